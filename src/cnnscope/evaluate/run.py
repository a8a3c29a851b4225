"""``evaluate``: which method should I trust on my model? Every method x every metric, on the same images,
beside a centre and two random-map baselines, optionally with the randomization sanity checks.

Per image, the maps of every method (and of the baselines) are scored together: the deletion, insertion
and ROAD frames of all of them go through the model in shared passes, so adding a method adds frames, not
passes. Targets are the images' own classes when the data has them (the pointing game asks whether the map
finds the object of *that* class), else the model's top-1.
"""

from __future__ import annotations

import csv
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .._registry import METHODS
from ..errors import CnnscopeError, InputError
from ..io import IMAGE_SUFFIXES
from ..models import Model
from ..progress import Progress
from ..state import preserved
from . import metrics as M
from .road import FRACTIONS, check_fractions, impute, removal_masks
from .sanity import data_randomization, model_randomization

#: Metrics of the table, and whether a higher value is better.
METRICS = {
    "pointing_game": True,
    "energy_pointing_game": True,
    "deletion_auc": False,
    "insertion_auc": True,
    "road_morf": False,
    "road_lerf": True,
    "gini": True,
    "constant_fraction": False,
}
#: Baseline maps scored beside the methods.
BASELINES = ("center", "random", "random_smooth")
#: Metrics where a method is expected to beat a random map (reported when it does not).
AGAINST_RANDOM = ("pointing_game", "energy_pointing_game", "deletion_auc", "insertion_auc", "road_morf", "road_lerf")


@dataclass
class Evaluation:
    """The result of :func:`evaluate`; ``to_json()`` is what ``cnnscope evaluate --json`` prints."""

    methods: list[dict]
    baselines: dict[str, dict]
    images: int
    settings: dict
    curves: dict[str, dict[str, list[float]]]
    complete: bool = True
    seconds: float = 0.0
    problems: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "images": self.images,
            "complete": self.complete,
            "seconds": round(self.seconds, 3),
            "settings": self.settings,
            "methods": self.methods,
            "baselines": self.baselines,
            "problems": self.problems,
            "skipped": self.skipped,
            "failed_methods": self.failed,
        }

    def method(self, name: str) -> dict:
        for entry in self.methods:
            if entry["name"] == name:
                return entry
        raise InputError(f"no method {name!r} in this evaluation; it has {', '.join(m['name'] for m in self.methods)}")


# -- inputs ------------------------------------------------------------------------------------------


def _boxes(path: str | os.PathLike) -> dict[str, tuple[float, float, float, float]]:
    """``path, x0, y0, x1, y1`` rows (a header is optional), keyed by the path as written and by file name."""
    from ..audit.sources import _box

    csv_path = Path(path)
    try:
        rows = [
            r for r in csv.reader(csv_path.read_text(encoding="utf-8-sig").splitlines()) if any(c.strip() for c in r)
        ]
    except OSError as exc:
        raise InputError(f"cannot read --boxes '{csv_path}': {exc.strerror}") from None
    boxes: dict[str, tuple[float, float, float, float]] = {}
    for number, row in enumerate(rows, start=1):
        cells = [c.strip() for c in row if c.strip()]
        if number == 1 and cells and cells[0].lower() in ("path", "image", "file", "filename"):
            continue
        if len(cells) < 2:
            raise InputError(f"--boxes {csv_path} row {number}: give path, x0, y0, x1, y1")
        box = _box(" ".join(cells[-4:])) if len(cells) >= 5 else _box(cells[1])
        target = Path(cells[0])
        resolved = target if target.is_absolute() else csv_path.parent / target
        boxes[str(resolved)] = box
        boxes[str(target)] = box
        boxes.setdefault(target.name, box)
    return boxes


