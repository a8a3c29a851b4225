"""Perturbation methods: explain any scoring function by changing the input and watching the score.

They need no gradients and no layers, so they work on any :class:`~cnnscope.models.Model`, including
one wrapping a plain function from images to scores (``load_model(function, ...)``: an ONNX Runtime
session, a Keras model, a remote service). Perturbed images are scored under ``inference_mode`` in
passes of ``images_per_pass`` (default: the allocator-friendly size of :func:`auto_images_per_pass`),
with a progress line after a second (``quiet=True`` silences it) and ``max_seconds`` to stop early:
what was computed is returned, with ``stats["stopped_early"]`` set.
"""

from __future__ import annotations

import math
import threading
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import InputError, MethodError
from ..io import load_labels
from ..progress import Progress
from .base import Computed, Method, auto_images_per_pass, register_method
from .gradient import gaussian_blur

FILLS = ("grey", "mean", "blur", "zero", "noise")


class PerturbationMethod(Method):
    """Shared parts: scoring batches of perturbed inputs, fills, progress and early stop."""

    options: ClassVar[dict[str, object]] = {
        "images_per_pass": None,
        "quiet": False,
        "max_seconds": None,
        "precision": "fp32",
    }
    #: Largest difference in any class probability, on the unperturbed images, that lets bf16 be used.
    BF16_TOLERANCE: ClassVar[float] = 0.02
    #: "probability" (softmax or sigmoid of the model) or "logit".
    score_kind: ClassVar[str] = "probability"

    def per_pass(self) -> int:
        return int(self.config.get("images_per_pass") or auto_images_per_pass(self.model))

    def scores(self, inputs: torch.Tensor, kind: str, *, precision: str | None = None) -> torch.Tensor:
        """(N, C) scores of model-input tensors, in passes, without gradients."""
        precision = precision or self._precision
        outputs = []
        with torch.inference_mode():
            for start in range(0, inputs.shape[0], self.per_pass()):
                # channels-last input: 10% faster per image at passes of 5 on the default model, 35% at 16
                chunk = inputs[start : start + self.per_pass()].contiguous(memory_format=torch.channels_last)
                if precision == "bf16":
                    with torch.autocast(chunk.device.type, dtype=torch.bfloat16):
                        logits = self.model.module(chunk).float()
                else:
                    logits = self.model.module(chunk)
                outputs.append(self.model.probabilities(logits) if kind == "probability" else logits)
        return torch.cat(outputs)

    @property
    def _call(self) -> threading.local:
        """State of the call in progress, per thread: one method object may serve several threads."""
        return self.__dict__.setdefault("_call_state", threading.local())

    @property
    def _precision(self) -> str:
        return getattr(self._call, "precision", "fp32")

    @_precision.setter
    def _precision(self, value: str) -> None:
        self._call.precision = value

    def base_scores(self, batch: torch.Tensor, kind: str) -> torch.Tensor:
        """Unperturbed scores image by image, so an image's map does not depend on its batch mates
        (a batch of N changes the convolution's summation order, and score drops are small differences).

        With ``precision="bf16"`` (about 2x faster on CPUs with bf16 instructions) the unperturbed images
        are also scored in bf16 and compared with fp32: if any class probability moves by more than
        ``BF16_TOLERANCE`` the call falls back to fp32 with a warning. The fp32 scores are the reference
        either way."""
        precision = str(self.config.get("precision", "fp32"))
        if precision not in ("fp32", "bf16"):
            raise MethodError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
        reference = torch.cat([self.scores(batch[b : b + 1], kind, precision="fp32") for b in range(batch.shape[0])])
        self._precision = "fp32"
        if precision == "bf16":
            reduced = torch.cat(
                [self.scores(batch[b : b + 1], "probability", precision="bf16") for b in range(batch.shape[0])]
            )
            exact = reference if kind == "probability" else self.model.probabilities(reference)
            gap = float((reduced - exact).abs().max())
            if gap > self.BF16_TOLERANCE:
                import warnings

                from ..errors import CnnscopeWarning

                warnings.warn(
                    f"{self.name}: bf16 moves a class probability by {gap:.3f} on these images "
                    f"(more than {self.BF16_TOLERANCE}); using fp32",
                    CnnscopeWarning,
                    stacklevel=4,
                )
            else:
                self._precision = "bf16"
        return reference

    def _precision_used(self, rows: torch.Tensor) -> dict:
        return {"precision": [self._precision] * rows.shape[0]}

    def finish(
        self, maps: torch.Tensor, base: torch.Tensor, kind: str, targets: torch.Tensor, forwards: int, **extra
    ) -> Computed:
        """Zero the maps of padded targets and pack the result with the precision that was used."""
        maps = torch.where((targets >= 0)[:, :, None, None], maps, torch.zeros_like(maps))
        return Computed(
            raw=maps,
            logits=_as_logits(base, kind),
            targets=targets,
            forwards=forwards,
            extra={**extra, **self._precision_used(targets)},
        )

    def pixels(self, batch: torch.Tensor) -> torch.Tensor:
        """Model input -> [0, 1] RGB (the inverse of the normalization)."""
        return self.model.preprocess.unnormalize(batch)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.preprocess.normalize(pixels)

    def fill_for(self, image: torch.Tensor, fill: str, generator: torch.Generator) -> torch.Tensor:
        """What an occluded pixel becomes, in model-input space, for one (1, 3, H, W) image."""
        pixels = self.pixels(image)
        if fill == "grey":
            return self.normalize(torch.full_like(pixels, 0.5))
        if fill == "mean":
            return self.normalize(pixels.mean(dim=(2, 3), keepdim=True).expand_as(pixels))
        if fill == "blur":
            return gaussian_blur(image, max(1.0, image.shape[-1] / 32))
        if fill == "zero":
            return torch.zeros_like(image)
        if fill == "noise":
            return self.normalize(torch.rand(pixels.shape, generator=generator).to(pixels))
        raise MethodError(f"unknown fill {fill!r}; choose one of {', '.join(FILLS)}")


