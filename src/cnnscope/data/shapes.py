"""Shapes on textured backgrounds, with their masks, from a seed.

Each image holds one shape whose class is the label; its pixel mask is the ground truth for "where is
the evidence" (pointing game, localisation of multiple-instance attention). An optional spurious cue
(a small mark in a fixed corner, present mostly in images of one class) makes a dataset on which a
model can be "right for the wrong reason", and its mask says where that wrong reason is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from skimage import draw

from ..errors import InputError

SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond")
CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")


@dataclass(frozen=True)
class SpuriousCue:
    """A ``size``-pixel mark in ``corner``, drawn in ``probability`` of the images of class ``class_index``
    and in ``elsewhere`` of the others."""

    class_index: int = 0
    probability: float = 0.9
    elsewhere: float = 0.05
    corner: str = "bottom-left"
    size: int = 6


@dataclass(frozen=True)
class ShapesDataset:
    """Images (N, H, W, 3) uint8, labels (N,), object masks and cue masks (N, H, W) bool."""

    images: np.ndarray
    labels: np.ndarray
    masks: np.ndarray
    cue_masks: np.ndarray
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int, np.ndarray]:
        return self.images[index], int(self.labels[index]), self.masks[index]

    @property
    def has_cue(self) -> np.ndarray:
        return self.cue_masks.any(axis=(1, 2))


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth coloured noise plus faint stripes: texture without shapes."""
    coarse = rng.random((size // 8 + 2, size // 8 + 2, 3))
    from skimage.transform import resize

    smooth = resize(coarse, (size, size), order=3, mode="reflect", anti_aliasing=False)
    angle = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[0:size, 0:size]
    stripes = 0.08 * np.sin((np.cos(angle) * xx + np.sin(angle) * yy) * rng.uniform(0.3, 0.8))
    return np.clip(0.25 + 0.35 * smooth + stripes[..., None], 0, 1)


def _shape_mask(kind: str, rng: np.random.Generator, size: int, scale: tuple[float, float]) -> np.ndarray:
    radius = rng.uniform(*scale) * size / 2
    cy, cx = rng.uniform(radius + 1, size - radius - 1, size=2)
    mask = np.zeros((size, size), dtype=bool)
    if kind == "circle":
        mask[draw.disk((cy, cx), radius, shape=mask.shape)] = True
    elif kind == "ring":
        mask[draw.disk((cy, cx), radius, shape=mask.shape)] = True
        mask[draw.disk((cy, cx), radius * 0.55, shape=mask.shape)] = False
    elif kind == "square":
        rr, cc = draw.rectangle(
            (cy - radius * 0.8, cx - radius * 0.8), (cy + radius * 0.8, cx + radius * 0.8), shape=mask.shape
        )
        mask[rr, cc] = True
    elif kind == "triangle":
        rows = [cy - radius, cy + radius * 0.8, cy + radius * 0.8]
        cols = [cx, cx - radius, cx + radius]
        mask[draw.polygon(rows, cols, shape=mask.shape)] = True
    elif kind == "diamond":
        mask[draw.polygon([cy - radius, cy, cy + radius, cy], [cx, cx + radius, cx, cx - radius], shape=mask.shape)] = (
            True
        )
    elif kind == "cross":
        arm = radius * 0.3
        rr, cc = draw.rectangle((cy - radius, cx - arm), (cy + radius, cx + arm), shape=mask.shape)
        mask[rr, cc] = True
        rr, cc = draw.rectangle((cy - arm, cx - radius), (cy + arm, cx + radius), shape=mask.shape)
        mask[rr, cc] = True
    return mask


def make_shapes(
    count: int,
    *,
    size: int = 64,
    classes: Sequence[str] = ("circle", "square", "triangle", "cross"),
    seed: int = 0,
    scale: tuple[float, float] = (0.35, 0.6),
    spurious: SpuriousCue | None = None,
) -> ShapesDataset:
    """``count`` images of ``size`` x ``size``, classes in turn (balanced), everything drawn from ``seed``."""
    unknown = [c for c in classes if c not in SHAPES]
    if unknown or len(classes) < 2:
        raise InputError(f"classes must be at least two of {', '.join(SHAPES)}; got {list(classes)}")
    if count < 1 or size < 16:
        raise InputError("make_shapes needs count >= 1 and size >= 16")
    if spurious is not None and (spurious.corner not in CORNERS or not 0 <= spurious.class_index < len(classes)):
        raise InputError(f"the spurious cue needs a corner among {', '.join(CORNERS)} and a valid class index")
    rng = np.random.default_rng(seed)
    images = np.empty((count, size, size, 3), dtype=np.uint8)
    masks = np.zeros((count, size, size), dtype=bool)
    cues = np.zeros((count, size, size), dtype=bool)
    labels = np.arange(count) % len(classes)
    rng.shuffle(labels)
    for index, label in enumerate(labels):
        picture = _background(rng, size)
        mask = _shape_mask(classes[label], rng, size, scale)
        colour = rng.uniform(0.55, 1.0, size=3) * rng.choice([1.0, 0.9])
        picture[mask] = colour
        if spurious is not None:
            chance = spurious.probability if label == spurious.class_index else spurious.elsewhere
            if rng.random() < chance:
                s = spurious.size
                top = 1 if spurious.corner.startswith("top") else size - s - 1
                left = 1 if spurious.corner.endswith("left") else size - s - 1
                cues[index, top : top + s, left : left + s] = True
                picture[cues[index]] = (1.0, 0.1, 0.1)
                mask &= ~cues[index]
        images[index] = np.round(picture * 255).astype(np.uint8)
        masks[index] = mask
    return ShapesDataset(images=images, labels=labels, masks=masks, cue_masks=cues, classes=tuple(classes))
