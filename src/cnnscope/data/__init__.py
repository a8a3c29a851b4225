"""Synthetic data with ground truth: where the object is, and whether a spurious cue is present."""

from .shapes import SHAPES, ShapesDataset, SpuriousCue, make_shapes

__all__ = ["SHAPES", "ShapesDataset", "SpuriousCue", "make_shapes"]
