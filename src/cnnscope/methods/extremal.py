"""Extremal perturbations (Fong, Patrick and Vedaldi, ICCV 2019, "Understanding Deep Networks via Extremal
Perturbations and Smooth Masks"): the smooth mask of a fixed area whose preserved (or deleted) region moves the
target's score the most, found by gradient ascent on the mask.

The definitions are TorchRay's (``torchray.attribution.extremal_perturbation``, the authors' reference code):

- **mask**: a parameter grid m_bar with one value in [0, 1] every ``step`` pixels, turned into a smooth mask by
  a smooth max-convolution, m(u) = smax_v k(|u - v| / sigma) m_bar(v) over the grid points v in a window of
  1 + ceil(sigma / step) grid cells around u, with the kernel k(z) = exp(-2 max(0, z - 1/2)^2) and the smooth
  maximum smax(a) = sum_i a_i softmax(20 a)_i; clamped to [0, 1];
- **perturbation**: a pyramid of ``levels`` copies of the image, from the image itself to the image blurred
  with a Gaussian of ``max_blur`` pixels (``"blur"``; sigma_l = (1 - l / (L - 1)) max_blur, zero padding in
  model-input space as TorchRay's ``imsmooth``) or faded to zero (``"fade"``); a pixel of mask value m reads
  the pyramid at level m (L - 1), linearly interpolated, so m = 1 keeps the pixel and m = 0 perturbs it most;
- **variants**: ``preserve`` perturbs outside the mask and rewards the target's score, ``delete`` perturbs
  inside the mask and rewards its loss, ``dual`` does both and rewards the difference;
- **reward**: the target's output (``simple``) or the target's output minus the largest other class's output
  (``contrastive``, as in TorchRay's example);
- **area**: the ranking loss -w ||sort(m) - r_a||^2 / |m| against the sorted vector r_a that has a fraction
  ``a`` of ones, whose weight w starts at 300 and grows by 0.35% every step;
- **optimiser**: SGD with momentum 0.9 and dampening 0.9 from a mask of ones, the grid clamped to [0, 1] after
  every step, the masked images flipped left-right every other step (``jitter``).

Where this differs from TorchRay: the area is measured on the image's own pixels (TorchRay ranks a mask extended by
a margin of sigma pixels on every side, so its masks cover more of the image than the area asked: up to 0.13 of a
224-pixel image for ``areas=0.1``); every image and every target of a batch, and every area, is one row of a single
(rows, 1, h, w) parameter tensor optimised together, its rows through the model in passes of ``inputs_per_pass``
(by default as many as keep a pass's mask tensors under 24 MiB: one mask at 224 x 224, where larger passes measured
slower; TorchRay explains one image and one target per call); the default ``step``, ``sigma`` and ``max_blur``
scale with the input (TorchRay's 7, 21 and 20 pixels at 224); and the model's parameters are left as they were
(TorchRay turns their ``requires_grad`` off and leaves it so). ``steps`` keeps TorchRay's 800: the area weight
grows per step, and with fewer steps a mask whose evidence is larger than its area stays too large. Measured
(bench/extremal.py --stability and the tests' bright-square model): on the default model and chelsea (area 0.1) the
mask's top 10% after 400 and 600 steps overlaps the 800-step one at IoU 0.98, its mean 0.118, 0.106 and 0.106 after
400, 600 and 800 steps; but on the bright square a mask of area 0.03 still covers 0.107, 0.062 and 0.040 of the
image after 400, 600 and 800 steps. Nothing is random, so on a CPU the same call gives the same maps bit for
bit (on a GPU, its scatter and convolution backward passes may sum in a different order).

The map is the sum of the masks of the ``areas`` (one mask when one area is given), so each pixel counts the
areas whose mask holds it, as in the paper's figures. ``stats`` holds per image and target the achieved
``mask_area`` and final ``reward`` of each area and, for several areas, each area's mask (``area_masks``).
Pictures (N, C, H, W) of any channel count and volumes (N, C, D, H, W) go through the same code; only the
input gradient is used, so a model with TorchScript inside works too. The smooth mask keeps every pixel's
candidates for the backward pass (81 per pixel at the 2-D defaults, 729 per voxel in 3-D), within 256 MiB: at the
defaults, pictures up to about 450 x 450 and volumes or clips up to about 28^3; larger inputs get a one-line
error saying how to fit (a larger ``step``, a smaller ``sigma``) or, where nothing fits, to crop or resize.
"""

