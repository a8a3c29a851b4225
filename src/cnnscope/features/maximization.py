"""Activation maximization: optimize images that drive chosen objectives of the model up.

Simonyan et al. 2013 (class model visualization: gradient ascent on a class score with an L2
penalty), Olah et al. 2017 and the lucid/lucent approach (a decorrelated Fourier parameterization and
random transforms at every step). Several objectives are optimized together, one image each, in one
batch: the model runs once per step for all of them.

One step: image = param.image(); the model sees transforms(image) (random per image, drawn from the
seeded generator); loss = -objective + tv * TV(image) + l2 * mean((image - 0.5)^2)
+ diversity * similarity; Adam on the parameters.

``copies`` gives each objective several images. A feature often responds to several different things
and one image shows only one of them; with ``diversity`` the copies of one objective are pushed apart
(lucid/lucent's diversity term, Olah et al. 2017): each image's similarity is the mean cosine similarity
between its Gram matrix (channel x channel correlations of a layer, the "style" of Gatys et al.) and
those of the other copies of its objective.

Gradients never reach the model's parameters (``torch.autograd.grad`` with respect to the input only),
and the model's flags are restored (:func:`cnnscope.state.preserved`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import InputError, MethodError
from ..hooks import LayerRef, capture, forward_until
from ..methods.base import auto_images_per_pass
from ..models import Model, load_model
from ..models.folding import fold_batchnorm
from ..models.model import Prediction
from ..progress import Progress
from ..render.figure import FigureResult
from ..render.plates import batch_to_uint8
from ..state import preserved
from .objectives import (
    BoundObjective,
    LayerSpec,
    Objective,
    as_objective,
    evaluate_each,
    feature_map,
    middle_layer,
)
from .param import make_param
from .transforms import Transforms


@dataclass
class Visualization(FigureResult):
    """The result of :func:`maximize`: one image per objective, and how the optimization went."""

    images: np.ndarray  # (N, H, W, 3) uint8
    tensor: torch.Tensor  # (N, 3, H, W) float in [0, 1]
    objectives: list[str]
    start: list[float]  # each objective on its starting image, no transforms
    final: list[float]  # each objective on its result, no transforms
    history: np.ndarray  # (steps, N): each objective as seen during the steps (transformed images)
    predictions: list[list[Prediction]]  # the model's top-5 for each result
    options: dict
    stats: dict = field(default_factory=dict)
    #: the images after chosen steps (``snapshots=`` of :func:`maximize`), by step: (N, H, W, 3) uint8
    snapshots: dict[int, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.objectives)

    @property
    def copies(self) -> int:
        """Images per objective (consecutive: the copies of objective k are rows k*copies ...)."""
        return int(self.options.get("copies", 1))

    def captions(self) -> list[str]:
        return [
            f"{name}\n{top[0].name} {top[0].probability:.0%}" if top else name
            for name, top in zip(self.objectives, self.predictions, strict=True)
        ]

    def figure(self, columns: int | None = None, step: int | None = None):
        """The images as a plate (with copies: one row per objective); ``step``: a snapshot's images."""
        from ..render.plates import plate_figure

        if columns is None and self.copies > 1:
            columns = self.copies
        if step is None:
            return plate_figure(list(self.images), self.captions(), columns=columns, title="activation maximization")
        if step not in self.snapshots:
            raise InputError(f"no snapshot after step {step}; kept: {sorted(self.snapshots) or 'none'}")
        return plate_figure(list(self.snapshots[step]), self.objectives, columns=columns, title=f"after step {step}")


def total_variation(images: torch.Tensor) -> torch.Tensor:
    """Per image: the mean absolute difference between neighbouring pixels (down and right)."""
    down = (images[:, :, 1:, :] - images[:, :, :-1, :]).abs().mean(dim=(1, 2, 3))
    right = (images[:, :, :, 1:] - images[:, :, :, :-1]).abs().mean(dim=(1, 2, 3))
    return down + right


