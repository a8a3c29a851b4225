"""Explaining a set of images with several methods: overlays on disk, a report, a JSON-able summary.

This is the job behind ``cnnscope explain`` and ``cnnscope demo``; it only calls the library.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ._registry import METHODS
from .explanation import Explanation, overlay_filename
from .models import Model
from .models.labels import short_name
from .options import split_options
from .render.overlay import save_png
from .render.report import ReportRow, write_report


def method_options(methods: Sequence[str], options: dict, quiet: bool = False) -> list[dict]:
    """Per method, the options it declares (each checked later by the method's own declaration), with
    ``quiet`` added where the method has a progress line. An option that none of the methods declares
    is an error (a typo must not be silently ignored)."""
    tables = [(method, METHODS.get(method).options) for method in methods]
    chosen = split_options(tables, options)
    if quiet:
        for (_, table), accepted in zip(tables, chosen, strict=True):
            if "quiet" in table:
                accepted["quiet"] = True
    return chosen


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`explain_images`: what finished is on disk, and ``summary`` (with
    ``"complete": False``) says so."""

    def __init__(self, summary: dict) -> None:
        super().__init__("interrupted")
        self.summary = summary


def unique_names(names: Sequence[str]) -> list[str]:
    """Make names unique for file names: 'x', 'x' -> 'x', 'x-2'."""
    seen: dict[str, int] = {}
    result = []
    for name in names:
        count = seen.get(name, 0) + 1
        seen[name] = count
        result.append(name if count == 1 else f"{name}-{count}")
    return result


def explain_images(
    model: Model,
    images: Sequence[np.ndarray],
    names: Sequence[str],
    *,
    methods: Sequence[str] = ("gradcam",),
    target: object = "top1",
    layer: str | None = None,
    out_dir: str | Path | None = None,
    report: bool = True,
    batch_size: int = 8,
    alpha: float = 0.5,
    colormap: str | None = None,
    options: dict | None = None,
    progress: Callable[[int], None] | None = None,
    quiet: bool = False,
) -> dict:
    """Run each method on the images in batches; write PNG overlays (and report.html) to ``out_dir``.

    Returns a JSON-able summary: per image, its top-5 and, per method and target, the class, its
    probability, the layer, the overlay file and the map's peak (x, y) in original-image pixels.
    """
    names = unique_names(names)
    explainers = []
    for method, accepted in zip(methods, method_options(methods, options or {}, quiet), strict=True):
        cls = METHODS.get(method)
        kwargs = {"layer": layer} if layer is not None and cls.uses_layer else {}
        explainers.append(cls(model, **kwargs, **accepted))
    out = Path(out_dir) if out_dir is not None else None
    results = [
        {"image": name, "size": [int(img.shape[1]), int(img.shape[0])], "top5": [], "explanations": []}
        for name, img in zip(names, images, strict=True)
    ]
    notes: list[str] = []
    rows_overlays: list[list[tuple[str, np.ndarray]]] = [[] for _ in images]
    finished = 0
    try:
        for start in range(0, len(images), batch_size):
            chunk = list(images[start : start + batch_size])
            for explainer in explainers:
                explanation: Explanation = explainer(chunk, target, names=names[start : start + batch_size])
                for local, k, entry in explanation.records():
                    index = start + local
                    picture = explanation.overlay(local, k, alpha=alpha, colormap=colormap)
                    class_index = entry["class_index"]
                    entry["file"] = None
                    if out is not None:
                        out.mkdir(parents=True, exist_ok=True)
                        path = out / overlay_filename(names[index], explanation.method, class_index, explanation.labels)
                        save_png(picture, str(path))
                        entry["file"] = str(path)
                    results[index]["explanations"].append(entry)
                    rows_overlays[index].append((explanation.caption(local, k), picture))
                for local, predictions in enumerate(explanation.top):
                    results[start + local]["top5"] = [
                        {"class_index": p.index, "class_name": p.name, "probability": round(p.probability, 6)}
                        for p in predictions
                    ]
                notes.extend(explanation.notes)
            if progress is not None:
                progress(len(chunk))
            finished = min(len(images), start + batch_size)
    except KeyboardInterrupt:
        complete = False
    else:
        complete = True
    summary = {
        "model": model.name,
        "methods": list(methods),
        "images": results,
        "notes": notes,
        "report": None,
        "complete": complete,
    }
    if not complete:
        results[:] = results[:finished]
        images = images[:finished]
        rows_overlays = rows_overlays[:finished]
    if out is not None and report:
        rows = [
            ReportRow(
                name=result["image"],
                image=image,
                top=[(p["class_name"], p["probability"]) for p in result["top5"]],
                overlays=overlays,
            )
            for result, image, overlays in zip(results, images, rows_overlays, strict=True)
        ]
        path = write_report(
            out / "report.html",
            rows,
            title="cnnscope report",
            meta=f"model {model.name} · methods {', '.join(methods)} · target {target}"
            + ("" if complete else f" · INCOMPLETE: interrupted after {finished} of {len(names)} images"),
        )
        summary["report"] = str(path)
    if not complete:
        raise Interrupted(summary)
    return summary


def compare_image(
    model: Model,
    image: np.ndarray,
    name: str,
    *,
    methods: Sequence[str],
    target: object = "top3",
    layers: Sequence[str] | None = None,
    options: dict | None = None,
    alpha: float = 0.5,
    quiet: bool = False,
):
    """One image, several methods (rows) or one layer method at several layers (rows), and its
    classes (columns). Returns (matplotlib Figure, JSON-able summary with each map's peak and each
    method's seconds)."""
    import time

    from .errors import MethodError
    from .render.grid import comparison_grid

    per_method = method_options(methods, options or {}, quiet)
    rows: list[tuple[str, list]] = []
    summary: dict = {"image": name, "model": model.name, "rows": []}
    columns: list[str] = []
    explanations: list[tuple[str, Explanation, float]] = []
    if layers:
        if len(methods) != 1:
            raise MethodError("--layers compares one layer method at several layers; give one --methods entry")
        cls = METHODS.get(methods[0])
        if not cls.uses_layer or not hasattr(cls, "explain_layers"):
            raise MethodError(f"{methods[0]} does not work on layers; choose a CAM method to compare layers")
        started = time.perf_counter()
        by_layer = cls(model, **per_method[0]).explain_layers(image, list(layers), target, names=[name])
        seconds = time.perf_counter() - started
        explanations = [(f"{methods[0]} @ {layer}", e, seconds) for layer, e in by_layer.items()]
    else:
        for method, accepted in zip(methods, per_method, strict=True):
            cls = METHODS.get(method)
            started = time.perf_counter()
            explanation = cls(model, **accepted)(image, target, names=[name])
            explanations.append((explanation.method, explanation, time.perf_counter() - started))
    first = explanations[0][1]
    classes = [int(t) for t in first.targets[0] if int(t) >= 0]
    columns = [f"{short_name(first.labels[c])} ({float(first.probabilities[0, c]):.1%})" for c in classes]
    for label, explanation, seconds in explanations:
        overlays = [explanation.overlay(0, k, alpha=alpha) for k in range(len(classes))]
        rows.append((label, overlays))
        summary["rows"].append(
            {
                "row": label,
                "method": explanation.method,
                "layer": explanation.layer,
                "seconds": round(seconds, 4),
                "forwards": explanation.stats.get("forwards"),
                "backwards": explanation.stats.get("backwards"),
                "maps": [explanation.record(0, k) for k in range(len(classes))],
            }
        )
    figure = comparison_grid(first.images[0], rows, columns, title=f"{name} · {model.name}")
    return figure, summary


def faithfulness_report(
    model: Model,
    image: np.ndarray,
    name: str,
    *,
    method: str = "gradcam",
    target: object = "top1",
    steps: int = 50,
    fraction: float = 0.1,
    fill: str = "grey",
    options: dict | None = None,
    quiet: bool = False,
):
    """Explain one image, then check the map: deletion and insertion curves (AUC), the prediction after
    removing the top ``fraction`` of the map, and the confidence kept by the evidence alone.
    Returns (curves Figure, JSON-able summary)."""
    from .evaluate import deletion_curve, insertion_curve, keep_evidence, remove_evidence
    from .render.figure import curves_figure

    explanation = METHODS.get(method)(model, **method_options([method], options or {}, quiet)[0])(
        image, target, names=[name]
    )
    batch = model.preprocess([image])
    class_index = int(explanation.targets[0, 0])
    saliency = explanation.maps[0, 0]
    deletion = deletion_curve(model, batch, saliency, class_index, steps=steps)
    insertion = insertion_curve(model, batch, saliency, class_index, steps=steps)
    summary = {
        "image": name,
        "method": explanation.method,
        "class_index": class_index,
        "class_name": short_name(explanation.labels[class_index]),
        "probability": round(explanation.probability(0, 0), 6),
        "deletion_auc": round(deletion.auc, 6),
        "insertion_auc": round(insertion.auc, 6),
        "remove_top": remove_evidence(model, batch, saliency, class_index, fraction=fraction, fill=fill),
        "keep_top": keep_evidence(model, batch, saliency, class_index, fraction=max(fraction, 0.2)),
    }
    figure = curves_figure([deletion, insertion], title=f"{name} · {explanation.method} · {summary['class_name']}")
    return figure, summary
