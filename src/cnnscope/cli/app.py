"""``cnnscope predict|explain|compare|faithfulness|serve|layers|labels|methods|models|demo`` (the
feature-visualization commands are in :mod:`cnnscope.cli.features`).

Every command takes ``--json`` (one JSON document on stdout) and ``-q``. Errors caused by input
are printed on one line (``cnnscope: error: ...``) with exit status 2; ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Annotated

import typer

from .. import __version__
from .._registry import METHODS, MODELS
from ..errors import CnnscopeError, CnnscopeWarning, InputError
from ..io import find_images, load_image, read_image
from ..models import DEFAULT_MODEL, Model, load_model
from ..models.loaders import RANDOM_WEIGHTS
from ..options import parse_pairs
from ..runner import Interrupted
from ..targets import parse_target_text

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    help="See what an image classifier looks at. Default model: ImageNet EfficientNet-Lite0 (offline).",
)

_state = {"quiet": False, "debug": False}

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="zoo name, torchvision:NAME or a model file")]
ArchOpt = Annotated[str | None, typer.Option("--arch", help="architecture of a state_dict file")]
NoWeightsOpt = Annotated[bool, typer.Option("--no-weights", help="architecture only, random weights")]
TrustOpt = Annotated[bool, typer.Option("--trust-pickle", help="allow unpickling a full-module file")]
MultiOpt = Annotated[bool, typer.Option("--multilabel", help="sigmoid scores (multi-label model)")]
LabelsOpt = Annotated[Path | None, typer.Option("--labels", help="text file, one class label per line")]
SizeOpt = Annotated[
    str | None,
    typer.Option("--size", help="model input size H[,W], or D,H,W for a volume (T,H,W for a clip)"),
]
MeanOpt = Annotated[
    str | None, typer.Option("--mean", help="normalization mean, one value per channel: R,G,B or one for grey")
]
StdOpt = Annotated[str | None, typer.Option("--std", help="normalization std, one value per channel (as --mean)")]
WindowOpt = Annotated[
    str | None, typer.Option("--window", help="LOW,HIGH: raw values mapped to [0, 1], clipped outside (CT, X-ray)")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON document on stdout")]
StrictOpt = Annotated[bool, typer.Option("--strict", help="an unreadable image is an error, not a skip")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="no progress or warnings")]
OptionOpt = Annotated[
    list[str] | None, typer.Option("--option", help="method option KEY=VALUE, e.g. steps=16; repeatable")
]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"cnnscope {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="show tracebacks")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True)] = False,
) -> None:
    _state["debug"] = debug


def _numbers(flag: str, text: str, *, integer: bool = False) -> tuple:
    values = []
    for part in text.replace(";", ",").split(","):
        try:
            values.append(int(part) if integer else float(part))
        except ValueError:
            kind = "whole numbers" if integer else "numbers"
            raise InputError(f"{flag} takes comma-separated {kind} (e.g. {flag} 224,224), got '{text}'") from None
    return tuple(values)


def _preprocess(base, size: str | None, mean: str | None, std: str | None, window: str | None = None):
    """The model's own preprocessing with --size, --mean and --std applied (None when none is given).
    --mean alone implies std 1 per channel, --std alone mean 0, so ``--mean 0 --std 1`` means one grey channel."""
    import dataclasses

    if size is None and mean is None and std is None and window is None:
        return None
    changes: dict = {}
    if size is not None:
        dims = _numbers("--size", size, integer=True)
        if len(dims) not in (1, 2, 3) or min(dims) < 1:
            raise InputError(f"--size takes H, H,W or D,H,W (positive whole numbers), got '{size}'")
        changes["size"] = (dims[0], dims[-1]) if len(dims) < 3 else dims
    if window is not None:
        bounds = _numbers("--window", window)
        if len(bounds) != 2 or not bounds[0] < bounds[1]:
            raise InputError(f"--window takes LOW,HIGH with LOW < HIGH (e.g. --window -1000,400), got '{window}'")
        changes["window"] = bounds
    if mean is not None or std is not None:
        means = _numbers("--mean", mean) if mean is not None else None
        stds = _numbers("--std", std) if std is not None else None
        count = len(means or stds)
        changes["mean"] = means if means is not None else (0.0,) * count
        changes["std"] = stds if stds is not None else (1.0,) * count
    return dataclasses.replace(base, **changes)


def _load(
    model: str,
    arch: str | None,
    no_weights: bool,
    trust_pickle: bool,
    multilabel: bool,
    labels: Path | None,
    size: str | None = None,
    mean: str | None = None,
    std: str | None = None,
    window: str | None = None,
) -> Model:
    label_list = None
    if labels is not None:
        try:
            label_list = [line.strip() for line in labels.read_text(encoding="utf-8").splitlines() if line.strip()]
        except OSError as exc:
            raise InputError(f"cannot read labels file '{labels}': {exc.strerror}") from None
    loaded = load_model(
        model,
        arch=arch,
        weights=not no_weights,
        trust_pickle=trust_pickle,
        multilabel=multilabel or None,
        labels=label_list,
    )
    if loaded.name.endswith(RANDOM_WEIGHTS) and not _state["quiet"]:  # torchvision:/timm: with --no-weights
        typer.echo(
            f"cnnscope: note: {model} runs with random weights (--no-weights): its maps show the architecture, "
            "not what a trained model looks at",
            err=True,
        )
    preprocess = _preprocess(loaded.preprocess, size, mean, std, window)
    return loaded if preprocess is None else load_model(loaded, preprocess=preprocess)


def _print_json(document: object) -> None:
    typer.echo(json.dumps(document, indent=2))


def _read_images(paths: list[Path], strict: bool = False, native: bool = False) -> tuple[list, list[str], list[dict]]:
    """The readable images among ``paths`` (folders expanded), their names, and the files skipped with
    the reason: an unreadable file does not stop the others (``--strict`` makes it an error), but nothing
    readable at all is an error. ``native``: as stored (grey, 16-bit, N channels; see ``read_image``) for a
    model's own preprocessing, else RGB uint8."""
    files = find_images(paths)
    pictures, names, skipped = [], [], []
    for path in files:
        try:
            pictures.append(read_image(path) if native else load_image(path))
            names.append(path.stem)
        except InputError as exc:
            if strict:
                raise
            skipped.append({"path": str(path), "reason": str(exc)})
    if not pictures:
        raise InputError(skipped[0]["reason"] if len(skipped) == 1 else f"none of the {len(skipped)} files is an image")
    if not _state["quiet"]:
        for entry in skipped:
            sys.stderr.write(f"cnnscope: skipped {entry['reason']}\n")
    return pictures, names, skipped


