"""What one layer computes for one image: every channel's map, sorted by mean activation.

MATLAB's ``activations`` + ``imtile`` view: all channel maps in one mosaic (brightest = strongest,
on one scale for the whole layer, so tiles compare), the top N labelled with their index and mean,
and the strongest channel upsampled over the photo.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import InputError
from ..hooks import capture, forward_until
from ..models import Model, load_model
from ..render.figure import FigureResult
from ..render.overlay import overlay
from ..render.plates import mosaic, to_uint8
from ..state import preserved


@dataclass
class LayerActivations(FigureResult):
    """Channel maps of one layer for one image."""

    layer: str
    maps: np.ndarray  # (C, h, w)
    means: np.ndarray  # (C,) mean over positions
    order: np.ndarray  # channel indices, largest mean first
    original: np.ndarray  # the photo, RGB uint8

    @property
    def strongest(self) -> int:
        return int(self.order[0])

    def top(self, count: int = 16) -> list[tuple[int, float]]:
        """(channel, mean) of the ``count`` strongest channels."""
        return [(int(c), float(self.means[c])) for c in self.order[:count]]

    def overlay(self, channel: int | None = None, *, alpha: float = 0.5, colormap: str | None = None) -> np.ndarray:
        """Channel ``channel`` (default: the strongest) upsampled over the photo, scaled to its own max."""
        index = self.strongest if channel is None else channel
        if not 0 <= index < self.maps.shape[0]:
            raise InputError(f"layer {self.layer!r} has {self.maps.shape[0]} channels; {index} is not one")
        values = self.maps[index]
        peak = float(values.max())
        heat = np.clip(values / peak, 0, 1) if peak > 0 else np.zeros_like(values)
        return overlay(self.original, heat, alpha=alpha, colormap=colormap)

    def mosaic(self, tile_size: int = 28) -> np.ndarray:
        """All channels, strongest first, on one scale for the layer (negative values clip to black)."""
        high = float(self.maps.max())
        tiles = [to_uint8(self.maps[c], 0.0, high if high > 0 else 1.0) for c in self.order]
        return mosaic(tiles, tile_size=tile_size)

    def figure(self, top: int = 16):
        """The photo, the strongest channel over it, the mosaic of all channels and the top ``top`` labelled."""
        from matplotlib.figure import Figure

        from ..render.plates import columns_for

        fig = Figure(figsize=(13, 6.5), layout="constrained")
        left, right = fig.subfigures(1, 2, width_ratios=[1.35, 1])
        axes = left.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.6]})
        small = axes[0]
        small.imshow(self.overlay())
        small.set_title(f"strongest: channel {self.strongest}", fontsize=9)
        small.set_axis_off()
        axes[1].imshow(self.mosaic(), interpolation="nearest")
        axes[1].set_title(f"{self.layer}: all {self.maps.shape[0]} channels, strongest first", fontsize=9)
        axes[1].set_axis_off()
        count = min(top, self.maps.shape[0])
        cols = columns_for(count)
        rows = -(-count // cols)
        grid = np.atleast_1d(right.subplots(rows, cols, squeeze=False)).ravel()
        for axis in grid:
            axis.set_axis_off()
        for axis, (index, mean) in zip(grid, self.top(count), strict=False):
            axis.imshow(self.maps[index], cmap="gray", interpolation="nearest")
            axis.set_title(f"ch {index}  mean {mean:.2f}", fontsize=7)
        right.suptitle(f"top {count} channels by mean activation", fontsize=9)
        return fig


def layer_activations(
    model: Model | str | torch.nn.Module, image: object, layer: str | None = None
) -> LayerActivations:
    """Record ``layer`` (default: the model's default target layer) for one image."""
    model = load_model(model)
    batch = model.prepare(image)
    if batch.tensor.shape[0] != 1:
        raise InputError(f"activations are shown for one image at a time, got {batch.tensor.shape[0]}")
    ref = model.layer(layer) if layer is not None else model.default_layer()
    if ref.layout is None:
        raise InputError(
            f"layer {ref.key!r} outputs {ref.output_shape}, not a feature map; choose a convolutional layer "
            "(cnnscope layers lists them)"
        )
    with preserved(model.module), torch.no_grad(), capture(model.module, [ref], stop=True) as record:
        forward_until(model.module, batch.tensor)  # the layers after this one are not needed
        maps = ref.layout.to_map(record[ref.key]).float()[0].cpu().numpy()
    means = maps.mean(axis=(1, 2))
    order = np.argsort(-means, kind="stable")
    return LayerActivations(layer=ref.key, maps=maps, means=means, order=order, original=batch.originals[0])
