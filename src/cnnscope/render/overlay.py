"""Heatmap overlays on the original image (not the resized model input)."""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import InputError
from .colormaps import colorize, default_colormap


def resize_map(values: np.ndarray | torch.Tensor, height: int, width: int) -> np.ndarray:
    """Bilinear resize of a 2-D map to (height, width)."""
    tensor = torch.as_tensor(np.asarray(values, dtype=np.float32))[None, None]
    if tensor.shape[-2:] == (height, width):
        return tensor[0, 0].numpy()
    return F.interpolate(tensor, size=(height, width), mode="bilinear", align_corners=False)[0, 0].numpy()


def overlay(
    image: np.ndarray,
    heat: np.ndarray,
    *,
    alpha: float = 0.5,
    colormap: str | None = None,
    signed: bool = False,
) -> np.ndarray:
    """Blend a normalized map (in [0, 1], or [-1, 1] when ``signed``) over an RGB uint8 image.

    The map is resized to the image, coloured, and mixed as ``(1 - alpha) * image + alpha * colour``; for a
    signed map the weight is ``alpha * sqrt(|value|)`` per pixel, so a zero leaves the photo unchanged.
    """
    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"alpha must be between 0 and 1, got {alpha}")
    height, width = image.shape[:2]
    resized = resize_map(heat, height, width)
    colour = colorize(resized, colormap or default_colormap(signed), signed=signed)
    # a signed map's zero is white in a diverging colormap: weigh the colour by the magnitude instead,
    # so that no evidence leaves the photo as it is (the square root keeps weak evidence visible)
    weight = alpha * np.sqrt(np.clip(np.abs(resized), 0.0, 1.0))[:, :, None] if signed else alpha
    mixed = (1.0 - weight) * image.astype(np.float32) + weight * colour.astype(np.float32)
    return np.clip(mixed + 0.5, 0, 255).astype(np.uint8)


#: zlib level 1: 3.5x faster than Pillow's default 6 on a 451x300 photo (10 ms instead of 35), files 6% larger.
PNG_COMPRESS_LEVEL = 1


def png_bytes(image: np.ndarray) -> bytes:
    """Encode an RGB uint8 array as PNG."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def save_png(image: np.ndarray, path: str) -> None:
    Image.fromarray(image).save(path, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
