"""Numbers about maps: how much of a map lies on the object, and how far two maps agree.

Grad-CAM and most CAMs end in a ReLU, so most cells of a map are exactly 0, and an upsampled map keeps
large flat zero areas. Statistics that order pixels must handle those ties, or they measure the order in
which a sort happened to place equal values:

- ``rank_correlation`` gives tied values their average rank (Spearman's rho with the tie correction);
- ``top_region`` keeps tied values together and never counts a pixel without evidence (<= 0) as "top":
  a map with 95% zeros has a top-20% region of its 5% positive pixels, not 15% arbitrary zeros;
- ``sign_agreement`` is taken over the pixels where at least one map has evidence, so two maps are not
  called 90% in agreement because both are 0 on 90% of the image.

Each returns NaN where the question has no answer (a constant map has no correlation; two empty top regions
have no IoU), never a made-up 0 or 1.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import InputError
from ..render.overlay import resize_map

#: Values within this fraction of a map's largest magnitude count as 0 (float noise of an upsampled 0).
ZERO_TOLERANCE = 1e-6


def focus_share(heat: np.ndarray, mask: np.ndarray) -> float:
    """The share of the map's positive mass that lies on ``mask`` (the object): in [0, 1], NaN for an
    empty map. ``heat`` is resized bilinearly to the mask's size first, as an overlay draws it."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise InputError(f"a mask must be a 2-D (H, W) array, got shape {mask.shape}")
    positive = np.clip(resize_map(heat, *mask.shape), 0.0, None).astype(np.float64)
    total = positive.sum()
    return float(positive[mask].sum() / total) if total > 0 else math.nan


def _pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise InputError(f"maps to compare must have the same size, got {a.size} and {b.size} values")
    return a, b


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson's correlation of two maps' values (NaN if either map is constant)."""
    a, b = _pair(a, b)
    a = a - a.mean()
    b = b - b.mean()
    scale = math.sqrt(float(a @ a) * float(b @ b))
    return float(np.clip((a @ b) / scale, -1.0, 1.0)) if scale > 0 else math.nan


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n, tied values sharing the mean of the ranks they span (``scipy.stats.rankdata``'s default)."""
    values = np.asarray(values).ravel()
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    # the start of each run of equal values, and its length
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    lengths = np.diff(np.r_[starts, ordered.size])
    mean_rank = starts + (lengths + 1) / 2.0
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = np.repeat(mean_rank, lengths)
    return ranks


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho with ties handled: Pearson's correlation of the average ranks (NaN if a map is constant)."""
    a, b = _pair(a, b)
    return pearson(average_ranks(_snap_zeros(a)), average_ranks(_snap_zeros(b)))


def _snap_zeros(values: np.ndarray) -> np.ndarray:
    """Values within ``ZERO_TOLERANCE`` of the largest magnitude set to exactly 0 (so they tie as zeros)."""
    scale = float(np.abs(values).max()) if values.size else 0.0
    return np.where(np.abs(values) <= ZERO_TOLERANCE * scale, 0.0, values)


def top_region(values: np.ndarray, fraction: float = 0.2) -> np.ndarray:
    """The pixels holding the top ``fraction`` of a map's values, as a bool array of its shape.

    The threshold is the value of the ceil(fraction * n)-th largest pixel; every pixel tied with it is kept
    (so the region may be a little larger than the fraction), and pixels without evidence (<= 0, after
    snapping float noise to 0) are never kept (so the region may be smaller: a mostly-zero map's region is
    its positive part)."""
    if not 0 < fraction <= 1:
        raise InputError(f"the top fraction must be in (0, 1], got {fraction}")
    values = np.asarray(values, dtype=np.float64)
    flat = _snap_zeros(values.ravel())
    count = max(1, math.ceil(fraction * flat.size))
    threshold = np.partition(flat, flat.size - count)[flat.size - count]
    return ((flat >= threshold) & (flat > 0)).reshape(values.shape)


def top_iou(a: np.ndarray, b: np.ndarray, fraction: float = 0.2) -> float:
    """Intersection over union of the two maps' :func:`top_region` (NaN when both regions are empty)."""
    a, b = _pair(a, b)
    first, second = top_region(a, fraction), top_region(b, fraction)
    union = int((first | second).sum())
    return float((first & second).sum() / union) if union else math.nan


def sign_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """The share of pixels where the two maps have the same sign (-, 0 or +), among the pixels where at
    least one of them is not 0 (NaN when both maps are 0 everywhere). For two ReLU'd maps this is the IoU of
    their supports; for signed maps (CAM, ``relu=False``) it also counts opposite evidence."""
    a, b = _pair(a, b)
    first, second = np.sign(_snap_zeros(a)), np.sign(_snap_zeros(b))
    either = (first != 0) | (second != 0)
    count = int(either.sum())
    return float((first[either] == second[either]).sum() / count) if count else math.nan


def normalize(heat: np.ndarray, signed: bool) -> np.ndarray:
    """A map scaled for display as ``Explanation.normalized`` does: [0, 1] by its maximum (negative part
    clipped), or [-1, 1] by its largest magnitude when signed; an all-zero map stays zero."""
    heat = np.nan_to_num(np.asarray(heat, dtype=np.float32))
    if signed:
        scale = float(np.abs(heat).max())
        return heat / scale if scale > 0 else np.zeros_like(heat)
    positive = np.clip(heat, 0.0, None)
    scale = float(positive.max())
    return positive / scale if scale > 0 else np.zeros_like(heat)
