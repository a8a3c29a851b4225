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
from torch import nn

from .._registry import METHODS
from ..errors import CnnscopeWarning, MethodError, TargetError
from ..explanation import Explanation
from ..hooks import LayerRef
from ..models import Model, load_model
from ..models.labels import short_name
from ..options import Options, integer
from ..state import preserved
from ..targets import NO_TARGET, resolve_targets, slice_per_image

#: At most this many notes of one kind per image (1,000 targets must not print 1,000 lines).
MAX_NOTES = 5
#: More targets per image than this get a warning: each is a map in memory (the web API refuses them).
MANY_TARGETS = 100


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
    channels: torch.Tensor | None = None  # (B, K, C, H, W) pixel attributions before reducing colour channels
    extra: dict = field(default_factory=dict)  # per-image lists of method-specific figures

    @classmethod
    def merge(cls, parts: list[Computed]) -> Computed:
        """Concatenate the results of consecutive slices of one batch (targets padded with -1)."""
        if len(parts) == 1:
            return parts[0]
        width = max(part.targets.shape[1] for part in parts)

        def pad(tensor: torch.Tensor, value: float) -> torch.Tensor:
            missing = width - tensor.shape[1]
            if missing == 0:
                return tensor
            filler = torch.full(
                (tensor.shape[0], missing, *tensor.shape[2:]), value, dtype=tensor.dtype, device=tensor.device
            )
            return torch.cat([tensor, filler], dim=1)

        return cls(
            raw=torch.cat([pad(part.raw, 0.0) for part in parts]),
            logits=torch.cat([part.logits for part in parts]),
            targets=torch.cat([pad(part.targets, NO_TARGET) for part in parts]),
            forwards=sum(part.forwards for part in parts),
            backwards=sum(part.backwards for part in parts),
            notes=[note for part in parts for note in part.notes],
            channels=None if parts[0].channels is None else torch.cat([pad(part.channels, 0.0) for part in parts]),
            extra={key: [v for part in parts for v in part.extra[key]] for key in parts[0].extra},
        )


