"""Audit a whole dataset: where the model looks, class by class, and which classes are right for the wrong
reason.

    result = cnnscope.audit(model, "data/", out="audit-out")       # class folders, a CSV, or arrays
    result.summary()                                               # the JSON of `cnnscope audit --json`
    result.flagged()                                               # the classes with flags, with reasons
    result.table()                                                 # every image's record (pyarrow Table)

The pipeline (DESIGN.md, "The dataset layer"): a source (:mod:`.sources`) -> batches decoded on threads ->
one step per batch (:class:`.engine.AuditStep`: prediction, top-5, the maps of the true and the predicted
class from one method call, penultimate features, statistics) -> Parquet shards and a manifest
(:mod:`.store`, resumable) -> per-class figures, SpRAy clusters, flags and galleries (:mod:`.aggregate`)
-> one self-contained HTML report (:mod:`.report`) and a JSON summary.

Needs the ``audit`` extra (pyarrow, scikit-learn): ``pip install 'cnnscope[audit]'``.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError
from .aggregate import THRESHOLDS, ClassReport, Flag, Thresholds

__all__ = ["AuditResult", "ClassReport", "Flag", "Thresholds", "audit", "demo_audit", "embed"]

#: Positions per shard: what a resumed run may have to redo at most.
SHARD_SIZE = 512


@dataclass
class AuditResult:
    """What an audit found; ``summary()`` is the JSON of ``cnnscope audit --json``.

    Attributes: ``out`` (the audit folder), ``images`` (images audited), ``skipped`` (unreadable images,
    ``{"path", "reason"}``), ``problems`` (found before the run: empty class folders, missing masks, bad CSV
    rows), ``classes`` (one :class:`ClassReport` per class, in label order), ``labels`` (the model's),
    ``report`` (the HTML file, or None), ``complete`` (every shard done), ``resumed`` (shards were reused),
    ``seconds`` and ``images_per_second`` (of this run's explaining), ``extra`` (demo facts).
    """

    out: Path
    images: int
    skipped: list[dict]
    problems: list[dict]
    classes: list[ClassReport]
    labels: list[str]
    model: str
    method: dict
    report: Path | None
    complete: bool
    resumed: bool
    seconds: float
    images_per_second: float
    extra: dict = field(default_factory=dict)

    def flagged(self) -> list[ClassReport]:
        """The classes with at least one flag."""
        return [report for report in self.classes if report.flags]

    def table(self, columns: list[str] | None = None):
        """Every audited image's record as one pyarrow Table (see :mod:`cnnscope.audit.records`)."""
        from .store import require_pyarrow

        pa, parquet = require_pyarrow()
        files = sorted((self.out / "shards").glob("shard-*.parquet"))
        return pa.concat_tables([parquet.read_table(path, columns=columns) for path in files])

    def summary(self) -> dict:
        return {
            "images": self.images,
            "skipped": [{"path": item["path"], "reason": item["reason"]} for item in self.skipped],
            "problems": [{"path": item["path"], "reason": item["reason"]} for item in self.problems],
            "classes": [report.to_json(self.labels) for report in self.classes],
            "flagged": [report.name for report in self.flagged()],
            "model": self.model,
            "method": self.method,
            "out": str(self.out),
            "report": str(self.report) if self.report else None,
            "complete": self.complete,
            "resumed": self.resumed,
            "seconds": round(self.seconds, 3),
            "images_per_second": round(self.images_per_second, 2),
            **self.extra,
        }


def model_identity(model) -> dict:
    """The model's name, class count and a fingerprint of its weights, labels and preprocessing."""
    import torch

    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.module.state_dict().items()):
        digest.update(name.encode())
        try:
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        except (RuntimeError, TypeError):
            digest.update(repr((tensor.dtype, tuple(tensor.shape))).encode())
    digest.update(repr((list(model.labels), model.preprocess, model.multilabel, model.outputs)).encode())
    return {"name": model.name, "classes": len(model.labels), "fingerprint": digest.hexdigest()}


def audit(
    model,
    data,
    *,
    method: str = "gradcam",
    out: str | os.PathLike = "cnnscope-audit",
    layer=None,
    options: dict | None = None,
    masks: str | os.PathLike | None = None,
    mapping: Mapping[str, str | int | None] | None = None,
    limit: int | None = None,
    resume: bool = True,
    batch_size: int = 32,
    shard_size: int = SHARD_SIZE,
    workers: int = 2,
    report: bool = True,
    quiet: bool = False,
    thresholds: Thresholds = THRESHOLDS,
    on_problem: Callable[[dict], None] | None = None,
    on_shard: Callable[[int], None] | None = None,
    extra: dict | None = None,
    features: str | None = None,
    engine: str = "local",
    address: str | None = None,
    actors: int | None = None,
    num_gpus: float = 0.0,
) -> AuditResult:
    """Audit ``model`` on ``data`` and write the store and the report to ``out``.

    Args:
        model: a :class:`~cnnscope.Model`, an ``nn.Module`` or anything ``load_model`` takes.
        data: a folder of class folders, a CSV (``path, label[, mask or box]``), a
            :class:`~cnnscope.data.ShapesDataset`, or an ``(images, class indices[, masks])`` tuple.
        method, layer, options: the explanation method (any registered one; Grad-CAM by default).
        masks: a folder of object masks mirroring the class folders (or the CSV's mask folder).
        mapping: dataset label (folder or CSV label) -> model label or index; ``None`` or ``"-"`` leaves it out.
        limit: audit at most this many images, spread evenly over the dataset.
        resume: continue a compatible run in ``out`` (the default); False replaces it.
        batch_size: images per step; shard_size: images per Parquet shard (a new run only).
        workers: threads decoding the next batch while the current one is explained.
        report: write ``out/report.html``; quiet: no progress line.
        on_problem: called with each problem found before the run (the CLI prints them).
        on_shard: called with each shard's index once it is written.
        extra: facts added to the summary (the demo's settings).
        features: record the global average of this layer's output as the features (default: the
            penultimate features, the input of the last linear layer).
        engine: ``local`` (in process) or ``ray`` (:mod:`.ray_engine`: Ray Data with an actor pool holding
            the model; ``address`` of a cluster, else a local Ray; ``actors`` and ``num_gpus`` per actor).
    Raises:
        InputError: a dataset label that matches no class, an ``out`` holding another audit, bad options.
    """
    from ..models import Model, load_model
    from .engine import AuditStep, check_engine, run_engine
    from .sources import open_source
    from .spray import require_sklearn
    from .store import Store, require_pyarrow

    require_pyarrow()
    require_sklearn()
    check_engine(engine, address)
    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, got {batch_size}")
    loaded = model if isinstance(model, Model) else load_model(model)
    source = open_source(data, loaded.labels, mapping=mapping, masks=masks).limited(limit)
    for problem in source.problems:
        if on_problem is not None:
            on_problem(problem)
    step = AuditStep(loaded, method, layer=layer, options=options, feature_layer=features)
    identity = {
        "model": model_identity(loaded),
        "method": step.identity(),
        "dataset": {"digest": source.digest, "images": len(source)},
    }
    out_dir = Path(out)
    store = Store(
        out_dir,
        identity,
        total=len(source),
        shard_size=shard_size,
        resume=resume,
        extra={
            "dataset": source.description,
            "labels": list(loaded.labels),
            "dataset_names": {str(k): v for k, v in source.names.items()},
            "problems": source.problems,
        },
    )
    started = time.perf_counter()
    explained = run_engine(
        engine,
        source,
        store,
        step,
        batch_size=batch_size,
        workers=workers,
        quiet=quiet,
        on_shard=on_shard,
        address=address,
        actors=actors,
        num_gpus=num_gpus,
    )
    seconds = time.perf_counter() - started
    return finish(
        store,
        loaded,
        source.names,
        identity,
        problems=source.problems,
        seconds=seconds,
        explained=explained,
        report=report,
        thresholds=thresholds,
        extra=extra,
    )


def finish(
    store,
    model,
    names: dict[int, str],
    identity: dict,
    *,
    problems: list[dict],
    seconds: float,
    explained: int,
    report: bool,
    thresholds: Thresholds = THRESHOLDS,
    extra: dict | None = None,
) -> AuditResult:
    """Aggregate the store, write the report and the manifest's summary, and build the result."""
    from .aggregate import aggregate
    from .stats import MAP_SIZE

    map_size = identity["method"].get("map_size", MAP_SIZE)
    classes = aggregate(store, model.labels, names, map_size, thresholds=thresholds)
    result = AuditResult(
        out=store.root,
        images=store.rows(),
        skipped=[item for item in store.skipped() if item.get("kind") != "note"],
        problems=list(problems) + [item for item in store.skipped() if item.get("kind") == "note"],
        classes=classes,
        labels=list(model.labels),
        model=model.name,
        method={k: identity["method"][k] for k in ("name", "layer", "options")},
        report=None,
        complete=not store.pending(),
        resumed=store.resumed,
        seconds=seconds,
        images_per_second=explained / seconds if seconds > 0 and explained else 0.0,
        extra=dict(extra or {}),
    )
    if report:
        from .report import write_report

        result.report = write_report(result, store, map_size)
    store.finish(summary={key: value for key, value in result.summary().items() if key != "classes"})
    return result


def demo_audit(
    out: str | os.PathLike = "cnnscope-audit-demo",
    *,
    cue: str | None = "patch",
    seed: int = 0,
    quiet: bool = False,
    report: bool = True,
    **settings,
) -> AuditResult:
    """The Clever Hans demo: shapes with a spurious cue on one class, a small CNN trained on them (seeded,
    deterministic), and the audit of held-out images of the same kind. ``cue``: ``"patch"`` (a red square in
    a fixed corner), ``"tint"`` (a red background) or None (no cue: nothing should be flagged). ``settings``
    override :data:`cnnscope.audit.demo.DEMO` (image size, counts, epochs, cue strength...)."""
    from .demo import run_demo

    return run_demo(out, cue=cue, seed=seed, quiet=quiet, report=report, **settings)


def embed(model=None, data=None, **settings):
    """Embed a dataset's features (t-SNE, UMAP or PCA) with an interactive scatter, its PNG and the per-class
    neighbourhood purity; an audit folder's stored features are reused. See
    :func:`cnnscope.audit.embedding.embed` for the settings."""
    from .embedding import embed as embed_features

    return embed_features(model, data, **settings)


class _CallableModule(types.ModuleType):
    """``cnnscope.audit(model, data)`` calls :func:`audit` while ``cnnscope.audit.store`` etc. stay modules."""

    def __call__(self, *args, **kwargs) -> AuditResult:
        return audit(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
