"""Sanity checks for saliency maps (Adebayo et al. 2018): does the map change when what the model learned
is destroyed?

- **Cascading model randomization**: re-initialize the model's weights stage by stage from the head down
  (the classifier first, then block after block, the last stage leaving nothing trained) and compare each
  stage's map with the trained model's. A map that stays similar shows the input's edges, not the model's
  reasoning (the paper's finding for guided backprop).
- **Independent randomization**: one stage at a time, the rest trained.
- **Data randomization**: the same architecture trained on shuffled labels (the user gives it) against
  the real model.

Always on a copy of the model: the user's module, its weights and its random generator state are left as
they were. Stages follow the model's own blocks (:func:`randomization_stages`): the top-level children,
the largest one split into its children until there are enough, a normalization layer kept with the layer
before it, then merged into at most ``max_stages`` contiguous stages. Re-initialization is each module's
own ``reset_parameters`` (the initializer training started from), seeded; a module without one gets its
parameters redrawn from a normal distribution with their own standard deviation.

Similarity of two maps, the paper's measures: Spearman rank correlation of the absolute values and of the
signed values, SSIM of the maps scaled to [0, 1], and the Pearson correlation of their HOG descriptors. A map
that has become constant has similarity 0 with anything (it holds no ranking or structure to share).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..errors import CnnscopeWarning, InputError
from ..models import Model

#: Similarity measures reported per stage.
MEASURES = ("spearman_abs", "spearman", "ssim", "hog")
_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


@dataclass(frozen=True)
class Stage:
    """A group of the model's modules re-initialized together; ``name`` is how reports show it."""

    name: str
    modules: tuple[str, ...]


def _has_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def randomization_stages(module: nn.Module, *, max_stages: int = 8) -> list[Stage]:
    """The model's blocks as re-initialization stages, ordered from the head (output) to the input."""
    if max_stages < 1:
        raise InputError(f"max_stages must be at least 1, got {max_stages}")
    units: list[tuple[str, nn.Module]] = [(n, m) for n, m in module.named_children() if _has_parameters(m)]
    if not units:
        if _has_parameters(module):
            return [Stage("model", ("",))]
        raise InputError("the model has no parameters to randomize")
    # split the unit holding the most parameters into its children until there are enough units
    while len(units) < max_stages:
        candidates = [
            i
            for i, (_, unit) in enumerate(units)
            if not any(True for _ in unit.parameters(recurse=False))
            and any(_has_parameters(c) for c in unit.children())
        ]
        if not candidates:
            break
        index = max(candidates, key=lambda i: _count(units[i][1]))
        name, unit = units[index]
        units[index : index + 1] = [(f"{name}.{n}", c) for n, c in unit.named_children() if _has_parameters(c)]
    # a normalization layer belongs to the layer before it
    groups: list[list[str]] = []
    for name, unit in units:
        if groups and isinstance(unit, _NORMS):
            groups[-1].append(name)
        else:
            groups.append([name])
    if any(True for _ in module.parameters(recurse=False)):
        groups[0].insert(0, "")  # the model's own parameters (position embeddings, a class token) go with the input
    groups.reverse()  # from the head down
    if len(groups) > max_stages:
        head, rest = groups[0], groups[1:]
        chunks = np.array_split(np.arange(len(rest)), max_stages - 1)
        groups = [head] + [[name for i in reversed(chunk) for name in rest[int(i)]] for chunk in chunks if len(chunk)]
    return [Stage(_stage_name(names), tuple(names)) for names in groups]


def _stage_name(names: list[str]) -> str:
    shown = [name or "(own parameters)" for name in names]
    return shown[0] if len(shown) == 1 else f"{shown[0]} .. {shown[-1]}"


@torch.no_grad()
def reinitialize(module: nn.Module, names: tuple[str, ...], seed: int) -> None:
    """Re-initialize the named submodules of ``module`` (a copy: this changes it) from ``seed``, leaving
    the global random state as it was."""
    lookup = dict(module.named_modules())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name in names:
            parts = [module] if name == "" else list(lookup[name].modules())
            for part in parts:
                own = list(part.parameters(recurse=False))
                if not own:
                    continue
                reset = getattr(part, "reset_parameters", None) if part is not module or name else None
                if callable(reset):
                    reset()
                    if isinstance(part, nn.modules.batchnorm._NormBase):
                        # a fresh norm is the identity: draw its affine as the other layers are drawn
                        if part.weight is not None:
                            part.weight.normal_(1.0, 0.5)
                        if part.bias is not None:
                            part.bias.normal_(0.0, 0.5)
                else:
                    for parameter in own:
                        scale = float(parameter.float().std()) if parameter.numel() > 1 else 1.0
                        parameter.normal_(0.0, scale if scale > 0 else 1.0)


