"""What activation maximization and Deep Dream maximize: objectives that add and scale.

An :class:`Objective` names the layers it reads and, bound to a model, maps the recorded activations
(and the logits) of a batch to one value per image. Objectives combine like numbers::

    class_logit("goldfish") + 0.5 * channel("_blocks.10", 3) - 0.1 * channel("_blocks.10", 7)

The same thing as text (the CLI's ``--objective``): ``"class:goldfish + 0.5*channel:_blocks.10:3"``.
Kinds are registered in ``OBJECTIVES``: ``class``, ``logprob``, ``channel``, ``neuron``, ``layer``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .._registry import OBJECTIVES
from ..errors import InputError, TargetError
from ..hooks import LayerRef
from ..targets import class_index

LayerSpec = str | nn.Module
#: acts (by LayerRef.key) and logits (None when no objective needs them) -> one value per image
Evaluate = Callable[[dict[str, torch.Tensor], torch.Tensor | None], torch.Tensor]
Build = Callable[["object", dict[object, LayerRef]], Evaluate]


def _spec_key(spec: LayerSpec) -> object:
    return spec if isinstance(spec, str) else id(spec)


@dataclass(frozen=True)
class Objective:
    """A quantity to maximize, per image. Build with :func:`class_logit`, :func:`channel`,
    :func:`neuron`, :func:`layer_activation` or :func:`parse_objective`; combine with ``+ - *``."""

    name: str
    layers: tuple[LayerSpec, ...]
    uses_logits: bool
    build: Build

    def bind(self, model, layer_of: Callable[[LayerSpec], LayerRef] | None = None) -> BoundObjective:
        """Resolve layer names and class names against ``model`` (errors name what is wrong).
        ``layer_of`` looks the layers up instead of ``model.layer`` (for a working copy of the model)."""
        lookup = layer_of or model.layer
        refs = {_spec_key(spec): lookup(spec) for spec in self.layers}
        return BoundObjective(self.name, tuple(dict.fromkeys(refs.values())), self.uses_logits, self.build(model, refs))

    def __add__(self, other: Objective) -> Objective:
        if not isinstance(other, Objective):
            return NotImplemented
        first, second = self.build, other.build
        return Objective(
            f"{self.name} + {other.name}",
            self.layers + other.layers,
            self.uses_logits or other.uses_logits,
            lambda model, refs: _combine(first(model, refs), second(model, refs), 1.0),
        )

    def __radd__(self, other: object) -> Objective:
        if isinstance(other, (int, float)) and other == 0:  # sum([...]) starts from 0
            return self
        return NotImplemented

    def __sub__(self, other: Objective) -> Objective:
        if not isinstance(other, Objective):
            return NotImplemented
        return self + (-1.0) * other

    def __neg__(self) -> Objective:
        return (-1.0) * self

    def __mul__(self, weight: float) -> Objective:
        if not isinstance(weight, (int, float)) or isinstance(weight, bool):
            return NotImplemented
        inner = self.build
        factor = float(weight)
        return Objective(
            f"{factor:g}*{self.name}",
            self.layers,
            self.uses_logits,
            lambda model, refs: _scaled(inner(model, refs), factor),
        )

    __rmul__ = __mul__

    def __truediv__(self, divisor: float) -> Objective:
        if not isinstance(divisor, (int, float)) or divisor == 0:
            return NotImplemented
        return self * (1.0 / divisor)


@dataclass(frozen=True)
class BoundObjective:
    """An objective resolved against one model: ``evaluate(acts, logits) -> (n,)``."""

    name: str
    layers: tuple[LayerRef, ...]
    uses_logits: bool
    evaluate: Evaluate


def evaluate_each(
    objectives: Sequence[BoundObjective], acts: dict[str, torch.Tensor], logits: torch.Tensor | None
) -> torch.Tensor:
    """Row i of a batch scored by ``objectives[i]`` (each image has its own objective): (n,) values."""
    return torch.cat(
        [
            objective.evaluate(
                {key: value[i : i + 1] for key, value in acts.items()}, None if logits is None else logits[i : i + 1]
            )
            for i, objective in enumerate(objectives)
        ]
    )


def _combine(first: Evaluate, second: Evaluate, sign: float) -> Evaluate:
    return lambda acts, logits: first(acts, logits) + sign * second(acts, logits)


def _scaled(inner: Evaluate, factor: float) -> Evaluate:
    return lambda acts, logits: factor * inner(acts, logits)


def _class_index(model, target: int | str) -> int:
    count = model.num_classes
    if isinstance(target, str) and target.strip().lstrip("-").isdigit():
        target = int(target)
    index = target if isinstance(target, int) else class_index(target, model.labels)
    if not 0 <= index < count:
        raise TargetError(f"class index {index} is out of range: the model has {count} classes (0-{count - 1})")
    return index


def class_logit(target: int | str, *, score: str = "logit") -> Objective:
    """A class's score: its logit (Simonyan et al. 2013: the unnormalized score, so other classes are
    not pushed down) or, with ``score="logprob"``, its log-probability (also pushes the others down)."""
    if score not in ("logit", "logprob"):
        raise InputError(f"score must be 'logit' or 'logprob', got {score!r}")

    def build(model, refs) -> Evaluate:
        index = _class_index(model, target)
        if score == "logit":
            return lambda acts, logits: logits[:, index]
        return lambda acts, logits: torch.log_softmax(logits, dim=1)[:, index]

    word = "class" if score == "logit" else "logprob"
    return Objective(f"{word}:{target}", (), True, build)


def feature_map(model, ref: LayerRef) -> Callable[[torch.Tensor], torch.Tensor]:
    """How to view ``ref``'s output as (n, C, h, w) maps: feature maps as they are, transformer tokens
    on their grid, a vector layer as 1x1 maps; anything else is a one-line InputError."""
    if ref.layout is None:
        if len(ref.output_shape) == 2:
            return lambda t: t[:, :, None, None]  # a vector layer: each unit is a 1x1 channel
        raise InputError(
            f"layer {ref.key!r} outputs shape {ref.output_shape}, neither a feature map nor a vector; "
            "choose a convolutional layer (cnnscope layers lists them)"
        )
    return ref.layout.to_map


def _check_channel(ref: LayerRef, index: int, channels: int) -> None:
    if not 0 <= index < channels:
        raise InputError(f"layer {ref.key!r} has {channels} channels (0-{channels - 1}); channel {index} is not one")


def _channel_count(model, ref: LayerRef) -> int:
    shaped = feature_map(model, ref)(torch.empty(ref.output_shape, device="meta"))
    return int(shaped.shape[1])


def channel(layer: LayerSpec, index: int) -> Objective:
    """The mean activation of one channel of ``layer`` over all positions (Olah et al. 2017)."""

    def build(model, refs) -> Evaluate:
        ref = refs[_spec_key(layer)]
        _check_channel(ref, index, _channel_count(model, ref))
        as_map = feature_map(model, ref)
        return lambda acts, logits: as_map(acts[ref.key])[:, index].mean(dim=(-2, -1))

    return Objective(f"channel:{_layer_name(layer)}:{index}", (layer,), False, build)


def neuron(layer: LayerSpec, index: int, y: int | None = None, x: int | None = None) -> Objective:
    """One unit: channel ``index`` of ``layer`` at position (y, x) of its map (default: the centre)."""

    def build(model, refs) -> Evaluate:
        ref = refs[_spec_key(layer)]
        _check_channel(ref, index, _channel_count(model, ref))
        as_map = feature_map(model, ref)

        def evaluate(acts, logits):
            grid = as_map(acts[ref.key])[:, index]
            height, width = grid.shape[-2:]
            row = height // 2 if y is None else y
            col = width // 2 if x is None else x
            if not (0 <= row < height and 0 <= col < width):
                raise InputError(f"neuron position ({row}, {col}) is outside the {height}x{width} map of {ref.key!r}")
            return grid[:, row, col]

        return evaluate

    where = "" if y is None and x is None else f"@{y},{x}"
    return Objective(f"neuron:{_layer_name(layer)}:{index}{where}", (layer,), False, build)


def layer_activation(layer: LayerSpec, channels: Sequence[int] | None = None, *, power: int = 2) -> Objective:
    """Deep Dream's objective (Mordvintsev et al. 2015): the mean of ``activation ** power`` over the
    chosen channels (all by default) and positions. ``power=1`` is the plain mean activation."""
    if power not in (1, 2):
        raise InputError(f"power must be 1 or 2, got {power}")
    chosen = None if channels is None else [int(c) for c in channels]

    def build(model, refs) -> Evaluate:
        ref = refs[_spec_key(layer)]
        count = _channel_count(model, ref)
        for index in chosen or []:
            _check_channel(ref, index, count)
        as_map = feature_map(model, ref)

        def evaluate(acts, logits):
            values = as_map(acts[ref.key])
            if chosen is not None:
                values = values[:, chosen]
            return (values if power == 1 else values * values).mean(dim=(1, 2, 3))

        return evaluate

    return Objective(f"layer:{_layer_name(layer)}", (layer,), False, build)


def middle_layer(model):
    """The spatial layer halfway through the model's trace (mid-level features: Deep Dream's default layer,
    and the default layer of the diversity term)."""
    spatial = [call for call in model.calls() if call.is_spatial and call.tensor_output and call.depth <= 1]
    if not spatial:
        raise InputError("the model has no spatial layer to use here; pass a layer (cnnscope layers lists them)")
    return model.layer(spatial[len(spatial) // 2].key)


def _layer_name(layer: LayerSpec) -> str:
    return layer if isinstance(layer, str) else type(layer).__name__


# -- text specs -------------------------------------------------------------------------------------


def _split_layer_index(kind: str, text: str) -> tuple[str, int]:
    layer, _, index = text.rpartition(":")
    if not layer or not index.strip().isdigit():
        raise InputError(f"{kind} objective needs LAYER:INDEX, e.g. {kind}:_blocks.10:3; got {text!r}")
    return layer.strip(), int(index)


OBJECTIVES.register("class", lambda text: class_logit(text.strip()))
OBJECTIVES.register("logprob", lambda text: class_logit(text.strip(), score="logprob"))
OBJECTIVES.register("channel", lambda text: channel(*_split_layer_index("channel", text)))
OBJECTIVES.register("neuron", lambda text: neuron(*_split_layer_index("neuron", text)))
OBJECTIVES.register("layer", lambda text: layer_activation(text.strip()))


def parse_objective(text: str) -> Objective:
    """``"class:goldfish"``, ``"963"`` (a class), ``"channel:LAYER:INDEX"``, ``"neuron:LAYER:INDEX"``,
    ``"layer:LAYER"``, ``"logprob:NAME"``, and weighted sums of them: ``"class:1 + 0.5*channel:L:3 - layer:L"``."""
    if not isinstance(text, str) or not text.strip():
        raise InputError("an objective needs text such as 'class:goldfish' or 'channel:LAYER:INDEX'")
    terms: list[Objective] = []
    sign = 1.0
    for part in _tokens(text):
        if part in ("+", "-"):
            sign = sign if part == "+" else -sign
            continue
        weight = sign
        body = part
        head, star, rest = part.partition("*")
        if star:
            try:
                weight *= float(head)
            except ValueError:
                raise InputError(f"in {part!r}, the weight before '*' must be a number") from None
            body = rest.strip()
        kind, colon, argument = body.partition(":")
        objective = OBJECTIVES.get(kind.strip())(argument) if colon else class_logit(body)
        terms.append(objective if weight == 1.0 else weight * objective)
        sign = 1.0
    if not terms:
        raise InputError(f"no objective in {text!r}")
    return sum(terms[1:], terms[0])


def _tokens(text: str) -> list[str]:
    """Terms and the '+'/'-' between them: an operator is a sign at the start or after a space, so the '-'
    inside a name such as 'ping-pong ball' stays part of it."""
    pieces = re.split(r"(?:^|\s)([+-])\s*", text.strip())
    return [piece.strip() for piece in pieces if piece and piece.strip()]


def as_objective(value: Objective | str | int) -> Objective:
    """An Objective, a text spec, or a class index."""
    if isinstance(value, Objective):
        return value
    if isinstance(value, bool):
        raise InputError("an objective cannot be a boolean")
    if isinstance(value, int):
        return class_logit(value)
    if isinstance(value, str):
        return parse_objective(value)
    raise InputError(f"an objective must be an Objective, a text spec or a class index, not {type(value).__name__}")
