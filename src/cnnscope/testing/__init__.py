"""Contract checks and tiny analytic models, shipped for cnnscope's tests and for users' methods."""

from .checks import (
    Snapshot,
    check_batched_equals_single,
    check_cleanup_on_error,
    check_deterministic,
    check_method,
    check_nothing_kept,
    check_untouched,
)
from .models import QuadrantNet, TinyCNN, TinyViT, quadrant_masks, quadrant_model, tiny_model, tiny_vit

__all__ = [
    "QuadrantNet",
    "Snapshot",
    "TinyCNN",
    "TinyViT",
    "check_batched_equals_single",
    "check_cleanup_on_error",
    "check_deterministic",
    "check_method",
    "check_nothing_kept",
    "check_untouched",
    "quadrant_masks",
    "quadrant_model",
    "tiny_model",
    "tiny_vit",
]
