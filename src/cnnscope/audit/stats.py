"""Where a map puts its mass: the per-image statistics of the audit, on maps at a fixed small resolution.

Every statistic reads the map's positive part normalized to sum 1 (the share of the evidence *for* the
class in each cell; a map with no positive value has none, and its statistics are NaN):

- ``peak``: the largest raw value (the method's own scale); ``peak_x``, ``peak_y``: where it is, as a
  fraction of the image's width and height (0 left/top, 1 right/bottom);
- ``inside``: the share inside the object's mask or box (NaN without one);
- ``on_object``: whether the peak is on the object (the pointing game, with a tolerance of one cell): the
  largest mask coverage among the peak's cell and its eight neighbours, 0 to 1 (NaN without a mask);
- ``border``: the share in the outer frame whose width is an eighth of the side (44% of the area);
- ``corner_tl``, ``corner_tr``, ``corner_bl``, ``corner_br``: the share in each corner square whose side
  is a quarter of the image's (each 1/16 of the area);
- ``entropy``: of the normalized map, divided by its largest possible value: 1 for evidence spread evenly,
  0 for one cell.

The model input is the whole image resized (no crop), so the cell (i, j) of a map covers the same fraction of
the original image as of the input; masks are brought to the same grid by averaging (a cell's coverage).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

#: Side of the stored maps: the maps of the true and of the predicted class are kept at MAP_SIZE x MAP_SIZE.
MAP_SIZE = 16
STAT_NAMES = (
    "peak",
    "peak_x",
    "peak_y",
    "inside",
    "on_object",
    "border",
    "corner_tl",
    "corner_tr",
    "corner_bl",
    "corner_br",
    "entropy",
)


def to_grid(maps: torch.Tensor, size: int = MAP_SIZE) -> torch.Tensor:
    """(..., h, w) maps -> (..., size, size): averaged over cells when larger (pixel methods), bilinear when
    smaller (a layer's coarse map), as they are when equal."""
    lead = maps.shape[:-2]
    flat = maps.reshape(-1, 1, *maps.shape[-2:]).float()
    height, width = flat.shape[-2:]
    if (height, width) == (size, size):
        out = flat
    elif height >= size and width >= size:
        out = F.adaptive_avg_pool2d(flat, size)
    else:
        out = F.interpolate(flat, size=(size, size), mode="bilinear", align_corners=False)
    return out.reshape(*lead, size, size)


def mask_grid(mask: np.ndarray, size: int = MAP_SIZE) -> np.ndarray:
    """(H, W) bool -> (size, size) float32 coverage in [0, 1] of each cell."""
    tensor = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
    return F.adaptive_avg_pool2d(tensor, size)[0, 0].numpy()


def normalized(maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, s, s) maps -> (their positive parts divided by their sums, whether each has any positive mass)."""
    positive = maps.clamp_min(0)
    total = positive.sum(dim=(-2, -1), keepdim=True)
    valid = total.flatten(1)[:, 0] > 0
    return positive / total.clamp_min(1e-30), valid


def region_masks(size: int = MAP_SIZE) -> dict[str, torch.Tensor]:
    """The fixed regions as (size, size) 0/1 tensors: border frame and the four corners."""
    frame, corner = max(1, size // 8), max(1, size // 4)
    border = torch.ones(size, size)
    border[frame:-frame, frame:-frame] = 0
    regions = {"border": border}
    for name, rows, cols in (
        ("corner_tl", slice(0, corner), slice(0, corner)),
        ("corner_tr", slice(0, corner), slice(size - corner, size)),
        ("corner_bl", slice(size - corner, size), slice(0, corner)),
        ("corner_br", slice(size - corner, size), slice(size - corner, size)),
    ):
        region = torch.zeros(size, size)
        region[rows, cols] = 1
        regions[name] = region
    return regions


def map_statistics(maps: torch.Tensor, masks: torch.Tensor | None) -> dict[str, np.ndarray]:
    """The statistics above for (N, s, s) maps; ``masks``: (N, s, s) coverage with NaN rows where an image
    has no mask (or None). Returns one float32 array of N values per name."""
    count, size = maps.shape[0], maps.shape[-1]
    shares, valid = normalized(maps)
    nan = torch.tensor(float("nan"))
    flat = maps.reshape(count, -1)
    peak, where = flat.max(dim=1)
    out: dict[str, torch.Tensor] = {
        "peak": peak,
        "peak_x": ((where % size).float() + 0.5) / size,
        "peak_y": (torch.div(where, size, rounding_mode="floor").float() + 0.5) / size,
    }
    if masks is None:
        out["inside"] = torch.full((count,), float("nan"))
        out["on_object"] = torch.full((count,), float("nan"))
    else:
        missing = masks.flatten(1).isnan().any(1)
        coverage = masks.nan_to_num(0.0)
        out["inside"] = torch.where(missing, nan, (shares * coverage).sum(dim=(-2, -1)))
        near = F.max_pool2d(coverage[:, None], 3, stride=1, padding=1)[:, 0].reshape(count, -1)
        out["on_object"] = torch.where(missing, nan, near.gather(1, where[:, None])[:, 0])
    for name, region in region_masks(size).items():
        out[name] = (shares * region).sum(dim=(-2, -1))
    logs = torch.where(shares > 0, shares.clamp_min(1e-30).log(), torch.zeros_like(shares))
    out["entropy"] = -(shares * logs).sum(dim=(-2, -1)) / math.log(size * size)
    result = {}
    for name in STAT_NAMES:
        values = out[name]
        if name not in ("peak",):
            values = torch.where(valid, values, nan)
        result[name] = values.float().numpy()
    return result


def top_share(mean_map: np.ndarray, fraction: float = 0.1) -> float:
    """The share of a (normalized) map's mass in its ``fraction`` strongest cells (0.1 for an even map)."""
    values = np.sort(mean_map.ravel())[::-1]
    count = max(1, round(fraction * values.size))
    total = float(values.sum())
    return float(values[:count].sum() / total) if total > 0 else float("nan")


def peak_region(x: np.ndarray, y: np.ndarray, cells: int = 4) -> np.ndarray:
    """The region (0 .. cells*cells - 1, row-major) of a ``cells`` x ``cells`` grid holding each peak."""
    column = np.clip((np.nan_to_num(x, nan=0.5) * cells).astype(int), 0, cells - 1)
    row = np.clip((np.nan_to_num(y, nan=0.5) * cells).astype(int), 0, cells - 1)
    return row * cells + column


REGION_NAMES_4 = tuple(
    f"{vertical} {horizontal}"
    for vertical in ("top", "upper middle", "lower middle", "bottom")
    for horizontal in ("left", "centre-left", "centre-right", "right")
)
