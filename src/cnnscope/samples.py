"""The bundled sample photos (scikit-image's own data files, no download)."""

from __future__ import annotations

import numpy as np

from .errors import InputError

SAMPLES = ("chelsea", "coffee", "astronaut", "rocket")


def sample_image(name: str) -> np.ndarray:
    """One of scikit-image's bundled colour photos as RGB uint8."""
    if name not in SAMPLES:
        raise InputError(f"unknown sample {name!r}; the samples are {', '.join(SAMPLES)}")
    import skimage.data

    return np.ascontiguousarray(getattr(skimage.data, name)())