def randomized(model: Model, stages: list[Stage], upto: int, *, cascading: bool = True, seed: int = 0) -> Model:
    """A copy of ``model`` with stages ``0..upto`` (cascading) or only stage ``upto`` re-initialized."""
    module = copy.deepcopy(model.module)
    chosen = range(upto + 1) if cascading else [upto]
    for index in chosen:
        reinitialize(module, stages[index].modules, seed + 1000 * index)
    return Model(
        module,
        labels=model.labels,
        preprocess=model.preprocess,
        multilabel=model.multilabel,
        name=f"{model.name} (randomized)",
        outputs=model.outputs,
        output=model.output,
    )


# -- similarity ------------------------------------------------------------------------------------


def _rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import rankdata

    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    ra, rb = rankdata(a.ravel()), rankdata(b.ravel())
    return float(np.corrcoef(ra, rb)[0, 1])


def _unit(values: np.ndarray) -> np.ndarray:
    spread = np.ptp(values)
    return (values - values.min()) / spread if spread > 0 else np.zeros_like(values)


def _hog(values: np.ndarray) -> np.ndarray:
    from skimage.feature import hog

    cell = max(4, min(values.shape) // 16)
    return hog(values, orientations=9, pixels_per_cell=(cell, cell), cells_per_block=(2, 2), feature_vector=True)


def similarity(original, other) -> dict[str, float]:
    """The paper's four similarity measures between two maps of the same shape."""
    a = np.asarray(original, dtype=np.float64)
    b = np.asarray(other, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise InputError(f"compare two maps of the same (H, W) shape, got {a.shape} and {b.shape}")
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return dict.fromkeys(MEASURES, 0.0)
    from skimage.metrics import structural_similarity

    ua, ub = _unit(np.abs(a)), _unit(np.abs(b))
    window = min(7, *a.shape) // 2 * 2 + 1 if min(a.shape) >= 3 else 3
    ssim = float(structural_similarity(ua, ub, data_range=1.0, win_size=window))
    ha, hb = _hog(ua), _hog(ub)
    hog = float(np.corrcoef(ha, hb)[0, 1]) if np.ptp(ha) > 0 and np.ptp(hb) > 0 else 0.0
    return {
        "spearman_abs": _rank_correlation(np.abs(a), np.abs(b)),
        "spearman": _rank_correlation(a, b),
        "ssim": ssim,
        "hog": hog,
    }


def _mean(rows: list[dict[str, float]]) -> dict[str, float]:
    return {key: float(np.mean([row[key] for row in rows])) for key in MEASURES}


def _spread(rows: list[dict[str, float]]) -> dict[str, float]:
    return {key: float(np.std([row[key] for row in rows])) for key in MEASURES}


MapsOf = Callable[[Model], np.ndarray]


def model_randomization(
    model: Model,
    maps_of: MapsOf,
    *,
    cascading: bool = True,
    max_stages: int = 8,
    seed: int = 0,
    original: np.ndarray | None = None,
    on_stage: Callable[[int, int], None] | None = None,
) -> list[dict]:
    """Per stage (from the head down, the last one fully randomized when cascading), the similarity of the
    maps ``maps_of(randomized model)`` (an (N, H, W) array, one map per image) to ``maps_of(model)``:
    the mean over images of each measure, and its spread (``{measure}_std``)."""
    stages = randomization_stages(model.module, max_stages=max_stages)
    reference = maps_of(model) if original is None else original
    results = []
    for index, stage in enumerate(stages):
        changed = randomized(model, stages, index, cascading=cascading, seed=seed)
        with warnings.catch_warnings():
            # an empty or constant map of a randomized model is an expected outcome here, not news
            warnings.simplefilter("ignore", CnnscopeWarning)
            maps = maps_of(changed)
        rows = [similarity(reference[i], maps[i]) for i in range(len(reference))]
        entry = {"stage": stage.name, "index": index, "modules": list(stage.modules), **_mean(rows)}
        entry.update({f"{key}_std": value for key, value in _spread(rows).items()})
        results.append(entry)
        if on_stage is not None:
            on_stage(index + 1, len(stages))
    return results


def data_randomization(model: Model, shuffled: Model, maps_of: MapsOf) -> dict[str, float]:
    """The similarity of the maps of ``model`` and of ``shuffled`` (the same architecture trained on shuffled
    labels): mean over images of each measure. A map that explains the model stays dissimilar."""
    if shuffled.num_classes != model.num_classes:
        raise InputError(
            f"the shuffled-label model has {shuffled.num_classes} classes, the model {model.num_classes}; "
            "train the same architecture on the same classes with the labels shuffled"
        )
    reference = maps_of(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CnnscopeWarning)
        other = maps_of(shuffled)
    rows = [similarity(reference[i], other[i]) for i in range(len(reference))]
    return {**_mean(rows), **{f"{key}_std": value for key, value in _spread(rows).items()}}