def open_data(
    data: object,
    model: Model,
    *,
    masks: str | os.PathLike | None = None,
    boxes: str | os.PathLike | None = None,
    mapping=None,
):
    """A :class:`~cnnscope.audit.sources.Source` from image files, a folder of images, a folder of class
    folders, a CSV, a ShapesDataset or an ``(images, labels[, masks])`` tuple. Loose images have class -1
    (explained for the model's top-1); ``masks`` mirrors their tree with the same file names."""
    from ..audit.sources import Entry, Source, _file_mask, _mask_file, open_source

    loose: list[Path] = []
    root: Path | None = None
    if isinstance(data, (list, tuple)) and data and all(isinstance(d, (str, os.PathLike)) for d in data):
        paths = [Path(d) for d in data]
        if len(paths) == 1 and paths[0].is_dir():
            data = paths[0]
        else:
            for path in paths:
                if not path.is_file():
                    raise InputError(f"'{path}': no such image file")
            loose = paths
    if isinstance(data, (str, os.PathLike)) and Path(data).is_dir():
        folder = Path(data)
        has_classes = any(p.is_dir() and not p.name.startswith(".") for p in folder.iterdir())
        if not has_classes:
            root = folder
            loose = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not loose:
                raise InputError(f"'{folder}' holds no images")
    elif isinstance(data, (str, os.PathLike)) and Path(data).is_file() and Path(data).suffix.lower() in IMAGE_SUFFIXES:
        loose = [Path(data)]
    if loose:
        mask_root = Path(masks) if masks is not None else None
        if mask_root is not None and not mask_root.is_dir():
            raise InputError(f"--masks '{mask_root}' is not a folder")
        entries, problems = [], []
        for path in loose:
            mask = None
            if mask_root is not None:
                relative = path.relative_to(root) if root is not None else Path(path.name)
                found = _mask_file(mask_root, relative)
                if found is None:
                    problems.append({"path": str(path), "reason": f"no mask for '{path}' in '{mask_root}'"})
                else:
                    mask = _file_mask(found)
            entries.append(Entry(str(path), -1, mask))
        source = Source(entries, {}, f"{len(entries)} image(s)", "", problems)
    else:
        source = open_source(data, model.labels, mapping=mapping, masks=masks)
    if boxes is not None:
        table = _boxes(boxes)
        matched = []
        for entry in source.entries:
            key = entry.key
            box = table.get(key) or table.get(str(Path(key))) or table.get(Path(key).name)
            matched.append(Entry(entry.key, entry.label, box if box is not None else entry.mask))
        if not any(m.mask is not None for m in matched):
            raise InputError(f"no image matches a row of --boxes '{boxes}'; rows are path, x0, y0, x1, y1")
        source.entries = matched
    return source


# -- scoring -----------------------------------------------------------------------------------------


def _forward_probabilities(model: Model, frames: torch.Tensor, target: int, per_pass: int) -> np.ndarray:
    """The target's probability for each frame, ``per_pass`` frames per forward, channels-last as
    ``faithfulness._outputs`` does (the default model at 224 px, 5 a pass: 30 ms a frame against 37 ms
    contiguous, best of 3 interleaved; 2 or 1 a pass were no faster)."""
    out = []
    with torch.inference_mode():
        for start in range(0, frames.shape[0], per_pass):
            chunk = frames[start : start + per_pass].contiguous(memory_format=torch.channels_last)
            out.append(model.probabilities(model(chunk))[:, target].float().cpu())
    return torch.cat(out).numpy()


def _auc(values: np.ndarray, fractions: np.ndarray) -> np.ndarray:
    return (
        np.trapezoid(values, fractions, axis=-1) if hasattr(np, "trapezoid") else np.trapz(values, fractions, axis=-1)
    )


