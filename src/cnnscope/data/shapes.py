"""Shapes on textured backgrounds, with their masks, from a seed.

Each image holds one shape whose class is the label; its pixel mask is the ground truth for "where is
the evidence" (pointing game, localisation of multiple-instance attention). An optional spurious cue,
present mostly in images of one class, makes a dataset on which a model can be "right for the wrong
reason", and its mask says where that wrong reason is. Two kinds of cue:

- ``"patch"``: a small square mark in a fixed corner;
- ``"tint"``: the whole background, outside the object, shifted towards a colour.

The scene (labels, background, shape, its colour) and the cue come from two separate random streams
of the same seed, and a cue is painted on the background, behind the object. So a cue-free twin
(``spurious=None``, or a cue drawn with probability 0) of a cued set has the same labels, the same
object masks and the same pixels everywhere except inside the cue masks; and flipping the cue
(``SpuriousCue(probability=0.0, elsewhere=1.0)``) changes nothing but the cue either.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import KW_ONLY, dataclass
from numbers import Integral, Real

import numpy as np
from skimage import draw

from ..errors import InputError

SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond")
CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")
CUE_KINDS = ("patch", "tint")
DEFAULT_STRENGTH = {"patch": 1.0, "tint": 0.4}


def _is_int(value: object) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and np.isfinite(float(value))


@dataclass(frozen=True)
class SpuriousCue:
    """A cue drawn in ``probability`` of the images of class ``class_index`` and in ``elsewhere`` of the
    others (each image decides on its own, from the cue's random stream).

    Args:
        class_index: the class the cue is correlated with (an index into ``make_shapes``' classes).
        probability: chance of the cue in an image of that class, in [0, 1].
        elsewhere: chance of the cue in an image of any other class, in [0, 1].
        corner: where a patch goes: one of ``CORNERS`` (unused by a tint).
        size: side of a patch in pixels, >= 1 (unused by a tint).
        kind: ``"patch"`` (the default) for a ``size``-pixel square in ``corner``; ``"tint"`` for the
            whole background shifted towards ``colour``.
        colour: RGB in [0, 1] that the cue pixels move towards.
        strength: how far they move, in (0, 1]: ``pixel = (1 - strength) * pixel + strength * colour``.
            ``None`` means 1.0 for a patch (a solid mark) and 0.4 for a tint.

    The cue's mask (``ShapesDataset.cue_masks``) is the patch, or the whole background for a tint, minus
    the object's pixels: the cue lies behind the object.
    """

    class_index: int = 0
    probability: float = 0.9
    elsewhere: float = 0.05
    corner: str = "bottom-left"
    size: int = 6
    _: KW_ONLY
    kind: str = "patch"
    colour: tuple[float, float, float] = (1.0, 0.1, 0.1)
    strength: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in CUE_KINDS:
            raise InputError(f"SpuriousCue kind must be one of {', '.join(CUE_KINDS)}; got {self.kind!r}")
        if not _is_int(self.class_index) or self.class_index < 0:
            raise InputError(f"SpuriousCue class_index must be an integer >= 0; got {self.class_index!r}")
        for name in ("probability", "elsewhere"):
            value = getattr(self, name)
            if not _is_real(value) or not 0 <= value <= 1:
                raise InputError(f"SpuriousCue {name} must be a number in [0, 1]; got {value!r}")
        if self.corner not in CORNERS:
            raise InputError(f"SpuriousCue corner must be one of {', '.join(CORNERS)}; got {self.corner!r}")
        if not _is_int(self.size) or self.size < 1:
            raise InputError(f"SpuriousCue size must be an integer >= 1 (pixels); got {self.size!r}")
        colour = tuple(self.colour) if isinstance(self.colour, Sequence) and not isinstance(self.colour, str) else ()
        if len(colour) != 3 or not all(_is_real(c) and 0 <= c <= 1 for c in colour):
            raise InputError(f"SpuriousCue colour must be 3 numbers in [0, 1] (RGB); got {self.colour!r}")
        object.__setattr__(self, "colour", tuple(float(c) for c in colour))
        if self.strength is not None and (not _is_real(self.strength) or not 0 < self.strength <= 1):
            raise InputError(f"SpuriousCue strength must be a number in (0, 1] or None; got {self.strength!r}")

    @property
    def blend(self) -> float:
        """The strength in effect: ``strength``, or the kind's default when it is None."""
        return float(self.strength) if self.strength is not None else DEFAULT_STRENGTH[self.kind]

    def region(self, object_mask: np.ndarray) -> np.ndarray:
        """The (H, W) bool mask this cue covers in an image whose object has ``object_mask``."""
        height, width = object_mask.shape
        if self.kind == "tint":
            return ~object_mask
        region = np.zeros((height, width), dtype=bool)
        top = 1 if self.corner.startswith("top") else height - self.size - 1
        left = 1 if self.corner.endswith("left") else width - self.size - 1
        region[top : top + self.size, left : left + self.size] = True
        return region & ~object_mask


@dataclass(frozen=True)
class ShapesDataset:
    """Images (N, H, W, 3) uint8, labels (N,), object masks and cue masks (N, H, W) bool.

    ``classes`` names the label indices; ``cue_masks`` is all False where an image has no cue.
    """

    images: np.ndarray
    labels: np.ndarray
    masks: np.ndarray
    cue_masks: np.ndarray
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int, np.ndarray]:
        return self.images[index], int(self.labels[index]), self.masks[index]

    def part(self, start: int, stop: int) -> ShapesDataset:
        """Images ``start`` to ``stop`` (a training and a held-out split of one drawn set)."""
        return ShapesDataset(
            self.images[start:stop],
            self.labels[start:stop],
            self.masks[start:stop],
            self.cue_masks[start:stop],
            self.classes,
        )

    @property
    def has_cue(self) -> np.ndarray:
        """(N,) bool: whether each image shows the cue (at least one pixel of it)."""
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
    """``count`` images of ``size`` x ``size``, classes in turn (balanced), everything drawn from ``seed``.

    ``scale`` bounds the shape's radius as a fraction of half the image side. ``spurious`` adds a cue
    (see :class:`SpuriousCue`). The scene comes from ``np.random.default_rng(seed)`` and the cue from a
    child stream of the same seed (``np.random.SeedSequence(seed).spawn(1)``), one draw per image: so the
    images without a cue are the same whatever the cue's options, and the images with one differ from
    their cue-free twin only inside ``cue_masks``.
    """
    unknown = [c for c in classes if c not in SHAPES]
    if unknown or len(classes) < 2:
        raise InputError(f"classes must be at least two of {', '.join(SHAPES)}; got {list(classes)}")
    if count < 1 or size < 16:
        raise InputError("make_shapes needs count >= 1 and size >= 16")
    if not _is_int(seed) or seed < 0:
        raise InputError(f"make_shapes seed must be an integer >= 0; got {seed!r}")
    if spurious is not None:
        if not isinstance(spurious, SpuriousCue):
            raise InputError(f"spurious must be a SpuriousCue or None; got {type(spurious).__name__}")
        if spurious.class_index >= len(classes):
            raise InputError(
                f"spurious class_index must be below the number of classes ({len(classes)}); got {spurious.class_index}"
            )
        if spurious.kind == "patch" and spurious.size > size - 2:
            raise InputError(f"spurious size must be at most {size - 2} for {size}-pixel images; got {spurious.size}")
    root = np.random.SeedSequence(seed)
    rng = np.random.default_rng(root)  # the scene: the same stream as default_rng(seed)
    cue_draws = np.random.default_rng(root.spawn(1)[0]).random(count)  # the cue: its own stream
    images = np.empty((count, size, size, 3), dtype=np.uint8)
    masks = np.zeros((count, size, size), dtype=bool)
    cues = np.zeros((count, size, size), dtype=bool)
    labels = np.arange(count) % len(classes)
    rng.shuffle(labels)
    for index, label in enumerate(labels):
        picture = _background(rng, size)
        mask = _shape_mask(classes[label], rng, size, scale)
        colour = rng.uniform(0.55, 1.0, size=3) * rng.choice([1.0, 0.9])
        if spurious is not None:
            chance = spurious.probability if label == spurious.class_index else spurious.elsewhere
            if cue_draws[index] < chance:
                region = spurious.region(mask)
                blend = spurious.blend
                picture[region] = (1 - blend) * picture[region] + blend * np.asarray(spurious.colour)
                cues[index] = region
        picture[mask] = colour
        images[index] = np.round(picture * 255).astype(np.uint8)
        masks[index] = mask
    return ShapesDataset(images=images, labels=labels, masks=masks, cue_masks=cues, classes=tuple(classes))
