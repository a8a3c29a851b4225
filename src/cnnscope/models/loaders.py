"""``load_model``: one entry point for every way a user holds a model."""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .._registry import MODELS, did_you_mean
from ..errors import ModelError
from .labels import imagenet_labels
from .model import Model
from .preprocess import Preprocess

DEFAULT_MODEL = "efficientnet_lite0"


def load_model(
    model: str | os.PathLike | nn.Module | Model = DEFAULT_MODEL,
    *,
    labels: Sequence[str] | None = None,
    preprocess: Preprocess | None = None,
    multilabel: bool | None = None,
    arch: str | None = None,
    weights: bool | str | os.PathLike = True,
    trust_pickle: bool = False,
    outputs: str = "logits",
    output=None,
    pretrained: bool | str | os.PathLike | None = None,
) -> Model:
    """Get a :class:`Model` from a zoo name, ``"torchvision:NAME"``, a file, an ``nn.Module`` or a function.

    - ``"efficientnet_lite0"`` (the default): ImageNet EfficientNet-Lite0, offline.
    - ``"torchvision:resnet50"``: a torchvision architecture with its DEFAULT weights, their transforms
      (input size, mean, std) and categories (``weights=False`` for the architecture only, random weights);
      needs torchvision, and a network for weights unless they are in torch's cache already. ``weights=PATH``
      loads a local file of those weights (a state_dict) and still uses their transforms and categories.
    - ``"timm:vit_small_patch16_224"``: a timm model, pretrained (``pretrained=False`` / ``weights=False`` for
      random weights; ``weights=PATH`` for a local weights file), with its data config and labels.
    - ``"model.onnx"``: an ONNX file, converted to PyTorch with onnx2torch when it is installed (every method),
      else run in ONNX Runtime (``cnnscope[onnx]``; the perturbation methods only).
    - a path: a TorchScript file, a state_dict (``arch=`` names its architecture: a zoo name or
      ``"torchvision:NAME"``; loaded with ``weights_only=True``), or a pickled full module
      (``trust_pickle=True`` only: unpickling runs code from the file).
    - an ``nn.Module`` or ``Model``: wrapped as it is, never copied or changed.
    - any other callable: a black box taking (N, H, W, 3) float32 RGB arrays in [0, 1] and returning
      (N, classes) scores (``outputs="probabilities"`` if they are already probabilities); for the
      perturbation methods (occlusion, RISE), e.g. an ONNX Runtime session or a remote service.

    ``labels``, ``preprocess`` and ``multilabel`` override what the source provides. ``output`` says where
    the scores are when the forward returns a tuple, list, dict or object (a key, attribute, position or
    function; default: the tensor itself, else ``logits``, else the first tensor). ``pretrained`` is
    another name for ``weights`` (timm's).
    """
    if pretrained is not None:
        weights = pretrained
    if isinstance(model, Model):
        loaded = model
    elif isinstance(model, nn.Module):
        loaded = Model(model, output=output, outputs=outputs)
    elif callable(model) and not isinstance(model, (str, os.PathLike)):
        loaded = from_function(model, size=(preprocess.size if preprocess else (224, 224)), outputs=outputs)
    elif isinstance(model, (str, os.PathLike)):
        loaded = _from_name_or_path(os.fspath(model), arch=arch, weights=weights, trust_pickle=trust_pickle)
    else:
        raise ModelError(
            f"cannot load a model from a {type(model).__name__}; give a zoo name, 'torchvision:NAME', "
            "a file path or an nn.Module"
        )
    if labels is None and preprocess is None and multilabel is None and (output is None or loaded.output == output):
        return loaded
    return Model(
        loaded.module,
        labels=labels if labels is not None else loaded._labels,
        preprocess=preprocess or loaded.preprocess,
        multilabel=loaded.multilabel if multilabel is None else multilabel,
        name=loaded.name,
        outputs=loaded.outputs,
        output=loaded.output if output is None else output,
    )


class FunctionModule(nn.Module):
    """An nn.Module around a function of numpy images, so a black box runs through the same machinery
    (no gradients: gradient and CAM methods say so)."""

    def __init__(self, function) -> None:
        super().__init__()
        self.function = function

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        import numpy as np

        images = batch.detach().permute(0, 2, 3, 1).float().cpu().numpy()
        try:
            scores = np.asarray(self.function(np.ascontiguousarray(images)), dtype=np.float32)
        except Exception as exc:
            raise ModelError(f"the scoring function failed: {type(exc).__name__}: {exc}") from None
        if scores.ndim != 2 or scores.shape[0] != images.shape[0]:
            raise ModelError(
                f"the scoring function returned shape {scores.shape} for {images.shape[0]} images; "
                "it must return (N, classes)"
            )
        return torch.from_numpy(scores).to(batch.device)


