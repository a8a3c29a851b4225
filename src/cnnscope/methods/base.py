"""The method template: construct once with a model and options, call with images and targets.

A subclass sets ``name`` (via :func:`register_method`), declares its ``options`` with defaults and
implements :meth:`Method.compute`. The base turns any image input into a batch, runs ``compute``
inside :func:`cnnscope.state.preserved` (eval mode; flags, ``requires_grad`` and ``.grad`` restored
even after an exception) and packs the result into an :class:`~cnnscope.explanation.Explanation`.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .._registry import METHODS, did_you_mean
from ..errors import CnnscopeWarning, MethodError
from ..explanation import Explanation
from ..hooks import LayerRef
from ..models import Model, load_model
from ..models.labels import short_name
from ..state import preserved
from ..targets import NO_TARGET, resolve_targets


def register_method(name: str):
    """Class decorator: register a Method subclass under ``name`` (errors on duplicates)."""

    def decorate(cls: type[Method]) -> type[Method]:
        cls.name = name
        METHODS.register(name, cls)
        return cls

    return decorate


@dataclass
class Computed:
    """What ``compute`` returns: raw maps and the facts needed to describe them."""

    raw: torch.Tensor  # (B, K, h, w)
    logits: torch.Tensor  # (B, C)
    targets: torch.Tensor  # (B, K)
    forwards: int = 1
    backwards: int = 0
    notes: list[tuple[int, str]] = field(default_factory=list)  # (image index, message)


class Method:
    """Base of every attribution method.

    Args:
        model: a :class:`~cnnscope.models.Model`, an ``nn.Module`` or anything ``load_model`` takes.
        layer: the layer to explain, for layer methods (default: the model's default target layer).
        **options: the method's options (see its ``options``); unknown names are an error.
    """

    name: ClassVar[str] = "method"
    #: Option names and defaults; the CLI and the web page read them.
    options: ClassVar[dict[str, object]] = {}
    #: Whether the method explains a layer (and accepts ``layer=``).
    uses_layer: ClassVar[bool] = False
    #: Whether negative values in the maps carry meaning.
    signed: ClassVar[bool] = False
    #: One line for listings.
    summary: ClassVar[str] = ""

    def __init__(self, model: Model | nn.Module | str = "efficientnet_lite0", *, layer=None, **options) -> None:
        self.model = load_model(model)
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            hint = did_you_mean(unknown[0], list(self.options))
            known = ", ".join(self.options) or "none"
            raise MethodError(f"{self.name} has no option {unknown[0]!r}{hint} (its options: {known})")
        self.config = {**self.options, **options}
        if layer is not None and not self.uses_layer:
            raise MethodError(f"{self.name} works on the input pixels and takes no layer")
        self.layer: LayerRef | None = None
        if self.uses_layer:
            self.layer = self.model.layer(layer) if layer is not None else self.model.default_layer()
            if len(self.layer.output_shape) != 4:
                raise MethodError(
                    f"{self.name} needs a layer with a (N, C, H, W) output; {self.layer.key!r} outputs "
                    f"{self.layer.output_shape}"
                )

    def __repr__(self) -> str:
        layer = f", layer={self.layer.key!r}" if self.layer else ""
        return f"{type(self).__name__}({self.model.name!r}{layer})"

    def __call__(
        self,
        images: object,
        target: object = "top1",
        *,
        threshold: float = 0.5,
        names: list[str] | None = None,
    ) -> Explanation:
        """Explain ``images`` (paths, arrays, PIL images, or a preprocessed tensor) for ``target``
        (see :mod:`cnnscope.targets`). ``names`` name the images in notes and file names."""
        batch = self.model.prepare(images)
        if names is not None:
            if len(names) != batch.tensor.shape[0]:
                raise MethodError(f"{len(names)} names for {batch.tensor.shape[0]} images")
            batch = type(batch)(tensor=batch.tensor, originals=batch.originals, names=list(names))
        started = time.perf_counter()
        with preserved(self.model.module):
            computed = self.compute(batch.tensor, lambda logits: self.resolve(target, logits, threshold))
        seconds = time.perf_counter() - started
        raw = computed.raw.detach().float()
        size = batch.tensor.shape[-2:]
        maps = raw if raw.shape[-2:] == size else F.interpolate(raw, size=size, mode="bilinear", align_corners=False)
        targets = computed.targets
        logits = computed.logits.detach().float()
        scores = torch.where(
            targets >= 0,
            logits.gather(1, targets.clamp_min(0)),
            torch.full_like(targets, float("nan"), dtype=logits.dtype),
        )
        notes = [f"{batch.names[i]}: {text}" for i, text in computed.notes + self._similar_map_notes(raw, targets)]
        for note in notes:
            warnings.warn(note, CnnscopeWarning, stacklevel=2)
        return Explanation(
            raw=raw.cpu(),
            maps=maps.cpu(),
            targets=targets.cpu(),
            scores=scores.cpu(),
            probabilities=self.model.probabilities(logits).cpu(),
            labels=tuple(self.model.labels),
            top=self.model.top_predictions(logits, 5),
            images=batch.originals,
            names=batch.names,
            method=self.name,
            layer=self.layer.key if self.layer else None,
            options=dict(self.config),
            signed=self.is_signed(),
            stats={"forwards": computed.forwards, "backwards": computed.backwards, "seconds": seconds},
            notes=tuple(notes),
        )

    def is_signed(self) -> bool:
        return self.signed

    def resolve(self, target: object, logits: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
        return resolve_targets(target, logits, self.model.labels, multilabel=self.model.multilabel, threshold=threshold)

    def compute(self, batch: torch.Tensor, resolve) -> Computed:
        """Compute raw maps for ``batch``; ``resolve(logits)`` gives the (B, K) targets."""
        raise NotImplementedError

    def _similar_map_notes(
        self, raw: torch.Tensor, targets: torch.Tensor, limit: float = 0.99
    ) -> list[tuple[int, str]]:
        """The multi-label trap: maps of different classes that are nearly the same picture."""
        notes = []
        labels = self.model.labels
        for i in range(raw.shape[0]):
            slots = [k for k in range(raw.shape[1]) if int(targets[i, k]) != NO_TARGET]
            if len(slots) < 2:
                continue
            flat = raw[i, slots].flatten(1)
            flat = flat - flat.mean(dim=1, keepdim=True)
            norms = flat.norm(dim=1)
            if (norms == 0).any():
                continue
            corr = (flat @ flat.T) / (norms[:, None] * norms[None, :])
            for a in range(len(slots)):
                for b in range(a + 1, len(slots)):
                    if corr[a, b] > limit:
                        first, second = (short_name(labels[int(targets[i, slots[j]])]) for j in (a, b))
                        notes.append(
                            (
                                i,
                                f"the {self.name} maps of '{first}' and '{second}' are nearly identical "
                                f"(Pearson r = {float(corr[a, b]):.3f}); they do not show what separates these classes "
                                "(try an earlier layer, or a pixel-level method)",
                            )
                        )
        return notes