@register_method("occlusion")
class Occlusion(PerturbationMethod):
    """Occlusion sensitivity (Zeiler & Fergus 2014; MATLAB's ``occlusionSensitivity``): slide a
    ``window`` x ``window`` patch with ``stride`` over the image, fill it (``fill``: grey, mean colour,
    blur, zero in model-input space as Captum's default baseline, or seeded noise) and record how much
    the target's score drops (``score``: probability or logit). Each pixel gets the average drop over
    the patches covering it, so the map is at the input's resolution. ``stats["winners"]`` holds, per
    image, the (rows, columns) grid of the class that wins when each patch is occluded.
    With ``fill="zero"`` and ``score="logit"`` it is Captum's ``Occlusion`` (baselines 0)."""

    summary = "score drop when a sliding patch is occluded (Zeiler & Fergus 2014)"
    options: ClassVar[dict[str, object]] = {
        **PerturbationMethod.options,
        "window": 32,
        "stride": 16,
        "fill": "grey",
        "score": "probability",
        "seed": 0,
    }

    def compute(self, batch: torch.Tensor, resolve) -> Computed:
        window, stride = int(self.config["window"]), int(self.config["stride"])
        kind = str(self.config["score"])
        if kind not in ("probability", "logit"):
            raise MethodError("score must be 'probability' or 'logit'")
        height, width = batch.shape[-2:]
        if not (1 <= window <= min(height, width)) or stride < 1:
            raise MethodError(f"window must be 1 to {min(height, width)} pixels and stride at least 1")
        ys = _positions(height, window, stride)
        xs = _positions(width, window, stride)
        base = self.base_scores(batch, kind)
        targets = resolve(self.model.probabilities(base) if kind == "logit" else base)
        progress = Progress(
            batch.shape[0] * len(ys) * len(xs),
            "occlusion",
            quiet=bool(self.config["quiet"]),
            max_seconds=self.config["max_seconds"],
        )
        maps = torch.zeros((batch.shape[0], targets.shape[1], height, width), device=batch.device)
        counts = torch.zeros((height, width), device=batch.device)
        winners, forwards, stopped = [], batch.shape[0], False
        positions = [(y, x) for y in ys for x in xs]
        for y, x in positions:
            counts[y : y + window, x : x + window] += 1
        generator = torch.Generator().manual_seed(int(self.config["seed"]))
        for b in range(batch.shape[0]):
            image = batch[b : b + 1]
            fill = self.fill_for(image, str(self.config["fill"]), generator)
            safe = targets[b].clamp_min(0)
            winner = torch.full((len(ys), len(xs)), -1, dtype=torch.long)
            per = self.per_pass()
            for start in range(0, len(positions), per):
                chunk = positions[start : start + per]
                occluded = image.repeat(len(chunk), 1, 1, 1)
                for row, (y, x) in enumerate(chunk):
                    occluded[row, :, y : y + window, x : x + window] = fill[0, :, y : y + window, x : x + window]
                scores = self.scores(occluded, kind)
                forwards += math.ceil(len(chunk) / per)
                drops = base[b, safe] - scores[:, safe]  # (n, K)
                for row, (y, x) in enumerate(chunk):
                    maps[b, :, y : y + window, x : x + window] += drops[row][:, None, None]
                    winner[ys.index(y), xs.index(x)] = int(scores[row].argmax())
                progress.update(len(chunk))
                if progress.should_stop():
                    stopped = True
                    break
            winners.append(winner.tolist())
            if stopped:
                break
        progress.close()
        maps = maps / counts.clamp_min(1)
        return self.finish(
            maps, base, kind, targets, forwards, winners=winners, stopped_early=[stopped] * batch.shape[0]
        )

    def is_signed(self) -> bool:
        return True


