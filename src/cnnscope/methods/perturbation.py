"""Perturbation methods: explain any scoring function by changing the input and watching the score.

They need no gradients and no layers, so they work on any :class:`~cnnscope.models.Model`, including
one wrapping a plain function from images to scores (``load_model(function, ...)``: an ONNX Runtime
session, a Keras model, a remote service).

One loop, in :class:`PerturbationMethod`, serves them all: the unperturbed images are run first (their
outputs resolve the targets and give the reported probabilities, exactly as for every other method);
then, image by image, the method makes its perturbed inputs, which are scored under
``inference_mode`` in passes of ``inputs_per_pass``, with a progress line after a second (``quiet``
silences it) and ``max_seconds`` to stop early (what was computed is returned, with
``stats["stopped_early"]`` set). A method only says how to perturb and how to read the scores, in four
steps over a :class:`Perturbed` record of one image:

- ``start(run)``: set ``run.total`` (perturbations planned) and anything the other steps share;
- ``make(run, start, stop)``: the model inputs of perturbations ``start`` to ``stop``;
- ``take(run, start, scores)``: record their (n, classes) scores (``run.picked(scores)`` gives the
  targets' columns); return True once more perturbations would change nothing;
- ``finish(run)``: set ``run.maps`` (K, H, W) and any per-image figures in ``run.extra``.

Scores are the model's probabilities (softmax, multi-label sigmoid, or the outputs of a model that
outputs probabilities) unless a method's ``score_kind`` says ``"logit"``.
"""

from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import CnnscopeWarning, InputError, MethodError
from ..io import load_labels
from ..models.labels import short_name
from ..options import Option, Options, anything, choice, flag, integer, number
from ..progress import Progress
from .base import INPUTS_PER_PASS, MAX_NOTES, Computed, Method, auto_images_per_pass, register_method
from .gradient import SEED, gaussian_blur
from .incremental import plan_for

FILLS = ("grey", "mean", "blur", "zero", "noise")


@dataclass
class Perturbed:
    """One image's perturbation run: ``image`` (1, C, H, W) model input, ``targets`` (K,) class indices
    (-1: none), ``base`` (K,) their unperturbed scores. The method's steps fill ``total``, ``maps`` and
    ``extra`` and may keep their own state in ``state``."""

    image: torch.Tensor
    targets: torch.Tensor
    base: torch.Tensor
    index: int
    count: int
    total: int = 0
    maps: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)
    done: int = 0

    def picked(self, scores: torch.Tensor) -> torch.Tensor:
        """The targets' columns of (n, classes) scores: (n, K)."""
        return scores[:, self.targets.clamp_min(0)]


