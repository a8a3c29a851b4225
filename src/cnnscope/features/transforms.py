"""Robustness transforms for activation maximization: the image is seen jittered, rotated, scaled,
cropped and recoloured differently at every step, so only features that survive these changes grow
(Mordvintsev et al. 2015; Olah et al. 2017). Without them the optimum is adversarial noise.

Every random choice is drawn from the ``torch.Generator`` passed in, per image, in a fixed order, so a
seed repeats a run bit for bit. The geometric transforms (jitter, rotation, scale, crop) compose into
one affine matrix per image and cost one ``grid_sample`` together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import InputError


@dataclass(frozen=True)
class Transforms:
    """What each step does to the images before the model sees them.

    Args:
        jitter: largest shift in pixels, each direction.
        rotate: largest rotation in degrees, each direction.
        scale: (smallest, largest) zoom factor.
        crop: smallest side of a random crop as a fraction of the image (1: no crop); the crop is
            resized back to the full size.
        colour: largest relative change of each colour channel's gain (0: none).
        padding: ``"reflection"``, ``"border"`` or ``"zeros"``: what fills pixels moved in from outside.
    """

    jitter: float = 8.0
    rotate: float = 10.0
    scale: tuple[float, float] = (0.9, 1.1)
    crop: float = 1.0
    colour: float = 0.0
    padding: str = "reflection"

    def __post_init__(self) -> None:
        if self.jitter < 0 or self.rotate < 0 or self.colour < 0:
            raise InputError("jitter, rotate and colour must be zero or positive")
        if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1]:
            raise InputError(f"scale must be (smallest, largest) with 0 < smallest <= largest, got {self.scale}")
        if not 0 < self.crop <= 1:
            raise InputError(f"crop must be a fraction in (0, 1], got {self.crop}")
        if self.padding not in ("reflection", "border", "zeros"):
            raise InputError(f"padding must be 'reflection', 'border' or 'zeros', got {self.padding!r}")

    @classmethod
    def none(cls) -> Transforms:
        """The images as they are (plain gradient ascent)."""
        return cls(jitter=0.0, rotate=0.0, scale=(1.0, 1.0), crop=1.0, colour=0.0)

    @property
    def geometric(self) -> bool:
        """Whether any pixel moves (jitter, rotation, scale or crop)."""
        return not (self.jitter == 0 and self.rotate == 0 and tuple(self.scale) == (1.0, 1.0) and self.crop == 1)

    def affine(self, count: int, size: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
        """(count, 2, 3) matrices for ``F.affine_grid``: output coordinates -> input coordinates."""
        height, width = size
        draws = torch.rand(count, 6, generator=generator, dtype=torch.float64)
        angle = (draws[:, 0] * 2 - 1) * math.radians(self.rotate)
        low, high = self.scale
        zoom = low + draws[:, 1] * (high - low)
        crop = self.crop + draws[:, 2] * (1.0 - self.crop)  # the crop's side, as a fraction
        # a crop of fraction c resized to full size samples c of the input: a zoom of 1/c
        extent = crop / zoom
        # crop position and jitter, in normalized [-1, 1] coordinates (2 units per side)
        room = 1.0 - crop
        shift_x = (draws[:, 3] * 2 - 1) * room + (draws[:, 4] * 2 - 1) * 2 * self.jitter / width
        shift_y = (draws[:, 5] * 2 - 1) * room
        jitter_y = torch.rand(count, generator=generator, dtype=torch.float64)
        shift_y = shift_y + (jitter_y * 2 - 1) * 2 * self.jitter / height
        cos, sin = torch.cos(angle) * extent, torch.sin(angle) * extent
        aspect = height / width  # rotation in pixel space, not in the normalized square
        theta = torch.stack(
            [
                torch.stack([cos, -sin * aspect, shift_x], dim=1),
                torch.stack([sin / aspect, cos, shift_y], dim=1),
            ],
            dim=1,
        )
        return theta.float()

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A transformed copy of an (N, 3, H, W) batch (differentiable). The same number of values is drawn
        from ``generator`` whatever the settings, so changing one transform leaves the others' draws alone."""
        count = images.shape[0]
        theta = self.affine(count, tuple(images.shape[-2:]), generator)
        gains = torch.rand(count, 3, generator=generator)
        if self.geometric:
            grid = F.affine_grid(theta.to(images.device), list(images.shape), align_corners=False)
            images = F.grid_sample(images, grid, mode="bilinear", padding_mode=self.padding, align_corners=False)
        if self.colour > 0:
            gain = 1.0 + (gains * 2 - 1) * self.colour
            images = images * gain.to(images.device)[:, :, None, None]
        return images
