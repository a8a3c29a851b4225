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
        {"image": name, "size": _size(img), "top5": [], "explanations": []}
        for name, img in zip(names, images, strict=True)
    ]
    notes: list[str] = []
    rows_overlays: list[list[tuple[str, np.ndarray]]] = [[] for _ in images]
    # the pictures under the overlays (RGB uint8; a grey, 16-bit or N-channel input as the model's preprocessing
    # shows it), filled in as the explanations come
    shown: list[np.ndarray] = [np.zeros((1, 1, 3), dtype=np.uint8) for _ in images]
    finished = 0
    try:
        for start in range(0, len(images), batch_size):
            chunk = list(images[start : start + batch_size])
            for explainer in explainers:
                explanation: Explanation = explainer(chunk, target, names=names[start : start + batch_size])
                for local, k, entry in explanation.records():
                    index = start + local
                    clip = _as_clip(chunk[local])  # a video clip: a frame strip here, GIF and MP4 below
                    picture, frames = map_picture(explanation, local, k, clip, entry, alpha, colormap)
                    class_index = entry["class_index"]
                    entry["file"] = None
                    if out is not None:
                        out.mkdir(parents=True, exist_ok=True)
                        path = out / overlay_filename(names[index], explanation.method, class_index, explanation.labels)
                        save_png(picture, str(path))
                        entry["file"] = str(path)
                        if clip is not None:
                            entry.update(_write_clip(frames, path, clip))
                        elif explanation.maps.ndim == 5:  # a volume's map, also as NIfTI on the scan's affine
                            entry["nifti"] = _write_volume_map(explanation, local, k, chunk[local], path)
                    results[index]["explanations"].append(entry)
                    rows_overlays[index].append((explanation.caption(local, k), picture))
                for local in range(len(chunk)):
                    shown[start + local] = input_picture(explanation, local, chunk[local])
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
        shown = shown[:finished]
        rows_overlays = rows_overlays[:finished]
    if out is not None and report:
        rows = [
            ReportRow(
                name=result["image"],
                image=image,
                top=[(p["class_name"], p["probability"]) for p in result["top5"]],
                overlays=overlays,
            )
            for result, image, overlays in zip(results, shown, rows_overlays, strict=True)
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


def _size(image) -> list[int]:
    """[W, H] of a picture, [W, H, D] of a volume (a :class:`~cnnscope.io_volumes.Volume` or array)."""
    values = getattr(image, "values", image)
    if getattr(image, "values", None) is not None or values.ndim == 4:
        return [int(values.shape[2]), int(values.shape[1]), int(values.shape[0])]
    return [int(values.shape[1]), int(values.shape[0])]


def _as_clip(source):
    """``source`` when it is a :class:`~cnnscope.io_volumes.Clip` (it has frames), else None."""
    return source if getattr(source, "frames", None) else None


#: Frames per row of a clip's pictures in the compare grid (one long strip would make the figure very wide).
GRID_FRAMES_PER_ROW = 4


def input_picture(explanation: Explanation, i: int, source=None, columns: int | None = None) -> np.ndarray:
    """The picture of input ``i`` shown beside its maps (report rows, the compare grid): a picture as it is, a
    clip's frames as a strip (in rows of ``columns``), a volume's middle slice."""
    picture = explanation.images[i]
    if picture.ndim == 3:
        return picture
    if _as_clip(source) is not None:
        from .render.clips import frame_strip

        return frame_strip(list(picture), columns=columns)
    return picture[picture.shape[0] // 2]


def map_picture(explanation: Explanation, i: int, k: int, source, entry: dict, alpha: float, colormap=None):
    """The picture of one map and its JSON entry completed: for a clip, the frame strip (and the overlay frames,
    for a GIF and MP4) with ``peak`` [x, y, t] and ``temporal``; otherwise the overlay (a volume's planes through
    the peak, whose ``peak`` is [x, y, z]). Returns (picture, frames or None)."""
    clip = _as_clip(source)
    if clip is not None:
        strip, frames = _clip_entry(explanation, i, k, clip, entry, alpha, colormap)
        return strip, frames
    return explanation.overlay(i, k, alpha=alpha, colormap=colormap), None


def _clip_entry(explanation: Explanation, i: int, k: int, clip, entry: dict, alpha: float, colormap):
    """For a clip's map: ``entry["peak"]`` as [x, y, t] with t the input frame, ``temporal`` (the map's mass per
    sampled frame) and ``frames`` (which input frames were sampled); returns (frame strip, overlay frames)."""
    from .render.clips import frame_strip, overlay_frames, temporal_mass

    x, y, step = explanation.peak(i, k)
    entry["peak"] = [x, y, int(clip.frames[step])]
    heat_map = explanation.maps[i, k]
    entry["temporal"] = temporal_mass(heat_map.abs() if explanation.signed else heat_map)  # |evidence| when signed
    entry["frames"] = [int(f) for f in clip.frames]
    heat = explanation.normalized()[i, k].numpy()
    frames = overlay_frames(explanation.images[i], heat, alpha=alpha, colormap=colormap, signed=explanation.signed)
    return frame_strip(frames), frames


def _write_clip(frames: list, png: Path, clip) -> dict:
    """The overlay frame by frame as a GIF, and as an MP4 where the ``video`` extra is installed."""
    from .render.animate import video_available, write_gif, write_mp4

    fps = clip.fps * len(clip.frames) / max(1, clip.total) if clip.fps else 4.0  # the clip's own pace
    written = {"gif": str(write_gif(frames, png.parent / f"{png.stem}.gif", fps=max(fps, 0.5), hold=1.0))}
    written["mp4"] = (
        str(write_mp4(frames, png.parent / f"{png.stem}.mp4", fps=max(fps, 0.5))) if video_available() else None
    )
    return written


def _write_volume_map(explanation: Explanation, i: int, k: int, source, png: Path) -> str | None:
    """The map of a volume as NIfTI next to its montage PNG, at the scan's resolution and on its affine (None
    without nibabel, which cnnscope[medical] installs: the PNG montage is written all the same)."""
    import importlib.util

    import torch
    import torch.nn.functional as F

    from .io_volumes import read_volume, write_nifti

    if importlib.util.find_spec("nibabel") is None:
        return None
    volume = read_volume(source)
    heat = explanation.maps[i, k][None, None].float()
    if tuple(heat.shape[2:]) != tuple(volume.values.shape[:3]):
        heat = F.interpolate(heat, size=tuple(volume.values.shape[:3]), mode="trilinear", align_corners=False)
    path = png.parent / f"{png.stem}.nii.gz"
    with torch.no_grad():
        return str(write_nifti(path, heat[0, 0].numpy(), volume))


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
    method's seconds). A volume's maps are its planes through the peak (``peak`` [x, y, z]); a clip's, its frame
    strip (``peak`` [x, y, t] with ``temporal``), as ``explain`` draws them."""
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
        records = [explanation.record(0, k) for k in range(len(classes))]
        overlays = []
        for k in range(len(classes)):
            picture, frames = map_picture(explanation, 0, k, image, records[k], alpha)
            if frames is not None:  # a clip: its overlay frames in rows, as the input beside them
                from .render.clips import frame_strip

                picture = frame_strip(frames, columns=GRID_FRAMES_PER_ROW)
            overlays.append(picture)
        rows.append((label, overlays))
        summary["rows"].append(
            {
                "row": label,
                "method": explanation.method,
                "layer": explanation.layer,
                "seconds": round(seconds, 4),
                "forwards": explanation.stats.get("forwards"),
                "backwards": explanation.stats.get("backwards"),
                "maps": records,
            }
        )
    shown = input_picture(first, 0, image, columns=GRID_FRAMES_PER_ROW)
    figure = comparison_grid(shown, rows, columns, title=f"{name} · {model.name}")
    return figure, summary


def random_map_baselines(model: Model, batch, class_index: int, *, steps: int = 50, seed: int = 0) -> dict:
    """Deletion and insertion AUC of a per-pixel random map and of a smooth one (blobs at the scale of a CAM
    cell) on the same image and class: what a map must beat to say anything (black-fill deletion ranks a
    per-pixel random map well, as the hole's shape itself misleads the model)."""
    import numpy as np

    from .evaluate import deletion_curve, insertion_curve
    from .evaluate.metrics import random_map, smooth_random_map

    size = tuple(batch.shape[-2:])
    generator = np.random.default_rng(seed)
    maps = {"random": random_map(size, generator), "random_smooth": smooth_random_map(size, generator)}
    return {
        name: {
            "deletion_auc": round(deletion_curve(model, batch, values, class_index, steps=steps).auc, 6),
            "insertion_auc": round(insertion_curve(model, batch, values, class_index, steps=steps).auc, 6),
        }
        for name, values in maps.items()
    }


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
        "baselines": random_map_baselines(model, batch, class_index, steps=steps),
        "remove_top": remove_evidence(model, batch, saliency, class_index, fraction=fraction, fill=fill),
        "keep_top": keep_evidence(model, batch, saliency, class_index, fraction=max(fraction, 0.2)),
    }
    random = summary["baselines"]
    summary["beats_random"] = {
        "deletion": all(deletion.auc < b["deletion_auc"] for b in random.values()),
        "insertion": all(insertion.auc > b["insertion_auc"] for b in random.values()),
    }
    figure = curves_figure([deletion, insertion], title=f"{name} · {explanation.method} · {summary['class_name']}")
    return figure, summary
