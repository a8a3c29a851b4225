"""Activation maximization: optimize images that drive chosen objectives of the model up.

Simonyan et al. 2013 (class model visualization: gradient ascent on a class score with an L2
penalty), Olah et al. 2017 and the lucid/lucent approach (a decorrelated Fourier parameterization and
random transforms at every step). Several objectives are optimized together, one image each, in one
batch: the model runs once per step for all of them.

One step: image = param.image(); the model sees transforms(image) (random per image, drawn from the
seeded generator); loss = -objective + tv * TV(image) + l2 * mean((image - 0.5)^2); Adam on the
parameters. Gradients never reach the model's parameters (``torch.autograd.grad`` with respect to the
input only), and the model's flags are restored (:func:`cnnscope.state.preserved`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import InputError, MethodError
from ..hooks import capture, forward_until
from ..methods.base import auto_images_per_pass
from ..models import Model, load_model
from ..models.model import Prediction
from ..progress import Progress
from ..render.figure import FigureResult
from ..state import preserved
from .objectives import BoundObjective, Objective, as_objective, evaluate_each
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

    def __len__(self) -> int:
        return len(self.objectives)

    def captions(self) -> list[str]:
        return [
            f"{name}\n{top[0].name} {top[0].probability:.0%}" if top else name
            for name, top in zip(self.objectives, self.predictions, strict=True)
        ]

    def figure(self, columns: int | None = None):
        from ..render.plates import plate_figure

        return plate_figure(list(self.images), self.captions(), columns=columns, title="activation maximization")


def total_variation(images: torch.Tensor) -> torch.Tensor:
    """Per image: the mean absolute difference between neighbouring pixels (down and right)."""
    down = (images[:, :, 1:, :] - images[:, :, :-1, :]).abs().mean(dim=(1, 2, 3))
    right = (images[:, :, :, 1:] - images[:, :, :, :-1]).abs().mean(dim=(1, 2, 3))
    return down + right


class _Scorer:
    """Runs the model on a batch of [0, 1] images and evaluates each image's own objective."""

    def __init__(self, model: Model, bound: list[BoundObjective], per_pass: int) -> None:
        self.model, self.bound, self.per_pass = model, bound, per_pass
        self.refs = list(dict.fromkeys(ref for objective in bound for ref in objective.layers))
        self.needs_logits = any(objective.uses_logits for objective in bound)

    def values(self, record, logits: torch.Tensor | None, rows: range) -> torch.Tensor:
        acts = {ref.key: record.activations[ref.key] for ref in self.refs}
        return evaluate_each(self.bound[rows.start : rows.stop], acts, logits)

    def gradient(self, inputs: torch.Tensor, record) -> tuple[torch.Tensor, torch.Tensor]:
        """(objective values, d objective / d inputs) for a normalized batch, in passes."""
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
            (grad,) = torch.autograd.grad(value.sum(), x)
            grads.append(grad)
            values.append(value.detach())
        return torch.cat(values), torch.cat(grads)

    def evaluate(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(objective values, logits) of [0, 1] images as they are (full forward, no gradients)."""
        values, logits = [], []
        with capture(self.model.module, self.refs) as record, torch.no_grad():
            for start in range(0, images.shape[0], self.per_pass):
                stop = min(images.shape[0], start + self.per_pass)
                x = self.model.preprocess.normalize(images[start:stop]).contiguous(memory_format=torch.channels_last)
                out = self.model.module(x)
                values.append(self.values(record, out, range(start, stop)))
                logits.append(out)
        return torch.cat(values), torch.cat(logits)


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
            the same seed gives the same images bit for bit on CPU.
        max_seconds: stop early and return the images so far (``stats["stopped_early"]``).
    """
    model = load_model(model)
    if isinstance(objectives, (Objective, str, int)) or not isinstance(objectives, Sequence):
        objectives = [objectives]
    wanted = [as_objective(objective) for objective in objectives]
    if not wanted:
        raise InputError("give at least one objective, e.g. a class name or 'channel:LAYER:INDEX'")
    if steps < 0:
        raise InputError(f"steps must be zero or positive, got {steps}")
    if lr <= 0:
        raise InputError(f"lr must be positive, got {lr}")
    if tv < 0 or l2 < 0:
        raise InputError("the tv and l2 weights must be zero or positive")
    if isinstance(size, int):
        size = (size, size)
    size = tuple(size) if size is not None else tuple(model.preprocess.size)
    transforms = Transforms() if transforms is None else transforms
    if not isinstance(transforms, Transforms):
        raise InputError("transforms must be a cnnscope.features.Transforms")
    bound = [objective.bind(model) for objective in wanted]
    per_pass = images_per_pass or auto_images_per_pass(model)
    if per_pass < 1:
        raise InputError(f"images_per_pass must be at least 1, got {per_pass}")
    scorer = _Scorer(model, bound, per_pass)
    generator = torch.Generator().manual_seed(int(seed))
    image_param = make_param(param, len(bound), size, generator, decorrelate=decorrelate, device=model.device)
    optimizer = torch.optim.Adam(image_param.parameters(), lr=lr)
    history: list[torch.Tensor] = []
    progress = Progress(steps, "maximize", quiet=quiet, max_seconds=max_seconds)
    started = time.perf_counter()
    stopped_early = False
    try:
        with preserved(model.module, freeze=True), torch.inference_mode(False), torch.enable_grad():
            with torch.no_grad():
                start_values, _ = scorer.evaluate(image_param.image())
            optimize_started = time.perf_counter()
            with capture(model.module, scorer.refs, stop=not scorer.needs_logits) as record:
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
                    progress.update()
            optimize_seconds = time.perf_counter() - optimize_started
            with torch.no_grad():
                result = image_param.image().detach()
                final_values, logits = scorer.evaluate(result)
    finally:
        progress.close()
    done = len(history)
    pixels = (result.permute(0, 2, 3, 1).cpu().numpy() * 255.0 + 0.5).clip(0, 255).astype(np.uint8)
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
        },
        stats={
            "seconds": time.perf_counter() - started,
            "steps_done": done,
            "iterations_per_second": done / optimize_seconds if optimize_seconds > 0 and done else 0.0,
            "images_per_pass": per_pass,
            "stopped_early": stopped_early,
        },
    )