def score_maps(
    model: Model,
    image: torch.Tensor,
    maps: Sequence,
    target: int,
    *,
    signed: Sequence[bool] | None = None,
    mask: np.ndarray | None = None,
    steps: int = 20,
    fractions: Sequence[float] = FRACTIONS,
    tolerance: float = M.TOLERANCE_PX,
    generator: torch.Generator | None = None,
    per_pass: int = 16,
) -> tuple[list[dict], dict[str, np.ndarray]]:
    """Every metric for each of ``maps`` (each (H, W) at the model input's size) of one preprocessed
    ``image`` (1, C, H, W) and its ``target``; ``mask`` (H, W) bool marks the object (None: no pointing
    game). Returns one metrics dict per map and the curves (``deletion``, ``insertion``: (maps, steps);
    ``road_morf``, ``road_lerf``: (maps, fractions))."""
    from .faithfulness import _blurred, _fill

    if image.ndim == 3:
        image = image.unsqueeze(0)
    count = len(maps)
    signed = list(signed) if signed is not None else [False] * count
    stack = torch.stack([torch.as_tensor(np.asarray(m), dtype=torch.float32) for m in maps]).to(image.device)
    if stack.shape[-2:] != image.shape[-2:]:
        raise InputError(f"maps are {tuple(stack.shape[-2:])} but the image is {tuple(image.shape[-2:])}")
    fractions = check_fractions(fractions)
    if steps < 2:
        raise InputError("deletion and insertion curves need at least 2 steps")
    height, width = image.shape[-2:]
    total = height * width
    curve = np.linspace(0, 1, steps)
    order = torch.argsort(stack.reshape(count, -1), dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(total, device=order.device).expand(count, -1))
    ranks = ranks.view(count, 1, 1, height, width)
    cutoffs = torch.tensor([round(f * total) for f in curve], device=image.device).view(1, steps, 1, 1, 1)
    chosen = ranks < cutoffs  # (maps, steps, 1, H, W): the top f of each map
    black, blurred = _fill(model, image, "black"), _blurred(image)
    deletion = torch.where(chosen, black.unsqueeze(0), image.unsqueeze(0)).flatten(0, 1)
    insertion = torch.where(chosen, image.unsqueeze(0), blurred.unsqueeze(0)).flatten(0, 1)
    frames = [deletion, insertion]
    if fractions:  # ROAD: every map's holes imputed in one batch
        morf = removal_masks(stack, fractions, most_relevant=True).flatten(0, 1)
        lerf = removal_masks(stack, fractions, most_relevant=False).flatten(0, 1)
        holes = torch.cat([morf, lerf])
        frames.append(impute(image.expand(holes.shape[0], -1, -1, -1), holes, generator=generator))
    frames = torch.cat(frames)
    with preserved(model.module):
        scores = _forward_probabilities(model, frames, target, per_pass)
    n_curve, n_road = count * steps, count * len(fractions)
    deletion_scores = scores[:n_curve].reshape(count, steps)
    insertion_scores = scores[n_curve : 2 * n_curve].reshape(count, steps)
    morf_scores = scores[2 * n_curve : 2 * n_curve + n_road].reshape(count, len(fractions))
    lerf_scores = scores[2 * n_curve + n_road :].reshape(count, len(fractions))
    deletion_auc, insertion_auc = _auc(deletion_scores, curve), _auc(insertion_scores, curve)
    region = M.resize_mask(mask, (height, width)) if mask is not None else None
    rows = []
    for k in range(count):
        values = stack[k].cpu().numpy()
        row = {
            "deletion_auc": float(deletion_auc[k]),
            "insertion_auc": float(insertion_auc[k]),
            "road_morf": float(morf_scores[k].mean()) if fractions else None,
            "road_lerf": float(lerf_scores[k].mean()) if fractions else None,
            "gini": M.gini(values, signed=signed[k]),
            "constant": M.is_constant(values),
            "pointing_game": None,
            "energy_pointing_game": None,
        }
        if region is not None and region.any():
            hit = M.pointing_game(values, region, tolerance=M.scaled_tolerance((height, width), tolerance))
            row["pointing_game"] = None if hit is None else float(hit)
            row["energy_pointing_game"] = M.energy_in_mask(values, region, signed=signed[k])
        rows.append(row)
    curves = {
        "deletion": deletion_scores,
        "insertion": insertion_scores,
        "road_morf": morf_scores,
        "road_lerf": lerf_scores,
    }
    return rows, curves


class _Tally:
    """Running per-image values of every metric, and the sum of the curves, for one method or baseline."""

    def __init__(self) -> None:
        self.values: dict[str, list[float]] = {name: [] for name in METRICS}
        self.curves: dict[str, np.ndarray] = {}
        self.count = 0

    def add(self, row: dict, curves: dict[str, np.ndarray]) -> None:
        for name in METRICS:
            value = float(row["constant"]) if name == "constant_fraction" else row.get(name)
            if value is not None and not (isinstance(value, float) and math.isnan(value)):
                self.values[name].append(float(value))
        for name, values in curves.items():
            self.curves[name] = self.curves.get(name, 0) + values
        self.count += 1

    def summary(self) -> dict:
        metrics, spread, counts = {}, {}, {}
        for name, values in self.values.items():
            metrics[name] = round(float(np.mean(values)), 6) if values else None
            spread[name] = round(float(np.std(values)), 6) if values else None
            counts[name] = len(values)
        return {"metrics": metrics, "spread": spread, "counts": counts}

    def mean_curves(self) -> dict[str, list[float]]:
        return {name: [round(float(v) / self.count, 6) for v in values] for name, values in self.curves.items()}


def _worse_or_equal(value: float | None, baseline: float | None, higher_is_better: bool) -> bool:
    if value is None or baseline is None:
        return False
    return value <= baseline if higher_is_better else value >= baseline


