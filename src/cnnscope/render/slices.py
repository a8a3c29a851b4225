"""Pictures of a 3-D map over its volume: the three orthogonal planes through the peak, and a row of slices."""

from __future__ import annotations

import numpy as np
from PIL import Image

from .overlay import overlay

#: Height in pixels of every panel of a montage.
PANEL = 160
#: Slices in the montage's second row.
ROW_SLICES = 6


def _index(position: int, size_from: int, size_to: int) -> int:
    return int(min(size_to - 1, max(0, (position + 0.5) * size_to / size_from)))


def _panel(picture: np.ndarray, height: int = PANEL) -> np.ndarray:
    width = max(1, round(picture.shape[1] * height / picture.shape[0]))
    return np.asarray(Image.fromarray(picture).resize((width, height), Image.Resampling.NEAREST))


def _row(panels: list[np.ndarray], gap: int = 4) -> np.ndarray:
    height = max(p.shape[0] for p in panels)
    width = sum(p.shape[1] for p in panels) + gap * (len(panels) - 1)
    row = np.full((height, width, 3), 255, dtype=np.uint8)
    x = 0
    for panel in panels:
        row[: panel.shape[0], x : x + panel.shape[1]] = panel
        x += panel.shape[1] + gap
    return row


def orthogonal_planes(
    volume: np.ndarray, heat: np.ndarray, peak: tuple[int, int, int], **style
) -> list[tuple[str, np.ndarray]]:
    """(name, overlay) of the axial (z), coronal (y) and sagittal (x) planes through ``peak`` = (x, y, z) in the
    volume's voxels. ``volume`` is (D, H, W, 3) uint8, ``heat`` a (d, h, w) normalized map (any resolution)."""
    depth, height, width = volume.shape[:3]
    x, y, z = peak
    hd, hh, hw = heat.shape
    zi, yi, xi = _index(z, depth, hd), _index(y, height, hh), _index(x, width, hw)
    return [
        (f"z={z}", overlay(volume[z], heat[zi], **style)),
        (f"y={y}", overlay(volume[:, y], heat[:, yi], **style)),
        (f"x={x}", overlay(volume[:, :, x], heat[:, :, xi], **style)),
    ]


def volume_montage(
    volume: np.ndarray,
    heat: np.ndarray,
    peak: tuple[int, int, int],
    *,
    alpha: float = 0.5,
    colormap: str | None = None,
    signed: bool = False,
) -> np.ndarray:
    """One RGB picture: the three orthogonal planes through the peak (top row), and ``ROW_SLICES`` axial slices
    evenly spread through the volume with the peak's slice among them (bottom row)."""
    style = {"alpha": alpha, "colormap": colormap, "signed": signed}
    depth = volume.shape[0]
    top = _row([_panel(picture) for _, picture in orthogonal_planes(volume, heat, peak, **style)])
    chosen = sorted(set(np.linspace(0, depth - 1, min(depth, ROW_SLICES)).round().astype(int).tolist()) | {peak[2]})
    hd = heat.shape[0]
    bottom = _row(
        [_panel(overlay(volume[z], heat[_index(z, depth, hd)], **style), PANEL // 2) for z in chosen[: ROW_SLICES + 1]]
    )
    width = max(top.shape[1], bottom.shape[1])
    picture = np.full((top.shape[0] + 4 + bottom.shape[0], width, 3), 255, dtype=np.uint8)
    picture[: top.shape[0], : top.shape[1]] = top
    picture[top.shape[0] + 4 :, : bottom.shape[1]] = bottom
    return picture
