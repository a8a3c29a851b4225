"""cnnscope: what an image classifier looks at, and whether it looks there for the right reasons.

import cnnscope
model = cnnscope.load_model()                      # ImageNet EfficientNet-Lite0, offline
explanation = cnnscope.explain(model, "cat.jpg", method="gradcam", target="top5")
explanation.figure(0)                              # image | overlays | top-5 bars
"""

from __future__ import annotations

from ._registry import METHODS
from .errors import (
    CnnscopeError,
    CnnscopeWarning,
    InputError,
    LayerNotFoundError,
    MethodError,
    ModelError,
    TargetError,
)
from .explanation import Explanation
from .features import Objective, Transforms, maximize
from .features.activations import layer_activations
from .features.architecture import architecture
from .features.dream import deep_dream
from .features.filters import filter_plate
from .features.impressions import class_impressions
from .io import load_image, load_images
from .methods import get_method, list_methods
from .models import Model, Preprocess, list_models, load_model

__version__ = "0.1.0"

__all__ = [
    "CnnscopeError",
    "CnnscopeWarning",
    "Explanation",
    "InputError",
    "LayerNotFoundError",
    "MethodError",
    "Model",
    "ModelError",
    "Objective",
    "Preprocess",
    "TargetError",
    "Transforms",
    "architecture",
    "audit",
    "class_impressions",
    "compare_models",
    "deep_dream",
    "explain",
    "filter_plate",
    "get_method",
    "layer_activations",
    "list_methods",
    "list_models",
    "load_image",
    "load_images",
    "load_model",
    "maximize",
]


def explain(
    model,
    images,
    method: str = "gradcam",
    target: object = "top1",
    *,
    layer=None,
    threshold: float = 0.5,
    **options,
) -> Explanation:
    """Explain ``images`` with ``method`` for ``target`` classes in one call.

    ``model``: a Model, an nn.Module or a name/path for :func:`load_model`. ``images``: paths,
    arrays, PIL images, or a preprocessed tensor. ``target``: ``"top1"``, ``"top5"``, an index, a
    class name, a list, or one list per image. ``layer`` and ``options`` go to the method.
    For repeated calls build the method once: ``get_method("gradcam")(model, layer=...)``.
    """
    cls = METHODS.get(method)
    kwargs = {"layer": layer} if layer is not None else {}
    return cls(model, **kwargs, **options)(images, target, threshold=threshold)


# last: the audit package is itself callable (cnnscope.audit(model, data)) and imports the rest of the API
from . import audit  # noqa: E402
from .training import compare_models  # noqa: E402