def _resolve_methods(methods: str | Sequence[str]) -> list[str]:
    if isinstance(methods, str):
        names = (
            METHODS.names()
            if methods.strip().lower() == "all"
            else [m.strip() for m in methods.split(",") if m.strip()]
        )
    else:
        names = list(methods)
    if not names:
        raise InputError("give at least one method (or 'all')")
    for name in names:
        METHODS.get(name)  # unknown names get "did you mean"
    return list(dict.fromkeys(names))


def evaluate(
    model: Model,
    data: object,
    *,
    methods: str | Sequence[str] = "all",
    masks: str | os.PathLike | None = None,
    boxes: str | os.PathLike | None = None,
    target: str = "label",
    options: dict | None = None,
    steps: int = 20,
    fractions: Sequence[float] = FRACTIONS,
    tolerance: float = M.TOLERANCE_PX,
    sanity: bool = False,
    sanity_images: int = 8,
    independent: bool = False,
    shuffled_model: Model | None = None,
    max_stages: int = 8,
    seed: int = 0,
    limit: int | None = None,
    batch_size: int = 8,
    max_seconds: float | None = None,
    quiet: bool = True,
) -> Evaluation:
    """Evaluate ``methods`` (``"all"``, a comma list or a list of registered names) on ``data`` (see
    :func:`open_data`): for every method and baseline the mean and spread over images of the pointing game,
    the energy-based pointing game (offset-free mass in the object), deletion and insertion AUC, ROAD (most-
    and least-relevant first), Gini sparsity and the fraction of constant maps; with ``sanity`` the cascading
    model randomization (and ``independent``, and the data randomization against ``shuffled_model``) on the
    first ``sanity_images`` images. ``target``: ``"label"`` (the image's class when the data has one, else
    the top-1) or ``"top1"``. ``max_seconds`` stops between batches and keeps what was scored."""
    from ..runner import method_options

    started = time.perf_counter()
    names = _resolve_methods(methods)
    if target not in ("label", "top1"):
        raise InputError(f"target must be 'label' or 'top1', got {target!r}")
    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, got {batch_size}")
    fractions = check_fractions(fractions)
    source = open_data(data, model, masks=masks, boxes=boxes)
    source = source.limited(limit)
    chosen = method_options(names, dict(options or {}), quiet=True)
    failed: dict[str, str] = {}
    explainers = {}
    for name, opts in zip(names, chosen, strict=True):
        try:
            explainers[name] = METHODS.get(name)(model, **opts)
        except CnnscopeError as exc:  # a method that does not apply to this model (CAM without a GAP head)
            if len(names) == 1:
                raise
            failed[name] = str(exc)
    names = [name for name in names if name in explainers]
    signed = {name: explainer.is_signed() for name, explainer in explainers.items()}
    tallies = {name: _Tally() for name in [*names, *BASELINES]}
    generator = np.random.default_rng(seed)
    torch_generator = torch.Generator().manual_seed(seed)
    per_pass = _per_pass(model)
    progress = Progress(len(source) * len(names), "evaluate", quiet=quiet, max_seconds=max_seconds)
    skipped: list[dict] = []
    sanity_set: list[tuple[np.ndarray, int]] = []
    done, complete = 0, True
    entries = source.entries
    try:
        for start in range(0, len(entries), batch_size):
            if done and progress.should_stop():  # the first batch always runs
                complete = False
                break
            chunk, pictures = [], []
            for entry in entries[start : start + batch_size]:
                try:
                    pictures.append(source.load_image(entry))
                    chunk.append(entry)
                except InputError as exc:
                    skipped.append({"path": entry.key, "reason": str(exc)})
            if not chunk:
                continue
            batch = model.preprocess(pictures)
            with preserved(model.module), torch.inference_mode():
                top = model(batch).argmax(dim=1).tolist()
            labels = [e.label if (target == "label" and e.label >= 0) else t for e, t in zip(chunk, top, strict=True)]
            maps = {}
            for name, explainer in list(explainers.items()):
                named = [Path(e.key).name for e in chunk]
                try:
                    explanation = explainer(pictures, [[label] for label in labels], names=named)
                except CnnscopeError as exc:
                    if len(explainers) == 1:
                        raise
                    failed[name] = str(exc)  # dropped from the table: its images would not match the others'
                    del explainers[name]
                    continue
                maps[name] = explanation.maps[:, 0].detach().float().cpu()
                progress.update(len(chunk))
            names = [name for name in names if name in explainers]
            size = tuple(batch.shape[-2:])
            for i, entry in enumerate(chunk):
                mask = source.load_mask(entry, pictures[i].shape[:2])
                candidates = [maps[name][i] for name in names]
                candidates += [
                    torch.as_tensor(M.center_map(size), dtype=torch.float32),
                    torch.as_tensor(M.random_map(size, generator), dtype=torch.float32),
                    torch.as_tensor(M.smooth_random_map(size, generator), dtype=torch.float32),
                ]
                rows, curves = score_maps(
                    model,
                    batch[i : i + 1],
                    candidates,
                    labels[i],
                    signed=[signed[n] for n in names] + [False] * len(BASELINES),
                    mask=mask,
                    steps=steps,
                    fractions=fractions,
                    tolerance=tolerance,
                    generator=torch_generator,
                    per_pass=per_pass,
                )
                for k, name in enumerate([*names, *BASELINES]):
                    tallies[name].add(rows[k], {key: value[k] for key, value in curves.items()})
                if len(sanity_set) < sanity_images:
                    sanity_set.append((pictures[i], labels[i]))
                done += 1
    finally:
        progress.close()
    if done == 0:
        raise InputError("no image could be evaluated" + (f": {skipped[0]['reason']}" if skipped else ""))
    baselines = {name: tallies[name].summary() for name in BASELINES}
    results = []
    for name in names:
        entry = {"name": name, "signed": signed[name], **tallies[name].summary()}
        entry["not_better_than_random"] = [
            metric
            for metric in AGAINST_RANDOM
            if _worse_or_equal(entry["metrics"][metric], baselines["random"]["metrics"][metric], METRICS[metric])
        ]
        results.append(entry)
    if sanity and complete:
        _sanity(model, explainers, results, sanity_set, independent, shuffled_model, max_stages, seed)
    curves = {name: tallies[name].mean_curves() for name in [*names, *BASELINES]}
    settings = {
        "methods": names,
        "target": target,
        "steps": steps,
        "road_fractions": list(fractions),
        "tolerance_px_at_224": tolerance,
        "tolerance_px": round(M.scaled_tolerance(tuple(model.preprocess.size[-2:]), tolerance), 3),
        "seed": seed,
        "data": source.description,
        "with_masks": sum(1 for e in source.entries[:done] if e.mask is not None),
        "sanity_images": len(sanity_set) if sanity else 0,
    }
    return Evaluation(
        results,
        baselines,
        done,
        settings,
        curves,
        complete=complete,
        seconds=time.perf_counter() - started,
        problems=list(source.problems),
        skipped=skipped,
        failed=[{"name": name, "reason": reason} for name, reason in failed.items()],
    )


