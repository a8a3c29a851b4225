"""Metrics of one map against where the object is, and of the map alone.

Every function takes maps as arrays (any method's ``Explanation.maps[i, k]``, or a user's own), never a
method, so a map from another library is measured the same way.

- :func:`pointing_game` (Zhang et al. 2016, with TorchRay's protocol): a hit when the map's peak lies
  within ``tolerance`` pixels of the object (15 px at 224 px, scaled with the map's size);
- :func:`energy_in_mask` (the energy-based pointing game of Score-CAM, Wang et al. 2020): the share of
  the map's mass inside the object;
- :func:`gini` (sparsity, Chalasani et al. 2020) and :func:`is_constant`;
- baselines: :func:`center_map` (a Gaussian bump in the middle of the image, the pointing game's centre
  baseline), :func:`random_map` (per-pixel noise) and :func:`smooth_random_map` (blobs at the scale of a
  CAM cell).

Mass is measured offset-free: an unsigned map has its minimum subtracted first, so a constant offset
(RISE's maps sit on one, the mean score of the random masks) does not count as mass inside the object;
a signed map counts its positive part only (evidence for the class, not against it).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ..errors import InputError

#: TorchRay's pointing-game tolerance: 15 pixels at a 224-pixel input.
TOLERANCE_PX = 15.0
REFERENCE_SIDE = 224


def _map(saliency) -> np.ndarray:
    values = np.asarray(saliency.detach().cpu() if hasattr(saliency, "detach") else saliency, dtype=np.float64)
    if values.ndim != 2:
        raise InputError(f"a map is (H, W), got shape {values.shape}")
    if not np.isfinite(values).all():
        raise InputError("the map holds NaN or infinite values; check the method's output before measuring it")
    return values


def _mask(mask, shape: tuple[int, int]) -> np.ndarray:
    region = np.asarray(mask)
    if region.shape != shape:
        raise InputError(f"the mask is {region.shape} but the map is {shape}; resize the mask to the map first")
    return region.astype(bool)


def mass(saliency, *, signed: bool = False) -> np.ndarray:
    """The map as non-negative mass: the positive part of a signed map, an unsigned map minus its minimum."""
    values = _map(saliency)
    if signed:
        return np.clip(values, 0, None)
    return values - values.min()


def scaled_tolerance(shape: tuple[int, int], tolerance: float = TOLERANCE_PX) -> float:
    """``tolerance`` pixels at a 224-pixel side, scaled to a map of ``shape`` (by its shorter side)."""
    return float(tolerance) * min(shape) / REFERENCE_SIDE


def is_constant(saliency, *, relative: float = 1e-6) -> bool:
    """True when the map has no structure: its range is below ``relative`` of its largest magnitude
    (an all-zero map included)."""
    values = _map(saliency)
    spread = float(values.max() - values.min())
    scale = float(np.abs(values).max())
    return spread <= relative * scale or scale == 0.0


def peak(saliency) -> tuple[int, int]:
    """(row, column) of the map's maximum (the first one, in reading order, on ties)."""
    values = _map(saliency)
    row, column = np.unravel_index(int(np.argmax(values)), values.shape)
    return int(row), int(column)


def pointing_game(saliency, mask, *, tolerance: float | None = None) -> bool | None:
    """TorchRay's pointing game: True when the map's peak lies within ``tolerance`` pixels of the object
    (``mask``: (H, W) bool, nonzero = object). ``tolerance`` defaults to 15 px at 224 px, scaled with the
    map's size. A constant map points nowhere: a miss (and it is counted apart, as a constant map). None
    when the mask is empty."""
    values = _map(saliency)
    region = _mask(mask, values.shape)
    if not region.any():
        return None
    if is_constant(values):
        return False
    radius = scaled_tolerance(values.shape) if tolerance is None else float(tolerance)
    if radius < 0:
        raise InputError(f"the pointing-game tolerance is a distance in pixels, got {tolerance}")
    row, column = peak(values)
    if region[row, column]:
        return True
    # distance from the peak to the nearest object pixel
    distance = ndimage.distance_transform_edt(~region)
    return bool(distance[row, column] <= radius)


def energy_in_mask(saliency, mask, *, signed: bool = False) -> float | None:
    """The share of the map's (offset-free) mass inside the object, in [0, 1]; None for an empty mask or a
    map without mass."""
    values = mass(saliency, signed=signed)
    region = _mask(mask, values.shape)
    total = float(values.sum())
    if not region.any() or total <= 0:
        return None
    return float(values[region].sum() / total)


def gini(saliency, *, signed: bool = False) -> float:
    """Gini index of the map's magnitudes (|.| of a signed map, minus the minimum of an unsigned one):
    0 when every pixel carries the same weight, towards 1 when one pixel carries it all."""
    values = np.abs(_map(saliency)) if signed else mass(saliency)
    flat = np.sort(values.ravel())
    total = flat.sum()
    count = flat.size
    if total <= 0 or count < 2:
        return 0.0
    ranks = np.arange(1, count + 1)
    return float(((2 * ranks - count - 1) * flat).sum() / (count * total))


def center_map(shape: tuple[int, int], *, sigma: float = 0.25) -> np.ndarray:
    """A Gaussian bump at the image centre (``sigma`` as a fraction of each side): the centre baseline."""
    height, width = shape
    ys = (np.arange(height) + 0.5 - height / 2) / (sigma * height)
    xs = (np.arange(width) + 0.5 - width / 2) / (sigma * width)
    return np.exp(-0.5 * (ys[:, None] ** 2 + xs[None, :] ** 2))


def random_map(shape: tuple[int, int], generator: np.random.Generator) -> np.ndarray:
    """Independent uniform noise per pixel."""
    return generator.random(shape)


def smooth_random_map(shape: tuple[int, int], generator: np.random.Generator, *, cells: int = 7) -> np.ndarray:
    """Noise at the scale of a CAM cell (a ``cells`` x ``cells`` grid, blurred): blobs, not pixels."""
    coarse = generator.random((cells, cells))
    zoomed = ndimage.zoom(coarse, (shape[0] / cells, shape[1] / cells), order=3)
    return zoomed[: shape[0], : shape[1]]


def resize_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A bool mask resized (nearest neighbour) to ``shape``."""
    region = np.asarray(mask, dtype=bool)
    if region.shape == tuple(shape):
        return region
    from PIL import Image

    return np.asarray(Image.fromarray(region).resize((shape[1], shape[0]), Image.Resampling.NEAREST))
