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
from ..io import find_images, load_image
from ..models import DEFAULT_MODEL, Model, load_model
from ..runner import parse_options

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
JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON document on stdout")]
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


def _load(
    model: str, arch: str | None, no_weights: bool, trust_pickle: bool, multilabel: bool, labels: Path | None
) -> Model:
    label_list = None
    if labels is not None:
        try:
            label_list = [line.strip() for line in labels.read_text(encoding="utf-8").splitlines() if line.strip()]
        except OSError as exc:
            raise InputError(f"cannot read labels file '{labels}': {exc.strerror}") from None
    return load_model(
        model,
        arch=arch,
        weights=not no_weights,
        trust_pickle=trust_pickle,
        multilabel=multilabel or None,
        labels=label_list,
    )


def _print_json(document: object) -> None:
    typer.echo(json.dumps(document, indent=2))


def _read_images(paths: list[Path]) -> tuple[list, list[str]]:
    files = find_images(paths)
    return [load_image(path) for path in files], [path.stem for path in files]


def _targets(values: list[str] | None, top_k: int | None) -> object:
    if values and top_k:
        raise InputError("give either --target or --top-k, not both")
    if values:
        parts = [part.strip() for value in values for part in value.split(";") if part.strip()]
        if len(parts) == 1 and parts[0].lower().startswith(("top", "positive")):
            return parts[0]
        return parts
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
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Top-k predictions with probabilities."""
    _state["quiet"] = quiet
    loaded = _load(model, arch, no_weights, trust_pickle, multilabel, labels)
    pictures, names = _read_images(images)
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
        _print_json({"model": loaded.name, "results": results})
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
    counterfactual: Annotated[bool, typer.Option("--counterfactual", help="negated gradients (Grad-CAM)")] = False,
    relu: Annotated[bool | None, typer.Option("--relu/--no-relu", help="clip negative map values")] = None,
    alpha: Annotated[float, typer.Option("--alpha", min=0.0, max=1.0)] = 0.5,
    colormap: Annotated[str | None, typer.Option("--colormap")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 8,
    option: OptionOpt = None,
    report: Annotated[bool, typer.Option("--report/--no-report", help="write report.html")] = True,
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
    loaded = _load(model, arch, no_weights, trust_pickle, multilabel, labels)
    pictures, names = _read_images(images)
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
        options={**parse_options(option or []), **_method_options(counterfactual, relu)},
    )
    _print_summary(summary, as_json)


@app.command()
def compare(
    image: Annotated[Path, typer.Argument(help="one image file")],
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
    loaded = _load(model, arch, no_weights, trust_pickle, False, None)
    picture = load_image(image)
    chosen = _targets(target, None) if target else f"top{top_k}"
    layer_list = [layer.strip() for layer in layers.split(",")] if layers else None
    figure, summary = compare_image(
        loaded,
        picture,
        image.stem,
        methods=names,
        target=chosen,
        layers=layer_list,
        options=parse_options(option or []),
        quiet=quiet,
    )
    path = _write_figure(figure, out / f"{image.stem}_compare.png", summary)
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
    option: OptionOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Does the map tell the truth? Deletion/insertion AUC, remove-the-evidence and keep-only-the-evidence."""
    from ..runner import faithfulness_report

    _state["quiet"] = quiet
    METHODS.get(method)
    loaded = _load(model, arch, False, False, False, None)
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
        options=parse_options(option or []),
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
) -> None:
    """The web page: upload an image, see the top-5, explain any class with any method."""
    try:
        import uvicorn

        from ..web import create_app
    except ImportError as exc:
        raise InputError(
            f"the web page needs the web extra ({exc.name} is missing): pip install 'cnnscope[web]'"
        ) from None
    application = create_app(model, running=running, waiting=waiting)
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


@app.command()
def layers(
    model: ModelOpt = DEFAULT_MODEL,
    arch: ArchOpt = None,
    no_weights: NoWeightsOpt = False,
    trust_pickle: TrustOpt = False,
    diagram: Annotated[
        Path | None, typer.Option("--diagram", help="also draw the data flow to this .svg or .png file")
    ] = None,
    depth: Annotated[int, typer.Option("--depth", min=0, help="diagram: open modules nested less deep")] = 0,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """The layer table: name, type, output shape, parameters; the default target layer; a diagram."""
    loaded = _load(model, arch, no_weights, trust_pickle, False, None)
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
def methods(as_json: JsonOpt = False) -> None:
    """The registered methods and their options."""
    rows = [
        {
            "name": name,
            "summary": cls.summary,
            "uses_layer": cls.uses_layer,
            "options": {k: v for k, v in cls.options.items()},
        }
        for name, cls in METHODS.items()
    ]
    if as_json:
        _print_json(rows)
        return
    for row in rows:
        options = ", ".join(f"{k}={v}" for k, v in row["options"].items())
        typer.echo(f"{row['name']:<12} {row['summary']}" + (f"  [{options}]" if options else ""))


@app.command()
def models(as_json: JsonOpt = False) -> None:
    """The zoo models that load offline (torchvision:NAME and model files work too)."""
    rows = [{"name": name, "description": entry.description} for name, entry in MODELS.items()]
    if as_json:
        _print_json(rows)
        return
    for row in rows:
        typer.echo(f"{row['name']:<20} {row['description']}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder")] = Path("cnnscope-out"),
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Explain the bundled sample photos with Grad-CAM and CAM: overlays and report.html in --out."""
    from ..samples import SAMPLES, sample_image

    _state["quiet"] = quiet
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


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    if _state["quiet"]:
        return
    if issubclass(category, CnnscopeWarning):
        sys.stderr.write(f"cnnscope: warning: {message}\n")
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def main(argv: list[str] | None = None) -> None:
    """Entry point of the console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    previous = warnings.showwarning
    warnings.showwarning = _show_warning
    try:
        # standalone mode: usage errors print click's message and exit 2; our errors come through here
        app(args=args, prog_name="cnnscope")
    except CnnscopeError as exc:
        if debug:
            raise
        sys.stderr.write(f"cnnscope: error: {exc}\n")
        sys.exit(2)
    except KeyboardInterrupt:
        sys.stderr.write("cnnscope: interrupted\n")
        sys.exit(130)
    except Exception as exc:
        if debug:
            raise
        sys.stderr.write(
            f"cnnscope: internal error: {type(exc).__name__}: {exc} "
            "(rerun with --debug for the traceback, and please report it)\n"
        )
        sys.exit(1)
    finally:
        warnings.showwarning = previous
