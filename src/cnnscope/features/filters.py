"""Convolution kernels as pictures: the first layer's filters in colour, any other layer in grey.

The first convolution that reads the RGB input shows each kernel as a small colour image, min-max
scaled per kernel (what AlexNet's and MATLAB's first-layer plates show). Deeper kernels have many
input channels: ``mode="mean"`` shows each output filter averaged over its input channels (one grey
tile per filter), ``mode="channels"`` one grey tile per (filter, input channel), a row per filter,
scaled per filter so the tiles of one row compare.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..errors import InputError
from ..models import Model, load_model
from ..render.plates import mosaic, to_uint8


@dataclass
class FilterPlate:
    """Kernels of one layer and the plate drawn from them."""

    layer: str
    weights: np.ndarray  # (out, in / groups, kh, kw)
    mode: str  # "rgb", "mean" or "channels"
    image: np.ndarray  # the plate, RGB uint8
    shown: int  # filters drawn (at most max_filters)

    def save(self, path: str) -> None:
        from ..render.overlay import save_png

        save_png(self.image, path)

    def _repr_png_(self) -> bytes:
        from ..render.overlay import png_bytes

        return png_bytes(self.image)


def first_conv(model: Model) -> str:
    """The key of the first Conv2d in call order that reads 3 channels (the RGB input)."""
    modules = dict(model.module.named_modules())
    for call in model.calls():
        module = modules.get(call.name)
        if isinstance(module, nn.Conv2d) and module.in_channels == 3:
            return call.key
    raise InputError("the model has no Conv2d with 3 input channels; pass layer=... (cnnscope layers lists them)")


def _conv_of(model: Model, layer: str | None) -> tuple[str, nn.Conv2d]:
    key = layer or first_conv(model)
    ref = model.layer(key)
    if not isinstance(ref.module, nn.Conv2d):
        modules = dict(model.module.named_modules())
        convs = [c.key for c in model.calls() if isinstance(modules.get(c.name), nn.Conv2d)][:5]
        raise InputError(
            f"layer {ref.key!r} is a {type(ref.module).__name__}, not a Conv2d; filters are drawn for "
            f"convolutions, e.g. {', '.join(convs) or 'none in this model'}"
        )
    return ref.key, ref.module


def filter_plate(
    model: Model | str | nn.Module,
    layer: str | None = None,
    *,
    mode: str | None = None,
    max_filters: int = 256,
    max_inputs: int = 64,
    tile_size: int = 32,
) -> FilterPlate:
    """The kernels of ``layer`` (default: the first convolution on the RGB input) as one image.

    ``mode``: ``"rgb"`` (needs 3 input channels per group; the default when it has them), ``"mean"``
    (the default otherwise) or ``"channels"``. At most ``max_filters`` filters and, in ``channels``
    mode, ``max_inputs`` input channels are drawn; ``tile_size``: each kernel enlarged to about this
    many pixels."""
    model = load_model(model)
    key, conv = _conv_of(model, layer)
    with torch.no_grad():
        weights = conv.weight.detach().float().cpu().numpy().copy()
    inputs_per_group = weights.shape[1]
    mode = mode or ("rgb" if inputs_per_group == 3 else "mean")
    if mode not in ("rgb", "mean", "channels"):
        raise InputError(f"mode must be 'rgb', 'mean' or 'channels', got {mode!r}")
    if mode == "rgb" and inputs_per_group != 3:
        raise InputError(
            f"layer {key!r} has {inputs_per_group} input channels per filter; colour tiles need 3 "
            "(use mode 'mean' or 'channels')"
        )
    if max_filters < 1 or max_inputs < 1:
        raise InputError("max_filters and max_inputs must be at least 1")
    shown = weights[:max_filters]
    if mode == "rgb":
        tiles = [to_uint8(kernel.transpose(1, 2, 0)) for kernel in shown]
        image = mosaic(tiles, tile_size=tile_size)
    elif mode == "mean":
        tiles = [to_uint8(kernel.mean(axis=0)) for kernel in shown]
        image = mosaic(tiles, tile_size=tile_size)
    else:
        columns = min(inputs_per_group, max_inputs)
        tiles = []
        for kernel in shown:
            part = kernel[:columns]
            low, high = float(part.min()), float(part.max())
            tiles.extend(to_uint8(plane, low, high) for plane in part)
        image = mosaic(tiles, columns=columns, tile_size=tile_size)
    return FilterPlate(layer=key, weights=weights, mode=mode, image=image, shown=len(shown))
