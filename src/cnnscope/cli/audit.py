"""``cnnscope audit DATA``: where the model looks over a whole dataset, class by class, and which classes are
right for the wrong reason (registered on the same typer app as the other commands)."""

from __future__ import annotations

import json
import sys
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

MapOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--map",
        help="dataset label -> model label: FOLDER=LABEL (FOLDER=- leaves it out), or a JSON file of them; repeatable",
    ),
]

EngineOpt = Annotated[
    str,
    typer.Option("--engine", help="local (in this process) or ray (a Ray Data actor pool; needs the ray extra)"),
]
AddressOpt = Annotated[
    str | None, typer.Option("--address", help="Ray cluster address (ray://HOST:10001 or auto); default: a local Ray")
]
ActorsOpt = Annotated[
    int | None, typer.Option("--actors", min=1, help="Ray actors, each holding the model once (default: one per CPU)")
]
GpusOpt = Annotated[float, typer.Option("--gpus", min=0.0, help="GPUs per Ray actor (num_gpus; 0: CPU)")]


def parse_mapping(values: list[str] | None) -> dict[str, str | None]:
    """``--map`` values: ``NAME=LABEL`` pairs or JSON files holding an object of them."""
    mapping: dict[str, str | None] = {}
    for value in values or []:
        if "=" not in value:
            path = Path(value)
            if not path.is_file():
                raise InputError(f"--map takes FOLDER=LABEL or a JSON file of them; got '{value}'")
            try:
                loaded = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise InputError(f"--map file '{path}' is not a JSON object of FOLDER: LABEL ({exc})") from None
            if not isinstance(loaded, dict):
                raise InputError(f"--map file '{path}' must hold a JSON object of FOLDER: LABEL")
            mapping.update({str(k): (None if v in (None, "", "-") else v) for k, v in loaded.items()})
            continue
        name, _, label = value.partition("=")
        if not name.strip():
            raise InputError(f"--map takes FOLDER=LABEL; got '{value}'")
        mapping[name.strip()] = None if label.strip() in ("", "-") else label.strip()
    return mapping


def show_result(result, as_json: bool) -> None:
    """Print an :class:`~cnnscope.audit.AuditResult`: its JSON summary, or flagged classes first as text."""
    summary = result.summary()
    if as_json:
        _print_json(summary)
        return
    skipped = f", {len(result.skipped)} skipped" if result.skipped else ""
    typer.echo(
        f"{result.images} images audited{skipped}; {len(result.classes)} classes, {len(result.flagged())} flagged"
        + ("" if result.complete else " (incomplete: run the same command again to resume)")
    )
    for report in result.flagged() + [r for r in result.classes if not r.flags]:
        typer.echo(f"  {report.name:<24} {report.images:>6} images  accuracy {report.accuracy:6.1%}")
        for flag in report.flags:
            typer.echo(f"      {flag.kind}: {flag.reason}")
    for item in result.skipped[:20]:
        typer.echo(f"  skipped {item['reason']}", err=True)
    if len(result.skipped) > 20:
        typer.echo(f"  ... and {len(result.skipped) - 20} more skipped (see --json)", err=True)
    if result.report:
        typer.echo(f"report: {result.report}")
    typer.echo(f"store: {result.out / 'shards'} (Parquet; manifest.json names what was audited)")


@app.command(name="audit")
def audit_command(
    data: Annotated[Path, typer.Argument(help="a folder of class folders, or a CSV of path,label[,mask or box]")],
    model: ModelOpt = DEFAULT_MODEL,
    out: Annotated[Path, typer.Option("--out", "-o", help="audit folder (store, manifest, report)")] = Path(
        "cnnscope-audit"
    ),
    method: Annotated[str, typer.Option("--method", help="explanation method (cnnscope methods)")] = "gradcam",
    layer: Annotated[str | None, typer.Option("--layer", help="layer name (cnnscope layers)")] = None,
    option: OptionOpt = None,
    masks: Annotated[
        Path | None, typer.Option("--masks", help="folder of object masks mirroring the class folders")
    ] = None,
    mapping: MapOpt = None,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="audit at most N images, spread evenly")] = None,
    resume: Annotated[
        bool, typer.Option("--resume/--restart", help="continue the audit in --out (default), or start it again")
    ] = True,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="images per step")] = 32,
    shard_size: Annotated[int, typer.Option("--shard-size", min=1, help="images per Parquet shard")] = 512,
    report: Annotated[bool, typer.Option("--report/--no-report", help="write report.html")] = True,
    engine: EngineOpt = "local",
    address: AddressOpt = None,
    actors: ActorsOpt = None,
    gpus: GpusOpt = 0.0,
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
    """Audit a dataset: per-class accuracy, mean maps, SpRAy clusters, flags for classes right for the wrong
    reason; a Parquet store (resumable) and one HTML report in --out."""
    from ..audit import audit

    _state["quiet"] = quiet
    loaded = _load(model, arch, no_weights, trust_pickle, False, labels, size, mean, std)

    def problem(item: dict) -> None:
        if not quiet:
            sys.stderr.write(f"cnnscope: {item['reason']}\n")

    result = audit(
        loaded,
        data,
        method=method,
        out=out,
        layer=layer,
        options=parse_pairs(option or []),
        masks=masks,
        mapping=parse_mapping(mapping),
        limit=limit,
        resume=resume,
        batch_size=batch_size,
        shard_size=shard_size,
        report=report,
        quiet=quiet or as_json,
        on_problem=problem,
        engine=engine,
        address=address,
        actors=actors,
        num_gpus=gpus,
    )
    show_result(result, as_json)


