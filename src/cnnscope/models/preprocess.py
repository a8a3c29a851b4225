"""Turning images, volumes and clips into the tensor a model expects, keeping the originals for overlays.

An input arrives as a channels-last array: (H, W, C) for a picture, (D, H, W, C) for a volume or a clip
(T as the first axis), in its own dtype (uint8, uint16, float, ...). :class:`Preprocess` scales its values to
[0, 1] by their own range (never wrapped) or by a ``window``, converts it to the model's channel count (RGB to
grey by luminance, grey repeated for an RGB model, RGBA composited on white), resizes it to ``size`` and
normalizes it with one mean and std per channel.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..errors import InputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


#: ITU-R 601-2 luma weights (what Pillow's "L" conversion uses): RGB photos for one-channel models.
LUMA = (0.299, 0.587, 0.114)


def unit_range(values: np.ndarray, window: tuple[float, float] | None = None) -> np.ndarray:
    """``values`` as float32 in [0, 1]: through ``window`` = (low, high) when given (CT, X-ray: below ``low`` is
    0, above ``high`` is 1); otherwise uint8 / 255, uint16 / 65535, bool as 0 / 1, floats already in [0, 1] as they
    are, and any other values (signed or wider integers, floats outside [0, 1]) by their own minimum and maximum.
    Nothing wraps around."""
    if values.dtype == np.bool_:
        return values.astype(np.float32)
    if not (np.issubdtype(values.dtype, np.integer) or np.issubdtype(values.dtype, np.floating)):
        raise InputError(f"cannot read pixel values of dtype {values.dtype}; use integers or floats")
    if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
        raise InputError("the image contains NaN or infinite values")
    if window is not None:
        low, high = float(window[0]), float(window[1])
        return np.clip((values.astype(np.float32) - low) / (high - low), 0.0, 1.0)
    if values.dtype == np.uint8:
        return values.astype(np.float32) / 255.0
    if values.dtype == np.uint16:
        return values.astype(np.float32) / 65535.0
    if values.size == 0:
        return values.astype(np.float32)
    low, high = float(values.min()), float(values.max())
    if np.issubdtype(values.dtype, np.floating) and low >= 0.0 and high <= 1.0:
        return values.astype(np.float32)
    if np.issubdtype(values.dtype, np.integer) and low >= 0 and high <= 255 and values.dtype.itemsize <= 2:
        return values.astype(np.float32) / 255.0
    if high == low:
        return np.zeros(values.shape, dtype=np.float32)
    return ((values.astype(np.float64) - low) / (high - low)).astype(np.float32)


def convert_channels(pixels: np.ndarray, channels: int) -> tuple[np.ndarray, str | None]:
    """[0, 1] channels-last ``pixels`` with C channels -> ``channels`` channels, and a note saying how when they
    were converted: RGBA composited on white, RGB to grey by luminance (ITU-R 601-2), grey repeated."""
    have = pixels.shape[-1]
    if have == channels:
        return pixels, None
    note = None
    if have == 4 and channels in (1, 3):
        alpha = pixels[..., 3:4]
        pixels = pixels[..., :3] * alpha + (1.0 - alpha)
        have, note = 3, "RGBA composited on white"
    if have == channels:
        return pixels, note
    if have == 3 and channels == 1:
        grey = (pixels * np.asarray(LUMA, dtype=np.float32)).sum(axis=-1, keepdims=True)
        return grey, ", then ".join(filter(None, [note, "RGB converted to grey by luminance for a 1-channel model"]))
    if have == 1:
        return np.repeat(pixels, channels, axis=-1), f"grey repeated into the model's {channels} channels"
    raise InputError(
        f"the image has {have} channels but the model takes {channels}; give an image with {channels} channels "
        f"(or 1, repeated), or preprocessing with {have} mean/std values if the model takes {have}"
    )


@dataclass(frozen=True)
class Preprocess:
    """Scale to [0, 1] (by the values' own range or ``window``), convert to the model's channels, resize the
    whole input to ``size`` (no crop, so a map covers the whole picture), then normalize with ``mean`` and
    ``std``, one value per channel of the model's input: three for RGB, one for grey, N for multispectral.

    ``size`` is (H, W) for pictures and (D, H, W) for volumes (T, H, W for clips). A picture is resized
    bilinearly with antialiasing (Pillow), a volume trilinearly. Because nothing is cropped, a point (x, y)
    of the model input maps back to (x * W / size[1], y * H / size[0]) in the original image.
    ``window`` = (low, high) maps raw values to [0, 1] (CT in Hounsfield units, X-ray), clipping outside.
    """

    size: tuple[int, ...] = (224, 224)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    window: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        size, mean, std = tuple(self.size), tuple(float(v) for v in self.mean), tuple(float(v) for v in self.std)
        if len(size) not in (2, 3) or min(size) < 1:
            raise InputError(
                f"preprocess size must be (height, width), or (depth, height, width) for a volume or clip, with "
                f"every value >= 1, got {self.size}"
            )
        if not mean or len(mean) != len(std):
            raise InputError(
                f"preprocess mean and std need one value per channel each, got {len(mean)} and {len(std)} values"
            )
        if min(std) <= 0:
            raise InputError(f"preprocess std must be positive for every channel, got {std}")
        if self.window is not None:
            window = tuple(float(v) for v in self.window)
            if len(window) != 2 or not window[0] < window[1] or not all(np.isfinite(window)):
                raise InputError(f"window must be (low, high) with low < high, got {self.window}")
            object.__setattr__(self, "window", window)
        object.__setattr__(self, "size", tuple(int(v) for v in size))
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    @property
    def channels(self) -> int:
        """Channels of the model input (1 grey, 3 RGB, N multispectral)."""
        return len(self.mean)

    @property
    def spatial_dims(self) -> int:
        """2 for pictures, 3 for volumes and clips."""
        return len(self.size)

    def input_shape(self, batch: int = 1) -> tuple[int, ...]:
        """The model input's shape: (N, C, H, W) or (N, C, D, H, W)."""
        return (batch, self.channels, *self.size)

    def conversion_note(self, image: np.ndarray) -> str | None:
        """How an image of this shape loses its colour for the model (None when it does not): a colour picture
        for a grey model. Grey repeated into RGB, and RGBA composited on white, keep what the picture shows and
        pass without a note, as they always have."""
        have = image.shape[-1] if image.ndim == self.spatial_dims + 1 else 1
        if have == self.channels or not (have in (3, 4) and self.channels == 1):
            return None
        return convert_channels(np.zeros((1, have), dtype=np.float32), self.channels)[1]

    def pixels(self, image: np.ndarray) -> np.ndarray:
        """One image as [0, 1] float32 channels-last, converted to the model's channels, not resized."""
        image = self._checked(image)
        return convert_channels(unit_range(image, self.window), self.channels)[0]

    def _checked(self, image: np.ndarray) -> np.ndarray:
        image = np.asarray(image)
        dims = self.spatial_dims
        if image.ndim == dims:
            image = image[..., None]
        if image.ndim != dims + 1:
            kind = "(H, W) or (H, W, C)" if dims == 2 else "(D, H, W) or (D, H, W, C)"
            raise InputError(
                f"an input of shape {tuple(image.shape)} does not fit a model taking {dims}-D inputs of size "
                f"{self.size}; expected {kind}"
            )
        if min(image.shape[:-1]) < 1:
            raise InputError(f"the image has no pixels (shape {tuple(image.shape)})")
        return image

    def __call__(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """(N, channels, *size) float32 batch from channels-last arrays of any dtype (see :func:`unit_range`)."""
        if len(images) == 0:
            raise InputError("no images given")
        planes = [self._resized(image) for image in images]
        batch = torch.from_numpy(np.stack(planes)).movedim(-1, 1)
        return batch.sub_(self._view(self.mean, batch)).div_(self._view(self.std, batch)).contiguous()

    def _resized(self, image: np.ndarray) -> np.ndarray:
        image = self._checked(image)
        size = self.size
        if (
            self.spatial_dims == 2
            and image.dtype == np.uint8
            and image.shape[-1] == 3
            and self.window is None
            and self.channels in (1, 3)
        ):  # photos: Pillow's antialiased resize of the uint8 picture (the fast path, as before)
            height, width = size
            if image.shape[:2] != (height, width):
                image = np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR))
            pixels = image.astype(np.float32) / 255.0
            if self.channels == 1:
                pixels = (pixels * np.asarray(LUMA, dtype=np.float32)).sum(axis=-1, keepdims=True)
            return pixels
        pixels = self.pixels(image)
        if tuple(pixels.shape[:-1]) == size:
            return np.ascontiguousarray(pixels, dtype=np.float32)
        if self.spatial_dims == 2:  # each channel through Pillow's float resize: the same filter as for photos
            height, width = size
            return np.stack(
                [
                    np.asarray(Image.fromarray(pixels[..., c]).resize((width, height), Image.Resampling.BILINEAR))
                    for c in range(pixels.shape[-1])
                ],
                axis=-1,
            ).astype(np.float32)
        volume = torch.from_numpy(np.ascontiguousarray(pixels)).movedim(-1, 0).unsqueeze(0)
        resized = F.interpolate(volume, size=size, mode="trilinear", align_corners=False)
        return resized[0].movedim(0, -1).numpy()

    def _view(self, values: tuple[float, ...], like: torch.Tensor | None = None) -> torch.Tensor:
        tensor = torch.tensor(values) if like is None else torch.tensor(values, dtype=like.dtype, device=like.device)
        dims = like.ndim - 2 if like is not None else self.spatial_dims
        return tensor.view(1, -1, *([1] * dims))

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """[0, 1] pixels (N, channels, *spatial) -> the model's input: ``(pixels - mean) / std``, in the batch's
        dtype and device (differentiable)."""
        return (pixels - self._view(self.mean, pixels)) / self._view(self.std, pixels)

    def unnormalize(self, batch: torch.Tensor) -> torch.Tensor:
        """The inverse of the normalization: a batch back to [0, 1] pixels (clamped)."""
        return (batch * self._view(self.std, batch) + self._view(self.mean, batch)).clamp(0, 1)


