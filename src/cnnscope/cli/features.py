"""``cnnscope filters|activations|maximize|dream``: what the network has learned (registered on the
same typer app as the other commands)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import InputError
from ..io import load_image, safe_filename
from ..models import DEFAULT_MODEL
from .app import (
    ArchOpt,
    JsonOpt,
    ModelOpt,
    NoWeightsOpt,
    QuietOpt,
    TrustOpt,
    _load,
    _print_json,
    _state,
    _write_file,
    app,
)

OutOpt = Annotated[Path, typer.Option("--out", "-o", help="output folder")]
SeedOpt = Annotated[int, typer.Option("--seed", help="random seed; the same seed repeats the run exactly")]
NoFoldOpt = Annotated[
    bool, typer.Option("--no-fold-bn", help="run the model as it is (default: a copy with BatchNorms folded)")
]


@app.command()
def filters(
    layer: Annotated[str | None, typer.Option("--layer", help="a Conv2d (default: the first on the RGB input)")] = None,
    mode: Annotated[str | None, typer.Option("--mode", help="rgb, mean or channels")] = None,
    max_filters: Annotated[int, typer.Option("--max-filters", min=1)] = 256,
    out: OutOpt = Path("cnnscope-out"),
    model: ModelOpt = DEFAULT_MODEL,
    arch: ArchOpt = None,
    no_weights: NoWeightsOpt = False,
    trust_pickle: TrustOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """A convolution's kernels as a picture: the first layer in colour, deeper ones in grey."""
    from ..features.filters import filter_plate
    from ..render.overlay import png_bytes

    loaded = _load(model, arch, no_weights, trust_pickle, False, None)
    plate = filter_plate(loaded, layer, mode=mode, max_filters=max_filters)
    path = _write_file(out / f"filters_{safe_filename(plate.layer)}.png", png_bytes(plate.image))
    summary = {
        "layer": plate.layer,
        "kernel_shape": list(plate.weights.shape),
        "mode": plate.mode,
        "filters_shown": plate.shown,
        "file": str(path),
    }
    if as_json:
        _print_json(summary)
        return
    shape = "x".join(str(s) for s in plate.weights.shape)
    typer.echo(f"{plate.layer}: {shape} kernels, {plate.shown} drawn ({plate.mode}): {path}")


