"""ONNX files as models.

- With ``onnx2torch`` installed, the graph is converted to a PyTorch module: every method works (layers,
  gradients, hooks), so a Keras or MATLAB model exported to ONNX is explained like a PyTorch one.
- Otherwise, or where an operator does not convert, the file runs in ONNX Runtime (``cnnscope[onnx]``):
  a black box for the perturbation methods (occlusion, RISE, LIME); a method that needs gradients or a
  layer gets one line saying why.

The preprocessing comes from the graph's input: its height and width when they are fixed (else 224),
and one mean/std per channel (ImageNet's for three channels, 0 and 1 for one).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import CnnscopeWarning, MethodError, ModelError
from .preprocess import Preprocess

#: What a method that needs gradients or layers is told about a model running in ONNX Runtime.
BLACK_BOX = (
    "this ONNX model runs in ONNX Runtime, which gives no gradients and no layers{why}: use a perturbation "
    "method (occlusion, rise, lime), or install onnx2torch (pip install onnx2torch) so that the file is "
    "converted to PyTorch and every method works"
)


def _missing(extra: str, package: str) -> ModelError:
    return ModelError(f"ONNX models need {package}: pip install 'cnnscope[{extra}]'")


class OnnxRuntimeModule(nn.Module):
    """An ONNX Runtime session as an ``nn.Module`` of preprocessed (N, C, H, W) batches: no gradients,
    no submodules. ``cnnscope_black_box`` is the line a gradient or layer method gets."""

    def __init__(self, path: Path, reason: str = "") -> None:
        super().__init__()
        try:
            import onnxruntime
        except ImportError:
            raise _missing("onnx", "onnxruntime") from None
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        try:
            self.session = onnxruntime.InferenceSession(
                str(path), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:
            raise ModelError(f"'{path}' does not load in ONNX Runtime: {type(exc).__name__}: {exc}") from None
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise ModelError(f"'{path}' takes {len(inputs)} inputs; an image classifier takes one image batch")
        self.input_name = inputs[0].name
        self.input_shape = list(inputs[0].shape)
        self.cnnscope_black_box = BLACK_BOX.format(why=reason)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and batch.requires_grad:
            raise MethodError(self.cnnscope_black_box)
        array = np.ascontiguousarray(batch.detach().float().cpu().numpy())
        fixed_batch = self.input_shape[0] if isinstance(self.input_shape[0], int) else None
        if fixed_batch is not None and fixed_batch != array.shape[0]:
            if fixed_batch != 1:
                raise ModelError(f"this ONNX model takes batches of exactly {fixed_batch} images")
            parts = [self._run(array[i : i + 1]) for i in range(array.shape[0])]
            scores = np.concatenate(parts, axis=0)
        else:
            scores = self._run(array)
        return torch.from_numpy(scores).to(batch.device)

    def _run(self, array: np.ndarray) -> np.ndarray:
        try:
            (scores, *_) = self.session.run(None, {self.input_name: array})
        except Exception as exc:
            raise ModelError(
                f"the ONNX model failed on a {tuple(array.shape)} batch: {type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}; check --size, --mean and --std"
            ) from None
        return np.asarray(scores, dtype=np.float32)


def _preprocess_of(shape: list) -> Preprocess:
    """Preprocessing from the graph's input shape [N, C, H, W] (symbolic dims are names or None)."""
    dims = [d if isinstance(d, int) and d > 0 else None for d in shape]
    channels = dims[1] if len(dims) == 4 and dims[1] in (1, 3) else 3
    size = (dims[2], dims[3]) if len(dims) == 4 and dims[2] and dims[3] else (224, 224)
    if channels == 1:
        return Preprocess(size=size, mean=(0.0,), std=(1.0,))
    return Preprocess(size=size)


def _input_shape(graph) -> list:
    initializers = {init.name for init in graph.initializer}
    for value in graph.input:
        if value.name not in initializers:
            dims = value.type.tensor_type.shape.dim
            return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in dims]
    return []


def load_onnx(path: Path, *, convert: bool | None = None):
    """A :class:`~cnnscope.models.Model` from an ``.onnx`` file: converted with onnx2torch when it is installed
    (``convert=None``) or asked for (``convert=True``), else (or where conversion fails) in ONNX Runtime."""
    from .model import Model

    if not path.exists():
        raise ModelError(f"model file '{path}' not found")
    converter = None
    if convert is not False:
        try:
            from onnx2torch import convert as converter
        except ImportError:
            if convert:
                raise ModelError("converting ONNX to PyTorch needs onnx2torch: pip install onnx2torch") from None
    if converter is not None:
        try:
            import onnx
        except ImportError:
            raise _missing("onnx", "onnx") from None
        try:
            graph_model = onnx.load(str(path))
        except Exception as exc:
            raise ModelError(f"'{path}' is not an ONNX file onnx can read: {type(exc).__name__}: {exc}") from None
        preprocess = _preprocess_of(_input_shape(graph_model.graph))
        try:
            module = converter(graph_model)
        except Exception as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            warnings.warn(
                f"onnx2torch could not convert '{path.name}' ({reason}); it runs in ONNX Runtime instead, "
                "for the black-box methods only (occlusion, rise, lime)",
                CnnscopeWarning,
                stacklevel=3,
            )
            module = OnnxRuntimeModule(path, reason=f" (onnx2torch could not convert it: {reason})")
        else:
            return Model(module.eval(), preprocess=preprocess, name=path.stem)
    else:
        module = OnnxRuntimeModule(path)
        preprocess = _preprocess_of(module.input_shape)
    return Model(module.eval(), preprocess=preprocess, name=path.stem)
