"""Plates of many small pictures: filter mosaics, channel grids, activation-maximization and Deep Dream
sheets. ``mosaic`` builds one array (fast for 1,000 tiles); ``plate_figure`` adds captions."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure
from PIL import Image


def columns_for(count: int) -> int:
    """A near-square layout: 25 -> 5, 32 -> 6, 1280 -> 36."""
    return max(1, math.ceil(math.sqrt(count)))


def mosaic(
    tiles: Sequence[np.ndarray] | np.ndarray,
    *,
    columns: int | None = None,
    gap: int = 1,
    tile_size: int | None = None,
    background: int = 255,
) -> np.ndarray:
    """One RGB uint8 image of ``tiles`` (each (h, w) or (h, w, 3), uint8) in a grid, row-major.

    ``tile_size``: enlarge each tile with nearest-neighbour to at least this many pixels on its
    longer side (a 3x3 kernel becomes visible); ``gap`` pixels of ``background`` between tiles."""
    if len(tiles) == 0:
        raise ValueError("no tiles")
    first = np.asarray(tiles[0])
    height, width = first.shape[:2]
    factor = 1 if tile_size is None else max(1, math.ceil(tile_size / max(height, width)))
    cols = columns or columns_for(len(tiles))
    rows = math.ceil(len(tiles) / cols)
    cell_h, cell_w = height * factor, width * factor
    sheet = np.full((rows * cell_h + (rows - 1) * gap, cols * cell_w + (cols - 1) * gap, 3), background, dtype=np.uint8)
    for index, tile in enumerate(tiles):
        picture = np.asarray(tile)
        if picture.ndim == 2:
            picture = np.repeat(picture[:, :, None], 3, axis=2)
        if factor > 1:
            picture = picture.repeat(factor, axis=0).repeat(factor, axis=1)
        row, col = divmod(index, cols)
        top, left = row * (cell_h + gap), col * (cell_w + gap)
        sheet[top : top + cell_h, left : left + cell_w] = picture
    return sheet


def to_uint8(values: np.ndarray, low: float | None = None, high: float | None = None) -> np.ndarray:
    """Min-max scale to 0-255 (``low``/``high`` override the range; a constant array becomes mid-grey)."""
    values = np.asarray(values, dtype=np.float32)
    low = float(values.min()) if low is None else low
    high = float(values.max()) if high is None else high
    if high - low <= 1e-12:
        return np.full(values.shape, 128, dtype=np.uint8)
    return np.clip((values - low) / (high - low) * 255.0 + 0.5, 0, 255).astype(np.uint8)


def batch_to_uint8(images) -> np.ndarray:
    """A (N, 3, H, W) float tensor in [0, 1] as (N, H, W, 3) uint8 images."""
    return to_uint8(images.detach().permute(0, 2, 3, 1).cpu().numpy(), 0.0, 1.0)


def resize_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of an RGB uint8 image."""
    if image.shape[:2] == (height, width):
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR))


def plate_figure(
    images: Sequence[np.ndarray],
    captions: Sequence[str],
    *,
    columns: int | None = None,
    title: str = "",
    cell: float = 2.2,
) -> Figure:
    """A grid of pictures with a caption above each (at most a few dozen; use :func:`mosaic` beyond)."""
    cols = columns or columns_for(len(images))
    rows = math.ceil(len(images) / cols)
    aspect = images[0].shape[0] / max(1, images[0].shape[1])  # rows as tall as the pictures, plus a caption
    fig = Figure(figsize=(cell * cols, (cell * aspect + 0.35) * rows + (0.4 if title else 0.1)), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for axis in axes:
        axis.set_axis_off()
    for axis, picture, caption in zip(axes, images, captions, strict=False):
        axis.imshow(picture, interpolation="nearest" if max(picture.shape[:2]) < 64 else "antialiased")
        axis.set_title(caption, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig
