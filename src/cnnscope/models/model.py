"""The adapter between a user's network and every method: ``Model``.

A :class:`Model` is an ``nn.Module`` plus what explaining it needs: how to preprocess an image,
the class labels, whether outputs are softmax (single-label) or sigmoid (multi-label) scores, and
a traced table of its layers. It holds the user's module by reference and never changes it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..errors import CnnscopeWarning, InputError, ModelError
from ..hooks import LayerRef
from ..io import ImageSource, display_rgb, read_image
from ..state import model_lock, preserved
from ..tokens import layout_of
from .labels import short_name
from .layers import LayerCall, default_layer_name, find_layer, format_table, trace_calls
from .preprocess import Preprocess, preprocess_for

#: Input sizes tried, in order, for a model file that brings no preprocessing and fails at the default size.
TRIED_SIZES = {
    2: ((28, 28), (32, 32), (64, 64), (96, 96), (128, 128), (224, 224), (256, 256), (299, 299), (384, 384)),
    3: ((16, 112, 112), (8, 112, 112), (32, 32, 32), (64, 64, 64), (96, 96, 96), (128, 128, 128)),
}


@dataclass(frozen=True)
class Prediction:
    index: int
    label: str
    probability: float
    score: float  # the logit

    @property
    def name(self) -> str:
        return short_name(self.label)


@dataclass(frozen=True)
class Batch:
    """A preprocessed batch and the original RGB images it came from (for overlays)."""

    tensor: torch.Tensor
    originals: Sequence[np.ndarray]
    names: list[str]


class UnnormalizedImages(Sequence):
    """The images of a preprocessed tensor as RGB uint8, computed on first access (only overlays
    need them, so a method call on a tensor does not pay for the conversion)."""

    def __init__(self, tensor: torch.Tensor, preprocess: Preprocess) -> None:
        self._tensor = tensor
        self._preprocess = preprocess
        self._images: list[np.ndarray] | None = None

    def _all(self) -> list[np.ndarray]:
        if self._images is None:
            pixels = self._preprocess.unnormalize(self._tensor.float())
            if pixels.shape[1] not in (1, 3):  # multispectral: the grey mean of its channels
                pixels = pixels.mean(dim=1, keepdim=True)
            pixels = pixels.mul(255).round().byte()
            if pixels.shape[1] == 1:  # grey: shown as a grey RGB picture under the colour map
                pixels = pixels.expand(-1, 3, *pixels.shape[2:])
            self._images = list(pixels.movedim(1, -1).cpu().numpy())
        return self._images

    def __len__(self) -> int:
        return int(self._tensor.shape[0])

    def __getitem__(self, index):
        return self._all()[index]


OutputSelector = str | int | Callable[[object], torch.Tensor] | None


def select_output(output: object, selector: OutputSelector = None) -> torch.Tensor:
    """The (N, classes) scores inside a forward's output: ``selector`` is a dict key or attribute name, a
    position in a tuple or list, or a function; by default a tensor as it is, else the ``logits`` entry or
    attribute (Hugging Face style), else the first tensor of a tuple, list or dict."""
    if isinstance(output, torch.Tensor) and selector is None:
        return output
    if callable(selector):
        chosen = selector(output)
    elif isinstance(selector, int) and not isinstance(selector, bool):
        chosen = (
            output[selector] if isinstance(output, (tuple, list)) and -len(output) <= selector < len(output) else None
        )
    elif isinstance(selector, str):
        chosen = output.get(selector) if isinstance(output, dict) else getattr(output, selector, None)
    elif isinstance(output, dict):
        chosen = output.get("logits")
        if not isinstance(chosen, torch.Tensor):
            chosen = next((v for v in output.values() if isinstance(v, torch.Tensor)), None)
    elif isinstance(getattr(output, "logits", None), torch.Tensor):
        chosen = output.logits
    elif isinstance(output, (tuple, list)):
        chosen = next((item for item in output if isinstance(item, torch.Tensor)), None)
    else:
        chosen = None
    if not isinstance(chosen, torch.Tensor):
        where = f"output={selector!r} " if selector is not None else ""
        raise ModelError(
            f"the model's forward returns a {type(output).__name__} and {where}finds no tensor of scores in it; "
            "pass output= a key, attribute, position or function that picks the (N, classes) scores"
        )
    return chosen


class Model:
    """A classifier ready to be explained.

    Args:
        module: the network; called as ``module(batch)`` and returning (N, num_classes) logits.
        labels: one name per class; defaults to ``"class 0"``, ``"class 1"``, ...
        preprocess: image -> tensor; defaults to 224x224 with ImageNet mean and std.
        multilabel: scores are per-class sigmoids instead of one softmax.
        name: shown in reports.
        outputs: ``"logits"`` or ``"probabilities"`` (the forward already ends in a softmax or sigmoid).
        output: where the scores are when the forward returns a tuple, list, dict or an object (see
            :func:`select_output`; default: the tensor itself, else ``logits``, else the first tensor).
    """

    def __init__(
        self,
        module: nn.Module,
        *,
        labels: Sequence[str] | None = None,
        preprocess: Preprocess | None = None,
        multilabel: bool = False,
        name: str | None = None,
        outputs: str = "logits",
        output: OutputSelector = None,
    ) -> None:
        if outputs not in ("logits", "probabilities", "scores"):
            raise ModelError(f"outputs must be 'logits', 'probabilities' or 'scores', got {outputs!r}")
        self.outputs = outputs
        self.output = output
        if not isinstance(module, nn.Module):
            raise ModelError(f"Model needs a torch.nn.Module, got {type(module).__name__}")
        self.module = module
        #: whether the preprocessing was read from the model's first layer (none was given): its size is then
        #: searched for when the default one fails
        self.guessed_preprocess = preprocess is None
        self.preprocess = preprocess if preprocess is not None else preprocess_for(module)[0]
        self.multilabel = bool(multilabel)
        self.name = name or type(module).__name__
        self._labels = [str(label) for label in labels] if labels is not None else None
        self._calls: list[LayerCall] | None = None
        self._output_shape: tuple[int, ...] = ()
        self._largest: int | None = None
        self._default: LayerRef | None = None
        #: what methods keep between calls on this model, by name (DeepLIFT's shared reference's values of the last
        #: forward): rebuilt where needed, never pickled (an audit on Ray ships the model to every actor)
        self.kept: dict[str, object] = {}

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["kept"] = {}
        return state

    def __repr__(self) -> str:
        kind = "multi-label" if self.multilabel else "single-label"
        return f"Model({self.name!r}, {kind}, input {'x'.join(str(v) for v in self.preprocess.size)})"

    # -- structure -------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        for tensor in self.module.parameters():
            return tensor.device
        for tensor in self.module.buffers():
            return tensor.device
        return torch.device("cpu")

    def calls(self) -> list[LayerCall]:
        """Every module call of one forward pass, traced once and cached."""
        if self._calls is None:
            with model_lock(self.module):
                self._trace()
        return self._calls

    def _trace(self) -> None:
        if self._calls is None:
            self._calls, self._output_shape = self._first_trace()
            if len(self._output_shape) != 2:
                raise ModelError(
                    f"the model returns shape {self._output_shape} for one image; a classifier must "
                    "return (N, num_classes) scores"
                )
            if self._labels is not None and len(self._labels) != self._output_shape[1]:
                raise ModelError(
                    f"{len(self._labels)} labels given but the model has {self._output_shape[1]} outputs; "
                    "give one label per output"
                )

    def _first_trace(self) -> tuple[list[LayerCall], tuple[int, ...]]:
        """Trace one blank input of the preprocessing's shape. A model that brought no preprocessing (its channels
        read from its first layer) is tried at the usual sizes when the default fails, and the size that runs is
        kept with a note. A model that fails at every size raises one line naming the shape tried and the flags
        that give the right one."""
        first = self.preprocess
        try:
            return trace_calls(self.module, torch.zeros(first.input_shape(), device=self.device), self.select)
        except ModelError as exc:
            failure = exc
        if self.guessed_preprocess:
            channel_options = [first] + ([Preprocess()] if first.channels != 3 or first.spatial_dims != 2 else [])
            for option in channel_options:
                for size in TRIED_SIZES[option.spatial_dims]:
                    if option is first and size == first.size:
                        continue
                    trial = dataclasses.replace(option, size=size)
                    try:
                        blank = torch.zeros(trial.input_shape(), device=self.device)
                        found = trace_calls(self.module, blank, self.select)
                    except ModelError:
                        continue
                    if len(found[1]) != 2:
                        continue
                    self.preprocess = trial
                    warnings.warn(
                        f"{self.name}: no preprocessing given; the model runs on {trial.channels}-channel "
                        f"{'x'.join(map(str, size))} inputs with pixels in [0, 1] (mean 0, std 1) unless told "
                        "otherwise; set them with --size, --mean, --std (Preprocess(size=..., mean=..., std=...))",
                        CnnscopeWarning,
                        stacklevel=3,
                    )
                    return found
        raise ModelError(
            f"the model fails on a {first.input_shape()} input ({_last_line(failure)}); give the input it takes with "
            f"--size {'H,W' if first.spatial_dims == 2 else 'D,H,W'}, --mean and --std (one value per channel, e.g. "
            "--mean 0 --std 1 for one grey channel), or preprocess=Preprocess(size=..., mean=..., std=...)"
        ) from None

    def largest_layer_output(self) -> int:
        """Elements per image of the largest layer output (from the trace; cached with it)."""
        if self._largest is None:
            self._largest = max(
                (math.prod(row.output_shape[1:]) for row in self.calls() if row.output_shape), default=1
            )
        return self._largest

    @property
    def num_classes(self) -> int:
        self.calls()
        return self._output_shape[1]

    @property
    def labels(self) -> list[str]:
        if self._labels is None:
            self._labels = [f"class {i}" for i in range(self.num_classes)]
        return self._labels

    def layers(self) -> list[LayerCall]:
        """The summary rows: every module call in execution order with output shape and parameters."""
        return list(self.calls())

    def summary(self) -> str:
        """The layer table as text (Keras' ``model.summary()``), with totals."""
        total = sum(p.numel() for p in self.module.parameters())
        trainable = sum(p.numel() for p in self.module.parameters() if p.requires_grad)
        try:
            default = self.default_layer().key
        except ModelError as exc:
            default = f"none ({exc})"
        return (
            f"{format_table(self.calls())}\n\n"
            f"total params: {total:,}  trainable: {trainable:,}  default target layer: {default}"
        )

    def layer(self, spec: str | nn.Module | LayerRef) -> LayerRef:
        """Look a layer up by dotted name, ``'name@call'`` or module object; the reference carries the
        output's :class:`~cnnscope.tokens.Layout` for this model's input size."""
        ref = find_layer(self.module, self.calls(), spec)
        if ref.layout is None:
            ref = dataclasses.replace(ref, layout=layout_of(ref.output_shape, self.preprocess.size))
        return ref

    def default_layer(self) -> LayerRef:
        """The last layer with a spatial (N, C, H, W) output: the usual Grad-CAM / CAM target."""
        if isinstance(self.module, torch.jit.ScriptModule):
            return self.layer("")  # raises the TorchScript explanation
        if self._default is None and any(isinstance(sub, torch.jit.ScriptModule) for sub in self.module.modules()):
            from .layers import scripted_submodule_message

            raise ModelError(scripted_submodule_message(self.module))
        if self._default is None:
            from ..tokens import token_grid

            calls = self.calls()
            spatial = [row for row in calls if row.is_spatial]
            last_spatial = max((row.finished for row in spatial), default=-1)
            tokens_after = any(
                len(row.output_shape) == 3
                and row.finished > last_spatial
                and token_grid(row.output_shape[1], self.preprocess.size)
                for row in calls
            )
            if spatial and not tokens_after:
                self._default = self.layer(default_layer_name(calls))
            else:  # a transformer: patch tokens come after the last spatial map (the patch embedding)
                self._default = self._token_default_layer()
        return self._default

    def _token_default_layer(self) -> LayerRef:
        """For transformers: the last layer of patch tokens that reaches the head's features (see
        :func:`~cnnscope.models.layers.token_default_layer`)."""
        from .layers import token_default_layer

        return token_default_layer(self)

    # -- data ------------------------------------------------------------------------------------
    def prepare(self, images: object) -> Batch:
        """Images in any accepted form -> a batch on the model's device and the original pixels.

        Accepts a path, bytes, PIL image or array, or a list of them, or a torch tensor that is
        already preprocessed, (N, 3, H, W) or (3, H, W). A tensor is never modified.
        """
        if isinstance(images, torch.Tensor):
            return self._prepare_tensor(images)
        if isinstance(images, np.ndarray) and images.ndim == self.preprocess.spatial_dims + 2:
            images = list(images)
        from ..io_volumes import Volume

        if isinstance(images, (str, os.PathLike, bytes, Image.Image, np.ndarray, Volume)):
            images = [images]
        if not isinstance(images, (list, tuple)):
            raise InputError(
                f"images must be a path, an array, a PIL image, a list of them or a tensor, not {type(images).__name__}"
            )
        if not images:
            raise InputError("no images given")
        self.calls()  # the model runs on inputs of the preprocessing's shape (or one line says which it needs)
        preprocess = self.preprocess
        if preprocess.spatial_dims == 3:
            return self._prepare_volumes(images)
        stored = [read_image(image) for image in images]
        notes = dict.fromkeys(note for note in map(preprocess.conversion_note, stored) if note)
        for note in notes:
            warnings.warn(f"{self.name}: {note}", CnnscopeWarning, stacklevel=3)
        names = [_name_of(image, index) for index, image in enumerate(images)]
        tensor = preprocess(stored).to(self.device)
        originals = [display_rgb(image, preprocess.window) for image in stored]
        return Batch(tensor=tensor, originals=originals, names=names)

    def _prepare_volumes(self, sources: list) -> Batch:
        """Volumes (paths, DICOM folders, arrays (D, H, W[, C]) or :class:`~cnnscope.io_volumes.Volume`) -> a
        (N, C, D, H, W) batch; a DICOM file's own window applies when none is given."""
        from ..io_volumes import read_volume

        volumes = [read_volume(source, frames=self.preprocess.size[0]) for source in sources]
        tensors, originals = [], []
        for volume in volumes:
            preprocess = self.preprocess
            if preprocess.window is None and volume.window is not None:
                preprocess = dataclasses.replace(preprocess, window=volume.window)
            note = preprocess.conversion_note(volume.values)
            if note:
                warnings.warn(f"{self.name}: {note}", CnnscopeWarning, stacklevel=4)
            tensors.append(preprocess([volume.values]))
            originals.append(display_rgb(volume.values, preprocess.window))
        names = [_name_of(source, index) for index, source in enumerate(sources)]
        return Batch(tensor=torch.cat(tensors).to(self.device), originals=originals, names=names)

    def _prepare_tensor(self, tensor: torch.Tensor) -> Batch:
        channels = self.preprocess.channels
        dims = self.preprocess.spatial_dims
        if tensor.ndim == dims + 1:
            tensor = tensor.unsqueeze(0)
        if tensor.ndim != dims + 2 or tensor.shape[1] != channels:
            spatial = "H, W" if dims == 2 else "D, H, W"
            raise InputError(
                f"a tensor input must be a preprocessed (N, {channels}, {spatial}) or ({channels}, {spatial}) batch "
                f"for this model, got shape {tuple(tensor.shape)}"
            )
        if tensor.shape[0] == 0:
            raise InputError("the input batch is empty")
        if not tensor.is_floating_point():
            raise InputError(f"a tensor input must be floating point (preprocessed), got {tensor.dtype}")
        # a NaN or inf anywhere makes the sum non-finite; the sum is 10x cheaper than isfinite() on every value
        if not torch.isfinite(tensor.sum()) and not torch.isfinite(tensor).all():
            raise InputError("the input tensor contains NaN or infinite values")
        batch = tensor.detach().to(self.device)
        names = [f"image{i}" for i in range(batch.shape[0])]
        return Batch(tensor=batch, originals=UnnormalizedImages(batch, self.preprocess), names=names)

    # -- outputs ---------------------------------------------------------------------------------
    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Softmax over classes, or per-class sigmoid for a multi-label model (as they are when the
        model already outputs probabilities; the scores themselves for a model scored by a callable
        target, see :meth:`scored_by`)."""
        if self.outputs == "scores":
            return logits
        if self.outputs == "probabilities":
            return logits.clamp(0, 1)
        return torch.sigmoid(logits) if self.multilabel else torch.softmax(logits, dim=-1)

    def scored_by(self, function: Callable[[torch.Tensor], torch.Tensor]) -> Model:
        """The same module whose outputs are ``function(logits)``: (N,) or (N, K) scores per image (a weighted
        sum of classes, the difference between two classes), as pytorch-grad-cam's callable targets. The
        scores are explained as they are (``outputs="scores"``: no softmax) under the labels
        ``name[k]``, ``name`` being the function's name."""
        own = self.select

        def scores(output: object) -> torch.Tensor:
            logits = own(output)
            values = function(logits)
            if not isinstance(values, torch.Tensor) or values.ndim not in (1, 2) or values.shape[0] != logits.shape[0]:
                raise ModelError(
                    "a callable target must map the (N, classes) logits to (N,) or (N, K) scores, got "
                    f"{getattr(values, 'shape', type(values).__name__)}"
                )
            return values.unsqueeze(1) if values.ndim == 1 else values

        name = getattr(function, "__name__", "score")
        name = "score" if name == "<lambda>" else name
        scored = Model(
            self.module, preprocess=self.preprocess, name=f"{self.name} / {name}", outputs="scores", output=scores
        )
        scored._labels = [name] if scored.num_classes == 1 else [f"{name}[{k}]" for k in range(scored.num_classes)]
        return scored

    def select(self, output: object) -> torch.Tensor:
        """The scores in a forward's output (see ``output``)."""
        return select_output(output, self.output)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """The forward every method runs: the module's (N, classes) scores for a preprocessed batch (the
        logits, or the probabilities of a model that outputs them), picked by ``output`` from a tuple, dict
        or object output. No state change: the module gets a copy of ``batch``, which a first in-place module
        (``nn.ReLU(inplace=True)``) would otherwise overwrite (the caller's images, or a leaf that needs its
        gradient); the copy costs well under 1% of a forward pass."""
        output = self.module(batch.clone())
        return output if isinstance(output, torch.Tensor) and self.output is None else self.select(output)

    def predict(self, images: object, top_k: int = 5) -> list[list[Prediction]]:
        """The top-k classes of each image, with probabilities (eval mode, no gradients)."""
        batch = self.prepare(images)
        with preserved(self.module), torch.no_grad():
            logits = self(batch.tensor)
        return self.top_predictions(logits, top_k)

    def top_predictions(self, logits: torch.Tensor, top_k: int = 5) -> list[list[Prediction]]:
        if top_k < 1:
            raise InputError(f"top_k must be at least 1, got {top_k}")
        probs = self.probabilities(logits.detach().float())
        k = min(top_k, probs.shape[1])
        values, indices = probs.topk(k, dim=1)
        labels = self.labels
        return [
            [
                Prediction(int(i), labels[int(i)], float(v), float(logits[row, int(i)]))
                for v, i in zip(values[row], indices[row], strict=True)
            ]
            for row in range(probs.shape[0])
        ]


def _last_line(error: BaseException) -> str:
    """The informative line of a model's failure: a TorchScript error ends with the Python-side message after
    its own traceback, so the last non-empty line of the cause (or of the error itself)."""
    cause = error.__cause__ or error
    lines = [line.strip() for line in str(cause).strip().splitlines() if line.strip()]
    text = lines[-1] if lines else type(cause).__name__
    if not text.startswith(type(cause).__name__) and ":" not in text[:40]:
        text = f"{type(cause).__name__}: {text}"
    return text[:300]


def _name_of(image: ImageSource, index: int) -> str:
    if isinstance(image, (str, os.PathLike)):
        return os.path.splitext(os.path.basename(os.fspath(image)))[0] or f"image{index}"
    return f"image{index}"