def _per_pass(model: Model) -> int:
    from ..methods.base import auto_images_per_pass

    return max(1, auto_images_per_pass(model))


def _sanity(model, explainers, results, sanity_set, independent, shuffled_model, max_stages, seed) -> None:
    pictures = [p for p, _ in sanity_set]
    targets = [[t] for _, t in sanity_set]

    for entry in results:
        name = entry["name"]
        explainer = explainers[name]
        config = {k: v for k, v in explainer.config.items() if k in type(explainer).options}
        layer = explainer.layer.key if getattr(explainer, "layer", None) is not None else None

        def maps_of(current: Model, seed_shift: int = 0, *, config=config, layer=layer, name=name) -> np.ndarray:
            options = dict(config)
            if "seed" in options and seed_shift:
                options["seed"] = int(options["seed"]) + seed_shift
            cls = METHODS.get(name)
            if layer is not None and cls.uses_layer:
                options["layer"] = layer
            return cls(current, **options)(pictures, targets).maps[:, 0].detach().float().cpu().numpy()

        original = maps_of(model)
        entry["sanity"] = model_randomization(model, maps_of, max_stages=max_stages, seed=seed, original=original)
        if independent:
            entry["sanity_independent"] = model_randomization(
                model, maps_of, cascading=False, max_stages=max_stages, seed=seed, original=original
            )
        if "seed" in type(explainer).options:
            from .sanity import similarity

            again = maps_of(model, 1)
            rows = [similarity(original[i], again[i]) for i in range(len(original))]
            entry["seed_spearman_abs"] = round(float(np.mean([r["spearman_abs"] for r in rows])), 6)
        else:
            entry["seed_spearman_abs"] = 1.0
        if shuffled_model is not None:
            entry["data_randomization"] = data_randomization(model, shuffled_model, maps_of)