#: Layer types whose weight tells the input's channels and spatial dims, as (spatial dims, channel axis).
_FIRST_LAYERS = {"Conv1d": 1, "Conv2d": 2, "Conv3d": 3, "Linear": 0}


def first_layer_input(module: nn.Module) -> tuple[int, int] | None:
    """(channels, spatial dims) the first convolution of ``module`` takes, read from its weight: Conv2d (2),
    Conv3d (3); None when the first such layer is a Linear or Conv1d (no picture input to read) or there is
    none. Works on TorchScript modules (by their original class names) too."""
    for _, sub in module.named_modules():
        kind = getattr(sub, "original_name", None) if isinstance(sub, torch.jit.ScriptModule) else type(sub).__name__
        if kind not in _FIRST_LAYERS:
            continue
        dims = _FIRST_LAYERS[kind]
        weight = getattr(sub, "weight", None)
        if dims < 2 or not isinstance(weight, torch.Tensor):
            return None
        groups = int(getattr(sub, "groups", 1) or 1)
        return int(weight.shape[1]) * groups, dims
    return None


def preprocess_for(module: nn.Module) -> tuple[Preprocess, bool]:
    """A default :class:`Preprocess` for a model that brings none, and whether it was read from the model: RGB
    2-D convolutions get the ImageNet default (224 x 224, ImageNet mean and std); any other channel count or a
    Conv3d gets plain [0, 1] pixels (mean 0, std 1) at 224 x 224 or 16 x 112 x 112."""
    found = first_layer_input(module)
    if found is None or found == (3, 2):
        return Preprocess(), False
    channels, dims = found
    size = (224, 224) if dims == 2 else (16, 112, 112)
    return Preprocess(size=size, mean=(0.0,) * channels, std=(1.0,) * channels), True
