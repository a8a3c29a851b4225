"""Colormaps as 256-entry lookup tables, registered by name."""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from .._registry import COLORMAPS
from ..errors import InputError

#: Sequential maps for maps that are zero or positive (Grad-CAM, saliency magnitude).
SEQUENTIAL = ("jet", "turbo", "viridis", "inferno", "magma", "gray")
#: Diverging maps for signed maps (CAM, gradient x input): blue negative, white zero, red positive.
DIVERGING = ("coolwarm", "bwr", "seismic")

for _name in SEQUENTIAL + DIVERGING:
    COLORMAPS.register(_name, _name)


@lru_cache(maxsize=16)
def lookup_table(name: str) -> np.ndarray:
    """(256, 3) uint8 colours of a registered colormap."""
    mpl_name = COLORMAPS.get(name)
    from matplotlib import colormaps

    table = colormaps[mpl_name](np.linspace(0.0, 1.0, 256))[:, :3]
    return np.round(table * 255.0).astype(np.uint8)


def colorize(values: np.ndarray, name: str = "jet", *, signed: bool = False) -> np.ndarray:
    """Colour a map: values in [0, 1] (or [-1, 1] when ``signed``) -> (H, W, 3) uint8."""
    if values.ndim != 2:
        raise InputError(f"colorize needs a 2-D map, got shape {values.shape}")
    scaled = (values + 1.0) / 2.0 if signed else values
    indices = np.clip(np.nan_to_num(scaled) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return lookup_table(name)[indices]


def default_colormap(signed: bool) -> str:
    return "coolwarm" if signed else "jet"
