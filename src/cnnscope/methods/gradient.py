"""Gradient methods: maps from the gradient of a class score with respect to the input pixels.

All of them run one forward pass for the batch and one backward pass per target, via
``torch.autograd.grad`` on a copy of the input (the caller's tensor and the parameters' ``.grad``
are untouched). They return per-channel attributions (``Explanation.channels``) and a map reduced
over the colour channels by ``reduce``:

- ``"max-abs"``: max_c |a_c| (Simonyan et al. 2013), unsigned;
- ``"abs-sum"``: sum_c |a_c|, unsigned;
- ``"l2"``: sqrt(sum_c a_c^2), unsigned;
- ``"sum"``: sum_c a_c, signed (the natural choice for gradient x input and Integrated Gradients).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import MethodError
from ..options import Options, choice, integer, number
from ..progress import check_cancelled
from .base import INPUTS_PER_PASS, Computed, Method, auto_images_per_pass, register_method
from .modifiers import modified_backprop

# over the channel axis of (B, K, C, *spatial) attributions (2 spatial dims for pictures, 3 for volumes and clips)
REDUCTIONS = {
    "max-abs": lambda a: a.abs().amax(dim=2),
    "abs-sum": lambda a: a.abs().sum(dim=2),
    "l2": lambda a: a.pow(2).sum(dim=2).sqrt(),
    "sum": lambda a: a.sum(dim=2),
}


REDUCE = choice("max-abs", tuple(REDUCTIONS), "how the colour channels' attributions become one map")
SEED = integer(0, "seed of the random draws (the same seed repeats a run exactly)", low=0, high=2**63 - 1)


def reduce_channels(attributions: torch.Tensor, how: str) -> torch.Tensor:
    return REDUCTIONS[how](attributions)


def picked_scores(logits: torch.Tensor, targets: torch.Tensor, k: int) -> torch.Tensor:
    """Sum over the batch of each image's k-th target logit (0 where there is none): its gradient
    gives every image's own gradient at once, images being independent in eval mode."""
    column = targets[:, k : k + 1]
    return (logits.gather(1, column.clamp_min(0)) * (column >= 0).to(logits.dtype)).sum()


def input_gradients(model, batch: torch.Tensor, targets_of, *, modifier: str | None = None):
    """(gradients (B, K, C, H, W), logits, targets, backward passes) for one forward pass of ``model`` (a
    :class:`~cnnscope.models.Model`)."""
    if modifier and any(isinstance(sub, torch.jit.ScriptModule) for sub in model.module.modules()):
        raise MethodError(
            f"the {modifier} backprop modifier cannot reach the activations inside this model's TorchScript code, so "
            "its map would be the plain gradient; give the model as an eager nn.Module or an ONNX export (every "
            "method), or use saliency, integrated-gradients, smoothgrad, occlusion or rise"
        )
    inputs = batch.detach().clone().requires_grad_(True)
    context = modified_backprop(model.module, modifier) if modifier else contextlib.nullcontext()
    with torch.inference_mode(False), torch.enable_grad():
        with context:
            logits = model(inputs)
        if not logits.requires_grad:
            raise MethodError(
                "this model's outputs carry no gradients (a black-box function, or a forward under no_grad); "
                "use a perturbation method: occlusion or rise"
            )
        targets = targets_of(logits)
        k_total = targets.shape[1]
        grads = []
        for k in range(k_total):
            (grad,) = torch.autograd.grad(picked_scores(logits, targets, k), inputs, retain_graph=k < k_total - 1)
            grads.append(grad)
    return torch.stack(grads, dim=1), logits.detach(), targets, k_total


class GradientMethod(Method):
    """Base of the pixel-gradient methods: ``attributions`` then a channel reduction."""

    options: ClassVar[Options] = Options(reduce=REDUCE)
    modifier: ClassVar[str | None] = None

    def is_signed(self) -> bool:
        return self.config["reduce"] == "sum"

    def attributions(self, batch: torch.Tensor, resolve) -> Computed:
        """A ``Computed`` whose ``channels`` hold the per-channel attributions (``raw`` is filled in by
        :meth:`compute`)."""
        grads, logits, targets, backwards = input_gradients(self.model, batch, resolve, modifier=self.modifier)
        return Computed(raw=grads, logits=logits, targets=targets, forwards=1, backwards=backwards, channels=grads)

    def compute(self, batch: torch.Tensor, resolve) -> Computed:
        computed = self.attributions(batch, resolve)
        computed.raw = reduce_channels(computed.channels, self.config["reduce"])
        return computed