@app.command(name="embed")
def embed_command(
    data: Annotated[
        Path, typer.Argument(help="an audit folder (its stored features are reused), class folders, or a CSV")
    ],
    model: ModelOpt = DEFAULT_MODEL,
    out: Annotated[Path, typer.Option("--out", "-o", help="folder for embedding.html, .png, .parquet")] = Path(
        "cnnscope-embed"
    ),
    layer: Annotated[
        str | None, typer.Option("--layer", help="features from this layer (default: the penultimate features)")
    ] = None,
    method: Annotated[str, typer.Option("--method", help="tsne, umap (needs the umap extra) or pca")] = "tsne",
    seed: Annotated[int, typer.Option("--seed", help="seed of the projection (same seed, same picture)")] = 0,
    neighbours: Annotated[int, typer.Option("--neighbours", "-k", min=1, help="neighbours for the class purity")] = 10,
    explain: Annotated[
        str, typer.Option("--explain", help="method of the maps shown on click (cnnscope methods)")
    ] = "gradcam",
    mapping: MapOpt = None,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="embed at most N images, spread evenly")] = None,
    resume: Annotated[
        bool, typer.Option("--resume/--restart", help="continue the feature store in --out (default), or redo it")
    ] = True,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="images per step")] = 32,
    thumbnails: Annotated[
        int, typer.Option("--thumbnails", min=0, help="points with a thumbnail in the HTML (misclassified first)")
    ] = 20000,
    engine: EngineOpt = "local",
    address: AddressOpt = None,
    actors: ActorsOpt = None,
    gpus: GpusOpt = 0.0,
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
    """Embed a dataset's features (t-SNE, UMAP or PCA): an interactive HTML scatter with thumbnails, a PNG,
    and per-class neighbourhood purity with the classes the features confuse."""
    from ..audit.embedding import embed, is_audit_folder

    _state["quiet"] = quiet
    reuse = is_audit_folder(data)
    loaded = None if reuse else _load(model, arch, no_weights, trust_pickle, False, labels, size, mean, std)

    def problem(item: dict) -> None:
        if not quiet:
            sys.stderr.write(f"cnnscope: {item['reason']}\n")

    result = embed(
        loaded,
        data,
        out=out,
        method=method,
        layer=layer,
        seed=seed,
        k=neighbours,
        explain=explain,
        engine=engine,
        address=address,
        actors=actors,
        num_gpus=gpus,
        batch_size=batch_size,
        limit=limit,
        resume=resume,
        mapping=parse_mapping(mapping),
        max_thumbnails=thumbnails,
        quiet=quiet or as_json,
        on_problem=problem,
    )
    summary = result.summary()
    if as_json:
        _print_json(summary)
        return
    source = "stored features" if not result.computed else f"{summary['points']} images read"
    typer.echo(
        f"{summary['points']} points, {summary['method']} (seed {summary['seed']}), {source}; "
        f"neighbourhood purity {summary['purity']:.2f} (k={summary['k']}, chance {summary['chance']:.2f})"
    )
    for entry in sorted(summary["classes"], key=lambda e: e["purity"]):
        nearest = entry["nearest_other"]
        near = f"  closest: {nearest['name']} {nearest['share']:.0%}" if nearest else ""
        typer.echo(f"  {entry['name']:<24} {entry['images']:>6} images  purity {entry['purity']:.2f}{near}")
    for pair in summary["overlapping"][:5]:
        typer.echo(f"  overlap {pair['classes'][0]} / {pair['classes'][1]}: {pair['overlap']:.2f}")
    typer.echo(f"html: {result.html}\npng: {result.png}\ncoordinates: {result.table}")
