"""Transformer layers as maps: token sequences (N, T, D) reshaped to a (N, D, h, w) grid.

Leading tokens that are not patches (a class token, a distillation token, register tokens) are
dropped: their number is what makes the rest fill the patch grid, whose aspect ratio is the model
input's. No reshape function is asked of the user.
"""

from __future__ import annotations

import math

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
