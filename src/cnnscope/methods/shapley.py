"""Shapley-value methods: DeepLIFT-SHAP, GradientSHAP (expected gradients) and KernelSHAP.

- ``deeplift-shap`` averages DeepLIFT (:mod:`.propagation`) over a distribution of references;
- ``gradient-shap`` is expected gradients: the gradient at random points between the image and random
  references, times their difference, averaged;
- ``kernel-shap`` fits Shapley values of LIME's superpixels (the same segmentation, fill and seeded sampling,
  imported from :mod:`.perturbation`) by the Shapley kernel's weighted least squares, constrained to sum to
  f(image) - f(every superpixel off).

Every random draw comes from a generator seeded by ``seed``, image by image, so a batch gives each image the
map it gets alone, and the same call gives the same map.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np
import torch

from ..errors import MethodError
from ..options import Options, choice, integer, number
from ..progress import check_cancelled
from .base import INPUTS_PER_PASS, Computed, auto_images_per_pass, register_method
from .gradient import REDUCE, SEED, GradientMethod, gaussian_blur, input_gradients
from .perturbation import LIME
from .propagation import DeepLift, PropagationMethod

REFERENCES = ("blurred-noised", "black")


def _references_option(default: str = "blurred-noised"):
    return choice(
        default,
        REFERENCES,
        "the reference distribution: blurred copies of the image with Gaussian noise, or black; or a tensor of "
        "reference images (N, C, H, W) in model-input space",
        accepts=(torch.Tensor,),
    )


SHAP_OPTIONS = Options(
    reduce=dataclasses.replace(REDUCE, default="sum"),
    baselines=_references_option(),
    references=integer(8, "references drawn from the distribution per image", low=1, high=4096),
    blur_sigma=number(None, "blur of the references, in pixels (default: the image's width / 16)", above=0, high=1000),
    noise=number(0.1, "standard deviation of the references' noise, in [0, 1] pixel units", low=0, high=10),
    seed=SEED,
    inputs_per_pass=INPUTS_PER_PASS,
)


def reference_images(method, image: torch.Tensor, count: int) -> torch.Tensor:
    """(count, C, ...) references for one (1, C, ...) image: the user's tensor, black, or blurred and noised
    copies (noise from a generator seeded by ``seed``: the same for every image)."""
    given = method.config["baselines"]
    if isinstance(given, torch.Tensor):
        refs = given.to(image)
        if refs.ndim == image.ndim - 1:
            refs = refs.unsqueeze(0)
        if refs.shape[1:] != image.shape[1:]:
            raise MethodError(
                f"the baselines tensor has shape {tuple(given.shape)}; give reference images of shape "
                f"(N, {', '.join(map(str, image.shape[1:]))}) in model-input space"
            )
        return refs
    preprocess = method.model.preprocess
    if given == "black":
        return preprocess.normalize(torch.zeros_like(image)).expand(count, *image.shape[1:]).contiguous()
    sigma = method.config["blur_sigma"] or max(1.0, image.shape[-1] / 16)
    if 3 * sigma >= min(image.shape[-2:]):
        raise MethodError(
            f"blur_sigma={sigma:g} is too wide for a {image.shape[-2]}x{image.shape[-1]} input; give blur_sigma < "
            f"{min(image.shape[-2:]) / 3:g}"
        )
    blurred = gaussian_blur(image.detach(), float(sigma))
    generator = torch.Generator().manual_seed(int(method.config["seed"]))
    noise = torch.randn((count, *image.shape[1:]), generator=generator, dtype=image.dtype).to(image.device)
    # noise of std `noise` in pixel units is noise / std in model-input units (per channel)
    scale = preprocess.normalize(torch.ones_like(image)) - preprocess.normalize(torch.zeros_like(image))
    return blurred + float(method.config["noise"]) * noise * scale


@register_method("deeplift-shap")
class DeepLiftShap(PropagationMethod):
    """DeepLIFT-SHAP (Lundberg & Lee 2017; Captum's ``DeepLiftShap``): DeepLIFT (rescale) against each of
    ``references`` references, averaged. The references are blurred copies of the image with Gaussian noise
    (``blur_sigma``, ``noise``; seeded), black, or your own reference images (``baselines`` a tensor, e.g.
    other images of the dataset). The map sums to f(x) - mean f(x'); the gap is in
    ``stats["completeness_gap"]``."""

    summary = "DeepLIFT averaged over a distribution of references (Lundberg & Lee 2017)"
    kind = "deeplift"
    options: ClassVar[Options] = SHAP_OPTIONS

    def estimated_work(self, targets: int = 1) -> int:
        return 2 * int(self.config["references"]) * (1 + targets)

    def attributions(self, batch, resolve):
        count = int(self.config["references"])
        refs = [reference_images(self, batch[i : i + 1], count) for i in range(batch.shape[0])]
        n = refs[0].shape[0]
        b = batch.shape[0]
        per_pass = max(1, int(self.config["inputs_per_pass"] or auto_images_per_pass(self.model)) // (2 * b))
        targets_seen = {}

        def resolve_tiled(logits, copies):
            if "targets" not in targets_seen:
                targets_seen["targets"] = resolve(logits[:b])
            return targets_seen["targets"].repeat(copies, 1)

        total, gain_sum, logits, backwards, forwards = None, None, None, 0, 0
        for start in range(0, n, per_pass):
            check_cancelled()
            chosen = list(range(start, min(n, start + per_pass)))
            copies = len(chosen)
            images = batch.repeat(copies, *([1] * (batch.ndim - 1)))
            reference = torch.cat([torch.stack([refs[i][j] for i in range(b)]) for j in chosen])
            values, out, targets, _, reference_logits = self.propagate(
                images, lambda lg, c=copies: resolve_tiled(lg, c), reference
            )
            delta = (images - reference).unsqueeze(1)
            part = (values * delta).unflatten(0, (copies, b)).sum(dim=0)
            safe = targets.clamp_min(0)
            gains = (out.gather(1, safe) - reference_logits.gather(1, safe)).unflatten(0, (copies, b)).sum(dim=0)
            total = part if total is None else total + part
            gain_sum = gains if gain_sum is None else gain_sum + gains
            logits = out[:b]
            forwards, backwards = forwards + 1, backwards + targets.shape[1]
        targets = targets_seen["targets"]
        attributions = total / n
        gain = gain_sum / n
        gap = torch.where(targets >= 0, attributions.flatten(2).sum(dim=2) - gain, torch.full_like(gain, float("nan")))
        return Computed(
            raw=attributions,
            logits=logits,
            targets=targets,
            forwards=forwards,
            backwards=backwards,
            channels=attributions,
            extra={"completeness_gap": gap.tolist()},
        )


@register_method("gradient-shap")
class GradientShap(GradientMethod):
    """GradientSHAP / expected gradients (Erion et al. 2021; Captum's ``GradientShap``): the mean over
    ``samples`` draws of (x + e - x') * d y / d x at x' + a (x + e - x'), with a reference x' drawn from
    ``baselines`` (as DeepLIFT-SHAP's), a ~ U(0, 1) and input noise e of std ``stdev`` (Captum's
    ``stdevs``; 0 by default). Seeded: every image gets the same draws of a, e and reference index, so a
    batch gives each image its own map alone. Sums to f(x) - E f(x') in expectation (a Monte Carlo
    estimate of Integrated Gradients averaged over the references)."""

    summary = "expected gradients from a reference distribution, seeded (Lundberg & Lee 2017)"
    options: ClassVar[Options] = SHAP_OPTIONS | Options(
        samples=integer(32, "random points (reference, position on the path) per image", low=1, high=100_000),
        stdev=number(0.0, "noise added to the image at each sample, in model-input units", low=0, high=100),
    )

    def estimated_work(self, targets: int = 1) -> int:
        return int(self.config["samples"]) * (1 + targets)

    def attributions(self, batch, resolve):
        samples = int(self.config["samples"])
        b = batch.shape[0]
        generator = torch.Generator().manual_seed(int(self.config["seed"]) + 1)
        refs = [reference_images(self, batch[i : i + 1], int(self.config["references"])) for i in range(b)]
        picks = torch.randint(0, refs[0].shape[0], (samples,), generator=generator)
        alphas = torch.rand(samples, generator=generator, dtype=batch.dtype).to(batch.device)
        noise = torch.randn((samples, *batch.shape[1:]), generator=generator, dtype=batch.dtype).to(batch.device)
        noise = noise * float(self.config["stdev"])
        with torch.no_grad():
            logits = self.model(batch)
        targets = resolve(logits)
        per_pass = max(1, int(self.config["inputs_per_pass"] or auto_images_per_pass(self.model)) // b)
        total = torch.zeros((b, targets.shape[1], *batch.shape[1:]), dtype=torch.float64, device=batch.device)
        forwards, backwards = 1, 0
        for start in range(0, samples, per_pass):
            check_cancelled()
            chosen = range(start, min(samples, start + per_pass))
            noisy = torch.cat([batch.detach() + noise[s] for s in chosen])  # (copies * b, ...)
            reference = torch.cat([torch.stack([refs[i][int(picks[s])] for i in range(b)]) for s in chosen])
            a = torch.cat([alphas[s].expand(b) for s in chosen]).view(-1, *([1] * (batch.ndim - 1)))
            points = reference + a * (noisy - reference)
            tiled = targets.repeat(len(chosen), 1)
            grads, _, _, passes = input_gradients(self.model, points, lambda _logits, t=tiled: t)
            forwards, backwards = forwards + 1, backwards + passes
            values = grads * (noisy - reference).unsqueeze(1)
            total += values.unflatten(0, (len(chosen), b)).sum(dim=0).double()
        attributions = (total / samples).float()
        return Computed(
            raw=attributions,
            logits=logits,
            targets=targets,
            forwards=forwards,
            backwards=backwards,
            channels=attributions,
        )


def shapley_kernel_samples(segments: int, total: int, seed: int, paired: bool = True) -> np.ndarray:
    """(total, segments) on/off rows: all on, all off, then coalitions drawn with the Shapley kernel's
    probability of each size, (M - 1) / (s (M - s)), a uniform subset of that size, and (``paired``) its
    complement next to it. Drawn so, every row has the same weight in the least squares."""
    rows = np.zeros((total, segments))
    rows[0] = 1.0
    if segments < 2 or total <= 2:
        return rows[:total]
    rng = np.random.default_rng(seed)
    sizes = np.arange(1, segments)
    weights = (segments - 1) / (sizes * (segments - sizes))
    weights = weights / weights.sum()
    index = 2
    while index < total:
        size = int(rng.choice(sizes, p=weights))
        on = rng.permutation(segments)[:size]
        rows[index, on] = 1.0
        index += 1
        if paired and index < total:
            rows[index] = 1.0 - rows[index - 1]
            index += 1
    return rows


def constrained_shapley_fit(switches: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """(segments, K) Shapley values from rows (all on, all off, sampled coalitions) and their (n, K) scores:
    least squares of the sampled rows under sum(values) = f(on) - f(off), exactly (the last value is
    eliminated)."""
    segments = switches.shape[1]
    on, off = scores[0], scores[1]
    difference = on - off
    if segments == 1:
        return difference[None, :]
    rows, values = switches[2:], scores[2:] - off
    if len(rows) == 0:
        return np.repeat(difference[None, :] / segments, segments, axis=0)
    last = rows[:, -1:]
    design = rows[:, :-1] - last
    target = values - last * difference
    rest, *_ = np.linalg.lstsq(design, target, rcond=None)
    return np.vstack([rest, difference - rest.sum(axis=0, keepdims=True)])


@register_method("kernel-shap")
class KernelShap(LIME):
    """KernelSHAP over superpixels (Lundberg & Lee 2017; Captum's ``KernelShap`` with a ``feature_mask``):
    LIME's superpixels and fill (the same ``segmentation``, ``segments``, ``fill`` and ``feature_mask``), the
    target's logit scored on ``samples`` coalitions drawn with the Shapley kernel (complements paired with
    ``sampling="paired"``; seeded), and the Shapley values fitted by least squares under the constraint that
    they sum to f(image) - f(every superpixel off), which holds exactly. ``max_seconds`` stops sampling and
    fits what was scored. Signed map: each pixel gets its superpixel's value."""

    summary = "Shapley values of superpixels by the Shapley kernel (Lundberg & Lee 2017), seeded"
    options: ClassVar[Options] = LIME.options.without("kernel_width", "alpha", "converge", "min_samples")

    def score_kind(self) -> str:
        return "logit"

    def start(self, run):
        super().start(run)
        segments = int(run.state["labels"].max()) + 1
        run.state["switches"] = shapley_kernel_samples(
            segments, run.total, int(self.config["seed"]), self.config["sampling"] == "paired"
        )

    def take(self, run, start, scores):
        state, stop = run.state, start + len(scores)
        state["scores"][start:stop] = run.picked(scores).cpu().numpy()
        return False

    def finish(self, run):
        state, used = run.state, run.done
        segments = state["switches"].shape[1]
        if used >= 2:
            values = constrained_shapley_fit(state["switches"][:used], state["scores"][:used])
        else:
            values = np.zeros((segments, len(run.targets)))
        ids, top = state["ids"], int(self.config["top"])
        run.maps = torch.from_numpy(values.T[:, state["labels"]]).float().to(run.image.device)
        run.extra["off_score"] = (
            [float(v) for v in state["scores"][1]] if used >= 2 else [float("nan")] * len(run.targets)
        )
        run.extra["top_positive"] = [ids[np.argsort(-values[:, k])[:top]].tolist() for k in range(values.shape[1])]
        run.extra["top_negative"] = [ids[np.argsort(values[:, k])[:top]].tolist() for k in range(values.shape[1])]
        run.extra["samples_used"] = used


__all__ = ["DeepLift", "DeepLiftShap", "GradientShap", "KernelShap"]