def _read_volumes(paths: list[Path], strict: bool = False, frames: int = 16) -> tuple[list, list[str], list[dict]]:
    """Volumes and clips for a 3-D model: NIfTI, ``.npy`` and TIFF-stack files, DICOM series folders, and video
    files, GIFs and folders of frames, sampled to the model's ``frames`` (T). A folder of volume or video files is
    expanded. Unreadable ones are skipped as ``_read_images`` skips images."""
    from ..io_volumes import CLIP_SUFFIXES, VOLUME_SUFFIXES, read_volume

    def is_volume_file(path: Path) -> bool:
        return path.is_file() and path.name.lower().endswith(VOLUME_SUFFIXES + CLIP_SUFFIXES)

    sources: list[Path] = []
    for path in paths:
        inside = sorted(p for p in path.iterdir() if is_volume_file(p)) if path.is_dir() else []
        sources.extend(inside or [path])
    volumes, names, skipped = [], [], []
    for path in sources:
        try:
            volumes.append(read_volume(path, frames=frames))
            names.append(path.name.split(".")[0] or path.name)
        except InputError as exc:
            if strict:
                raise
            skipped.append({"path": str(path), "reason": str(exc)})
    if not volumes:
        raise InputError(skipped[0]["reason"] if len(skipped) == 1 else f"none of the {len(skipped)} paths is a volume")
    if not _state["quiet"]:
        for entry in skipped:
            sys.stderr.write(f"cnnscope: skipped {entry['reason']}\n")
    return volumes, names, skipped


def _read_inputs(model: Model, paths: list[Path], strict: bool) -> tuple[list, list[str], list[dict]]:
    """Images, or volumes for a model whose input is 3-D (its first layer a Conv3d, or --size D,H,W)."""
    if model.preprocess.spatial_dims == 3:
        return _read_volumes(paths, strict, frames=model.preprocess.size[0])
    return _read_images(paths, strict, native=True)