def from_function(function, *, size: tuple[int, int] = (224, 224), outputs: str = "logits") -> Model:
    """A Model from a function of (N, H, W, 3) [0, 1] float32 arrays to (N, classes) scores."""
    preprocess = Preprocess(size=size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    return Model(
        FunctionModule(function).eval(),
        preprocess=preprocess,
        outputs=outputs,
        name=getattr(function, "__name__", "function"),
    )


def list_models() -> list[str]:
    """Names of the zoo models that load offline."""
    return MODELS.names()


def _from_name_or_path(spec: str, *, arch: str | None, weights, trust_pickle: bool) -> Model:
    if spec.startswith("torchvision:"):
        return _torchvision(spec.split(":", 1)[1], weights=weights)
    if spec.startswith("timm:"):
        return _timm(spec.split(":", 1)[1], weights=weights)
    if spec in MODELS:
        if isinstance(weights, (str, os.PathLike)):
            raise ModelError(
                f"weights=PATH is for 'torchvision:NAME' and 'timm:NAME'; for {spec} load the file itself "
                f"with arch={spec!r}"
            )
        return MODELS.get(spec).build(weights=bool(weights))
    path = Path(spec)
    if path.suffix.lower() == ".onnx":
        from .onnx import load_onnx

        return load_onnx(path)
    if path.suffix or os.sep in spec or path.exists():
        return _from_file(path, arch=arch, trust_pickle=trust_pickle)
    hint = did_you_mean(spec, MODELS.names())
    raise ModelError(
        f"unknown model {spec!r}{hint}; give a zoo name ({', '.join(MODELS.names())}), "
        "'torchvision:NAME', 'timm:NAME' or a model file"
    )


#: Appended to the name of a torchvision or timm model built without its pretrained weights: the JSON summary's
#: "model", reports and figures say so.
RANDOM_WEIGHTS = " (random weights)"


def _local_weights(path: Path, name: str) -> dict:
    if not path.is_file():
        raise ModelError(f"weights file '{path}' for {name} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(f"'{path}' is not a weights file torch can load ({type(exc).__name__}: {exc})") from None
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"'{path}' does not hold a state_dict of tensors")
    return state


def _load_state(module: nn.Module, state: dict, path: Path, name: str) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1:3]
        raise ModelError(f"'{path}' does not fit {name}: {' '.join(s.strip() for s in first)}") from None


def _torchvision(name: str, *, weights, num_classes: int | None = None, announce: bool = True) -> Model:
    try:
        from torchvision import models as tv_models
    except Exception as exc:  # ImportError, or a torchvision built for another torch
        raise ModelError(
            f"'torchvision:{name}' needs torchvision, which does not import here ({type(exc).__name__}: "
            f"{exc}); install a torchvision matching your torch"
        ) from None
    available = list(tv_models.list_models())
    if name not in available:
        raise ModelError(f"torchvision has no model {name!r}{did_you_mean(name, available)}")
    builder = tv_models.get_model_builder(name)
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    from .zoo import is_torchvision_video, video_preprocess

    video = is_torchvision_video(name)
    if weights is not False and weights is not None and num_classes is None:
        weight_enum = tv_models.get_model_weights(name).DEFAULT
        if isinstance(weights, (str, os.PathLike)):  # a local file of these weights: no download
            meta = getattr(weight_enum, "meta", {}) or {}
            classes = len(meta.get("categories") or []) or None
            module = builder(weights=None, **({"num_classes": classes} if classes else {}))
            _load_state(module, _local_weights(Path(weights), f"torchvision:{name}"), Path(weights), name)
        else:
            try:
                module = builder(weights=weight_enum)
            except Exception as exc:  # no network, a broken cache, ...
                first = str(exc).splitlines()[0] if str(exc) else ""
                raise ModelError(
                    f"could not get the pretrained weights of torchvision:{name} ({type(exc).__name__}: {first}); "
                    "check the network, or use weights=False (--no-weights) for the architecture only"
                ) from None
        meta = getattr(weight_enum, "meta", {}) or {}
        labels = meta.get("categories")
        transforms = weight_enum.transforms()
        size = getattr(transforms, "crop_size", [224])
        size = (int(size[0]), int(size[-1]))
        preprocess = Preprocess(
            size=size,
            mean=tuple(getattr(transforms, "mean", Preprocess.mean)),
            std=tuple(getattr(transforms, "std", Preprocess.std)),
        )
        if video:
            preprocess = video_preprocess(weight_enum)
    else:
        module = builder(weights=None, **kwargs)
        labels, preprocess = None, Preprocess()
        if video:  # clips (T, H, W) and Kinetics-400 names from the weights' metadata (no download)
            weight_enum = tv_models.get_model_weights(name).DEFAULT
            preprocess = video_preprocess(weight_enum)
            categories = list((getattr(weight_enum, "meta", {}) or {}).get("categories") or [])
            labels = categories if num_classes in (None, len(categories)) else None
    module.eval()
    random = announce and (weights is False or weights is None or num_classes is not None)
    model = Model(module, labels=labels, preprocess=preprocess, name=f"torchvision:{name}" + RANDOM_WEIGHTS * random)
    if labels is None and model.num_classes == 1000:
        model._labels = list(imagenet_labels())
    return model


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in archive.namelist())


