"""Deep Dream (Mordvintsev, Olah and Tyka 2015; MATLAB's deepDreamImage): amplify what chosen channels
of a layer already see in a photo, over an image pyramid.

Per octave, from the smallest: the photo at that size plus the detail dreamed so far (upsampled),
then ``iterations`` steps of normalized gradient ascent, ``image += step * g / mean(|g|)``, each on a
randomly rolled copy (the roll drawn from a seeded generator). The dreamed detail is what the steps
added; it is carried to the next, larger octave. Each channel gets its own image (a plate like
deepDreamImage's), all in one batch; ``together=True`` dreams one image for all chosen channels.
The forward stops at the layer: the head never runs, so any image size works.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError, MethodError, ModelError
from ..hooks import capture, forward_until
from ..io import load_image
from ..methods.base import auto_images_per_pass
from ..models import Model, load_model
from ..models.folding import fold_batchnorm
from ..progress import Progress
from ..render.figure import FigureResult
from ..render.plates import batch_to_uint8
from ..state import preserved
from .objectives import channel, evaluate_each, layer_activation, middle_layer


@dataclass
class Dream(FigureResult):
    """The result of :func:`deep_dream`: one dreamed image per channel (or one for all)."""

    images: np.ndarray  # (K, H, W, 3) uint8 at the photo's size
    channels: list[list[int]]  # the channels each image amplifies ([] = the whole layer)
    layer: str
    before: list[float]  # each image's objective on the photo
    after: list[float]  # ... and on the dreamed image (at the working size)
    original: np.ndarray
    options: dict
    stats: dict = field(default_factory=dict)

    def captions(self) -> list[str]:
        return [
            f"ch {_channel_text(chs)}: {before:.2f} -> {after:.2f}"
            for chs, before, after in zip(self.channels, self.before, self.after, strict=True)
        ]

    def figure(self, columns: int | None = None):
        from ..render.plates import plate_figure

        return plate_figure(list(self.images), self.captions(), columns=columns, title=f"Deep Dream: {self.layer}")


def _channel_text(channels: list[int]) -> str:
    if not channels:
        return "all"
    if len(channels) > 3:
        return f"{channels[0]}..{channels[-1]} ({len(channels)})"
    return ",".join(str(c) for c in channels)


def parse_channels(text: str | Sequence[int] | None) -> list[int] | None:
    """``"0-24"``, ``"3,5,7"``, ``"0-3,10"`` or a list -> channel indices; None stays None (all)."""
    if text is None:
        return None
    if not isinstance(text, str):
        return [int(c) for c in text]
    chosen: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        first, dash, last = part.partition("-")
        numbers = [first.strip(), last.strip()] if dash else [part]
        if not all(number.isdigit() for number in numbers):
            raise InputError(f"channels must look like 0-24 or 3,5,7; got {text!r}")
        low, high = int(numbers[0]), int(numbers[-1])
        if high < low:
            raise InputError(f"channel range {part!r} runs backwards; write {high}-{low}")
        chosen.extend(range(low, high + 1))
    if not chosen:
        raise InputError(f"no channels in {text!r}")
    return chosen


def _working_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    scale = short_side / min(height, width)
    return max(8, round(height * scale)), max(8, round(width * scale))


def deep_dream(
    model: Model | str | torch.nn.Module,
    image: object,
    layer: str | None = None,
    channels: Sequence[int] | str | None = "0-24",
    *,
    together: bool = False,
    octaves: int = 4,
    octave_scale: float = 1.4,
    iterations: int = 10,
    step: float = 0.01,
    jitter: int = 16,
    size: int | None = None,
    seed: int = 0,
    fold_bn: bool = True,
    images_per_pass: int | None = None,
    quiet: bool = False,
) -> Dream:
    """Dream ``image`` (a path, array or PIL image) at ``layer`` (default: the middle spatial layer).

    Args:
        channels: the channels to amplify, one image each (``"0-24"``: a 5x5 plate); None: the whole
            layer (its mean squared activation, the original Deep Dream objective), one image.
        together: one image amplifying all ``channels`` at once.
        octaves, octave_scale: the pyramid (4 sizes, each 1.4x the previous).
        iterations, step: ascent steps per octave and the step in [0, 1] pixel units per mean gradient.
        jitter: largest random roll in pixels at each step.
        size: the shorter side of the full-size octave (default: the model's input height); the
            result is resized back to the photo's size.
        fold_bn: dream on a copy of the model with its BatchNorms folded into the convolutions before
            them (the same function, checked; faster), as :func:`cnnscope.maximize` does.
    """
    model = load_model(model)
    photo = load_image(image)
    if octaves < 1 or iterations < 0 or step <= 0 or octave_scale <= 1.0 or jitter < 0:
        raise InputError("need octaves >= 1, iterations >= 0, step > 0, octave_scale > 1 and jitter >= 0")
    ref = model.layer(layer) if layer is not None else middle_layer(model)
    chosen = parse_channels(channels)
    if chosen is None:
        groups: list[list[int]] = [[]]
        objectives = [layer_activation(ref.key, power=2)]
    elif together:
        groups = [chosen]
        objectives = [layer_activation(ref.key, chosen, power=1)]
    else:
        groups = [[c] for c in chosen]
        objectives = [channel(ref.key, c) for c in chosen]
    bound = [objective.bind(model) for objective in objectives]
    per_pass = images_per_pass or auto_images_per_pass(model)
    short = size or min(model.preprocess.size)
    full = _working_size(photo.shape[0], photo.shape[1], short)
    sizes = [
        (max(8, round(full[0] / octave_scale**k)), max(8, round(full[1] / octave_scale**k)))
        for k in reversed(range(octaves))
    ]
    base = torch.from_numpy(photo).permute(2, 0, 1)[None].float().div(255.0).to(model.device)
    # the photo at each octave's size, smallest first (the last is the full working size)
    pyramid = [F.interpolate(base, size=s, mode="bilinear", align_corners=False, antialias=True) for s in sizes]
    generator = torch.Generator().manual_seed(int(seed))
    progress = Progress(len(bound) * octaves * iterations, "dream", quiet=quiet)
    started = time.perf_counter()
    results, before, after = [], [], []

    def objective_values(images: torch.Tensor, rows: list, record) -> torch.Tensor:
        x = model.preprocess.normalize(images).contiguous(memory_format=torch.channels_last)
        try:
            forward_until(working.module, x)
        except Exception as exc:
            raise ModelError(
                f"the model failed on a {x.shape[-2]}x{x.shape[-1]} input ({type(exc).__name__}: {exc}); Deep "
                "Dream runs the photo at several sizes, which models with a fixed input size (vision transformers) "
                "cannot take: use a convolutional model"
            ) from exc
        acts = record.activations[ref.key]
        if not acts.requires_grad and torch.is_grad_enabled():
            raise MethodError(
                f"layer {ref.key!r} carries no gradients (a black-box function, or a forward under no_grad); "
                "Deep Dream needs a differentiable PyTorch model"
            )
        return evaluate_each(rows, {ref.key: acts}, None)

    def dream_passes(bound: list, record) -> None:
        """Every pass of images through the octaves, appending to results, before and after."""
        for start in range(0, len(bound), per_pass):
            rows = bound[start : start + per_pass]
            count = len(rows)
            with torch.no_grad():
                before.extend(objective_values(pyramid[-1].expand(count, -1, -1, -1), rows, record).tolist())
            detail = torch.zeros(count, 3, *sizes[0], device=model.device)
            for octave_size, shrunk in zip(sizes, pyramid, strict=True):
                detail = F.interpolate(detail, size=octave_size, mode="bilinear", align_corners=False)
                dreamed = (shrunk + detail).clamp(0, 1)
                for _ in range(iterations):
                    shift = torch.randint(-jitter, jitter + 1, (2,), generator=generator).tolist()
                    rolled = dreamed.roll(shifts=shift, dims=(2, 3)).detach().requires_grad_(True)
                    values = objective_values(rolled, rows, record)
                    (grad,) = torch.autograd.grad(values.sum(), rolled)
                    grad = grad.roll(shifts=[-shift[0], -shift[1]], dims=(2, 3))
                    scale = grad.abs().mean(dim=(1, 2, 3), keepdim=True).clamp(min=1e-12)
                    dreamed = (dreamed + step * grad / scale).clamp(0, 1).detach()
                    progress.update(count)
                detail = dreamed - shrunk
            with torch.no_grad():
                after.extend(objective_values(dreamed, rows, record).tolist())
            results.append(dreamed.detach())

    working, folded = model, 0  # the model the helpers above run: the folded copy once it is made
    try:
        with preserved(model.module, freeze=True), torch.inference_mode(False), torch.enable_grad():
            if fold_bn:
                working, folded = fold_batchnorm(model, [ref])
            if folded:
                bound = [objective.bind(working) for objective in objectives]
            with capture(working.module, [working.layer(ref.key)], stop=True) as record:
                dream_passes(bound, record)
    finally:
        progress.close()
    dreamed_all = torch.cat(results)
    back = F.interpolate(dreamed_all, size=photo.shape[:2], mode="bilinear", align_corners=False)
    pixels = batch_to_uint8(back)
    return Dream(
        images=pixels,
        channels=groups,
        layer=ref.key,
        before=before,
        after=after,
        original=photo,
        options={
            "octaves": octaves,
            "octave_scale": octave_scale,
            "iterations": iterations,
            "step": step,
            "jitter": jitter,
            "size": list(full),
            "seed": seed,
            "together": together,
        },
        stats={"seconds": time.perf_counter() - started, "images_per_pass": per_pass, "batchnorm_folded": folded},
    )