class PerturbationMethod(Method):
    """The shared loop (see the module docstring); subclasses implement the four steps."""

    options: ClassVar[Options] = Options(
        inputs_per_pass=INPUTS_PER_PASS,
        quiet=flag(False, "no progress line"),
        max_seconds=number(None, "stop after this many seconds and return what was computed", low=0, high=1e6),
        precision=choice(
            "fp32", ("fp32", "bf16"), "bf16 scores perturbed images about 2x faster where the CPU has bf16 (checked)"
        ),
    )
    #: Largest difference in any class probability, on the unperturbed images, that lets bf16 be used.
    BF16_TOLERANCE: ClassVar[float] = 0.02

    # -- the four steps ------------------------------------------------------------------------------
    def start(self, run: Perturbed) -> None:
        raise NotImplementedError

    def make(self, run: Perturbed, start: int, stop: int) -> torch.Tensor:
        raise NotImplementedError

    def scored(self, run: Perturbed, start: int, stop: int, kind: str, precision: str) -> torch.Tensor:
        """The scores of perturbations ``start:stop``: the model on :meth:`make`'s inputs (a method that can
        score them without making every input, as occlusion's incremental path, overrides this)."""
        return self.scores(self.make(run, start, stop), kind, precision=precision)

    def take(self, run: Perturbed, start: int, scores: torch.Tensor) -> bool | None:
        raise NotImplementedError

    def finish(self, run: Perturbed) -> None:
        raise NotImplementedError

    def score_kind(self) -> str:
        """``"probability"`` or ``"logit"``: what the perturbed images' scores are."""
        return "probability"

    def estimated_work(self, targets: int = 1) -> int:
        """The unperturbed pass and every perturbation (their number from ``start`` on a blank input)."""
        blank = torch.zeros(self.model.preprocess.input_shape())
        run = Perturbed(blank, torch.zeros(targets, dtype=torch.long), torch.zeros(targets), 0, 1)
        self.start(run)
        return 1 + run.total

    def is_signed(self) -> bool:
        return True

    # -- the loop ------------------------------------------------------------------------------------
    def compute(self, batch: torch.Tensor, resolve) -> Computed:
        kind = self.score_kind()
        outputs, precision = self._unperturbed(batch)
        targets = resolve(outputs)
        base = self.as_scores(outputs, kind)
        runs = [
            Perturbed(batch[b : b + 1], targets[b], base[b, targets[b].clamp_min(0)], b, batch.shape[0])
            for b in range(batch.shape[0])
        ]
        for run in runs:
            self.start(run)
        progress = Progress(
            sum(run.total for run in runs),
            self.name,
            quiet=bool(self.config["quiet"]),
            max_seconds=self.config["max_seconds"],
        )
        per = int(self.config["inputs_per_pass"] or auto_images_per_pass(self.model))
        forwards, stopped, notes = batch.shape[0], False, []
        for run in runs:
            low = high = run.base.clone()
            while not stopped and run.done < run.total:
                stop = min(run.total, run.done + per)
                scores = self.scored(run, run.done, stop, kind, precision)
                forwards += 1
                picked = run.picked(scores)
                low, high = torch.minimum(low, picked.amin(0)), torch.maximum(high, picked.amax(0))
                settled = self.take(run, run.done, scores)
                progress.update(stop - run.done)
                run.done = stop
                stopped = progress.should_stop()
                if settled:
                    break
            run.extra["stopped_early"] = stopped and run.done < run.total
            self.finish(run)
            notes += self._constant_notes(run, high - low)
        progress.close()
        maps = torch.stack([run.maps for run in runs]).float()
        present = (targets >= 0).view(*targets.shape, *([1] * (maps.ndim - 2)))  # pictures, volumes and clips
        maps = torch.where(present, maps, torch.zeros_like(maps))
        extra = {key: [run.extra[key] for run in runs] for key in runs[0].extra}
        extra["precision"] = [precision] * batch.shape[0]
        return Computed(raw=maps, logits=outputs, targets=targets, forwards=forwards, notes=notes, extra=extra)

    def _constant_notes(self, run: Perturbed, spread: torch.Tensor) -> list[tuple[int, str]]:
        """The blank-image trap: the target's score never moved, so the map says nothing."""
        if run.done == 0:
            return []
        still = [int(t) for t, s in zip(run.targets.tolist(), spread.tolist(), strict=True) if t >= 0 and s <= 1e-7]
        return [
            (
                run.index,
                f"the {self.name} map of '{short_name(self.model.labels[t])}' is constant: its score never moved "
                "under these perturbations (a blank or noise image, or a region size that misses the evidence)",
            )
            for t in still[:MAX_NOTES]
        ]

    # -- scoring -------------------------------------------------------------------------------------
    def as_scores(self, outputs: torch.Tensor, kind: str) -> torch.Tensor:
        """The model's raw outputs as scores of ``kind``."""
        return self.model.probabilities(outputs) if kind == "probability" else outputs

    def scores(self, inputs: torch.Tensor, kind: str, *, precision: str = "fp32") -> torch.Tensor:
        """(N, C) scores of model-input tensors, in one pass without gradients."""
        # channels-last input: 10% faster per image at passes of 5 on the default model, 35% at 16
        chunk = inputs.contiguous(memory_format=torch.channels_last) if inputs.ndim == 4 else inputs
        with torch.inference_mode():
            if precision == "bf16":
                with torch.autocast(chunk.device.type, dtype=torch.bfloat16):
                    outputs = self.model(chunk).float()
            else:
                outputs = self.model(chunk)
        return self.as_scores(outputs, kind)

    def _unperturbed(self, batch: torch.Tensor) -> tuple[torch.Tensor, str]:
        """The raw outputs of the unperturbed images, image by image (so an image's map does not depend
        on its batch mates: a batch of N changes the convolution's summation order, and score drops are
        small differences), and the precision the perturbed images are scored in.

        With ``precision="bf16"`` the unperturbed images are also scored in bf16 and compared with
        fp32: if any class probability moves by more than ``BF16_TOLERANCE`` the call falls back to fp32
        with a warning. The fp32 outputs are the reference either way."""
        with torch.inference_mode():
            outputs = torch.cat([self.model(batch[b : b + 1]) for b in range(batch.shape[0])])
        if self.config["precision"] != "bf16":
            return outputs, "fp32"
        if not bf16_is_fast(batch.device):
            warnings.warn(
                f"{self.name}: this CPU has no bf16 instructions (AVX512-BF16 or AMX), where bf16 runs several "
                "times slower than fp32; using fp32",
                CnnscopeWarning,
                stacklevel=5,
            )
            return outputs, "fp32"
        reduced = torch.cat(
            [self.scores(batch[b : b + 1], "probability", precision="bf16") for b in range(batch.shape[0])]
        )
        gap = float((reduced - self.model.probabilities(outputs)).abs().max())
        if gap > self.BF16_TOLERANCE:
            warnings.warn(
                f"{self.name}: bf16 moves a class probability by {gap:.3f} on these images "
                f"(more than {self.BF16_TOLERANCE}); using fp32",
                CnnscopeWarning,
                stacklevel=5,
            )
            return outputs, "fp32"
        return outputs, "bf16"

    # -- helpers for the steps -----------------------------------------------------------------------
    def pixels(self, batch: torch.Tensor) -> torch.Tensor:
        """Model input -> [0, 1] pixels (the inverse of the normalization)."""
        return self.model.preprocess.unnormalize(batch)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.preprocess.normalize(pixels)

    def fill_for(self, image: torch.Tensor, fill: str, generator: torch.Generator) -> torch.Tensor:
        """What an occluded pixel becomes, in model-input space, for one (1, C, H, W) image."""
        pixels = self.pixels(image)
        if fill == "grey":
            return self.normalize(torch.full_like(pixels, 0.5))
        if fill == "mean":
            return self.normalize(pixels.mean(dim=tuple(range(2, pixels.ndim)), keepdim=True).expand_as(pixels))
        if fill == "blur":  # sigma: a 32nd of the width, on every axis (the slices or frames too)
            return gaussian_blur(image, max(1.0, image.shape[-1] / 32))
        if fill == "zero":
            return torch.zeros_like(image)
        return self.normalize(torch.rand(pixels.shape, generator=generator).to(pixels))


