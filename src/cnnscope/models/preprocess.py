"""Turning RGB uint8 images into the tensor a model expects, keeping the originals for overlays."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..errors import InputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """Resize the whole image to ``size`` (no crop, so a map covers the whole photo), scale to
    [0, 1], then normalize with ``mean`` and ``std`` per channel.

    The resize is bilinear with antialiasing (Pillow). Because nothing is cropped, a point (x, y)
    of the model input maps back to (x * W / size[1], y * H / size[0]) in the original image.
    """

    size: tuple[int, int] = (224, 224)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if len(self.size) != 2 or min(self.size) < 1:
            raise InputError(f"preprocess size must be (height, width) with both >= 1, got {self.size}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise InputError("preprocess mean and std need 3 values each, and std must be positive")

    def __call__(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """(N, 3, H, W) float32 batch from RGB uint8 (H, W, 3) arrays."""
        if len(images) == 0:
            raise InputError("no images given")
        height, width = self.size
        planes = np.empty((len(images), height, width, 3), dtype=np.uint8)
        for index, image in enumerate(images):
            if image.shape[:2] == (height, width):
                planes[index] = image
            else:
                planes[index] = np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR))
        batch = torch.from_numpy(planes).permute(0, 3, 1, 2).float().div_(255.0)
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return batch.sub_(mean).div_(std).contiguous()

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """[0, 1] RGB (N, 3, H, W) -> the model's input: ``(pixels - mean) / std``, in the batch's dtype and
        device (differentiable)."""
        mean = torch.tensor(self.mean, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
        return (pixels - mean) / std

    def unnormalize(self, batch: torch.Tensor) -> torch.Tensor:
        """The inverse of the normalization: a batch back to [0, 1] RGB (clamped)."""
        mean = torch.tensor(self.mean, device=batch.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=batch.device).view(1, 3, 1, 1)
        return (batch * std + mean).clamp(0, 1)