def _from_file(path: Path, *, arch: str | None, trust_pickle: bool) -> Model:
    if not path.exists():
        raise ModelError(f"model file '{path}' not found (and it is not a zoo name: {', '.join(MODELS.names())})")
    if path.is_dir():
        raise ModelError(f"'{path}' is a directory; give the model file itself")
    if _is_torchscript(path):
        try:
            module = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:
            raise ModelError(f"'{path}' looks like TorchScript but does not load: {exc}") from None
        return Model(module, name=path.stem)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        if not trust_pickle:
            raise ModelError(
                f"'{path}' holds a pickled object (a full nn.Module?); unpickling runs code from the file, "
                "so pass trust_pickle=True (--trust-pickle) if you trust it, or save a state_dict instead"
            ) from None
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:
            raise ModelError(f"'{path}' does not unpickle: {type(exc).__name__}: {exc}") from None
    except Exception as exc:
        raise ModelError(f"'{path}' is not a model file torch can load ({type(exc).__name__}: {exc})") from None
    if isinstance(obj, nn.Module):
        return Model(obj, name=path.stem)
    if isinstance(obj, dict):
        return _from_state_dict(path, obj, arch)
    raise ModelError(f"'{path}' holds a {type(obj).__name__}, not a module or a state_dict")


def _from_state_dict(path: Path, obj: dict, arch: str | None) -> Model:
    state = obj
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(state.get(key), dict):
            state = state[key]
            break
    if not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"'{path}' holds a dict that is not a state_dict of tensors")
    if arch is None:
        raise ModelError(
            f"'{path}' is a state_dict; say which architecture it belongs to with arch='efficientnet_lite0' "
            "or arch='torchvision:resnet50' (--arch)"
        )
    if all(k.startswith("module.") for k in state):  # saved from DataParallel
        state = {k[len("module.") :]: v for k, v in state.items()}
    matrices = [v for k, v in state.items() if k.endswith("weight") and v.ndim == 2]
    num_classes = int(matrices[-1].shape[0]) if matrices else None
    if arch.startswith("torchvision:"):
        model = _torchvision(arch.split(":", 1)[1], weights=False, num_classes=num_classes, announce=False)
    elif arch.startswith("timm:"):
        model = _timm(arch.split(":", 1)[1], weights=False, num_classes=num_classes, announce=False)
    else:
        model = MODELS.get(arch).build(weights=False, num_classes=num_classes)
    try:
        model.module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1:3]
        raise ModelError(
            f"'{path}' does not fit the {arch} architecture: {' '.join(s.strip() for s in first)}"
        ) from None
    return Model(model.module, labels=model._labels, preprocess=model.preprocess, name=path.stem)


def _timm(name: str, *, weights, num_classes: int | None = None, announce: bool = True) -> Model:
    """A timm model by name: its preprocessing from timm's data config (input size, mean, std; the whole
    image is resized, not cropped), its labels from the pretrained config (ImageNet-1k names otherwise)."""
    try:
        import timm
        import timm.data
    except Exception as exc:  # ImportError, or a timm whose torchvision does not import here
        raise ModelError(
            f"'timm:{name}' needs timm, which does not import here ({type(exc).__name__}: {exc}); pip install timm"
        ) from None
    if not timm.is_model(name.split(".", 1)[0]):  # "vit_small_patch16_224.augreg_in21k": a pretrained tag
        available = timm.list_models()
        raise ModelError(f"timm has no model {name!r}{did_you_mean(name, available)}")
    kwargs: dict = {} if num_classes is None else {"num_classes": num_classes}
    local = isinstance(weights, (str, os.PathLike)) and not isinstance(weights, bool)
    pretrained = bool(weights) and num_classes is None
    if local:
        path = Path(weights)
        if not path.is_file():
            raise ModelError(f"weights file '{path}' for timm:{name} not found")
        kwargs["pretrained_cfg_overlay"] = {"file": str(path)}
    try:
        module = timm.create_model(name, pretrained=pretrained, **kwargs)
    except ModelError:
        raise
    except Exception as exc:  # no network, a file that does not fit, ...
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise ModelError(
            f"could not build timm:{name} with its pretrained weights ({type(exc).__name__}: {first}); "
            "check the network or the weights file, or use pretrained=False (--no-weights) for random weights"
        ) from None
    module.eval()
    config = timm.data.resolve_model_data_config(module)
    _, height, width = config["input_size"]
    preprocess = Preprocess(size=(int(height), int(width)), mean=tuple(config["mean"]), std=tuple(config["std"]))
    labels = None
    if pretrained:
        try:
            info = timm.data.ImageNetInfo(timm.data.infer_imagenet_subset(module) or "imagenet-1k")
            if info.num_classes() == getattr(module, "num_classes", None):
                labels = list(info.label_descriptions(as_dict=False))
        except Exception:  # not an ImageNet subset: "class N" labels
            labels = None
    random = announce and not pretrained and not local
    model = Model(module, labels=labels, preprocess=preprocess, name=f"timm:{name}" + RANDOM_WEIGHTS * random)
    if labels is None and getattr(module, "num_classes", None) == 1000:
        model._labels = list(imagenet_labels())
    return model