def bf16_is_fast(device: torch.device) -> bool:
    """Whether bf16 is faster than fp32 here: on a GPU, or a CPU with AVX512-BF16 or AMX instructions (where
    a bf16 pass took about half the fp32 time); elsewhere bf16 is emulated and several times slower."""
    if device.type != "cpu":
        return True
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def _positions(size: int, window: int, stride: int) -> list[int]:
    """Patch starts covering the whole side (a last patch flush with the edge if the stride misses it)."""
    starts = list(range(0, size - window + 1, stride))
    if starts[-1] != size - window:
        starts.append(size - window)
    return starts


def parse_sizes(value: object) -> int | tuple[int, ...]:
    """An occlusion ``window`` or ``stride``: one whole number for every spatial axis, or one per axis: a list or
    tuple, or text such as ``"4,16,16"`` (the command line's ``--option window=4,16,16``). Each is 1 to 4096."""
    if isinstance(value, str):
        parts: list = [part for part in value.strip().strip("[]()").replace(";", ",").split(",") if part.strip()]
    elif isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        parts = [value]
    sizes = []
    for part in parts:
        text = part.strip() if isinstance(part, str) else part
        try:
            size = int(text) if isinstance(text, str) else text
        except ValueError:
            size = None
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 1 <= int(size) <= 4096:
            raise ValueError(
                f"takes one whole number of pixels from 1 to 4096, or one per spatial axis such as 4,16,16 for a "
                f"(t, h, w) clip or (d, h, w) volume; got {value!r}"
            )
        sizes.append(int(size))
    if not sizes:
        raise ValueError(f"takes one whole number of pixels, or one per spatial axis such as 4,16,16; got {value!r}")
    return sizes[0] if len(sizes) == 1 else tuple(sizes)


def per_axis(name: str, value: int | tuple[int, ...], spatial: tuple[int, ...]) -> tuple[int, ...]:
    """``value`` (one size, or one per axis) for each of the ``spatial`` axes; a wrong count is a one-line error."""
    if isinstance(value, int):
        return (value,) * len(spatial)
    if len(value) != len(spatial):
        axes = {2: "(h, w)", 3: "(t, h, w) for a clip, (d, h, w) for a volume"}.get(len(spatial), "")
        raise MethodError(
            f"occlusion {name} has {len(value)} values but the input has {len(spatial)} spatial axes "
            f"{'x'.join(map(str, spatial))}; give one value for every axis or {len(spatial)} values {axes}"
        )
    return tuple(value)


class SizesOption(Option):
    """An option of one size or one per spatial axis (occlusion's ``window`` and ``stride``), listed with its
    range in words (the web form reads it as text or JSON)."""

    def describe_range(self) -> str:
        return "a whole number from 1 to 4096, or one per spatial axis (h,w or t,h,w or d,h,w)"


def _size_option(default: int, help: str) -> Option:
    return SizesOption("object", default, help, check=parse_sizes)


