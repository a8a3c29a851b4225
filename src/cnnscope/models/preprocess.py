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


#: ITU-R 601-2 luma weights (what Pillow's "L" conversion uses): RGB photos for one-channel models.
LUMA = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class Preprocess:
    """Resize the whole image to ``size`` (no crop, so a map covers the whole photo), scale to
    [0, 1], then normalize with ``mean`` and ``std``, one value per channel of the model's input:
    three for RGB, one for a grey model (photos are converted to grey by luminance).

    The resize is bilinear with antialiasing (Pillow). Because nothing is cropped, a point (x, y)
    of the model input maps back to (x * W / size[1], y * H / size[0]) in the original image.
    """

    size: tuple[int, int] = (224, 224)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __post_init__(self) -> None:
        size, mean, std = tuple(self.size), tuple(float(v) for v in self.mean), tuple(float(v) for v in self.std)
        if len(size) != 2 or min(size) < 1:
            raise InputError(f"preprocess size must be (height, width) with both >= 1, got {self.size}")
        if not mean or len(mean) != len(std):
            raise InputError(
                f"preprocess mean and std need one value per channel each, got {len(mean)} and {len(std)} values"
            )
        if min(std) <= 0:
            raise InputError(f"preprocess std must be positive for every channel, got {std}")
        if len(mean) not in (1, 3):
            raise InputError(
                f"{len(mean)} channels: images are read as RGB or grey, so preprocessing takes 1 (grey) or 3 (RGB) "
                "mean and std values"
            )
        object.__setattr__(self, "size", (int(size[0]), int(size[1])))
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    @property
    def channels(self) -> int:
        """Channels of the model input (1 grey, 3 RGB)."""
        return len(self.mean)

    def __call__(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """(N, channels, H, W) float32 batch from RGB uint8 (H, W, 3) arrays."""
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
        if self.channels == 1:
            batch = (batch * torch.tensor(LUMA).view(1, 3, 1, 1)).sum(dim=1, keepdim=True)
        return batch.sub_(self._view(self.mean)).div_(self._view(self.std)).contiguous()

    def _view(self, values: tuple[float, ...], like: torch.Tensor | None = None) -> torch.Tensor:
        tensor = torch.tensor(values) if like is None else torch.tensor(values, dtype=like.dtype, device=like.device)
        return tensor.view(1, -1, 1, 1)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """[0, 1] pixels (N, channels, H, W) -> the model's input: ``(pixels - mean) / std``, in the batch's
        dtype and device (differentiable)."""
        return (pixels - self._view(self.mean, pixels)) / self._view(self.std, pixels)

    def unnormalize(self, batch: torch.Tensor) -> torch.Tensor:
        """The inverse of the normalization: a batch back to [0, 1] pixels (clamped)."""
        return (batch * self._view(self.std, batch) + self._view(self.mean, batch)).clamp(0, 1)