def _targets(values: list[str] | None, top_k: int | None) -> object:
    if values and top_k:
        raise InputError("give either --target or --top-k, not both")
    if values:
        return parse_target_text(values)
    return f"top{top_k}" if top_k else "top1"


def _method_options(counterfactual: bool, relu: bool | None) -> dict:
    options: dict = {}
    if counterfactual:
        options["counterfactual"] = True
    if relu is not None:
        options["relu"] = relu
    return options


@app.command()
def predict(
    images: Annotated[list[Path], typer.Argument(help="image files or folders")],
    model: ModelOpt = DEFAULT_MODEL,
    top_k: Annotated[int, typer.Option("--top-k", "-k")] = 5,
    arch: ArchOpt = None,
    no_weights: NoWeightsOpt = False,
    trust_pickle: TrustOpt = False,
    multilabel: MultiOpt = False,
    labels: LabelsOpt = None,
    size: SizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    window: WindowOpt = None,
    strict: StrictOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Top-k predictions with probabilities."""
    _state["quiet"] = quiet
    loaded = _load(model, arch, no_weights, trust_pickle, multilabel, labels, size, mean, std, window)
    pictures, names, skipped = _read_inputs(loaded, images, strict)
    results = []
    for start in range(0, len(pictures), 16):
        for name, predictions in zip(
            names[start : start + 16], loaded.predict(pictures[start : start + 16], top_k), strict=True
        ):
            results.append(
                {
                    "image": name,
                    "predictions": [
                        {
                            "class_index": p.index,
                            "class_name": p.name,
                            "label": p.label,
                            "probability": round(p.probability, 6),
                        }
                        for p in predictions
                    ],
                }
            )
    if as_json:
        _print_json({"model": loaded.name, "results": results, "skipped": skipped})
        return
    for result in results:
        typer.echo(result["image"])
        for p in result["predictions"]:
            typer.echo(f"  {p['probability']:7.2%}  {p['class_index']:>5}  {p['label']}")


@app.command()
def explain(
    images: Annotated[list[Path], typer.Argument(help="image files or folders")],
    method: Annotated[
        list[str] | None, typer.Option("--method", help="method name (default gradcam); repeat or comma-separate")
    ] = None,
    target: Annotated[list[str] | None, typer.Option("--target", "-t", help="class index or name; repeatable")] = None,
    top_k: Annotated[int | None, typer.Option("--top-k", "-k", help="explain the top K classes")] = None,
    layer: Annotated[str | None, typer.Option("--layer", help="layer name (cnnscope layers)")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder")] = Path("cnnscope-out"),
    model: ModelOpt = DEFAULT_MODEL,
    arch: ArchOpt = None,
    no_weights: NoWeightsOpt = False,
    trust_pickle: TrustOpt = False,
    multilabel: MultiOpt = False,
    labels: LabelsOpt = None,
    size: SizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    window: WindowOpt = None,
    counterfactual: Annotated[bool, typer.Option("--counterfactual", help="negated gradients (Grad-CAM)")] = False,
    relu: Annotated[bool | None, typer.Option("--relu/--no-relu", help="clip negative map values")] = None,
    alpha: Annotated[float, typer.Option("--alpha", min=0.0, max=1.0)] = 0.5,
    colormap: Annotated[str | None, typer.Option("--colormap")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 8,
    option: OptionOpt = None,
    report: Annotated[bool, typer.Option("--report/--no-report", help="write report.html")] = True,
    strict: StrictOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Explain images: PNG overlays (and report.html) in the output folder."""
    _state["quiet"] = quiet
    methods = [m.strip() for value in method or ["gradcam"] for m in value.split(",") if m.strip()]
    for name in methods:
        METHODS.get(name)
    if colormap is not None:
        from ..render.colormaps import lookup_table

        lookup_table(colormap)
    loaded = _load(model, arch, no_weights, trust_pickle, multilabel, labels, size, mean, std, window)
    pictures, names, skipped = _read_inputs(loaded, images, strict)
    try:
        summary = _run(
            loaded,
            pictures,
            names,
            methods=methods,
            target=_targets(target, top_k),
            layer=layer,
            out_dir=out,
            report=report,
            batch_size=batch_size,
            alpha=alpha,
            colormap=colormap,
            options={**parse_pairs(option or []), **_method_options(counterfactual, relu)},
        )
    except Interrupted as stopped:
        stopped.summary["skipped"] = skipped
        _print_summary(stopped.summary, as_json)
        raise
    summary["skipped"] = skipped
    _print_summary(summary, as_json)


@app.command()
def compare(
    image: Annotated[Path, typer.Argument(help="one image file (or a volume or clip for a 3-D model)")],
    methods: Annotated[
        str, typer.Option("--methods", help="comma-separated methods (rows)")
    ] = "gradcam,gradcam++,scorecam,guided-gradcam,saliency,smoothgrad,ig",
    layers: Annotated[str | None, typer.Option("--layers", help="comma-separated layers (rows) for one method")] = None,
    top_k: Annotated[int, typer.Option("--top-k", "-k", help="columns: the top K classes")] = 3,
    target: Annotated[list[str] | None, typer.Option("--target", "-t", help="class index or name; repeatable")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder")] = Path("cnnscope-out"),
    model: ModelOpt = DEFAULT_MODEL,
    arch: ArchOpt = None,
    no_weights: NoWeightsOpt = False,
    trust_pickle: TrustOpt = False,
    multilabel: MultiOpt = False,
    labels: LabelsOpt = None,
    size: SizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    window: WindowOpt = None,
    option: OptionOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Several methods (or one method at several layers) side by side for the top classes: one grid PNG."""
    from ..runner import compare_image

    _state["quiet"] = quiet
    names = [m.strip() for m in methods.split(",") if m.strip()]
    for name in names:
        METHODS.get(name)
    loaded = _load(model, arch, no_weights, trust_pickle, multilabel, labels, size, mean, std, window)
    stem = image.stem
    if loaded.preprocess.spatial_dims == 3:  # a volume or clip, read as explain reads them
        pictures, stems, _ = _read_inputs(loaded, [image], strict=True)
        picture, stem = pictures[0], stems[0]
    else:
        picture = load_image(image)
    chosen = _targets(target, None) if target else f"top{top_k}"
    layer_list = [layer.strip() for layer in layers.split(",")] if layers else None
    figure, summary = compare_image(
        loaded,
        picture,
        stem,
        methods=names,
        target=chosen,
        layers=layer_list,
        options=parse_pairs(option or []),
        quiet=quiet,
    )
    path = _write_figure(figure, out / f"{stem}_compare.png", summary)
    if as_json:
        _print_json(summary)
        return
    for row in summary["rows"]:
        peaks = "  ".join(f"{m['class_name']} {tuple(m['peak'])}" for m in row["maps"])
        typer.echo(f"{row['row']:<28} {row['seconds']:7.3f} s  {peaks}")
    typer.echo(f"grid: {path}")


@app.command()
def faithfulness(
    image: Annotated[Path, typer.Argument(help="one image file")],
    method: Annotated[str, typer.Option("--method", help="the method whose map is checked")] = "gradcam",
    target: Annotated[str | None, typer.Option("--target", "-t", help="class index or name (default: top-1)")] = None,
    steps: Annotated[int, typer.Option("--steps", min=2, help="points on each curve")] = 50,
    fraction: Annotated[float, typer.Option("--fraction", min=0.001, max=0.999, help="share of the map removed")] = 0.1,
    fill: Annotated[str, typer.Option("--fill", help="what replaces removed evidence: grey, black, blur")] = "grey",
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder")] = Path("cnnscope-out"),
    model: ModelOpt = DEFAULT_MODEL,
    arch: ArchOpt = None,
    multilabel: MultiOpt = False,
    labels: LabelsOpt = None,
    size: SizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    option: OptionOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Does the map tell the truth? Deletion/insertion AUC, remove-the-evidence and keep-only-the-evidence."""
    from ..runner import faithfulness_report

    _state["quiet"] = quiet
    METHODS.get(method)
    loaded = _load(model, arch, False, False, multilabel, labels, size, mean, std)
    picture = load_image(image)
    figure, summary = faithfulness_report(
        loaded,
        picture,
        image.stem,
        method=method,
        target=target or "top1",
        steps=steps,
        fraction=fraction,
        fill=fill,
        options=parse_pairs(option or []),
        quiet=quiet,
    )
    path = _write_figure(figure, out / f"{image.stem}_{summary['method']}_faithfulness.png", summary)
    if as_json:
        _print_json(summary)
        return
    removed, kept = summary["remove_top"], summary["keep_top"]
    typer.echo(f"{summary['image']}: {summary['class_name']} ({summary['probability']:.1%}) by {summary['method']}")
    typer.echo(
        f"  deletion AUC {summary['deletion_auc']:.3f} (lower is better), insertion AUC "
        f"{summary['insertion_auc']:.3f} (higher is better)"
    )
    for name, baseline in summary["baselines"].items():
        typer.echo(
            f"  a {name.replace('_', ' ')} map: deletion {baseline['deletion_auc']:.3f}, insertion "
            f"{baseline['insertion_auc']:.3f}"
        )
    for curve, beaten in summary["beats_random"].items():
        if not beaten:
            typer.echo(f"  the {curve} curve does not beat the random maps: it says little about this map")
    after = removed["prediction_after"]
    typer.echo(
        f"  without the top {removed['fraction']:.0%}: {removed['probability_after']:.1%}, now "
        f"{after['class_name']} ({after['probability']:.1%})"
    )
    typer.echo(
        f"  the top {kept['fraction']:.0%} alone keeps {kept['confidence_kept']:.0%} of the confidence; "
        f"crop top-1 {kept['crop_top5'][0]['class_name']}"
    )
    typer.echo(f"curves: {path}")


@app.command()
def serve(
    model: ModelOpt = DEFAULT_MODEL,
    host: Annotated[str, typer.Option("--host", help="address to bind (loopback by default)")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535)] = 8000,
    running: Annotated[int, typer.Option("--running", min=1, help="explanations computed at once")] = 1,
    waiting: Annotated[int, typer.Option("--waiting", min=0, help="requests in line before 503")] = 4,
    allow_host: Annotated[
        list[str] | None,
        typer.Option(
            "--allow-host",
            help="another Host header to answer (name, name:port or *; repeatable): the loopback names and "
            "the address a request came in on are always answered, other names get 400 (DNS rebinding)",
        ),
    ] = None,
    allow_origin: Annotated[
        list[str] | None,
        typer.Option(
            "--allow-origin",
            help="another page origin whose POSTs are accepted (scheme://host[:port] or *; repeatable): "
            "by default only the server's own pages may post (403 otherwise)",
        ),
    ] = None,
    max_work: Annotated[
        int,
        typer.Option(
            "--max-work",
            min=1,
            help="forward-pass equivalents one explanation may cost (masks, samples, steps x targets); more is a 400",
        ),
    ] = 20_000,
) -> None:
    """The web page: upload an image, see the top-5, explain any class with any method."""
    try:
        import uvicorn

        from ..web import create_app
    except ImportError as exc:
        raise InputError(
            f"the web page needs the web extra ({exc.name} is missing): pip install 'cnnscope[web]'"
        ) from None
    hosts = list(allow_host or [])
    if host not in ("0.0.0.0", "::", ""):  # a name given to --host answers too
        hosts.append(host)
    try:
        application = create_app(
            model,
            running=running,
            waiting=waiting,
            allowed_hosts=hosts,
            allowed_origins=allow_origin or [],
            max_work=max_work,
        )
    except ValueError as exc:  # a malformed --allow-host or --allow-origin
        raise InputError(str(exc)) from None
    typer.echo(f"cnnscope: serving {model} on http://{host}:{port}/ (Ctrl-C to stop)", err=True)
    uvicorn.run(application, host=host, port=port, log_level="warning")


def _write_file(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path``, making its folder if needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _write_figure(figure, path: Path, summary: dict) -> Path:
    """Save a matplotlib figure as PNG and record its path in the command's summary."""
    from ..render.figure import figure_png

    summary["file"] = str(_write_file(path, figure_png(figure)))
    return path


def _run(model: Model, pictures: list, names: list[str], **kwargs) -> dict:
    from ..runner import explain_images

    kwargs["quiet"] = _state["quiet"]
    show = not _state["quiet"] and len(pictures) > kwargs.get("batch_size", 8)
    if not show:
        return explain_images(model, pictures, names, **kwargs)
    with typer.progressbar(length=len(pictures), label="explaining", file=sys.stderr) as bar:
        return explain_images(model, pictures, names, progress=bar.update, **kwargs)


def _print_summary(summary: dict, as_json: bool) -> None:
    if as_json:
        _print_json(summary)
        return
    for image in summary["images"]:
        top = image["top5"][0]
        typer.echo(f"{image['image']}: {top['class_name']} ({top['probability']:.1%})")
        for entry in image["explanations"]:
            where = entry["file"] or ""
            typer.echo(
                f"  {entry['method']:<10} {entry['class_name']:<24} {entry['probability']:7.2%}  "
                f"peak {tuple(entry['peak'])}  {where}"
            )
    if summary.get("report"):
        typer.echo(f"report: {summary['report']}")
    if summary.get("complete") is False:
        typer.echo(f"incomplete: interrupted after {len(summary['images'])} image(s)")


@app.command()
def layers(
    model: ModelOpt = DEFAULT_MODEL,
    arch: ArchOpt = None,
    no_weights: NoWeightsOpt = False,
    trust_pickle: TrustOpt = False,
    size: SizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    diagram: Annotated[
        Path | None, typer.Option("--diagram", help="also draw the data flow to this .svg or .png file")
    ] = None,
    depth: Annotated[int, typer.Option("--depth", min=0, help="diagram: open modules nested less deep")] = 0,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """The layer table: name, type, output shape, parameters; the default target layer; a diagram."""
    loaded = _load(model, arch, no_weights, trust_pickle, False, None, size, mean, std)
    if diagram is not None:
        from ..features.architecture import architecture

        if diagram.suffix.lower() not in (".svg", ".png"):
            raise InputError(f"--diagram needs a .svg or .png file name, got '{diagram}'")
        drawing = architecture(loaded, depth=depth)
        diagram.parent.mkdir(parents=True, exist_ok=True)
        drawing.save(str(diagram))
        if not quiet and not as_json:
            typer.echo(f"diagram: {diagram} ({len(drawing.nodes)} boxes for {drawing.layers} module calls)", err=True)
    if as_json:
        _print_json(
            {
                "model": loaded.name,
                "default_layer": loaded.default_layer().key,
                "layers": [
                    {
                        "name": row.key,
                        "module": row.name,
                        "type": row.type,
                        "call": row.call,
                        "calls": row.calls,
                        "output_shape": list(row.output_shape),
                        "params": row.params,
                    }
                    for row in loaded.layers()
                ],
            }
        )
        return
    typer.echo(loaded.summary())


@app.command(name="labels")
def labels_command(
    search: Annotated[str | None, typer.Argument(help="show only labels containing this text")] = None,
    model: ModelOpt = DEFAULT_MODEL,
    arch: ArchOpt = None,
    labels: LabelsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The model's class labels with their indices."""
    loaded = _load(model, arch, False, False, False, labels)
    rows = [(i, label) for i, label in enumerate(loaded.labels) if not search or search.lower() in label.lower()]
    if as_json:
        _print_json([{"class_index": i, "label": label} for i, label in rows])
        return
    for i, label in rows:
        typer.echo(f"{i:>5}  {label}")


@app.command()
def methods(
    name: Annotated[str | None, typer.Argument(help="one method: its options in full")] = None,
    as_json: JsonOpt = False,
    markdown: Annotated[bool, typer.Option("--markdown", help="the README's option table")] = False,
) -> None:
    """The registered methods and their typed options (type, default, allowed values, help)."""
    from ..methods import method_listing
    from ..options import markdown_table

    chosen = [(name, METHODS.get(name))] if name else list(METHODS.items())
    rows = method_listing(chosen)
    if markdown:
        typer.echo(markdown_table([(key, cls.options) for key, cls in chosen]))
        return
    if as_json:
        _print_json(rows)
        return
    for row in rows:
        typer.echo(f"{row['name']:<22} {row['summary']}")
        for key, option in row["options"].items():
            default = "auto" if option["default"] is None else option["default"]
            typer.echo(f"    {key}={default}  {option['range']}: {option['help']}")


@app.command()
def models(as_json: JsonOpt = False) -> None:
    """The zoo models that load offline (torchvision:NAME and model files work too)."""
    rows = [{"name": name, "description": entry.description} for name, entry in MODELS.items()]
    if as_json:
        _print_json(rows)
        return
    for row in rows:
        typer.echo(f"{row['name']:<20} {row['description']}")


DEMOS = ("photos", "audit", "training")


@app.command()
def demo(
    what: Annotated[
        str,
        typer.Argument(
            help="photos: explain the sample photos; audit: a Clever Hans model found in a dataset audit; "
            "training: the movie of two trainings, clean and with a spurious cue"
        ),
    ] = "photos",
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder")] = Path("cnnscope-out"),
    seed: Annotated[int, typer.Option("--seed", min=0, help="seed of the synthetic data and training")] = 0,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """The embedded demos, offline: the sample photos (overlays and report.html), an audit, a training movie."""
    from ..samples import SAMPLES, sample_image

    _state["quiet"] = quiet
    if what not in DEMOS:
        raise InputError(f"unknown demo {what!r}; choose one of {', '.join(DEMOS)}")
    if what != "photos":
        _extra_demo(what, out, seed, quiet, as_json)
        return
    loaded = load_model(DEFAULT_MODEL)
    pictures = [sample_image(name) for name in SAMPLES]
    summary = _run(
        loaded,
        pictures,
        list(SAMPLES),
        methods=["gradcam", "cam"],
        target="top1",
        out_dir=out,
        report=True,
        batch_size=len(pictures),
    )
    _print_summary(summary, as_json)


def _extra_demo(what: str, out: Path, seed: int, quiet: bool, as_json: bool) -> None:
    """``cnnscope demo audit`` and ``cnnscope demo training``: the synthetic shapes, a small CNN trained here."""
    try:
        if what == "audit":
            from ..audit import demo_audit
            from .audit import show_result

            show_result(demo_audit(out, seed=seed, quiet=quiet), as_json)
            return
        from ..training import demo_training

        summary = demo_training(out, seed=seed, quiet=quiet)
        if as_json:
            _print_json(summary)
        else:
            typer.echo(summary.get("text") or json.dumps(summary, indent=2))
    except ImportError as exc:
        extra = "audit" if what == "audit" else "video"
        raise InputError(
            f"the {what} demo needs the {extra} extra ({exc.name} is missing): pip install 'cnnscope[{extra}]'"
        ) from None


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    if _state["quiet"]:
        return
    if issubclass(category, CnnscopeWarning):
        sys.stderr.write(f"cnnscope: warning: {message}\n")
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


#: Exit status of a command stopped by Ctrl-C (128 + SIGINT), as typer reports it.
INTERRUPTED = 130
#: The exception of a wrong flag or argument (typer's vendored click UsageError; BadParameter is one).
USAGE_ERROR = typer.BadParameter.__mro__[1]


def _fail(message: str, kind: str, as_json: bool, code: int = 2) -> None:
    """One line on stderr, or with --json one JSON object ``{"error", "kind"}`` on stdout; then exit."""
    if as_json:
        sys.stdout.write(json.dumps({"error": message, "kind": kind}) + "\n")
    else:
        sys.stderr.write(f"cnnscope: error: {message}\n")
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    as_json = "--json" in args
    previous = warnings.showwarning
    warnings.showwarning = _show_warning
    try:
        result = app(args=args, prog_name="cnnscope", standalone_mode=False)
    except CnnscopeError as exc:
        if debug:
            raise
        _fail(str(exc), type(exc).__name__, as_json)
    except USAGE_ERROR as exc:  # a wrong flag or argument: typer's own words
        if as_json:
            _fail(exc.format_message(), "UsageError", True)
        exc.show()
        sys.exit(exc.exit_code)
    except (KeyboardInterrupt, typer.Abort):
        result = INTERRUPTED
    except Exception as exc:
        if debug:
            raise
        message = (
            f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback, and please report it)"
        )
        if as_json:
            _fail(message, "InternalError", True, code=1)
        sys.stderr.write(f"cnnscope: {message}\n")
        sys.exit(1)
    finally:
        warnings.showwarning = previous
    if result == INTERRUPTED:  # typer turns Ctrl-C into exit status 130
        sys.stderr.write("cnnscope: interrupted\n")
    sys.exit(result if isinstance(result, int) else 0)