@register_method("occlusion")
class Occlusion(PerturbationMethod):
    """Occlusion sensitivity (Zeiler & Fergus 2014; MATLAB's ``occlusionSensitivity``): slide a
    ``window`` x ``window`` patch with ``stride`` over the image (either one size for every axis or one per
    axis: (h, w), (d, h, w) for a volume, (t, h, w) for a clip), fill it (``fill``: grey, mean colour,
    blur, zero in model-input space as Captum's default baseline, or seeded noise) and record how much
    the target's score drops (``score``: probability or logit). Each pixel gets the average drop over
    the patches covering it, so the map is at the input's resolution. ``stats["winners"]`` holds, per
    image, the (rows, columns) grid of the class that wins when each patch is occluded (-1 where the run
    stopped early). With ``fill="zero"`` and ``score="logit"`` it is Captum's ``Occlusion`` (baselines 0).

    ``incremental`` (the default) computes, for a model whose forward starts with convolutions, pooling,
    eval-mode batch norm and activations (an ``nn.Sequential``, or a forward ``torch.fx`` traces: VGG, 3-D CNNs),
    only the part of each of those layers that the patch changes (Krypton, Nakandala et al. 2019:
    :mod:`cnnscope.methods.incremental`): the same maps to float rounding, in a fraction of the time on volumes.
    Other models, chains that would skip under a quarter of the forward's multiply-adds, and ``precision="bf16"``
    run the plain batched forward; ``stats["incremental"]`` says which ran."""

    summary = "score drop when a sliding patch is occluded (Zeiler & Fergus 2014)"
    options: ClassVar[Options] = PerturbationMethod.options | Options(
        window=_size_option(
            32, "side of the occluding patch in model-input pixels (a clip's window=4,16,16: 4 frames, 16 x 16 px)"
        ),
        stride=_size_option(16, "step between patches, in pixels (and frames or slices)"),
        fill=choice("grey", FILLS, "what the patch holds"),
        score=choice("probability", ("probability", "logit"), "the score whose drop is mapped"),
        seed=SEED,
        incremental=flag(
            True, "recompute only what the patch changes in a CNN's first local layers (exact; else the full pass)"
        ),
    )

    def score_kind(self) -> str:
        return str(self.config["score"])

    # Written over the spatial dims: a window x window patch of a picture, a box of a volume or clip.
    def start(self, run: Perturbed) -> None:
        spatial = tuple(int(n) for n in run.image.shape[2:])
        window = per_axis("window", self.config["window"], spatial)
        stride = per_axis("stride", self.config["stride"], spatial)
        if any(w > n for w, n in zip(window, spatial, strict=True)):
            raise MethodError(
                f"occlusion window {'x'.join(map(str, window))} does not fit a {'x'.join(map(str, spatial))} input; "
                f"give at most {','.join(map(str, spatial))}"
            )
        axes = [_positions(n, w, step) for n, w, step in zip(spatial, window, stride, strict=True)]
        generator = torch.Generator().manual_seed(int(self.config["seed"]))
        positions = list(itertools.product(*axes))
        run.total = len(positions)
        run.state.update(
            positions=positions,
            window=window,
            grid=tuple(len(axis) for axis in axes),
            fill=self.fill_for(run.image, str(self.config["fill"]), generator),
            sums=torch.zeros((len(run.targets), *spatial), device=run.image.device),
            counts=torch.zeros(spatial, device=run.image.device),
            winners=torch.full((len(positions),), -1, dtype=torch.long),
        )

    @staticmethod
    def _box(position: tuple[int, ...], window: tuple[int, ...]) -> tuple[slice, ...]:
        return tuple(slice(start, start + size) for start, size in zip(position, window, strict=True))

    def make(self, run, start, stop):
        fill = run.state["fill"]
        occluded = run.image.repeat(stop - start, *([1] * (run.image.ndim - 1)))
        for row, position in enumerate(run.state["positions"][start:stop]):
            box = (slice(None), *self._box(position, run.state["window"]))
            occluded[(row, *box)] = fill[(0, *box)]
        return occluded

    def scored(self, run, start, stop, kind, precision):
        """Incrementally where the model allows it (the same numbers to float rounding, without making the
        occluded inputs), else the plain forward on :meth:`make`'s."""
        if not self.config["incremental"] or precision != "fp32":
            return super().scored(run, start, stop, kind, precision)
        if "incremental" not in run.state:
            plan = plan_for(self.model, tuple(int(n) for n in run.image.shape[2:]), run.state["window"])
            run.state["incremental"] = None if plan is None else plan.prepare(run.image)
        prepared = run.state["incremental"]
        if prepared is None:
            return super().scored(run, start, stop, kind, precision)
        outputs = prepared.outputs(run.state["fill"], run.state["positions"][start:stop])
        return self.as_scores(outputs, kind)

    def take(self, run, start, scores):
        state = run.state
        drops = run.base - run.picked(scores)  # (n, K)
        for row, position in enumerate(state["positions"][start : start + len(scores)]):
            box = self._box(position, state["window"])
            state["sums"][(slice(None), *box)] += drops[row].view(-1, *([1] * len(box)))
        state["winners"][start : start + len(scores)] = scores.argmax(dim=1).cpu()

    def finish(self, run):
        counts = run.state["counts"]
        for position in run.state["positions"]:  # every patch, so a stopped run keeps the same scale
            counts[self._box(position, run.state["window"])] += 1
        run.maps = run.state["sums"] / counts.clamp_min(1)
        run.extra["winners"] = run.state["winners"].view(*run.state["grid"]).tolist()
        run.extra["incremental"] = run.state.get("incremental") is not None


