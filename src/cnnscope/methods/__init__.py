"""Every attribution method, registered by name on import (one module per family)."""

from .._registry import METHODS
from .base import Computed, Method, register_method
from .cam import (
    CAM,
    AblationCAM,
    CAMBase,
    EigenCAM,
    EigenGradCAM,
    FinerCAM,
    FullGrad,
    GradCAM,
    GradCAMElementWise,
    GradCAMPlusPlus,
    GuidedGradCAM,
    HiResCAM,
    LayerCAM,
    ScoreCAM,
    ShapleyCAM,
    XGradCAM,
)
from .extremal import ExtremalPerturbation
from .gradient import Deconvnet, GradientXInput, GuidedBackprop, IntegratedGradients, Saliency
from .perturbation import LIME, RISE, Occlusion, PatchScoring
from .propagation import LRP, DeepLift, ExcitationBackprop
from .shapley import DeepLiftShap, GradientShap, KernelShap
from .smoothing import SmoothGrad

__all__ = [
    "CAM",
    "LIME",
    "LRP",
    "RISE",
    "AblationCAM",
    "CAMBase",
    "Computed",
    "Deconvnet",
    "DeepLift",
    "DeepLiftShap",
    "EigenCAM",
    "EigenGradCAM",
    "ExcitationBackprop",
    "ExtremalPerturbation",
    "FinerCAM",
    "FullGrad",
    "GradCAM",
    "GradCAMElementWise",
    "GradCAMPlusPlus",
    "GradientShap",
    "GradientXInput",
    "GuidedBackprop",
    "GuidedGradCAM",
    "HiResCAM",
    "IntegratedGradients",
    "KernelShap",
    "LayerCAM",
    "Method",
    "Occlusion",
    "PatchScoring",
    "Saliency",
    "ScoreCAM",
    "ShapleyCAM",
    "SmoothGrad",
    "XGradCAM",
    "get_method",
    "list_methods",
    "method_listing",
    "register_method",
]


METHODS.alias("ig", "integrated-gradients")
METHODS.alias("gradcampp", "gradcam++")
METHODS.alias("guided-grad-cam", "guided-gradcam")
METHODS.alias("rectified", "deconvnet")


def list_methods() -> list[str]:
    """Names of the registered methods."""
    return METHODS.names()


def get_method(name: str) -> type[Method]:
    """The method class registered under ``name`` (with suggestions for unknown names)."""
    return METHODS.get(name)


def method_listing(methods=None) -> list[dict]:
    """JSON-able rows of the registered methods (or of the (name, class) pairs given): name, summary,
    whether it explains a layer, whether it is class-specific, and its typed options. ``cnnscope
    methods --json`` and ``GET /api/methods`` print these."""
    return [
        {
            "name": name,
            "summary": cls.summary,
            "uses_layer": cls.uses_layer,
            "class_specific": cls.class_specific,
            "options": cls.options.to_json(),
            "file_options": list(cls.file_options()),
        }
        for name, cls in (METHODS.items() if methods is None else methods)
    ]
