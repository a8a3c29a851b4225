"""``cnnscope evaluate IMAGES_OR_DATA``: which method should I trust on this model? A method x metric table
(pointing game, energy in the object, deletion/insertion, ROAD, sparsity, constant maps) beside centre and
random-map baselines, and with ``--sanity`` the model-randomization checks; ``--demo`` measures every method
on synthetic shapes with known object masks (the README's table)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ..errors import InputError
from ..models import DEFAULT_MODEL
from ..options import parse_pairs
from .app import (
    ArchOpt,
    JsonOpt,
    LabelsOpt,
    MeanOpt,
    ModelOpt,
    NoWeightsOpt,
    OptionOpt,
    QuietOpt,
    SizeOpt,
    StdOpt,
    TrustOpt,
    _load,
    _print_json,
    _state,
    app,
)


def _fractions(text: str) -> list[float]:
    if text.strip().lower() in ("none", "off", ""):
        return []
    try:
        return [float(part) for part in text.replace(";", ",").split(",") if part.strip()]
    except ValueError:
        raise InputError(f"--road-fractions takes numbers between 0 and 1 separated by commas, got '{text}'") from None


@app.command(name="evaluate")
def evaluate_command(
    data: Annotated[
        list[Path] | None,
        typer.Argument(help="image files, a folder of images or of class folders, or a CSV of path,label[,mask|box]"),
    ] = None,
    methods: Annotated[str, typer.Option("--methods", help="'all' or a comma list (cnnscope methods)")] = "all",
    masks: Annotated[
        Path | None, typer.Option("--masks", help="folder of object masks mirroring the images (nonzero = object)")
    ] = None,
    boxes: Annotated[Path | None, typer.Option("--boxes", help="CSV of path,x0,y0,x1,y1 object boxes (pixels)")] = None,
    sanity: Annotated[bool, typer.Option("--sanity", help="cascading model-randomization sanity check")] = False,
    independent: Annotated[
        bool, typer.Option("--independent", help="with --sanity: also randomize one stage at a time")
    ] = False,
    sanity_images: Annotated[int, typer.Option("--sanity-images", min=1, help="images used by --sanity")] = 8,
    shuffled_model: Annotated[
        str | None,
        typer.Option("--shuffled-model", help="the same architecture trained on shuffled labels (data randomization)"),
    ] = None,
    target: Annotated[
        str, typer.Option("--target", "-t", help="label (the image's class when the data has one) or top1")
    ] = "label",
    steps: Annotated[int, typer.Option("--steps", min=2, help="points on the deletion and insertion curves")] = 20,
    road_fractions: Annotated[
        str,
        typer.Option("--road-fractions", help="shares of pixels ROAD removes, comma separated; none: no ROAD"),
    ] = "0.1,0.3,0.5,0.7,0.9",
    tolerance: Annotated[
        float, typer.Option("--tolerance", min=0.0, help="pointing-game tolerance in pixels at 224 px (scaled)")
    ] = 15.0,
    limit: Annotated[
        int | None, typer.Option("--limit", min=1, help="evaluate at most N images, spread evenly")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", min=0, help="seed of the random baselines, ROAD noise, stages")] = 0,
    max_seconds: Annotated[
        float | None, typer.Option("--max-seconds", min=0.0, help="stop after this long, keeping what was scored")
    ] = None,
    option: OptionOpt = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="folder for report.html and evaluation.json")] = Path(
        "cnnscope-evaluate"
    ),
    report: Annotated[bool, typer.Option("--report/--no-report", help="write report.html")] = True,
    demo: Annotated[
        bool, typer.Option("--demo", help="every method on synthetic shapes with masks, a small CNN trained here")
    ] = False,
    images: Annotated[int | None, typer.Option("--images", min=1, help="with --demo: held-out images (100)")] = None,
    markdown: Annotated[bool, typer.Option("--markdown", help="print the table as Markdown (the README's)")] = False,
    model: ModelOpt = DEFAULT_MODEL,
    arch: ArchOpt = None,
    no_weights: NoWeightsOpt = False,
    trust_pickle: TrustOpt = False,
    labels: LabelsOpt = None,
    size: SizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Which method should I trust on this model? Every method x every metric on the same images, beside
    centre and random-map baselines; --sanity adds the model-randomization checks."""
    from ..evaluate import demo_evaluate, evaluate, markdown_table, write_report

    _state["quiet"] = quiet
    options = parse_pairs(option or [])
    silent = quiet or as_json or markdown
    if demo:
        if data:
            raise InputError("--demo makes its own data; give either --demo or IMAGES_OR_DATA, not both")
        result = demo_evaluate(
            methods=methods, images=images, sanity=True, options=options, max_seconds=max_seconds, quiet=silent
        )
        evaluated = None
    else:
        if not data:
            raise InputError("give images, a folder or a CSV to evaluate on (or --demo)")
        if masks is not None and boxes is not None:
            raise InputError("give --masks or --boxes, not both")
        loaded = _load(model, arch, no_weights, trust_pickle, False, labels, size, mean, std)
        shuffled = (
            _load(shuffled_model, arch, no_weights, trust_pickle, False, labels, size, mean, std)
            if shuffled_model
            else None
        )
        if shuffled is not None and not sanity:
            raise InputError("--shuffled-model is part of the sanity check: add --sanity")
        result = evaluate(
            loaded,
            [str(p) for p in data],
            methods=methods,
            masks=masks,
            boxes=boxes,
            target=target,
            options=options,
            steps=steps,
            fractions=_fractions(road_fractions),
            tolerance=tolerance,
            sanity=sanity,
            sanity_images=sanity_images,
            independent=independent,
            shuffled_model=shuffled,
            seed=seed,
            limit=limit,
            max_seconds=max_seconds,
            quiet=silent,
        )
        evaluated = loaded
    out.mkdir(parents=True, exist_ok=True)
    (out / "evaluation.json").write_text(json.dumps(result.to_json(), indent=1))
    page = write_report(result, out / "report.html", model=evaluated) if report else None
    if as_json:
        _print_json(result.to_json())
        return
    if markdown:
        typer.echo(markdown_table(result))
        return
    typer.echo(_text_table(result))
    for entry in result.methods:
        if entry["not_better_than_random"]:
            typer.echo(
                f"  {entry['name']}: not better than a random map on {', '.join(entry['not_better_than_random'])}"
            )
    for entry in result.failed:
        typer.echo(f"  {entry['name']}: left out: {entry['reason']}")
    if not result.complete:
        typer.echo(f"stopped after {result.images} image(s) (--max-seconds); the table covers those")
    typer.echo(f"{result.images} image(s) in {result.seconds:.1f} s; {out / 'evaluation.json'}")
    if page is not None:
        typer.echo(f"report: {page}")


def _text_table(result) -> str:
    from ..evaluate.run import METRICS

    short = {
        "pointing_game": "point",
        "energy_pointing_game": "energy",
        "deletion_auc": "del",
        "insertion_auc": "ins",
        "road_morf": "morf",
        "road_lerf": "lerf",
        "gini": "gini",
        "constant_fraction": "const",
    }
    header = f"{'method':<22}" + "".join(f"{short[m]:>9}" for m in METRICS) + f"{'rand':>9}"
    lines = [header]

    def row(name: str, metrics: dict, sanity: list | None) -> str:
        cells = "".join(f"{'-':>9}" if metrics[m] is None else f"{metrics[m]:>9.3f}" for m in METRICS)
        last = f"{sanity[-1]['spearman_abs']:>9.3f}" if sanity else f"{'-':>9}"
        return f"{name:<22}{cells}{last}"

    for entry in result.methods:
        lines.append(row(entry["name"], entry["metrics"], entry.get("sanity")))
    for name, entry in result.baselines.items():
        lines.append(row(f"({name})", entry["metrics"], None))
    return "\n".join(lines)