@register_method("saliency")
class Saliency(GradientMethod):
    """Vanilla saliency (Simonyan et al. 2013): the gradient of the class logit w.r.t. the input,
    d y_c / d x, reduced over colour channels by max |.| (the paper's choice; ``reduce`` changes it).
    Captum's ``Saliency(abs=False)`` gives the same per-channel gradients."""

    summary = "gradient of the class score w.r.t. the pixels (Simonyan et al. 2013)"


@register_method("gradxinput")
class GradientXInput(GradientMethod):
    """Gradient x input (Shrikumar et al. 2016): x * d y_c / d x on the preprocessed input, summed over
    colour channels (signed). Same per-channel values as Captum's ``InputXGradient``."""

    summary = "gradient times input, signed"
    options: ClassVar[Options] = Options(reduce=dataclasses.replace(REDUCE, default="sum"))

    def attributions(self, batch, resolve):
        computed = super().attributions(batch, resolve)
        computed.channels = computed.channels * batch.detach().unsqueeze(1)
        return computed


@register_method("guided-backprop")
class GuidedBackprop(GradientMethod):
    """Guided backpropagation (Springenberg et al. 2015): the input gradient with every activation
    passing back only positive gradients where it was active (see :mod:`.modifiers`). Unlike Captum's
    ``GuidedBackprop``, which only modifies ``nn.ReLU`` modules, this covers ReLU6, functional relu
    calls and smooth activations too; on a model of ``nn.ReLU`` modules the two agree exactly."""

    summary = "guided backpropagation (Springenberg et al. 2015)"
    modifier = "guided"


@register_method("deconvnet")
class Deconvnet(GradientMethod):
    """Deconvnet (Zeiler & Fergus 2014): the input gradient with every activation passing back
    max(0, gradient) whatever its input (the "rectified" modifier). Agrees with Captum's
    ``Deconvolution`` on models of ``nn.ReLU`` modules."""

    summary = "deconvnet / rectified backprop (Zeiler & Fergus 2014)"
    modifier = "rectified"


BASELINES = ("black", "blur", "noise")