def gram_similarity(maps: torch.Tensor, copies: int) -> torch.Tensor:
    """For (n, C, h, w) feature maps in groups of ``copies`` consecutive images: per image, the mean cosine
    similarity between its Gram matrix (C x C) and those of the other images of its group. (n,) values in
    [-1, 1]; 0 for a group of one."""
    n, c = maps.shape[:2]
    if copies < 2:
        return maps.new_zeros(n)
    flat = maps.reshape(n, c, -1)
    grams = torch.nn.functional.normalize((flat @ flat.transpose(1, 2)).reshape(n // copies, copies, c * c), dim=2)
    cosines = grams @ grams.transpose(1, 2)  # (groups, copies, copies), 1 on the diagonal
    return ((cosines.sum(dim=2) - cosines.diagonal(dim1=1, dim2=2)) / (copies - 1)).reshape(n)


class _Scorer:
    """Runs the model on a batch of [0, 1] images and evaluates each image's own objective (and, with
    diversity, each image's similarity to the other copies of its objective, at ``diversity_ref``)."""

    def __init__(
        self,
        model: Model,
        bound: list[BoundObjective],
        per_pass: int,
        copies: int = 1,
        diversity: float = 0.0,
        diversity_ref: LayerRef | None = None,
    ) -> None:
        self.model, self.bound, self.copies, self.diversity = model, bound, copies, diversity
        self.per_pass = max(1, per_pass // copies) * copies  # a pass holds whole groups of copies
        self.diversity_ref = diversity_ref
        layers = [ref for objective in bound for ref in objective.layers]
        self.refs = list(dict.fromkeys(layers + ([diversity_ref] if diversity_ref is not None else [])))
        self.needs_logits = any(objective.uses_logits for objective in bound)
        self._as_map = feature_map(model, diversity_ref) if diversity_ref is not None else None

    def similarity(self, record) -> torch.Tensor:
        """Each image of the current pass against the other copies of its objective."""
        return gram_similarity(self._as_map(record.activations[self.diversity_ref.key]), self.copies)

    def values(self, record, logits: torch.Tensor | None, rows: range) -> torch.Tensor:
        acts = {ref.key: record.activations[ref.key] for ref in self.refs}
        return evaluate_each(self.bound[rows.start : rows.stop], acts, logits)

    def gradient(self, inputs: torch.Tensor, record) -> tuple[torch.Tensor, torch.Tensor]:
        """(objective values, d (objective - diversity * similarity) / d inputs) for a normalized batch,
        in passes."""
        grads, values = [], []
        for start in range(0, inputs.shape[0], self.per_pass):
            stop = min(inputs.shape[0], start + self.per_pass)
            x = inputs[start:stop].detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
            logits = forward_until(self.model.module, x)
            value = self.values(record, logits, range(start, stop))
            if not value.requires_grad:
                raise MethodError(
                    "this model's outputs carry no gradients (a black-box function, or a forward under no_grad); "
                    "activation maximization needs a differentiable PyTorch model"
                )
            total = value.sum()
            if self.diversity > 0:
                total = total - self.diversity * self.similarity(record).sum()
            (grad,) = torch.autograd.grad(total, x)
            grads.append(grad)
            values.append(value.detach())
        return torch.cat(values), torch.cat(grads)

    def evaluate(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(objective values, logits, similarities or None) of [0, 1] images as they are (full forward,
        no gradients)."""
        values, logits, similarities = [], [], []
        with capture(self.model.module, self.refs) as record, torch.no_grad():
            for start in range(0, images.shape[0], self.per_pass):
                stop = min(images.shape[0], start + self.per_pass)
                x = self.model.preprocess.normalize(images[start:stop]).contiguous(memory_format=torch.channels_last)
                out = self.model(x)
                values.append(self.values(record, out, range(start, stop)))
                logits.append(out)
                if self.diversity_ref is not None:
                    similarities.append(self.similarity(record))
        return torch.cat(values), torch.cat(logits), torch.cat(similarities) if similarities else None


def maximize(
    model: Model | str | torch.nn.Module,
    objectives: Sequence[Objective | str | int] | Objective | str | int,
    *,
    size: tuple[int, int] | int | None = None,
    param: str = "fourier",
    steps: int = 256,
    lr: float = 0.05,
    transforms: Transforms | None = None,
    tv: float = 0.0,
    l2: float = 0.0,
    seed: int = 0,
    decorrelate: bool = True,
    copies: int = 1,
    diversity: float = 0.0,
    diversity_layer: LayerSpec | None = None,
    snapshots: Sequence[int] = (),
    fold_bn: bool = True,
    images_per_pass: int | None = None,
    quiet: bool = False,
    max_seconds: float | None = None,
) -> Visualization:
    """One image per objective, optimized together.

    Args:
        objectives: Objectives, text specs (``"class:goldfish"``, ``"channel:LAYER:INDEX"``, sums) or
            class indices; each gets its own image.
        size: (height, width) or one side of the images; default the model's input size.
        param: ``"fourier"`` (decorrelated, 1/f-scaled spectrum) or ``"pixel"``.
        steps, lr: Adam steps and learning rate.
        transforms: robustness transforms (default :class:`Transforms` ()'s jitter, rotation and scale;
            ``Transforms.none()`` for plain gradient ascent).
        tv, l2: weights of the total-variation and L2 penalties on the image.
        seed: every random draw (initial image, transforms) comes from a generator seeded with it;
            the same seed gives the same images bit for bit on CPU at the same thread count (rounding
            differences, e.g. from another thread count, move Adam's path: its first steps follow the
            gradient's sign).
        copies: images per objective, each from its own random start (rows ``k*copies ...`` of the
            result belong to objective k).
        diversity: weight of the penalty on the similarity of the copies of one objective (lucent's
            diversity term); needs ``copies >= 2``. Values around the objective's own size work: e.g.
            10-100 for a channel of the default model.
        diversity_layer: the layer whose Gram matrices are compared (default: the first layer the
            objectives read, else the model's middle spatial layer). With copies, ``stats`` reports the
            copies' mean similarity at it before and after (``similarity_start``, ``similarity_final``).
        snapshots: steps after which to keep the images too (lucent's ``thresholds``), to see how
            they form: ``result.snapshots[step]``.
        fold_bn: run on a copy of the model with its BatchNorms folded into the convolutions before
            them (:func:`cnnscope.models.folding.fold_batchnorm`: the same function, checked on a
            probe input, 1.15-1.4x faster per step on the default model); ``stats["batchnorm_folded"]``
            says how many were. The model itself is not changed either way.
        max_seconds: stop early and return the images so far (``stats["stopped_early"]``).
    """
    model = load_model(model)
    if isinstance(objectives, (Objective, str, int)) or not isinstance(objectives, Sequence):
        objectives = [objectives]
    wanted = [as_objective(objective) for objective in objectives]
    if not wanted:
        raise InputError("give at least one objective, e.g. a class name or 'channel:LAYER:INDEX'")
    _check_options(steps, lr, tv, l2, copies, diversity, diversity_layer)
    keep = sorted({int(step) for step in snapshots})
    if keep and not 1 <= keep[0] <= keep[-1] <= steps:
        raise InputError(f"snapshot steps must lie between 1 and steps ({steps}); got {keep}")
    if isinstance(size, int):
        size = (size, size)
    size = tuple(size) if size is not None else tuple(model.preprocess.size)
    transforms = Transforms() if transforms is None else transforms
    if not isinstance(transforms, Transforms):
        raise InputError("transforms must be a cnnscope.features.Transforms")
    per_pass = images_per_pass or auto_images_per_pass(model)
    if per_pass < 1:
        raise InputError(f"images_per_pass must be at least 1, got {per_pass}")

    diversity_key = model.layer(diversity_layer).key if diversity_layer is not None else None

    def scorer_for(target: Model) -> _Scorer:
        """The objectives bound to ``model`` or to its folded working copy (the same layers, by name)."""
        layer_of = None if target is model else (lambda spec: target.layer(model.layer(spec).key))
        bound = [bound for objective in wanted for bound in [objective.bind(target, layer_of)] * copies]
        diversity_ref = None  # with copies, the similarities are reported (and penalized with diversity > 0)
        if copies > 1:
            if diversity_key is not None:
                diversity_ref = target.layer(diversity_key)
            else:
                read = [ref for objective in bound for ref in objective.layers]
                diversity_ref = read[0] if read else middle_layer(target)
        return _Scorer(target, bound, per_pass, copies, diversity, diversity_ref)

    scorer = scorer_for(model)  # bound against the user's model first: its errors name their layers
    bound = scorer.bound
    generator = torch.Generator().manual_seed(int(seed))
    image_param = make_param(param, len(bound), size, generator, decorrelate=decorrelate, device=model.device)
    optimizer = torch.optim.Adam(image_param.parameters(), lr=lr)
    history: list[torch.Tensor] = []
    kept: dict[int, np.ndarray] = {}
    progress = Progress(steps, "maximize", quiet=quiet, max_seconds=max_seconds)
    started = time.perf_counter()
    stopped_early = False
    try:
        with preserved(model.module, freeze=True), torch.inference_mode(False), torch.enable_grad():
            folded = 0
            if fold_bn:
                working, folded = fold_batchnorm(model, scorer.refs)
                scorer = scorer_for(working) if folded else scorer
            with torch.no_grad():
                start_values, _, start_similarity = scorer.evaluate(image_param.image())
            optimize_started = time.perf_counter()
            with capture(scorer.model.module, scorer.refs, stop=not scorer.needs_logits) as record:
                for _ in range(steps):
                    if progress.should_stop():
                        stopped_early = True
                        break
                    image = image_param.image()
                    seen = transforms(image, generator)
                    inputs = model.preprocess.normalize(seen)
                    values, grads = scorer.gradient(inputs, record)
                    loss = -(inputs * grads).sum()
                    if tv > 0:
                        loss = loss + tv * total_variation(image).sum()
                    if l2 > 0:
                        loss = loss + l2 * (image - 0.5).square().mean(dim=(1, 2, 3)).sum()
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    history.append(values)
                    if len(history) in keep:
                        with torch.no_grad():
                            kept[len(history)] = batch_to_uint8(image_param.image())
                    progress.update()
            optimize_seconds = time.perf_counter() - optimize_started
            with torch.no_grad():
                result = image_param.image().detach()
                final_values, logits, final_similarity = scorer.evaluate(result)
    finally:
        progress.close()
    done = len(history)
    pixels = batch_to_uint8(result)
    return Visualization(
        images=pixels,
        tensor=result,
        objectives=[objective.name for objective in bound],
        start=[float(v) for v in start_values],
        final=[float(v) for v in final_values],
        history=torch.stack(history).cpu().numpy() if history else np.zeros((0, len(bound)), dtype=np.float32),
        predictions=model.top_predictions(logits, 5),
        options={
            "size": list(size),
            "param": param,
            "steps": steps,
            "lr": lr,
            "transforms": transforms,
            "tv": tv,
            "l2": l2,
            "seed": seed,
            "decorrelate": decorrelate,
            "copies": copies,
            "diversity": diversity,
            "diversity_layer": scorer.diversity_ref.key if scorer.diversity_ref is not None else None,
        },
        stats={
            "seconds": time.perf_counter() - started,
            "steps_done": done,
            "iterations_per_second": done / optimize_seconds if optimize_seconds > 0 and done else 0.0,
            "images_per_pass": scorer.per_pass,
            "stopped_early": stopped_early,
            "batchnorm_folded": folded,
            **_similarity_stats(start_similarity, final_similarity),
        },
        snapshots=kept,
    )


def _check_options(steps, lr, tv, l2, copies, diversity, diversity_layer) -> None:
    if steps < 0:
        raise InputError(f"steps must be zero or positive, got {steps}")
    if lr <= 0:
        raise InputError(f"lr must be positive, got {lr}")
    if tv < 0 or l2 < 0:
        raise InputError("the tv and l2 weights must be zero or positive")
    if isinstance(copies, bool) or not isinstance(copies, int) or copies < 1:
        raise InputError(f"copies must be a whole number >= 1, got {copies!r}")
    if diversity < 0:
        raise InputError(f"the diversity weight must be zero or positive, got {diversity}")
    if (diversity > 0 or diversity_layer is not None) and copies < 2:
        raise InputError("diversity pushes apart the copies of one objective: set copies to 2 or more")


def _similarity_stats(start: torch.Tensor | None, final: torch.Tensor | None) -> dict:
    """With diversity: the copies' mean Gram similarity before and after (lower: more different)."""
    if start is None or final is None:
        return {}
    return {"similarity_start": float(start.mean()), "similarity_final": float(final.mean())}