@app.command()
def activations(
    image: Annotated[Path, typer.Argument(help="one image file")],
    layer: Annotated[str | None, typer.Option("--layer", help="layer name (default: the default target layer)")] = None,
    top: Annotated[int, typer.Option("--top", min=1, help="label the N strongest channels")] = 16,
    out: OutOpt = Path("cnnscope-out"),
    model: ModelOpt = DEFAULT_MODEL,
    arch: ArchOpt = None,
    no_weights: NoWeightsOpt = False,
    trust_pickle: TrustOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Every channel of a layer for one image, sorted by mean activation, and the strongest over the image."""
    from ..features.activations import layer_activations
    from ..render.figure import figure_png
    from ..render.overlay import png_bytes

    loaded = _load(model, arch, no_weights, trust_pickle, False, None)
    result = layer_activations(loaded, load_image(image), layer)
    stem = f"{image.stem}_activations_{safe_filename(result.layer)}"
    grid = _write_file(out / f"{stem}.png", figure_png(result.figure(top)))
    strongest = _write_file(out / f"{stem}_strongest.png", png_bytes(result.overlay()))
    summary = {
        "image": image.stem,
        "layer": result.layer,
        "channels": int(result.maps.shape[0]),
        "map_size": list(result.maps.shape[1:]),
        "top": [{"channel": c, "mean": round(m, 6)} for c, m in result.top(top)],
        "files": [str(grid), str(strongest)],
    }
    if as_json:
        _print_json(summary)
        return
    typer.echo(f"{image.stem} at {result.layer}: {result.maps.shape[0]} channels; strongest:")
    for channel, mean in result.top(min(top, 5)):
        typer.echo(f"  channel {channel:<5} mean {mean:.3f}")
    typer.echo(f"grid: {grid}\nstrongest channel over the image: {strongest}")


@app.command()
def maximize(
    class_: Annotated[
        list[str] | None, typer.Option("--class", "-c", help="a class name or index to visualize; repeatable")
    ] = None,
    channel: Annotated[list[str] | None, typer.Option("--channel", help="LAYER:INDEX; repeatable")] = None,
    neuron: Annotated[list[str] | None, typer.Option("--neuron", help="LAYER:INDEX (centre unit); repeatable")] = None,
    objective: Annotated[
        list[str] | None,
        typer.Option("--objective", help="e.g. 'class:goldfish + 0.5*channel:_blocks.10:3'; repeatable"),
    ] = None,
    steps: Annotated[int, typer.Option("--steps", min=0)] = 256,
    lr: Annotated[float, typer.Option("--lr", min=0.0)] = 0.05,
    size: Annotated[int | None, typer.Option("--size", min=8, help="image side (default: the model's input)")] = None,
    param: Annotated[str, typer.Option("--param", help="fourier or pixel")] = "fourier",
    tv: Annotated[float, typer.Option("--tv", min=0.0, help="total-variation weight")] = 0.0,
    l2: Annotated[float, typer.Option("--l2", min=0.0, help="L2 weight")] = 0.0,
    no_transforms: Annotated[bool, typer.Option("--no-transforms", help="plain gradient ascent")] = False,
    jitter: Annotated[float, typer.Option("--jitter", min=0.0, help="largest shift in pixels")] = 8.0,
    rotate: Annotated[float, typer.Option("--rotate", min=0.0, help="largest rotation in degrees")] = 10.0,
    scale: Annotated[str, typer.Option("--scale", help="zoom range LOW,HIGH")] = "0.9,1.1",
    crop: Annotated[float, typer.Option("--crop", min=0.01, max=1.0, help="smallest random crop (1: none)")] = 1.0,
    colour: Annotated[float, typer.Option("--colour", min=0.0, help="largest relative colour gain change")] = 0.0,
    copies: Annotated[int, typer.Option("--copies", min=1, help="images per objective")] = 1,
    diversity: Annotated[
        float, typer.Option("--diversity", min=0.0, help="push the copies apart (weight, e.g. 10; needs --copies)")
    ] = 0.0,
    diversity_layer: Annotated[
        str | None, typer.Option("--diversity-layer", help="layer the copies are compared at")
    ] = None,
    snapshot: Annotated[
        list[int] | None, typer.Option("--snapshot", help="also save the plate after this step; repeatable")
    ] = None,
    no_fold_bn: NoFoldOpt = False,
    seed: SeedOpt = 0,
    out: OutOpt = Path("cnnscope-out"),
    model: ModelOpt = DEFAULT_MODEL,
    arch: ArchOpt = None,
    no_weights: NoWeightsOpt = False,
    trust_pickle: TrustOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Activation maximization: one image per class/channel/neuron/objective, optimized in one batch."""
    from ..features import maximize as run_maximize
    from ..features.transforms import Transforms
    from ..render.figure import figure_png
    from ..render.overlay import png_bytes

    _state["quiet"] = quiet
    specs = (
        [f"class:{c}" for c in class_ or []]
        + [f"channel:{c}" for c in channel or []]
        + [f"neuron:{c}" for c in neuron or []]
        + list(objective or [])
    )
    if not specs:
        raise InputError("nothing to maximize: give --class, --channel, --neuron or --objective")
    try:
        low, high = (float(part) for part in scale.split(","))
    except ValueError:
        raise InputError(f"--scale needs two numbers LOW,HIGH such as 0.9,1.1; got {scale!r}") from None
    transforms = (
        Transforms.none()
        if no_transforms
        else Transforms(jitter=jitter, rotate=rotate, scale=(low, high), crop=crop, colour=colour)
    )
    loaded = _load(model, arch, no_weights, trust_pickle, False, None)
    result = run_maximize(
        loaded,
        specs,
        size=size,
        param=param,
        steps=steps,
        lr=lr,
        transforms=transforms,
        tv=tv,
        l2=l2,
        seed=seed,
        copies=copies,
        diversity=diversity,
        diversity_layer=diversity_layer,
        snapshots=snapshot or (),
        fold_bn=not no_fold_bn,
        quiet=quiet,
    )
    plate = _write_file(out / "maximize.png", figure_png(result.figure()))
    files = [str(plate)]
    for step in result.snapshots:
        files.append(str(_write_file(out / f"maximize_step{step}.png", figure_png(result.figure(step=step)))))
    for index, (name, picture) in enumerate(zip(result.objectives, result.images, strict=True)):
        files.append(str(_write_file(out / f"maximize_{index}_{safe_filename(name)}.png", png_bytes(picture))))
    summary = {
        "objectives": [
            {
                "objective": name,
                "start": round(start, 6),
                "final": round(final, 6),
                "top1": {"class_index": top[0].index, "class_name": top[0].name, "probability": top[0].probability},
            }
            for name, start, final, top in zip(
                result.objectives, result.start, result.final, result.predictions, strict=True
            )
        ],
        "seconds": round(result.stats["seconds"], 3),
        "iterations_per_second": round(result.stats["iterations_per_second"], 3),
        "stopped_early": result.stats["stopped_early"],
        "batchnorm_folded": result.stats["batchnorm_folded"],
        **{key: round(result.stats[key], 4) for key in ("similarity_start", "similarity_final") if key in result.stats},
        "files": files,
    }
    if as_json:
        _print_json(summary)
        return
    for entry in summary["objectives"]:
        top = entry["top1"]
        typer.echo(
            f"{entry['objective']:<32} {entry['start']:9.3f} -> {entry['final']:9.3f}   "
            f"seen as {top['class_name']} ({top['probability']:.1%})"
        )
    if "similarity_final" in summary:
        typer.echo(
            f"similarity of the copies at {result.options['diversity_layer']}: "
            f"{summary['similarity_start']:.3f} -> {summary['similarity_final']:.3f} (lower: more diverse)"
        )
    typer.echo(f"plate: {plate}")


@app.command()
def dream(
    image: Annotated[Path, typer.Argument(help="one image file")],
    layer: Annotated[str | None, typer.Option("--layer", help="layer name (default: a middle layer)")] = None,
    channels: Annotated[
        str, typer.Option("--channels", help="e.g. 0-24 or 3,5,7 (one image each); 'all' for the whole layer")
    ] = "0-24",
    together: Annotated[bool, typer.Option("--together", help="one image for all the channels")] = False,
    octaves: Annotated[int, typer.Option("--octaves", min=1)] = 4,
    octave_scale: Annotated[float, typer.Option("--octave-scale", min=1.01)] = 1.4,
    iterations: Annotated[int, typer.Option("--iterations", min=0, help="steps per octave")] = 10,
    step: Annotated[float, typer.Option("--step", min=0.0)] = 0.01,
    no_fold_bn: NoFoldOpt = False,
    seed: SeedOpt = 0,
    out: OutOpt = Path("cnnscope-out"),
    model: ModelOpt = DEFAULT_MODEL,
    arch: ArchOpt = None,
    no_weights: NoWeightsOpt = False,
    trust_pickle: TrustOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Deep Dream: amplify channels of a layer in a photo over an image pyramid; a plate of one image per channel."""
    from ..features.dream import deep_dream
    from ..render.figure import figure_png

    _state["quiet"] = quiet
    loaded = _load(model, arch, no_weights, trust_pickle, False, None)
    result = deep_dream(
        loaded,
        load_image(image),
        layer,
        None if channels.strip().lower() == "all" else channels,
        together=together,
        octaves=octaves,
        octave_scale=octave_scale,
        iterations=iterations,
        step=step,
        seed=seed,
        fold_bn=not no_fold_bn,
        quiet=quiet,
    )
    path = _write_file(out / f"{image.stem}_dream_{safe_filename(result.layer)}.png", figure_png(result.figure()))
    summary = {
        "image": image.stem,
        "layer": result.layer,
        "batchnorm_folded": result.stats["batchnorm_folded"],
        "images": [
            {"channels": chs, "before": round(b, 6), "after": round(a, 6)}
            for chs, b, a in zip(result.channels, result.before, result.after, strict=True)
        ],
        "seconds": round(result.stats["seconds"], 3),
        "file": str(path),
    }
    if as_json:
        _print_json(summary)
        return
    raised = sum(a > b for a, b in zip(result.after, result.before, strict=True))
    typer.echo(f"{image.stem} at {result.layer}: {raised}/{len(result.after)} objectives raised; plate: {path}")


def _top5_json(predictions) -> list[dict]:
    return [{"class_index": p.index, "class_name": p.name, "probability": p.probability} for p in predictions]


@app.command()
def impressions(
    class_: Annotated[
        list[str] | None, typer.Option("--class", "-c", help="a class name or index; one impression each; repeatable")
    ] = None,
    fuse: Annotated[
        list[str] | None,
        typer.Option("--fuse", help="classes joined by '+' for one fused (negative) image, e.g. 'goldfish+tench'"),
    ] = None,
    steps: Annotated[int, typer.Option("--steps", min=0)] = 128,
    lr: Annotated[float, typer.Option("--lr", min=0.0)] = 0.05,
    size: Annotated[int | None, typer.Option("--size", min=8, help="image side (default: the model's input)")] = None,
    param: Annotated[str, typer.Option("--param", help="fourier or pixel")] = "fourier",
    focus: Annotated[
        float, typer.Option("--focus", min=0.0, help="weight of the class evidence in the main region (focus term)")
    ] = 6.0,
    outside: Annotated[
        float, typer.Option("--outside", min=0.0, help="weight of the penalty on class evidence outside it")
    ] = 3.0,
    grow: Annotated[int, typer.Option("--grow", min=0, help="cells the main region grows by before the penalty")] = 1,
    focus_weights: Annotated[
        str,
        typer.Option(
            "--focus-weights", help="fill (the region's weak cells most), saliency (by saliency) or region (evenly)"
        ),
    ] = "fill",
    background: Annotated[
        float, typer.Option("--background", min=0.0, help="weight of the pull towards a plain background outside it")
    ] = 5.0,
    layer: Annotated[
        str | None, typer.Option("--layer", help="the Grad-CAM layer (default: the default target layer)")
    ] = None,
    no_baseline: Annotated[bool, typer.Option("--no-baseline", help="skip plain maximize beside each image")] = False,
    snapshot: Annotated[
        list[int] | None, typer.Option("--snapshot", help="also save the plate after this step; repeatable")
    ] = None,
    no_fold_bn: NoFoldOpt = False,
    seed: SeedOpt = 0,
    out: OutOpt = Path("cnnscope-out"),
    model: ModelOpt = DEFAULT_MODEL,
    arch: ArchOpt = None,
    no_weights: NoWeightsOpt = False,
    trust_pickle: TrustOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Class impressions: the one object the model has in mind for a class (saliency-driven, after Addepalli
    et al. 2020), beside plain maximize, with fused images; each with its top-5."""
    from ..features.impressions import class_impressions
    from ..render.figure import figure_png
    from ..render.overlay import png_bytes

    _state["quiet"] = quiet
    if not class_ and not fuse:
        raise InputError("nothing to draw: give --class (repeatable) and/or --fuse 'goldfish+tench'")
    loaded = _load(model, arch, no_weights, trust_pickle, False, None)
    result = class_impressions(
        loaded,
        list(class_ or []),
        fuse=list(fuse or []),
        size=size,
        param=param,
        steps=steps,
        lr=lr,
        focus=focus,
        outside=outside,
        grow=grow,
        focus_weights=focus_weights,
        background=background,
        layer=layer,
        seed=seed,
        baseline=not no_baseline,
        snapshots=snapshot or (),
        fold_bn=not no_fold_bn,
        quiet=quiet,
    )
    plate = _write_file(out / "impressions.png", figure_png(result.figure()))
    snapshots = [
        str(_write_file(out / f"impressions_step{step}.png", figure_png(result.figure(step=step))))
        for step in result.snapshots
    ]
    images = []
    for row, (index, name) in enumerate(zip(result.classes, result.names, strict=True)):
        stem = f"{row}_{safe_filename(name)}"
        path = _write_file(out / f"impression_{stem}.png", png_bytes(result.images[row]))
        entry = {
            "class": name,
            "class_index": index,
            "path": str(path),
            "probability": result.probabilities[row],
            "regions": result.regions[row],
            "largest_share": round(result.largest_share[row], 6),
            "top5": _top5_json(result.predictions[row]),
            "baseline": None,
        }
        if result.baseline is not None:
            base = _write_file(out / f"maximize_{stem}.png", png_bytes(result.baseline.images[row]))
            entry["baseline"] = {
                "path": str(base),
                "probability": result.baseline_probabilities[row],
                "regions": result.baseline_regions[row],
                "largest_share": round(result.baseline_share[row], 6),
                "top5": _top5_json(result.baseline.predictions[row]),
            }
        images.append(entry)
    fused = []
    for number, group in enumerate(result.fused):
        row = len(result.classes) + number
        names = [result.options["labels"][c] for c in group]
        path = _write_file(out / f"fused_{number}_{safe_filename('+'.join(names))}.png", png_bytes(result.images[row]))
        fused.append(
            {
                "classes": names,
                "class_indices": list(group),
                "path": str(path),
                "top5": _top5_json(result.predictions[row]),
            }
        )
    summary = {
        "images": images,
        "fused": fused,
        "plate": str(plate),
        "snapshots": snapshots,
        "steps": steps,
        "seed": seed,
        "layer": result.options["layer"],
        "seconds": round(result.stats["seconds"], 3),
        "iterations_per_second": round(result.stats["iterations_per_second"], 3),
        "stopped_early": result.stats["stopped_early"],
        "batchnorm_folded": result.stats["batchnorm_folded"],
    }
    if as_json:
        _print_json(summary)
        return

    def described(entry: dict) -> str:
        return f"p={entry['probability']:.3f}  {entry['regions']} region(s), main {entry['largest_share']:.0%}"

    for entry in images:
        line = f"{entry['class']:<24} {described(entry)}"
        if entry["baseline"] is not None:
            line += f"   plain maximize: {described(entry['baseline'])}"
        typer.echo(line)
    for entry in fused:
        top = ", ".join(f"{p['class_name']} {p['probability']:.1%}" for p in entry["top5"])
        typer.echo(f"fused {'+'.join(entry['classes'])}: {top}")
    typer.echo(f"plate: {plate}")