def _interpolation_nodes(steps: int, rule: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Points alpha in [0, 1] and weights for integrating over the straight path."""
    if steps < 1:
        raise MethodError(f"steps must be at least 1, got {steps}")
    if rule == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(steps)
        return torch.tensor((nodes + 1) / 2, dtype=torch.float64), torch.tensor(weights / 2, dtype=torch.float64)
    if rule == "riemann-trapezoid":
        if steps < 2:
            raise MethodError("the trapezoid rule needs at least 2 steps")
        alphas = torch.linspace(0, 1, steps, dtype=torch.float64)
        weights = torch.full((steps,), 1.0 / (steps - 1), dtype=torch.float64)
        weights[0] = weights[-1] = 0.5 / (steps - 1)
        return alphas, weights
    raise MethodError(f"unknown integration rule {rule!r}; choose 'gausslegendre' or 'riemann-trapezoid'")


def gaussian_blur(batch: torch.Tensor, sigma: float) -> torch.Tensor:
    """Per-channel Gaussian blur (a baseline for Integrated Gradients, occlusion's blur fill) of ``sigma`` pixels
    over every spatial axis: (N, C, H, W) pictures, (N, C, D, H, W) volumes and clips (T blurred as an axis like
    the others). Separable: one 1-D kernel of radius 3 sigma along each axis in turn, never across channels, with
    reflect padding (replicate along an axis shorter than the radius, such as a clip's few frames)."""
    radius = max(1, int(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=batch.dtype, device=batch.device)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    if batch.ndim != 4:
        return _separable_blur(batch, kernel, radius)
    channels = batch.shape[1]
    padded = F.pad(batch, (radius, radius, radius, radius), mode="reflect")
    horizontal = F.conv2d(padded, kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1), groups=channels)
    return F.conv2d(horizontal, kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1), groups=channels)


def _separable_blur(batch: torch.Tensor, kernel: torch.Tensor, radius: int) -> torch.Tensor:
    """``batch`` (N, C, *spatial) convolved with the 1-D ``kernel`` along each spatial axis (same size)."""
    blurred = batch
    for axis in range(2, batch.ndim):
        moved = blurred.movedim(axis, -1)
        shape = moved.shape
        rows = moved.reshape(-1, 1, shape[-1])  # every channel's line along the axis on its own: no mixing
        mode = "reflect" if radius < shape[-1] else "replicate"
        rows = F.conv1d(F.pad(rows, (radius, radius), mode=mode), kernel.view(1, 1, -1))
        blurred = rows.reshape(shape).movedim(-1, axis)
    return blurred.contiguous()


@register_method("integrated-gradients")
class IntegratedGradients(GradientMethod):
    """Integrated Gradients (Sundararajan et al. 2017):

        IG_i(x) = (x_i - x'_i) * integral_0^1 d y_c(x' + a (x - x')) / d x_i  da

    with baseline x' = ``baseline``: ``"black"`` (black pixels, after normalization), ``"blur"`` (the
    image blurred with ``blur_sigma`` pixels), ``"noise"`` (uniform noise, seeded by ``seed``) or a
    tensor in model-input space. The integral uses ``steps`` points of ``rule`` (Gauss-Legendre, as
    Captum's default, or the trapezoid rule), evaluated ``inputs_per_pass`` images (points x images) at a time. The
    completeness gap sum(IG) - (y_c(x) - y_c(x')) of every map is in ``stats["completeness_gap"]``.
    Same definition and nodes as Captum's ``IntegratedGradients``.
    """

    summary = "integrated gradients along a straight path from a baseline (Sundararajan et al. 2017)"
    options: ClassVar[Options] = Options(
        reduce=dataclasses.replace(REDUCE, default="sum"),
        steps=integer(50, "points on the path from the baseline to the image", low=1, high=4096),
        baseline=choice(
            "black", BASELINES, "where the path starts (or a tensor in model-input space)", accepts=(torch.Tensor,)
        ),
        rule=choice("gausslegendre", ("gausslegendre", "riemann-trapezoid"), "the quadrature rule of the integral"),
        blur_sigma=number(10.0, "blur of the 'blur' baseline, in pixels", above=0, high=1000),
        seed=SEED,
        inputs_per_pass=INPUTS_PER_PASS,
    )

    def estimated_work(self, targets: int = 1) -> int:
        return 2 + int(self.config["steps"]) * (1 + targets)

    def baseline_for(self, batch: torch.Tensor) -> torch.Tensor:
        given = self.config["baseline"]
        if isinstance(given, torch.Tensor):
            base = given.to(batch)
            if base.ndim == 3:
                base = base.unsqueeze(0)
            if base.shape[1:] != batch.shape[1:] or base.shape[0] not in (1, batch.shape[0]):
                raise MethodError(
                    f"the baseline tensor has shape {tuple(given.shape)}; it must match the model input "
                    f"{tuple(batch.shape[1:])} (one for all images, or one per image)"
                )
            return base.expand_as(batch)
        if given == "black":
            return self.model.preprocess.normalize(torch.zeros_like(batch)).contiguous()
        if given == "blur":
            return gaussian_blur(batch.detach(), float(self.config["blur_sigma"]))
        if given == "noise":
            generator = torch.Generator().manual_seed(int(self.config["seed"]))
            noise = torch.rand(batch.shape, generator=generator, dtype=batch.dtype).to(batch.device)
            return self.model.preprocess.normalize(noise)
        raise MethodError(f"unknown baseline {given!r}; choose one of {', '.join(BASELINES)} or give a tensor")

    def attributions(self, batch: torch.Tensor, resolve):
        alphas, weights = _interpolation_nodes(int(self.config["steps"]), str(self.config["rule"]))
        baseline = self.baseline_for(batch)
        with torch.no_grad():
            logits = self.model(batch)
            baseline_logits = self.model(baseline)
        targets = resolve(logits)
        b, k_total = targets.shape
        per_pass = max(1, int(self.config["inputs_per_pass"] or auto_images_per_pass(self.model)) // b)
        delta = (batch - baseline).detach()
        total = torch.zeros((b, k_total, *batch.shape[1:]), dtype=torch.float64, device=batch.device)
        forwards, backwards = 2, 0
        for start in range(0, len(alphas), per_pass):
            a = alphas[start : start + per_pass].to(batch.device)
            w = weights[start : start + per_pass].to(batch.device)
            along = a.view(-1, *([1] * batch.ndim)).to(batch.dtype)
            points = (baseline.unsqueeze(0) + along * delta.unsqueeze(0)).flatten(0, 1)
            step_targets = targets.repeat(len(a), 1)
            grads, _, _, passes = input_gradients(self.model, points, lambda _logits, t=step_targets: t)
            forwards, backwards = forwards + 1, backwards + passes
            check_cancelled()
            grads = grads.view(len(a), b, k_total, *batch.shape[1:]).double()
            total += (grads * w.view(-1, *([1] * (grads.ndim - 1)))).sum(dim=0)
        attributions = (total * delta.unsqueeze(1).double()).float()
        valid = targets >= 0
        gain = logits.gather(1, targets.clamp_min(0)) - baseline_logits.gather(1, targets.clamp_min(0))
        gap = torch.where(valid, attributions.flatten(2).sum(dim=2) - gain, torch.full_like(gain, float("nan")))
        return Computed(
            raw=attributions,
            logits=logits,
            targets=targets,
            forwards=forwards,
            backwards=backwards,
            channels=attributions,
            extra={"completeness_gap": gap.tolist()},
        )
