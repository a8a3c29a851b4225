"""Pictures of a map over a video clip: the overlay frame by frame (for a GIF and an MP4), a strip of frames, and
the map's mass per frame."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .overlay import overlay

#: Height in pixels of each frame in a strip.
STRIP_HEIGHT = 96


def overlay_frames(
    frames: np.ndarray, heat: np.ndarray, *, alpha: float = 0.5, colormap: str | None = None, signed: bool = False
) -> list[np.ndarray]:
    """(T, H, W, 3) uint8 frames and a (t, h, w) normalized map (any resolution) -> T overlays, frame t under the
    map's nearest time step."""
    count, steps = frames.shape[0], heat.shape[0]
    style = {"alpha": alpha, "colormap": colormap, "signed": signed}
    return [overlay(frames[t], heat[min(steps - 1, int((t + 0.5) * steps / count))], **style) for t in range(count)]


def frame_strip(
    pictures: list[np.ndarray], gap: int = 4, height: int = STRIP_HEIGHT, columns: int | None = None
) -> np.ndarray:
    """The frames side by side, each ``height`` pixels high, on white; with ``columns``, in rows of that many
    frames (a compact tile for a grid of several maps)."""
    if columns is not None and 0 < columns < len(pictures):
        rows = [frame_strip(pictures[i : i + columns], gap, height) for i in range(0, len(pictures), columns)]
        tile = np.full((len(rows) * (height + gap) - gap, rows[0].shape[1], 3), 255, dtype=np.uint8)
        for index, row in enumerate(rows):
            tile[index * (height + gap) : index * (height + gap) + height, : row.shape[1]] = row
        return tile
    resized = []
    for picture in pictures:
        width = max(1, round(picture.shape[1] * height / picture.shape[0]))
        resized.append(np.asarray(Image.fromarray(picture).resize((width, height), Image.Resampling.BILINEAR)))
    strip = np.full((height, sum(p.shape[1] for p in resized) + gap * (len(resized) - 1), 3), 255, dtype=np.uint8)
    x = 0
    for picture in resized:
        strip[:, x : x + picture.shape[1]] = picture
        x += picture.shape[1] + gap
    return strip


def temporal_mass(heat: torch.Tensor | np.ndarray) -> list[float]:
    """The share of a (T, h, w) map's positive mass in each frame (sums to 1; all zeros for an empty map)."""
    values = torch.as_tensor(heat).double().clamp_min(0).flatten(1).sum(dim=1)
    total = float(values.sum())
    return [round(float(v) / total, 6) if total > 0 else 0.0 for v in values]