def _positions(size: int, window: int, stride: int) -> list[int]:
    """Patch starts covering the whole side (a last patch flush with the edge if the stride misses it)."""
    starts = list(range(0, size - window + 1, stride))
    if starts[-1] != size - window:
        starts.append(size - window)
    return starts


def _as_logits(scores: torch.Tensor, kind: str) -> torch.Tensor:
    """Scores in logit form for the Explanation (probabilities -> log, which softmax inverts)."""
    return scores if kind == "logit" else scores.clamp_min(1e-12).log()


@register_method("rise")
class RISE(PerturbationMethod):
    """RISE (Petsiuk et al. 2018): ``masks`` random binary ``cells`` x ``cells`` grids (each cell kept
    with probability ``keep``), upsampled bilinearly to (cells + 1) cell sizes and cropped at a random
    shift, multiply the image (in pixels, so removed parts go black); the map is the mask average
    weighted by the target's probability: S = 1 / (N keep) sum_i p(x * M_i) M_i. Seeded."""

    summary = "randomized input sampling: probability-weighted random masks (Petsiuk et al. 2018)"
    options: ClassVar[dict[str, object]] = {
        **PerturbationMethod.options,
        "masks": 4000,
        "cells": 7,
        "keep": 0.5,
        "seed": 0,
    }

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

    def compute(self, batch: torch.Tensor, resolve) -> Computed:
        count = int(self.config["masks"])
        if count < 1 or not 0 < float(self.config["keep"]) <= 1 or int(self.config["cells"]) < 1:
            raise MethodError("rise needs masks >= 1, cells >= 1 and 0 < keep <= 1")
        height, width = batch.shape[-2:]
        base = self.base_scores(batch, "probability")
        targets = resolve(base)
        maps = torch.zeros((batch.shape[0], targets.shape[1], height, width), device=batch.device)
        progress = Progress(
            batch.shape[0] * count, "rise", quiet=bool(self.config["quiet"]), max_seconds=self.config["max_seconds"]
        )
        forwards, used, stopped = batch.shape[0], [0] * batch.shape[0], False
        per = self.per_pass()
        for b in range(batch.shape[0]):
            pixels = self.pixels(batch[b : b + 1])
            safe = targets[b].clamp_min(0)
            local = torch.Generator().manual_seed(int(self.config["seed"]))  # same masks alone or in a batch
            for start in range(0, count, per):
                masks = self.masks_for(min(per, count - start), height, width, local).to(batch.device)
                scores = self.scores(self.normalize(pixels * masks), "probability")[:, safe]  # (n, K)
                forwards += 1
                maps[b] += torch.einsum("nk,nhw->khw", scores, masks[:, 0])
                used[b] += masks.shape[0]
                progress.update(masks.shape[0])
                if progress.should_stop():
                    stopped = True
                    break
            if stopped:
                break
        progress.close()
        scale = torch.tensor([max(1, u) for u in used], dtype=maps.dtype, device=maps.device).view(-1, 1, 1, 1)
        maps = maps / (scale * float(self.config["keep"]))
        return self.finish(
            maps, base, "probability", targets, forwards, masks_used=used, stopped_early=[stopped] * batch.shape[0]
        )