from __future__ import annotations

import functools
import itertools
import math
import re
from collections.abc import Callable, Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..errors import MethodError
from ..options import Options, anything, choice, flag, integer, number
from ..progress import Progress
from .base import INPUTS_PER_PASS, Computed, Method, auto_images_per_pass, register_method

VARIANTS = ("preserve", "delete", "dual")
REWARDS = ("contrastive", "simple")
PERTURBATIONS = ("blur", "fade")
#: The smooth maximum's inverse temperature (TorchRay's ``coldness``).
COLDNESS = 20.0
#: SGD momentum and dampening (TorchRay's).
MOMENTUM = 0.9
#: The area loss's weight at the first step and its growth per step (TorchRay's).
AREA_WEIGHT = 300.0
AREA_WEIGHT_GROWTH = 1.0035
#: TorchRay's step, sigma and max_blur were chosen for 224-pixel inputs; the defaults keep their ratios.
REFERENCE_SIDE = 224
#: Most areas in one call (each is a mask per image and target).
MAX_AREAS = 16
#: Memory the smooth-mask construction of one pass may take (its candidates are kept for the backward pass), and
#: the most one mask may take (65 MiB at 224 x 224 with TorchRay's step and sigma).
MASK_BUDGET_BYTES = 2**30
#: Without ``inputs_per_pass``, a pass holds at most this much in one (rows, candidates, *spatial) tensor: one row
#: at 224 x 224. Measured (bench/extremal.py, 2 cores): four 224-pixel masks in one pass took 2.2x as long as in
#: four passes of one (buffers over glibc's 32 MiB mmap threshold are page-faulted afresh at every step).
PASS_BYTES = 24 * 2**20
MASK_LIMIT_BYTES = 256 * 2**20


def parse_areas(value: object) -> float | list[float]:
    """The ``areas`` option checked: one fraction of the image in (0, 1) as a number, several as a list (from a
    number, a list, or text such as ``"0.05,0.1"``)."""
    areas = area_values(value)
    return areas[0] if len(areas) == 1 else list(areas)


def area_values(value: object) -> tuple[float, ...]:
    """Areas as fractions of the image, each in (0, 1): one number, a list, or text such as ``"0.05,0.1"``."""
    if value is None:
        return (0.1,)
    if isinstance(value, str):
        parts = [part for part in re.split(r"[,\s;]+", value.strip().strip("[]()")) if part]
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        parts = [value]
    elif isinstance(value, (Sequence, torch.Tensor)):
        parts = list(value.tolist() if isinstance(value, torch.Tensor) else value)
    else:
        raise ValueError(f"areas takes fractions of the image in (0, 1), e.g. 0.1 or 0.05,0.1,0.2; got {value!r}")
    areas = []
    for part in parts:
        try:
            area = float(part)
        except (TypeError, ValueError):
            raise ValueError(f"areas takes fractions of the image in (0, 1), e.g. 0.05,0.1,0.2; got {part!r}") from None
        if isinstance(part, bool) or not 0.0 < area < 1.0:
            raise ValueError(f"every area must be a fraction of the image in (0, 1), e.g. 0.1; got {part!r}")
        areas.append(area)
    if not areas:
        raise ValueError("areas is empty; give at least one fraction of the image, e.g. 0.1")
    if len(areas) > MAX_AREAS:
        raise ValueError(f"at most {MAX_AREAS} areas at a time; got {len(areas)}")
    return tuple(areas)


