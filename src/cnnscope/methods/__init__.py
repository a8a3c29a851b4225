"""Every attribution method, registered by name on import (one module per family)."""

from .._registry import METHODS
from .base import Computed, Method, register_method
from .cam import (
    CAM,
    AblationCAM,
    CAMBase,
    EigenCAM,
    GradCAM,
    GradCAMPlusPlus,
    GuidedGradCAM,
    HiResCAM,
    LayerCAM,
    ScoreCAM,
    XGradCAM,
)
from .gradient import Deconvnet, GradientXInput, GuidedBackprop, IntegratedGradients, Saliency
from .perturbation import LIME, RISE, Occlusion, PatchScoring
from .smoothing import SmoothGrad

__all__ = [
    "CAM",
    "LIME",
    "RISE",
    "AblationCAM",
    "CAMBase",
    "Computed",
    "Deconvnet",
    "EigenCAM",
    "GradCAM",
    "GradCAMPlusPlus",
    "GradientXInput",
    "GuidedBackprop",
    "GuidedGradCAM",
    "HiResCAM",
    "IntegratedGradients",
    "LayerCAM",
    "Method",
    "Occlusion",
    "PatchScoring",
    "Saliency",
    "ScoreCAM",
    "SmoothGrad",
    "XGradCAM",
    "get_method",
    "list_methods",
    "register_method",
]


METHODS.alias("ig", "integrated-gradients")
METHODS.alias("gradcampp", "gradcam++")
METHODS.alias("guided-grad-cam", "guided-gradcam")


def list_methods() -> list[str]:
    """Names of the registered methods."""
    return METHODS.names()


def get_method(name: str) -> type[Method]:
    """The method class registered under ``name`` (with suggestions for unknown names)."""
    return METHODS.get(name)
