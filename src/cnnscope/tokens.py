"""Transformer layers as maps: token sequences (N, T, D) reshaped to a (N, D, h, w) grid, and
channels-last maps (N, h, w, C) (Swin, ConvNeXt blocks) moved to (N, C, h, w).

Leading tokens that are not patches (a class token, a distillation token, register tokens) are
dropped: their number is what makes the rest fill the patch grid, whose aspect ratio is the model
input's. No reshape function is asked of the user.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MAX_EXTRA_TOKENS = 8


def token_grid(tokens: int, input_size: tuple[int, int]) -> tuple[int, int, int] | None:
    """(extra leading tokens, grid height, grid width) for a sequence of ``tokens``, or None."""
    height, width = input_size
    for extra in range(0, MAX_EXTRA_TOKENS + 1):
        patches = tokens - extra
        if patches < 9:
            break
        grid_w = round(math.sqrt(patches * width / height))
        if grid_w > 0 and patches % grid_w == 0:
            grid_h = patches // grid_w
            if abs(grid_h / grid_w - height / width) < 0.05 and grid_h > 2 and grid_w > 2:
                return extra, grid_h, grid_w
    return None


def to_grid(values: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """(..., T, D) -> (..., D, h, w), dropping the leading extra tokens."""
    extra, grid_h, grid_w = grid
    patches = values[..., extra:, :]
    shaped = patches.reshape(*patches.shape[:-2], grid_h, grid_w, patches.shape[-1])
    return shaped.movedim(-1, -3)


def is_channels_last(shape: tuple[int, ...], input_size: tuple[int, int]) -> bool:
    """Whether a 4-D layer output is (N, h, w, C) rather than (N, C, h, w): the spatial pair is the one
    whose ratio is the input's (h / w = H / W), with channels-first preferred when both fit."""
    if len(shape) != 4:
        return False
    ratio = input_size[0] / input_size[1]
    first = shape[3] > 1 and abs(shape[2] / shape[3] - ratio) < 0.05
    last = shape[2] > 1 and abs(shape[1] / shape[2] - ratio) < 0.05
    return last and not first


LAYOUTS = ("channels-first", "channels-last", "tokens")


@dataclass(frozen=True)
class Layout:
    """How a layer's output holds its channels: ``"channels-first"`` (N, C, h, w) maps, ``"channels-last"``
    (N, h, w, C) maps (Swin, ConvNeXt blocks) or ``"tokens"`` (N, T, D) with ``grid`` = (extra leading
    tokens, h, w). ``to_map`` puts an output (or its gradients, which have extra leading dims) in
    (..., C, h, w) form; ``channel_axis`` says where the channels are in the layer's own layout."""

    kind: str
    grid: tuple[int, int, int] | None = None

    def to_map(self, values: torch.Tensor) -> torch.Tensor:
        if self.kind == "channels-last":
            return values.movedim(-1, -3)
        if self.kind == "tokens":
            return to_grid(values, self.grid)
        return values

    def channel_axis(self, ndim: int) -> int:
        """1 for channels-first maps, the last axis for channels-last maps and tokens."""
        return 1 if self.kind == "channels-first" else ndim - 1

    @property
    def is_map(self) -> bool:
        return self.kind == "channels-first"


def layout_of(shape: tuple[int, ...], input_size: tuple[int, int]) -> Layout | None:
    """The :class:`Layout` of a layer output of ``shape`` for a model input of ``input_size``; None when
    the output is not a map (a vector, or tokens that fill no patch grid)."""
    if len(shape) == 5:  # a Conv3d's (N, C, D, h, w) volume or clip
        return Layout("channels-first")
    if len(shape) == 4:
        return Layout("channels-last" if is_channels_last(shape, input_size) else "channels-first")
    if len(shape) == 3:
        grid = token_grid(shape[1], input_size)
        if grid is not None:
            return Layout("tokens", grid)
    return None