def gaussian_smooth(values: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (N, C, *spatial) over every spatial axis: the 1-D kernel
    exp(-i^2 / (2 sigma^2)) for |i| <= ceil(4 sigma), normalised to sum to one, with zero padding (TorchRay's
    ``imsmooth``). Each axis is one matrix product with the banded (n, n) blur matrix (the zero padding is the
    band's truncation at the edges), much faster than a 1-D convolution with a wide kernel. Sigma 0 returns
    the input."""
    if sigma <= 0:
        return values
    radius = math.ceil(4 * sigma)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    for axis in range(2, values.ndim):
        n = values.shape[axis]
        gap = torch.arange(n).view(-1, 1) - torch.arange(n).view(1, -1)  # output i, input j: i - j
        matrix = torch.where(gap.abs() <= radius, kernel[(gap + radius).clamp(0, 2 * radius)], 0.0)
        values = (values.movedim(axis, -1) @ matrix.T.to(values)).movedim(-1, axis)
    return values


def perturbation_pyramid(images: torch.Tensor, levels: int, kind: str, max_blur: float) -> torch.Tensor:
    """(N, L, C, *spatial): level l of image n is the image blurred with sigma (1 - l / (L - 1)) max_blur
    (``"blur"``) or multiplied by l / (L - 1) (``"fade"``); the last level is the image itself."""
    steps = torch.linspace(0, 1, levels).tolist()
    if kind == "blur":
        copies = [gaussian_smooth(images, (1 - t) * max_blur) for t in steps]
    elif kind == "fade":
        copies = [images * t for t in steps]
    else:
        raise MethodError(f"unknown perturbation {kind!r}; choose one of {', '.join(PERTURBATIONS)}")
    return torch.stack(copies, dim=1)


def perturb(pyramid: torch.Tensor, owners: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(R, C, *spatial) images: row r reads image ``owners[r]``'s pyramid at level masks[r] (L - 1) at every
    pixel, linearly interpolated between the two nearest levels (masks (R, *spatial) in [0, 1])."""
    levels = pyramid.shape[1]
    position = masks * (levels - 1)
    lower = position.detach().floor().clamp(0, levels - 1).long()
    upper = (lower + 1).clamp(max=levels - 1)
    fraction = (position - lower.to(position.dtype)).unsqueeze(1)
    spatial = masks.shape[1:]
    dims = len(spatial)
    channels = pyramid.shape[2]
    rows = owners.view(-1, 1, *([1] * dims))
    channel = torch.arange(channels, device=pyramid.device).view(1, -1, *([1] * dims))
    grid = [
        torch.arange(n, device=pyramid.device).view(1, 1, *([1] * d), n, *([1] * (dims - d - 1)))
        for d, n in enumerate(spatial)
    ]
    below = pyramid[(rows, lower.unsqueeze(1), channel, *grid)]
    above = pyramid[(rows, upper.unsqueeze(1), channel, *grid)]
    return (1 - fraction) * below + fraction * above


class SmoothMask:
    """The smooth max-convolution of a parameter grid (one value every ``step`` pixels along each spatial axis)
    into a mask of ``spatial`` size; see the module docstring. A pixel's candidates are the grid points around
    its own cell, so they are gathered once per cell (a small tensor) and repeated over the cell's pixels, which
    then weigh them by their own distances (TorchRay's unfold-and-upsample). The indices and kernel weights are
    computed once; :meth:`__call__` maps (R, 1, *grid) parameters to (R, *spatial) masks."""

    def __init__(self, spatial: tuple[int, ...], step: int, sigma: float, device: torch.device) -> None:
        self.spatial, self.step, self.sigma = spatial, step, sigma
        self.grid = tuple(math.ceil(n / step) for n in spatial)
        self.radius = self.window_radius(step, sigma)
        window = range(-self.radius, self.radius + 1)
        offsets = torch.tensor(list(itertools.product(window, repeat=len(spatial))), dtype=torch.long)
        padded = [g + 2 * self.radius for g in self.grid]
        strides = [math.prod(padded[d + 1 :]) for d in range(len(spatial))]
        dims = len(spatial)
        index = torch.zeros((len(offsets), *self.grid), dtype=torch.long)
        squared = torch.zeros((len(offsets), *spatial), dtype=torch.float64)
        for d, n in enumerate(spatial):
            cells = torch.arange(self.grid[d]).view(1, -1) + offsets[:, d].view(-1, 1)  # (candidates, grid cells)
            index = index + ((cells + self.radius) * strides[d]).view(
                len(offsets), *([1] * d), -1, *([1] * (dims - d - 1))
            )
            pixels = torch.arange(n, dtype=torch.long)
            points = (pixels // step).view(1, n) + offsets[:, d].view(-1, 1)  # each pixel's candidate grid points
            shape = (len(offsets), *([1] * d), n, *([1] * (dims - d - 1)))
            squared = squared + ((pixels.view(1, n) - step * points).double() ** 2).view(shape)
        distance = squared.sqrt() / sigma
        self.index = index.to(device)
        self.weights = torch.exp(-2 * (distance - 0.5).clamp_min(0) ** 2).float().to(device)
        self.candidates = len(offsets)

    @staticmethod
    def window_radius(step: int, sigma: float) -> int:
        """Grid cells on each side of a pixel's own cell whose points are its candidates."""
        return 1 + math.ceil(sigma / step)

    @classmethod
    def bytes_per_mask(cls, spatial: tuple[int, ...], step: int, sigma: float) -> int:
        """Memory one mask's construction keeps for the backward pass (its candidates' values, their softmax and
        their products, four bytes each) and the shared index and weights (twelve bytes per candidate)."""
        candidates = (2 * cls.window_radius(step, sigma) + 1) ** len(spatial)
        return 16 * candidates * math.prod(spatial)

    def __call__(self, parameters: torch.Tensor) -> torch.Tensor:
        padded = F.pad(parameters[:, 0], [self.radius] * (2 * len(self.spatial))).flatten(1)
        # (R, candidates, *grid): each cell's candidates. index_select, not advanced indexing: the latter's backward
        # (an accumulating index_put) summed in a thread-dependent order on 2 CPU threads, so two runs differed
        values = padded.index_select(1, self.index.flatten()).view(padded.shape[0], *self.index.shape)
        for d, n in enumerate(self.spatial):  # repeated over the cell's pixels, cropped to the input
            values = values.repeat_interleave(self.step, dim=2 + d).narrow(2 + d, 0, n)
        values = values * self.weights  # (R, candidates, *spatial)
        mask = (values * torch.softmax(COLDNESS * values, dim=1)).sum(dim=1)
        return mask.clamp(0, 1)


@functools.lru_cache(maxsize=2)
def smooth_mask(spatial: tuple[int, ...], step: int, sigma: float, device: str) -> SmoothMask:
    """The :class:`SmoothMask` of these settings, built once (its indices and weights take about a second and
    48 MiB at 224 x 224) and reused by the next call with the same input size."""
    return SmoothMask(spatial, step, sigma, torch.device(device))


def area_reference(areas: Sequence[float], pixels: int, device: torch.device | None = None) -> torch.Tensor:
    """(R, pixels) sorted reference vectors: zeros, then a fraction ``areas[r]`` of ones at the end (TorchRay's
    int(pixels (1 - a)) zeros)."""
    zeros = torch.tensor([int(pixels * (1 - float(area))) for area in areas], device=device)
    positions = torch.arange(pixels, device=device).view(1, -1)
    return (positions >= zeros.view(-1, 1)).float()


def rewards(outputs: torch.Tensor, targets: torch.Tensor, contrastive: bool) -> torch.Tensor:
    """(R,) the target's output, or (contrastive) the target's output minus the largest other output."""
    own = outputs.gather(1, targets.view(-1, 1)).squeeze(1)
    if not contrastive or outputs.shape[1] < 2:
        return own
    others = outputs.scatter(1, targets.view(-1, 1), float("-inf"))
    return own - others.amax(dim=1)


def optimise_masks(
    score: Callable[[torch.Tensor], torch.Tensor],
    pyramid: torch.Tensor,
    owners: torch.Tensor,
    targets: torch.Tensor,
    areas: Sequence[float],
    generator: SmoothMask,
    *,
    steps: int,
    learning_rate: float,
    variant: str,
    contrastive: bool,
    jitter: bool,
    rows_per_pass: int,
    progress: Progress | None = None,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
) -> dict:
    """Optimise one mask per row (image ``owners[r]``, class ``targets[r]``, area ``areas[r]``) and return
    ``masks`` (R, *spatial) (those of the last step's forward pass), ``rewards`` (R,), ``steps_done`` and the
    counts of forward and backward passes. Rows go through ``score`` (model inputs -> outputs)
    ``rows_per_pass`` at a time (two inputs per row for ``dual``), every pass taking one step of every row
    before the next step; ``progress.should_stop()`` ends the run after a step. ``on_step(t, masks)`` sees
    every step's masks (for measurements)."""
    total = len(owners)
    spatial = generator.spatial
    pixels = math.prod(spatial)
    reference = area_reference(areas, pixels, pyramid.device)
    parameters = torch.ones((total, 1, *generator.grid), device=pyramid.device)
    velocity = torch.zeros_like(parameters)
    masks = torch.zeros((total, *spatial), device=pyramid.device)
    final_rewards = torch.zeros(total, device=pyramid.device)
    chunks = [slice(start, min(total, start + rows_per_pass)) for start in range(0, total, rows_per_pass)]
    weight = AREA_WEIGHT
    done = forwards = 0
    for step in range(steps):
        for chunk in chunks:
            with torch.inference_mode(False), torch.enable_grad():
                leaf = parameters[chunk].clone().requires_grad_(True)
                mask = generator(leaf)
                if variant == "preserve":
                    inputs = perturb(pyramid, owners[chunk], mask)
                elif variant == "delete":
                    inputs = perturb(pyramid, owners[chunk], 1 - mask)
                else:
                    inputs = torch.cat(
                        [perturb(pyramid, owners[chunk], mask), perturb(pyramid, owners[chunk], 1 - mask)]
                    )
                if jitter and step % 2 == 0:
                    inputs = inputs.flip(-1)
                outputs = score(inputs)
                rows = len(mask)
                if variant == "preserve":
                    reward = rewards(outputs, targets[chunk], contrastive)
                elif variant == "delete":
                    reward = -rewards(outputs, targets[chunk], contrastive)
                else:
                    reward = rewards(outputs[:rows], targets[chunk], contrastive) - rewards(
                        outputs[rows:], targets[chunk], contrastive
                    )
                ranked = mask.flatten(1).sort(dim=1, stable=True).values
                area_loss = ((ranked - reference[chunk]) ** 2).mean(dim=1) * weight
                (gradient,) = torch.autograd.grad((area_loss - reward).sum(), leaf)
            forwards += 1
            # SGD with momentum and dampening 0.9 (torch.optim.SGD's rule: the first step takes the gradient)
            if step == 0:
                velocity[chunk] = gradient
            else:
                velocity[chunk] = MOMENTUM * velocity[chunk] + (1 - MOMENTUM) * gradient
            parameters[chunk] = (parameters[chunk] - learning_rate * velocity[chunk]).clamp(0, 1)
            masks[chunk] = mask.detach()
            final_rewards[chunk] = reward.detach()
            if progress is not None:
                progress.update(1)
        done = step + 1
        weight *= AREA_WEIGHT_GROWTH
        if on_step is not None:
            on_step(done, masks)
        if progress is not None and progress.should_stop():
            break
    return {"masks": masks, "rewards": final_rewards, "steps_done": done, "forwards": forwards}


@register_method("extremal-perturbation")
class ExtremalPerturbation(Method):
    """Extremal perturbations (Fong, Patrick and Vedaldi, ICCV 2019; TorchRay's definitions, see
    :mod:`cnnscope.methods.extremal`): for each image, target and area a in ``areas``, the smooth mask of
    area a that maximises the target's reward when the rest is blurred (``variant="preserve"``), or its loss
    when the masked region is blurred (``"delete"``), or both (``"dual"``); the map is the sum of the masks.
    Every image, target and area is one row of one parameter tensor optimised for ``steps`` SGD steps, in
    passes of ``inputs_per_pass`` model inputs; ``max_seconds`` stops after a step and returns the masks so
    far (``stats["stopped_early"]``)."""

    summary = "smooth mask of a fixed area that keeps (or removes) the class evidence (Fong et al. 2019)"
    options: ClassVar[Options] = Options(
        areas=anything(
            0.1,
            "fractions of the image the masks cover, in (0, 1): one (0.1) or several (0.05,0.1,0.2; the map sums "
            "their masks)",
            parse_areas,
        ),
        variant=choice("preserve", VARIANTS, "keep the mask and blur the rest, blur the mask, or both"),
        reward=choice(
            "contrastive", REWARDS, "the target's output minus the largest other class's, or the target's output"
        ),
        steps=integer(
            800, "gradient steps of the mask optimisation (TorchRay's 800; fewer loosen the area)", low=1, high=5000
        ),
        learning_rate=number(0.01, "SGD learning rate of the mask parameters (momentum 0.9)", above=0, high=100),
        step=integer(
            None, "pixels between mask parameters (default: the input's shorter side / 32, 7 at 224)", low=1, high=512
        ),
        sigma=number(None, "smoothness of the mask in pixels (default: 3 x step, 21 at 224)", above=0, high=1000),
        perturbation=choice("blur", PERTURBATIONS, "how a masked-out pixel is perturbed: blurred or faded to zero"),
        max_blur=number(
            None, "sigma of the strongest blur in pixels (default: 20 at 224, in proportion)", above=0, high=1000
        ),
        levels=integer(8, "levels of the perturbation pyramid a mask value interpolates between", low=2, high=64),
        jitter=flag(True, "flip the perturbed images left-right every other step"),
        inputs_per_pass=INPUTS_PER_PASS,
        quiet=flag(False, "no progress line"),
        max_seconds=number(None, "stop after this many seconds and return the masks so far", low=0, high=1e6),
    )

    def __init__(self, model="efficientnet_lite0", **options) -> None:
        super().__init__(model, **options)
        self.areas = area_values(self.config["areas"])

    def is_signed(self) -> bool:
        return False

    def estimated_work(self, targets: int = 1) -> int:
        inputs = 2 if self.config["variant"] == "dual" else 1
        return 1 + 2 * int(self.config["steps"]) * targets * len(self.areas) * inputs

    def settings(self, spatial: tuple[int, ...]) -> tuple[int, float, float]:
        """(step, sigma, max_blur) in pixels for an input of ``spatial`` size."""
        side = min(spatial)
        step = self.config["step"] or max(1, round(side / 32))
        sigma = self.config["sigma"] or 3.0 * step
        max_blur = self.config["max_blur"] or 20.0 * side / REFERENCE_SIDE
        return int(step), float(sigma), float(max_blur)

    def compute(self, batch: torch.Tensor, resolve) -> Computed:
        with torch.no_grad():
            logits = self.model(batch)
        targets = resolve(logits)
        b, k = targets.shape
        spatial = tuple(int(n) for n in batch.shape[2:])
        step, sigma, max_blur = self.settings(spatial)
        if step > max(spatial):
            raise MethodError(
                f"step={step} is larger than the {'x'.join(map(str, spatial))} input; use 1 to {max(spatial)}"
            )
        mask_bytes = SmoothMask.bytes_per_mask(spatial, step, sigma)
        if mask_bytes > MASK_LIMIT_BYTES:
            size = "x".join(map(str, spatial))
            if 16 * 5 ** len(spatial) * math.prod(spatial) > MASK_LIMIT_BYTES:  # not even sigma=step fits
                raise MethodError(
                    f"a {size} input is too large for extremal perturbation's smooth masks (they need "
                    f"{mask_bytes / 2**30:.1f} GiB at sigma={sigma:g}, step={step}); explain a smaller crop or "
                    "resize, or use occlusion or rise"
                )
            raise MethodError(
                f"a smooth mask of sigma={sigma:g} over step={step} on a {size} input needs "
                f"{mask_bytes / 2**30:.1f} GiB; raise step or lower sigma (sigma=step keeps "
                f"{5 ** len(spatial)} candidates per pixel)"
            )
        generator = smooth_mask(spatial, step, sigma, str(batch.device))
        areas = self.areas
        present = torch.nonzero(targets >= 0)  # (pairs, 2): image, slot
        pairs = len(present)
        owners = present[:, 0].repeat_interleave(len(areas))
        row_targets = targets[present[:, 0], present[:, 1]].repeat_interleave(len(areas))
        row_areas = list(areas) * pairs
        inputs_per_row = 2 if self.config["variant"] == "dual" else 1
        if self.config["inputs_per_pass"]:
            rows_per_pass = max(
                1, min(int(self.config["inputs_per_pass"]) // inputs_per_row, MASK_BUDGET_BYTES // mask_bytes)
            )
        else:  # keep each pass's (rows, candidates, *spatial) tensors under glibc's mmap threshold, as the layers
            rows_per_pass = max(
                1, min(auto_images_per_pass(self.model) // inputs_per_row, PASS_BYTES // (mask_bytes // 4))
            )
        steps = int(self.config["steps"])
        progress = Progress(
            steps * math.ceil(len(owners) / rows_per_pass),
            self.name,
            quiet=bool(self.config["quiet"]),
            max_seconds=self.config["max_seconds"],
        )
        pyramid = perturbation_pyramid(
            batch.detach(), int(self.config["levels"]), str(self.config["perturbation"]), max_blur
        )
        try:
            result = optimise_masks(
                self.model,
                pyramid,
                owners,
                row_targets,
                row_areas,
                generator,
                steps=steps,
                learning_rate=float(self.config["learning_rate"]),
                variant=str(self.config["variant"]),
                contrastive=self.config["reward"] == "contrastive",
                jitter=bool(self.config["jitter"]),
                rows_per_pass=rows_per_pass,
                progress=progress,
            )
        finally:
            progress.close()
        masks = result["masks"].view(pairs, len(areas), *spatial)
        final_rewards = result["rewards"].view(pairs, len(areas))
        raw = torch.zeros((b, k, *spatial), device=batch.device)
        raw[present[:, 0], present[:, 1]] = masks.sum(dim=1)
        achieved = masks.flatten(2).mean(dim=2)
        per_pair = {(int(i), int(s)): n for n, (i, s) in enumerate(present.tolist())}

        def figures(values: torch.Tensor) -> list:
            return [
                [values[per_pair[(i, s)]].tolist() if (i, s) in per_pair else None for s in range(k)] for i in range(b)
            ]

        stopped = result["steps_done"] < steps
        extra = {
            "areas": [list(areas)] * b,
            "mask_area": figures(achieved),
            "reward": figures(final_rewards),
            "steps_done": [result["steps_done"]] * b,
            "stopped_early": [stopped] * b,
        }
        if len(areas) > 1:
            extra["area_masks"] = figures(masks.round(decimals=4))
        return Computed(
            raw=raw,
            logits=logits,
            targets=targets,
            forwards=1 + result["forwards"],
            backwards=result["forwards"],
            extra=extra,
        )