def auto_images_per_pass(model: Model, budget_bytes: int = 24 * 2**20) -> int:
    """Images per forward pass such that the largest layer output stays under ``budget_bytes``.

    Buffers above glibc's largest mmap threshold (32 MiB) are mapped fresh and page-faulted on
    every pass; below it, freed memory is reused. Measured on the default model (2 cores): a batch
    of 32 took 893 ms in one pass and 456 ms in passes of 16 (bench/gradcam.py)."""
    if isinstance(model.module, torch.jit.ScriptModule):
        return 16
    largest = model.largest_layer_output()
    return max(1, budget_bytes // (4 * largest))


#: The option every method with forward passes of its own (masked, ablated, interpolated, noisy or
#: perturbed inputs) takes for their number per pass; the old per-method names point to it.
INPUTS_PER_PASS = integer(
    None,
    "model inputs of the method's own (masked, perturbed, interpolated, noisy) images per forward pass "
    "(default: as many as keep every layer output under 24 MiB)",
    low=1,
    high=4096,
)
RENAMED = {name: "inputs_per_pass" for name in ("masks_per_pass", "ablations_per_pass", "steps_per_pass")} | {
    "copies_per_pass": "inputs_per_pass"
}


class Method:
    """Base of every attribution method.

    Args:
        model: a :class:`~cnnscope.models.Model`, an ``nn.Module`` or anything ``load_model`` takes.
        layer: the layer to explain, for layer methods (default: the model's default target layer).
        **options: the method's options (see its ``options``); unknown names or values out of range are
            an error naming what is allowed.
    """

    name: ClassVar[str] = "method"
    #: The typed option declarations (:mod:`cnnscope.options`); the CLI, the web page, ``cnnscope methods``
    #: and the README's option table read them.
    options: ClassVar[Options] = Options()
    #: Whether the method explains a layer (and accepts ``layer=``).
    uses_layer: ClassVar[bool] = False
    #: False for class-agnostic methods (every target gets the same map).
    class_specific: ClassVar[bool] = True
    #: One line for listings.
    summary: ClassVar[str] = ""

    def __init__(self, model: Model | nn.Module | str = "efficientnet_lite0", *, layer=None, **options) -> None:
        self.model = load_model(model)
        for old in set(options) & set(RENAMED):
            if RENAMED[old] in self.options:
                raise MethodError(f"option {old} of {self.name} is now called {RENAMED[old]}")
        self.config = self.options.resolve(options, self.name)
        if layer is not None and not self.uses_layer:
            raise MethodError(f"{self.name} works on the input pixels and takes no layer")
        self.layer: LayerRef | None = None
        if self.uses_layer:
            self.layer = self.model.layer(layer) if layer is not None else self.model.default_layer()
            if self.layer.layout is None:
                raise MethodError(
                    f"{self.name} needs a layer with a (N, C, H, W) output or a (N, tokens, D) sequence of "
                    f"patch tokens; {self.layer.key!r} outputs {self.layer.output_shape}"
                )

    @classmethod
    def file_options(cls) -> tuple[str, ...]:
        """Options that may name a file to read; the web app refuses file names for them (a browser must
        not make the server read its own files) and takes their values as JSON."""
        return tuple(name for name, option in cls.options.items() if option.reads_files)

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
        images_per_pass: int | None = None,
    ) -> Explanation:
        """Explain ``images`` (paths, arrays, PIL images, or a preprocessed tensor) for ``target``
        (see :mod:`cnnscope.targets`). ``names`` name the images in notes and file names.

        Images go through the model ``images_per_pass`` at a time (default: as many as keep every
        layer output under 24 MiB, see :func:`auto_images_per_pass`); all targets of an image are
        explained from the same pass.

        ``target`` may also be a callable from the (N, classes) logits to (N,) or (N, K) scores per image
        (pytorch-grad-cam's callable targets: a weighted sum of classes, the difference between two):
        each score is explained as it is, under the label ``name[k]`` (see ``Model.scored_by``)."""
        if callable(target) and not isinstance(target, (str, torch.Tensor)):
            scored = self.model.scored_by(target)
            layer = self.layer.key if self.layer is not None else None
            explainer = type(self)(scored, **({"layer": layer} if self.uses_layer else {}), **self.config)
            scores = scored.num_classes
            return explainer(images, list(range(scores)), names=names, images_per_pass=images_per_pass)
        return self._run(images, target, threshold, names, images_per_pass, self._compute_one)[None]

    def _compute_one(self, batch: torch.Tensor, resolve) -> dict[str | None, Computed]:
        return {None: self.compute(batch, resolve)}

    def _run(self, images, target, threshold, names, images_per_pass, compute_many) -> dict:
        """Prepare, run ``compute_many`` (batch, resolve) -> {layer: Computed} over passes of images inside
        ``preserved``, and package one Explanation per key."""
        batch = self.model.prepare(images)
        total = batch.tensor.shape[0]
        if names is not None:
            if len(names) != total:
                raise MethodError(f"{len(names)} names for {total} images")
            batch = type(batch)(tensor=batch.tensor, originals=batch.originals, names=list(names))
        if images_per_pass is None:
            images_per_pass = auto_images_per_pass(self.model)
        if images_per_pass < 1:
            raise MethodError(f"images_per_pass must be at least 1, got {images_per_pass}")
        if isinstance(target, torch.Tensor):
            target = target.tolist()
        started = time.perf_counter()
        parts: dict = {}
        with preserved(self.model.module):
            for start in range(0, total, images_per_pass):
                stop = min(total, start + images_per_pass)
                part_target = slice_per_image(target, start, stop, total)
                results = compute_many(
                    batch.tensor[start:stop], lambda logits, t=part_target: self.resolve(t, logits, threshold)
                )
                for key, part in results.items():
                    part.notes = [(i + start, text) for i, text in part.notes]
                    parts.setdefault(key, []).append(part)
        seconds = time.perf_counter() - started
        return {
            key: self._package(batch, Computed.merge(pieces), seconds, key, threshold) for key, pieces in parts.items()
        }

    def _package(
        self, batch, computed: Computed, seconds: float, layer_key: str | None, threshold: float
    ) -> Explanation:
        if bool((computed.targets == NO_TARGET).all()):
            raise TargetError(
                f"nothing to explain: no image has a target (with 'positive': no class passes the threshold "
                f"{threshold}; lower it or use 'top1')"
            )
        raw = computed.raw.detach().float()
        targets = computed.targets
        logits = computed.logits.detach().float()
        scores = torch.where(
            targets >= 0,
            logits.gather(1, targets.clamp_min(0)),
            torch.full_like(targets, float("nan"), dtype=logits.dtype),
        )
        notes = [f"{batch.names[i]}: {text}" for i, text in computed.notes + self._similar_map_notes(raw, targets)]
        if targets.shape[1] > MANY_TARGETS:
            notes.append(
                f"{targets.shape[1]} targets per image: {targets.numel()} maps of {tuple(raw.shape[-2:])} are kept in "
                "memory; explain fewer classes at a time if that is more than you need"
            )
        for note in notes:
            warnings.warn(note, CnnscopeWarning, stacklevel=4)
        if layer_key is None and self.layer is not None:
            layer_key = self.layer.key
        return Explanation(
            raw=raw.cpu(),
            input_size=tuple(int(v) for v in batch.tensor.shape[2:]),  # (H, W), or (D, H, W) for volumes and clips
            targets=targets.cpu(),
            scores=scores.cpu(),
            probabilities=self.model.probabilities(logits).cpu(),
            labels=tuple(self.model.labels),
            top=self.model.top_predictions(logits, 5),
            images=batch.originals,
            names=batch.names,
            method=self.name,
            layer=layer_key,
            options=dict(self.config),
            signed=self.is_signed(),
            stats={
                "forwards": computed.forwards,
                "backwards": computed.backwards,
                "seconds": seconds,
                **computed.extra,
            },
            channels=None if computed.channels is None else computed.channels.detach().float().cpu(),
            notes=tuple(notes),
        )

    def estimated_work(self, targets: int = 1) -> int:
        """Forward-pass equivalents one image costs with these options and ``targets`` targets (a backward
        pass counts as one): what a server's work budget is checked against before anything runs."""
        return 1 + targets

    def is_signed(self) -> bool:
        """Whether negative values in the maps carry meaning (drawn with a diverging colormap): the one
        source of ``Explanation.signed``, decided from the method and its options."""
        return False

    def resolve(self, target: object, logits: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
        return resolve_targets(
            target,
            logits,
            self.model.labels,
            multilabel=self.model.multilabel,
            threshold=threshold,
            probabilities=self.model.probabilities,
        )

    def compute(self, batch: torch.Tensor, resolve) -> Computed:
        """Compute raw maps for ``batch``; ``resolve(logits)`` gives the (B, K) targets."""
        raise NotImplementedError

    def _similar_map_notes(
        self, raw: torch.Tensor, targets: torch.Tensor, limit: float = 0.99
    ) -> list[tuple[int, str]]:
        """The multi-label trap: maps of different classes that are nearly the same picture."""
        notes: list[tuple[int, str]] = []
        labels = self.model.labels
        if raw.shape[1] < 2 or not self.class_specific:
            return notes
        for i in range(raw.shape[0]):
            slots = torch.nonzero(targets[i] != NO_TARGET).flatten()
            if len(slots) < 2:
                continue
            flat = raw[i, slots].flatten(1).double()
            flat = flat - flat.mean(dim=1, keepdim=True)
            norms = flat.norm(dim=1)
            corr = (flat @ flat.T) / (norms[:, None] * norms[None, :]).clamp_min(1e-30)
            corr = torch.triu(torch.where((norms[:, None] > 0) & (norms[None, :] > 0), corr, 0.0), diagonal=1)
            pairs = torch.nonzero(corr > limit).tolist()
            for a, b in pairs[:MAX_NOTES]:
                first, second = (short_name(labels[int(targets[i, slots[j]])]) for j in (a, b))
                notes.append(
                    (
                        i,
                        f"the {self.name} maps of '{first}' and '{second}' are nearly identical "
                        f"(Pearson r = {float(corr[a, b]):.3f}); they do not show what separates these "
                        "classes (try an earlier layer, or a pixel-level method)",
                    )
                )
            if len(pairs) > MAX_NOTES:
                notes.append((i, f"... and {len(pairs) - MAX_NOTES} more pairs of nearly identical {self.name} maps"))
        return notes
