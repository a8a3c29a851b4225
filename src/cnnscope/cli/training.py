"""``cnnscope movie|compare-models``: the movie of a recorded training run, and two models' maps compared
(registered on the same typer app as the other commands)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .._registry import METHODS
from ..errors import InputError
from ..options import parse_pairs
from .app import (
    JsonOpt,
    MultiOpt,
    NoWeightsOpt,
    OptionOpt,
    QuietOpt,
    TrustOpt,
    _load,
    _print_json,
    _read_images,
    _state,
    app,
)

OutOpt = Annotated[Path, typer.Option("--out", "-o", help="output folder")]
#: Per-model options of compare-models: given once, they apply to both models; given twice, the first to the
#: first --model and the second to the second; "-" means "the model's own".
PER_MODEL = "given once: both models; twice: one per --model, in order ('-': the model's own)"


@app.command()
def movie(
    run: Annotated[Path, typer.Argument(help="the folder a Recorder wrote (its out=)")],
    out: OutOpt = Path("cnnscope-movie"),
    fps: Annotated[float, typer.Option("--fps", min=0.1, max=60.0, help="frames (epochs) per second")] = 2.0,
    mp4: Annotated[bool, typer.Option("--mp4/--no-mp4", help="write MP4s (needs cnnscope[video])")] = True,
    gif: Annotated[bool, typer.Option("--gif/--no-gif", help="write GIFs")] = True,
    alpha: Annotated[float, typer.Option("--alpha", min=0.0, max=1.0, help="opacity of the map")] = 0.5,
    colormap: Annotated[str | None, typer.Option("--colormap")] = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """The movie of a recorded training run: per probe an MP4 and a GIF (the map, the epoch, the top-3 bars),
    movie.html with an epoch slider, and focus.png (share of the map on the object) where masks are known."""
    from ..training.movie import render_run

    _state["quiet"] = quiet
    if colormap is not None:
        from ..render.colormaps import lookup_table

        lookup_table(colormap)
    summary = render_run(run, out, mp4=mp4, gif=gif, fps=fps, alpha=alpha, colormap=colormap)
    if as_json:
        _print_json(summary)
        return
    epochs = summary["epochs"]
    typer.echo(f"{len(summary['probes'])} probes x {len(epochs)} epochs ({epochs[0]} to {epochs[-1]}) -> {out}")
    for probe in summary["probes"]:
        focus = [value for value in probe["focus"] if value is not None]
        track = f"  on object {focus[0]:.0%} -> {focus[-1]:.0%}" if focus else ""
        files = "  ".join(Path(probe[key]).name for key in ("mp4", "gif") if key in probe)
        typer.echo(f"  {probe['name']:<24}{track}  {files}")
    if "html" in summary:
        typer.echo(f"page: {summary['html']}")


def _per_model(flag: str, values: list[str] | None) -> tuple[str | None, str | None]:
    if not values:
        return None, None
    if len(values) > 2:
        raise InputError(f"{flag} is given {len(values)} times; give it once (both models) or twice (one per --model)")
    chosen = [None if value.strip() == "-" else value for value in values]
    return (chosen[0], chosen[0]) if len(chosen) == 1 else (chosen[0], chosen[1])


@app.command(name="compare-models")
def compare_models_command(
    images: Annotated[list[Path], typer.Argument(help="image files or folders")],
    model: Annotated[
        list[str], typer.Option("--model", "-m", help="zoo name, torchvision:NAME or a model file; exactly twice")
    ],
    method: Annotated[str, typer.Option("--method", help="the method run on both models")] = "gradcam",
    target: Annotated[
        str, typer.Option("--target", "-t", help="top1 (each model its own top class), or a class index or name")
    ] = "top1",
    layer: Annotated[list[str] | None, typer.Option("--layer", help=f"the layer; {PER_MODEL}")] = None,
    top: Annotated[float, typer.Option("--top", min=0.001, max=1.0, help="share of pixels in the top region")] = 0.2,
    out: OutOpt = Path("cnnscope-out"),
    arch: Annotated[list[str] | None, typer.Option("--arch", help=f"architecture of a state_dict; {PER_MODEL}")] = None,
    size: Annotated[list[str] | None, typer.Option("--size", help=f"model input size H[,W]; {PER_MODEL}")] = None,
    mean: Annotated[list[str] | None, typer.Option("--mean", help=f"normalization mean; {PER_MODEL}")] = None,
    std: Annotated[list[str] | None, typer.Option("--std", help=f"normalization std; {PER_MODEL}")] = None,
    labels: Annotated[list[str] | None, typer.Option("--labels", help=f"labels file; {PER_MODEL}")] = None,
    no_weights: NoWeightsOpt = False,
    trust_pickle: TrustOpt = False,
    multilabel: MultiOpt = False,
    option: OptionOpt = None,
    report: Annotated[bool, typer.Option("--report/--no-report", help="write models.html")] = True,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Two models' maps of the same images side by side, each model with its own preprocessing and layer: per
    image the Pearson and rank correlations, the IoU of the top regions, the sign agreement, a difference map
    and whether the top-1 classes agree; the most disagreeing image first."""
    from ..training.compare import compare_models

    _state["quiet"] = quiet
    if len(model) != 2:
        raise InputError(f"compare-models takes --model exactly twice (A and B); got {len(model)}")
    METHODS.get(method)
    per_model = {
        name: _per_model(flag, values)
        for name, flag, values in (
            ("layer", "--layer", layer),
            ("arch", "--arch", arch),
            ("size", "--size", size),
            ("mean", "--mean", mean),
            ("std", "--std", std),
            ("labels", "--labels", labels),
        )
    }
    loaded = []
    for index, name in enumerate(model):
        label_file = per_model["labels"][index]
        loaded.append(
            _load(
                name,
                per_model["arch"][index],
                no_weights,
                trust_pickle,
                multilabel,
                Path(label_file) if label_file else None,
                per_model["size"][index],
                per_model["mean"][index],
                per_model["std"][index],
            )
        )
    pictures, names, skipped = _read_images(images)
    result = compare_models(
        loaded[0],
        loaded[1],
        pictures,
        method=method,
        target=target.strip() if target.strip().lower().startswith("top") else _class(target),
        layer_a=per_model["layer"][0],
        layer_b=per_model["layer"][1],
        top=top,
        names=names,
        **parse_pairs(option or []),
    )
    files = [str(path) for path in result.save(out, report=report)]
    summary = result.to_json()
    for row, path in zip(summary["images"], files, strict=False):
        row["file"] = path
    summary["files"] = files
    summary["skipped"] = skipped
    if as_json:
        _print_json(summary)
        return
    typer.echo(f"A = {summary['model_a']} ({summary['layer_a']}), B = {summary['model_b']} ({summary['layer_b']})")
    for row in summary["images"]:

        def show(value) -> str:
            return "  n/a" if value is None else f"{value:5.2f}"

        agree = "same top-1" if row["top1_agree"] else "top-1 differs"
        typer.echo(
            f"  {row['image']:<20} r {show(row['pearson'])}  rho {show(row['rank_correlation'])}  "
            f"top-IoU {show(row['top_iou'])}  sign {show(row['sign_agreement'])}  "
            f"{agree} ({row['a']['top1']['class_name']} / {row['b']['top1']['class_name']})"
        )
    if report:
        typer.echo(f"report: {files[-1]}")


def _class(text: str) -> object:
    text = text.strip()
    return int(text) if text.lstrip("-").isdigit() else text