SEGMENTATIONS = ("slic", "quickshift", "felzenszwalb")


def superpixels(pixels: np.ndarray, how: str, segments: int, options: dict) -> np.ndarray:
    """(H, W) labels 0..S-1 of scikit-image superpixels on an (H, W, 3) [0, 1] image."""
    from skimage import segmentation

    if how == "slic":
        labels = segmentation.slic(pixels, n_segments=segments, start_label=0, **{"compactness": 10, **options})
    elif how == "quickshift":
        labels = segmentation.quickshift(pixels, **{"kernel_size": 4, "max_dist": 200, "ratio": 0.2, **options})
    elif how == "felzenszwalb":
        labels = segmentation.felzenszwalb(pixels, **{"scale": 100, "sigma": 0.5, "min_size": 50, **options})
    else:
        raise MethodError(f"unknown segmentation {how!r}; choose one of {', '.join(SEGMENTATIONS)}")
    _, dense = np.unique(labels, return_inverse=True)
    return dense.reshape(labels.shape)


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
    options: ClassVar[dict[str, object]] = {
        **PerturbationMethod.options,
        "samples": 1000,
        "segmentation": "slic",
        "segments": 50,
        "segmentation_options": None,
        "fill": "mean",
        "kernel_width": 0.25,
        "alpha": 1.0,
        "seed": 0,
        "converge": False,
        "min_samples": 300,
        "top": 5,
        "sampling": "paired",
        "feature_mask": None,
    }
    file_options: ClassVar[tuple[str, ...]] = ("feature_mask",)

    def is_signed(self) -> bool:
        return True

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

    def compute(self, batch: torch.Tensor, resolve) -> Computed:
        base = self.base_scores(batch, "probability")
        targets = resolve(base)
        height, width = batch.shape[-2:]
        maps = torch.zeros((batch.shape[0], targets.shape[1], height, width), device=batch.device)
        extra = {
            "r2": [],
            "top_positive": [],
            "top_negative": [],
            "samples_used": [],
            "stopped_early": [],
        }
        forwards = batch.shape[0]
        progress = Progress(
            batch.shape[0] * int(self.config["samples"]),
            "lime",
            quiet=bool(self.config["quiet"]),
            max_seconds=self.config["max_seconds"],
        )
        for b in range(batch.shape[0]):
            pixels = self.pixels(batch[b : b + 1])[0].permute(1, 2, 0).cpu().numpy().astype(np.float64)
            labels, ids = self._regions(pixels, b, batch.shape[0])
            coefficients, r2, used, passes, stopped = self._explain_one(batch[b : b + 1], labels, targets[b], progress)
            forwards += passes
            maps[b] = torch.from_numpy(coefficients.T[:, labels]).float().to(batch.device)
            top = int(self.config["top"])
            extra["r2"].append([float(v) for v in r2])
            extra["top_positive"].append(
                [ids[np.argsort(-coefficients[:, k])[:top]].tolist() for k in range(coefficients.shape[1])]
            )
            extra["top_negative"].append(
                [ids[np.argsort(coefficients[:, k])[:top]].tolist() for k in range(coefficients.shape[1])]
            )
            extra["samples_used"].append(used)
            extra["stopped_early"].append(stopped)
        progress.close()
        return self.finish(maps, base, "probability", targets, forwards, **extra)

    def _explain_one(self, image: torch.Tensor, labels: np.ndarray, targets: torch.Tensor, progress: Progress):
        count = int(labels.max()) + 1
        label_tensor = torch.from_numpy(labels).to(image.device)
        if self.config["fill"] == "mean":
            sums = torch.zeros((count, 3), dtype=image.dtype, device=image.device)
            sums.index_add_(0, label_tensor.flatten(), image[0].flatten(1).T)
            sizes = torch.bincount(label_tensor.flatten(), minlength=count).clamp_min(1)
            fill = (sums / sizes[:, None])[label_tensor].permute(2, 0, 1).unsqueeze(0)
        else:
            fill = self.fill_for(
                image, str(self.config["fill"]), torch.Generator().manual_seed(int(self.config["seed"]))
            )
        generator = np.random.default_rng(int(self.config["seed"]))
        total = int(self.config["samples"])
        if self.config["sampling"] not in ("paired", "independent"):
            raise MethodError(f"sampling must be 'paired' or 'independent', got {self.config['sampling']!r}")
        if self.config["sampling"] == "paired":
            # each random on/off pattern is followed by its complement (antithetic sampling)
            half = generator.integers(0, 2, size=(-(-total // 2), count)).astype(np.float64)
            half[0] = 1.0  # the image itself, paired with everything filled
            switches = np.stack([half, 1.0 - half], axis=1).reshape(-1, count)[:total]
        else:
            switches = generator.integers(0, 2, size=(total, count)).astype(np.float64)
            switches[0] = 1.0  # the first sample is the image itself, as in the lime package
        safe = targets.clamp_min(0)
        scores = np.zeros((total, len(safe)))
        per = self.per_pass()
        used, passes, stopped = 0, 0, False
        coefficients = np.zeros((count, len(safe)))
        r2 = np.zeros(len(safe))
        while used < total:
            chunk = switches[used : used + max(per, 50)]
            on = torch.from_numpy(chunk).float().to(image.device)[:, label_tensor]  # (n, H, W)
            perturbed = torch.where(on[:, None] > 0, image, fill)
            scores[used : used + len(chunk)] = self.scores(perturbed, "probability")[:, safe].cpu().numpy()
            passes += -(-len(chunk) // per)
            used += len(chunk)
            progress.update(len(chunk))
            if self.config["converge"] and used >= int(self.config["min_samples"]):
                coefficients, r2, errors = self._fit(switches[:used], scores[:used])
                if self._top_is_settled(coefficients, errors):
                    break
            if progress.should_stop():
                stopped = True
                break
        if not self.config["converge"] or used >= total or stopped:
            coefficients, r2, _ = self._fit(switches[:used], scores[:used])
        return coefficients, r2, used, passes, stopped

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
    options: ClassVar[dict[str, object]] = {**PerturbationMethod.options, "grid": 4, "overlap": 0.0}

    def compute(self, batch: torch.Tensor, resolve) -> Computed:
        grid, overlap = int(self.config["grid"]), float(self.config["overlap"])
        if grid < 1 or not 0 <= overlap < 1:
            raise MethodError("patches needs grid >= 1 and 0 <= overlap < 1")
        height, width = batch.shape[-2:]
        patch_h, patch_w = math.ceil(height / grid), math.ceil(width / grid)
        step_h = max(1, round(patch_h * (1 - overlap)))
        step_w = max(1, round(patch_w * (1 - overlap)))
        ys, xs = _positions(height, patch_h, step_h), _positions(width, patch_w, step_w)
        base = self.base_scores(batch, "probability")
        targets = resolve(base)
        maps = torch.zeros((batch.shape[0], targets.shape[1], height, width), device=batch.device)
        counts = torch.zeros((height, width), device=batch.device)
        for y in ys:
            for x in xs:
                counts[y : y + patch_h, x : x + patch_w] += 1
        grids, forwards = [], batch.shape[0]
        for b in range(batch.shape[0]):
            crops = torch.cat(
                [
                    F.interpolate(
                        batch[b : b + 1, :, y : y + patch_h, x : x + patch_w],
                        size=(height, width),
                        mode="bilinear",
                        align_corners=False,
                    )
                    for y in ys
                    for x in xs
                ]
            )
            scores = self.scores(crops, "probability")[:, targets[b].clamp_min(0)]  # (patches, K)
            forwards += math.ceil(crops.shape[0] / self.per_pass())
            for index, (y, x) in enumerate((y, x) for y in ys for x in xs):
                maps[b, :, y : y + patch_h, x : x + patch_w] += scores[index][:, None, None]
            grids.append(scores[:, 0].view(len(ys), len(xs)).tolist())
        maps = maps / counts.clamp_min(1)
        return self.finish(maps, base, "probability", targets, forwards, patch_scores=grids)