@register_method("rise")
class RISE(PerturbationMethod):
    """RISE (Petsiuk et al. 2018): ``masks`` random binary ``cells`` x ``cells`` grids (each cell kept
    with probability ``keep``), upsampled bilinearly to (cells + 1) cell sizes and cropped at a random
    shift, multiply the image (in pixels, so removed parts go black); the map is the mask average
    weighted by the target's probability: S = 1 / (N keep) sum_i p(x * M_i) M_i. Seeded."""

    summary = "randomized input sampling: probability-weighted random masks (Petsiuk et al. 2018)"
    options: ClassVar[Options] = PerturbationMethod.options | Options(
        masks=integer(4000, "random masks", low=1, high=100_000),
        cells=integer(7, "cells per side of a mask's grid", low=1, high=64),
        keep=number(0.5, "probability that a cell is kept", above=0, high=1),
        seed=SEED,
    )

    def is_signed(self) -> bool:
        return False

    def masks_for(self, count: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
        cells, keep = int(self.config["cells"]), float(self.config["keep"])
        cell_h, cell_w = math.ceil(height / cells), math.ceil(width / cells)
        grid = (torch.rand((count, 1, cells, cells), generator=generator) < keep).float()
        up = F.interpolate(
            grid, size=((cells + 1) * cell_h, (cells + 1) * cell_w), mode="bilinear", align_corners=False
        )
        dy = torch.randint(0, cell_h, (count,), generator=generator)
        dx = torch.randint(0, cell_w, (count,), generator=generator)
        return torch.stack([up[i, :, dy[i] : dy[i] + height, dx[i] : dx[i] + width] for i in range(count)])

    def volume_masks_for(self, count: int, size: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
        """The masks of a volume or clip: ``cells`` per side on every spatial dim, upsampled trilinearly and
        shifted at random by up to one cell on each."""
        cells, keep = int(self.config["cells"]), float(self.config["keep"])
        steps = [math.ceil(n / cells) for n in size]
        grid = (torch.rand((count, 1, *([cells] * len(size))), generator=generator) < keep).float()
        up = F.interpolate(grid, size=[(cells + 1) * s for s in steps], mode="trilinear", align_corners=False)
        shifts = torch.stack([torch.randint(0, s, (count,), generator=generator) for s in steps], dim=1)
        return torch.stack(
            [
                up[(i, slice(None), *(slice(int(o), int(o) + n) for o, n in zip(shifts[i], size, strict=True)))]
                for i in range(count)
            ]
        )

    def start(self, run):
        run.total = int(self.config["masks"])
        run.state.update(
            pixels=self.pixels(run.image),
            generator=torch.Generator().manual_seed(int(self.config["seed"])),  # same masks alone or in a batch
            sums=torch.zeros((len(run.targets), *run.image.shape[2:]), device=run.image.device),
        )

    def make(self, run, start, stop):
        size = tuple(int(n) for n in run.image.shape[2:])
        if len(size) == 2:
            masks = self.masks_for(stop - start, *size, run.state["generator"]).to(run.image.device)
        else:
            masks = self.volume_masks_for(stop - start, size, run.state["generator"]).to(run.image.device)
        run.state["masks"] = masks
        return self.normalize(run.state["pixels"] * masks)

    def take(self, run, start, scores):
        run.state["sums"] += torch.einsum("nk,n...->k...", run.picked(scores), run.state.pop("masks")[:, 0])

    def finish(self, run):
        run.maps = run.state["sums"] / (max(1, run.done) * float(self.config["keep"]))
        run.extra["masks_used"] = run.done


SEGMENTATIONS = ("slic", "quickshift", "felzenszwalb")
SEGMENTATION_DEFAULTS = {
    "slic": {"compactness": 10},
    "quickshift": {"kernel_size": 4, "max_dist": 200, "ratio": 0.2},
    "felzenszwalb": {"scale": 100, "sigma": 0.5, "min_size": 50},
}


def superpixels(pixels: np.ndarray, how: str, segments: int, options: dict) -> np.ndarray:
    """(H, W) labels 0..S-1 of scikit-image superpixels on an (H, W, 3) [0, 1] image."""
    from skimage import segmentation

    if how not in SEGMENTATIONS:
        raise MethodError(f"unknown segmentation {how!r}; choose one of {', '.join(SEGMENTATIONS)}")
    settings = {**SEGMENTATION_DEFAULTS[how], **options}
    try:
        if how == "slic":
            labels = segmentation.slic(pixels, n_segments=segments, start_label=0, **settings)
        elif how == "quickshift":
            labels = segmentation.quickshift(pixels, **settings)
        else:
            labels = segmentation.felzenszwalb(pixels, **settings)
    except TypeError as exc:
        raise MethodError(f"segmentation_options for {how}: {exc}") from None
    _, dense = np.unique(labels, return_inverse=True)
    return dense.reshape(labels.shape)


def _segmentation_options(value: Any) -> dict:
    """A dict of keyword arguments for the scikit-image segmentation, with numbers, words or booleans."""
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ValueError('give a JSON object of keyword arguments, e.g. {"compactness": 20}')
    for key, item in value.items():
        if not isinstance(item, (int, float, str, bool)) or key.startswith("_"):
            raise ValueError(f"{key!r} must be a number, a word or true/false")
    return dict(value)


def weighted_ridge(features: np.ndarray, targets: np.ndarray, weights: np.ndarray, alpha: float):
    """Ridge regression with an intercept and sample weights, as scikit-learn's ``Ridge(alpha)`` with
    ``sample_weight`` (what the ``lime`` package fits): minimises sum_i w_i (y_i - b - x_i beta)^2 + alpha |beta|^2.

    Returns (coefficients (S, K), intercepts (K,), weighted R^2 (K,), standard errors of the
    coefficients (S, K), from the weighted residual variance)."""
    share = weights / weights.sum()
    mean_x = share @ features
    mean_y = share @ targets
    xc, yc = features - mean_x, targets - mean_y
    gram = xc.T @ (xc * weights[:, None])
    inverse = np.linalg.inv(gram + alpha * np.eye(features.shape[1]))
    coefficients = inverse @ (xc.T @ (yc * weights[:, None]))
    residuals = yc - xc @ coefficients
    residual = (share[:, None] * residuals**2).sum(axis=0)
    total = (share[:, None] * yc**2).sum(axis=0)
    r2 = 1 - residual / np.where(total > 0, total, 1)
    dof = max(1, len(weights) - features.shape[1] - 1)
    variance = (weights[:, None] * residuals**2).sum(axis=0) / dof  # (K,)
    spread = np.sqrt(np.clip(np.diag(inverse @ gram @ inverse), 0, None))  # (S,)
    errors = spread[:, None] * np.sqrt(variance)[None, :]
    return coefficients, mean_y - mean_x @ coefficients, r2, errors


@register_method("lime")
class LIME(PerturbationMethod):
    """LIME for images (Ribeiro et al. 2016): superpixels (``segmentation``: slic, quickshift or
    felzenszwalb from scikit-image, ``segments`` and ``segmentation_options``) are switched off at random
    (replaced by ``fill``: each superpixel's mean colour, as the ``lime`` package, or grey/blur/zero) in
    ``samples`` perturbed images; a ridge regression (``alpha``) weighted by the kernel
    sqrt(exp(-d^2 / width^2)) on the cosine distance d to the full image fits the target's probability.
    The map gives each pixel its superpixel's coefficient (signed); ``stats`` holds the fit's weighted
    R^2 and the top positive and negative superpixels.

    ``sampling="paired"`` (the default) draws each random on/off pattern together with its complement
    (antithetic sampling): every superpixel is then on in exactly half of the samples and the surrogate's
    coefficients vary about a third less from seed to seed on the default model (0.66-0.69x the spread
    of ``"independent"`` samples, as the ``lime`` package draws them, at 600 samples): about twice the
    samples' worth. Seeded (``seed``): the same call gives the same answer, unlike the ``lime`` package, and
    a run of fewer samples uses the first samples of a longer run with the same seed (600 samples in bf16
    find the same top-5 superpixels as the 1,000-sample fp32 run on all four sample photos, in 2.7-3.0 s
    instead of 7.7-8.5 s: bench/perturbation.py). With
    ``converge=True`` sampling stops (after ``min_samples``, checked every 50 samples) once the ``top``-th
    superpixel beats the next by three standard errors of the surrogate's coefficients, so that more
    samples would not change the top set; ``stats["samples_used"]`` says how many were used. On the
    sample photos the 5th and 6th superpixels stay within that margin even at 1,000 samples, so it does
    not stop early there; it does on clear-cut images.

    ``feature_mask`` replaces the superpixels with your own regions (Captum's ``feature_mask``): an
    (H, W) integer label array or a label image (a path: a greyscale image's values are the labels, a
    colour image's colours are) for every image, or a list or (N, H, W) array with one per image, at the
    photo's or the model input's size (resized by nearest neighbour, as the photo is resized whole).
    ``top_positive`` and ``top_negative`` then name your labels."""

    summary = "local linear surrogate over superpixels (Ribeiro et al. 2016), seeded"
    options: ClassVar[Options] = PerturbationMethod.options | Options(
        samples=integer(1000, "perturbed images the surrogate is fitted on", low=2, high=100_000),
        segmentation=choice("slic", SEGMENTATIONS, "the scikit-image superpixel algorithm"),
        segments=integer(50, "superpixels asked of slic", low=2, high=5000),
        segmentation_options=anything(
            None, "keyword arguments of the segmentation, a JSON object (e.g. compactness)", _segmentation_options
        ),
        fill=choice("mean", ("mean", "grey", "blur", "zero"), "what a switched-off superpixel becomes"),
        kernel_width=number(0.25, "width of the proximity kernel on the cosine distance", above=0, high=100),
        alpha=number(1.0, "ridge penalty of the surrogate", low=0, high=1e6),
        seed=SEED,
        converge=flag(False, "stop sampling once the top superpixels are settled"),
        min_samples=integer(300, "samples before converge may stop", low=2, high=100_000),
        top=integer(5, "superpixels named in top_positive / top_negative", low=1, high=1000),
        sampling=choice("paired", ("paired", "independent"), "antithetic pairs, or independent draws"),
        feature_mask=Option(
            "object",
            None,
            "your own regions instead of superpixels: a label array, a label image file, or one per image",
            optional=True,
            web=False,
            reads_files=True,
        ),
    )

    def _regions(self, pixels: np.ndarray, index: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(H, W) labels 0..S-1 of image ``index`` of ``count`` at the input size, and the S region ids
        reported to the user (the superpixel numbers, or the labels of the user's ``feature_mask``)."""
        mask = self.config["feature_mask"]
        if mask is None:
            labels = superpixels(
                pixels,
                str(self.config["segmentation"]),
                int(self.config["segments"]),
                dict(self.config["segmentation_options"] or {}),
            )
            return labels, np.arange(int(labels.max()) + 1)
        if isinstance(mask, (list, tuple)) and all(isinstance(row, (list, tuple)) for row in mask):
            mask = np.asarray(mask)  # nested lists (JSON): one (H, W) mask, or (N, H, W)
        per_image = isinstance(mask, (list, tuple)) or getattr(mask, "ndim", 2) == 3
        if per_image:
            if len(mask) != count:
                raise MethodError(f"feature_mask holds {len(mask)} masks for {count} images; give one per image")
            mask = mask[index]
        try:
            given = load_labels(mask)
        except InputError as exc:
            raise InputError(f"feature_mask: {exc}") from None
        ids, dense = np.unique(given, return_inverse=True)
        if len(ids) < 2:
            raise MethodError("feature_mask has a single region; LIME needs at least two regions to compare")
        height, width = pixels.shape[:2]
        dense = dense.reshape(given.shape).astype(np.int32)
        if dense.shape != (height, width):
            dense = np.asarray(Image.fromarray(dense).resize((width, height), Image.Resampling.NEAREST))
        present = np.unique(dense)  # a region too small to survive the resize has no pixels left
        return np.searchsorted(present, dense), ids[present]

    def start(self, run):
        image = run.image
        pixels = self.pixels(image)[0].permute(1, 2, 0).cpu().numpy().astype(np.float64)
        labels, ids = self._regions(pixels, run.index, run.count)
        count = int(labels.max()) + 1
        label_tensor = torch.from_numpy(labels).to(image.device)
        if self.config["fill"] == "mean":
            sums = torch.zeros((count, image.shape[1]), dtype=image.dtype, device=image.device)
            sums.index_add_(0, label_tensor.flatten(), image[0].flatten(1).T)
            sizes = torch.bincount(label_tensor.flatten(), minlength=count).clamp_min(1)
            fill = (sums / sizes[:, None])[label_tensor].permute(2, 0, 1).unsqueeze(0)
        else:
            fill = self.fill_for(
                image, str(self.config["fill"]), torch.Generator().manual_seed(int(self.config["seed"]))
            )
        generator = np.random.default_rng(int(self.config["seed"]))
        total = int(self.config["samples"])
        if self.config["sampling"] == "paired":
            # each random on/off pattern is followed by its complement (antithetic sampling)
            half = generator.integers(0, 2, size=(-(-total // 2), count)).astype(np.float64)
            half[0] = 1.0  # the image itself, paired with everything filled
            switches = np.stack([half, 1.0 - half], axis=1).reshape(-1, count)[:total]
        else:
            switches = generator.integers(0, 2, size=(total, count)).astype(np.float64)
            switches[0] = 1.0  # the first sample is the image itself, as in the lime package
        run.total = total
        run.state.update(
            labels=labels,
            ids=ids,
            label_tensor=label_tensor,
            fill=fill,
            switches=switches,
            scores=np.zeros((total, len(run.targets))),
            fitted=None,
        )

    def make(self, run, start, stop):
        on = torch.from_numpy(run.state["switches"][start:stop]).float().to(run.image.device)
        on = on[:, run.state["label_tensor"]]  # (n, H, W)
        return torch.where(on[:, None] > 0, run.image, run.state["fill"])

    def take(self, run, start, scores):
        state, stop = run.state, start + len(scores)
        state["scores"][start:stop] = run.picked(scores).cpu().numpy()
        # with converge, check every 50 samples once min_samples are in
        if self.config["converge"] and stop >= int(self.config["min_samples"]) and stop // 50 > start // 50:
            state["fitted"] = (stop, *self._fit(state["switches"][:stop], state["scores"][:stop]))
            return self._top_is_settled(state["fitted"][1], state["fitted"][3])
        return False

    def finish(self, run):
        state, used = run.state, run.done
        if state["fitted"] is not None and state["fitted"][0] == used:
            _, coefficients, r2, _ = state["fitted"]
        elif used >= 2:
            coefficients, r2, _ = self._fit(state["switches"][:used], state["scores"][:used])
        else:  # stopped before two samples: nothing to fit
            coefficients = np.zeros((state["switches"].shape[1], len(run.targets)))
            r2 = np.full(len(run.targets), np.nan)
        ids, top = state["ids"], int(self.config["top"])
        run.maps = torch.from_numpy(coefficients.T[:, state["labels"]]).float().to(run.image.device)
        run.extra["r2"] = [float(v) for v in r2]
        run.extra["top_positive"] = [ids[np.argsort(-coefficients[:, k])[:top]].tolist() for k in range(len(r2))]
        run.extra["top_negative"] = [ids[np.argsort(coefficients[:, k])[:top]].tolist() for k in range(len(r2))]
        run.extra["samples_used"] = used

    def estimated_work(self, targets: int = 1) -> int:
        return 1 + int(self.config["samples"])

    def _fit(self, switches: np.ndarray, scores: np.ndarray):
        distances = 1.0 - (switches @ np.ones(switches.shape[1])) / (
            np.linalg.norm(switches, axis=1) * np.sqrt(switches.shape[1]) + 1e-12
        )
        width = float(self.config["kernel_width"])
        kernel = np.sqrt(np.exp(-(distances**2) / width**2))
        coefficients, _, r2, errors = weighted_ridge(switches, scores, kernel, float(self.config["alpha"]))
        return coefficients, r2, errors

    def _top_is_settled(self, coefficients: np.ndarray, errors: np.ndarray, z: float = 3.0) -> bool:
        """Whether, for every target, the ``top``-th superpixel beats the next one by ``z`` standard errors
        of their difference, so more samples would not change the top set."""
        top = int(self.config["top"])
        if coefficients.shape[0] <= top:
            return True
        for k in range(coefficients.shape[1]):
            order = np.argsort(-coefficients[:, k])
            last, first_out = order[top - 1], order[top]
            gap = coefficients[last, k] - coefficients[first_out, k]
            if gap <= z * np.hypot(errors[last, k], errors[first_out, k]):
                return False
        return True


@register_method("patches")
class PatchScoring(PerturbationMethod):
    """Patch scoring (the multiple-instance view of histopathology): the image is cut into a ``grid`` x
    ``grid`` of patches (overlapping when ``overlap`` > 0, as a fraction of a patch), each patch is
    resized to the model input and classified on its own, and each pixel gets the target's probability
    averaged over the patches that contain it. ``stats["patch_scores"]`` holds the (rows, columns) grid
    of each image's first target."""

    summary = "each patch classified on its own; the map is the target's probability per patch"
    options: ClassVar[Options] = PerturbationMethod.options | Options(
        grid=integer(4, "patches per side", low=1, high=64),
        overlap=number(0.0, "overlap of neighbouring patches, as a fraction of a patch", low=0, below=1),
    )

    def is_signed(self) -> bool:
        return False

    def start(self, run):
        grid, overlap = int(self.config["grid"]), float(self.config["overlap"])
        height, width = run.image.shape[-2:]
        patch_h, patch_w = math.ceil(height / grid), math.ceil(width / grid)
        ys = _positions(height, patch_h, max(1, round(patch_h * (1 - overlap))))
        xs = _positions(width, patch_w, max(1, round(patch_w * (1 - overlap))))
        run.total = len(ys) * len(xs)
        run.state.update(
            patches=[(y, x) for y in ys for x in xs],
            size=(patch_h, patch_w),
            columns=len(xs),
            scores=torch.zeros((run.total, len(run.targets))),
        )

    def make(self, run, start, stop):
        (patch_h, patch_w), size = run.state["size"], tuple(run.image.shape[-2:])
        return torch.cat(
            [
                F.interpolate(run.image[:, :, y : y + patch_h, x : x + patch_w], size=size, mode="bilinear")
                for y, x in run.state["patches"][start:stop]
            ]
        )

    def take(self, run, start, scores):
        run.state["scores"][start : start + len(scores)] = run.picked(scores).cpu()

    def finish(self, run):
        (patch_h, patch_w), height, width = run.state["size"], *run.image.shape[-2:]
        sums = torch.zeros((len(run.targets), height, width))
        counts = torch.zeros((height, width))
        for (y, x), score in zip(run.state["patches"], run.state["scores"], strict=True):
            sums[:, y : y + patch_h, x : x + patch_w] += score[:, None, None]
            counts[y : y + patch_h, x : x + patch_w] += 1
        run.maps = (sums / counts.clamp_min(1)).to(run.image.device)
        run.extra["patch_scores"] = run.state["scores"][:, 0].view(-1, run.state["columns"]).tolist()
