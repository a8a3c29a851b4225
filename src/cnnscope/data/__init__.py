"""Synthetic data with ground truth: where the object is, and whether a spurious cue is present; and a
small seeded CNN trainer for it (a model to explain in demos and tests)."""

from .shapes import CORNERS, CUE_KINDS, SHAPES, ShapesDataset, SpuriousCue, make_shapes
from .train import SmallCNN, TrainingHistory, accuracy, train_small_cnn

__all__ = [
    "CORNERS",
    "CUE_KINDS",
    "SHAPES",
    "ShapesDataset",
    "SmallCNN",
    "SpuriousCue",
    "TrainingHistory",
    "accuracy",
    "make_shapes",
    "train_small_cnn",
]
