"""Faithfulness checks of a saliency map against the model it explains.

- ``deletion_curve`` / ``insertion_curve`` (Petsiuk et al. 2018): remove (or insert, into a blurred
  copy) the pixels in order of saliency and follow the target's probability; a faithful map makes it
  fall fast (low deletion AUC) and rise fast (high insertion AUC).
- ``remove_evidence``: grey out, blur or crop away the top fraction of the map, then re-classify (the
  bear-in-the-corner check: if the prediction survives, the map did not show the evidence).
- ``keep_evidence``: crop to the strongest region, resize to the model input, re-classify: how much
  confidence the evidence alone keeps, and the crop's top-5.

Maps are (H, W) at the model input's resolution (``Explanation.maps[i, k]``); images are one
preprocessed (1, 3, H, W) tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError
from ..models import Model, Prediction
from ..models.labels import short_name
from ..state import preserved


@dataclass(frozen=True)
class Curve:
    """Scores after removing/inserting ``fractions`` of the pixels; ``auc`` by the trapezoid rule."""

    kind: str
    fractions: list[float]
    scores: list[float]
    auc: float


def _check(model: Model, image: torch.Tensor, saliency: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if image.ndim == 3:
        image = image.unsqueeze(0)
    if image.ndim != 4 or image.shape[0] != 1:
        raise InputError(f"give one preprocessed image (1, 3, H, W), got shape {tuple(image.shape)}")
    saliency = torch.as_tensor(saliency, dtype=torch.float32)
    if saliency.shape != image.shape[-2:]:
        raise InputError(
            f"the map is {tuple(saliency.shape)} but the image is {tuple(image.shape[-2:])}; "
            "use Explanation.maps (model-input resolution)"
        )
    return image.detach(), saliency.to(image.device)


def _outputs(model: Model, batch: torch.Tensor, per_pass: int = 8) -> torch.Tensor:
    """The model's raw outputs (logits, or probabilities for a model that outputs them)."""
    out = []
    with preserved(model.module), torch.inference_mode():
        for start in range(0, batch.shape[0], per_pass):
            chunk = batch[start : start + per_pass].contiguous(memory_format=torch.channels_last)
            out.append(model(chunk))
    return torch.cat(out)


def _probabilities(model: Model, batch: torch.Tensor, per_pass: int = 8) -> torch.Tensor:
    """The model's own probabilities (softmax, multi-label sigmoid, or its outputs as they are)."""
    return model.probabilities(_outputs(model, batch, per_pass))


def _blurred(image: torch.Tensor) -> torch.Tensor:
    from ..methods.gradient import gaussian_blur

    return gaussian_blur(image, max(1.0, image.shape[-1] / 16))


def _curve(
    kind: str,
    model: Model,
    image: torch.Tensor,
    saliency: torch.Tensor,
    target: int,
    steps: int,
    start_from: torch.Tensor,
    end_at: torch.Tensor,
) -> Curve:
    if steps < 2:
        raise InputError("a curve needs at least 2 steps")
    order = torch.argsort(saliency.flatten(), descending=True, stable=True)
    total = order.numel()
    fractions = [i / (steps - 1) for i in range(steps)]
    frames = []
    for fraction in fractions:
        chosen = torch.zeros(total, dtype=torch.bool, device=image.device)
        chosen[order[: round(fraction * total)]] = True
        mask = chosen.view(1, 1, *saliency.shape)
        frames.append(torch.where(mask, end_at, start_from))
    scores = _probabilities(model, torch.cat(frames))[:, target].tolist()
    auc = float(np.trapezoid(scores, fractions)) if hasattr(np, "trapezoid") else float(np.trapz(scores, fractions))
    return Curve(kind, fractions, scores, auc)


def deletion_curve(
    model: Model, image: torch.Tensor, saliency, target: int, *, steps: int = 50, baseline: str = "black"
) -> Curve:
    """Probability of ``target`` as the most salient pixels are replaced by ``baseline`` (black or blur)."""
    image, saliency = _check(model, image, saliency)
    fill = _blurred(image) if baseline == "blur" else _fill(model, image, baseline)
    return _curve("deletion", model, image, saliency, target, steps, image, fill)


def insertion_curve(model: Model, image: torch.Tensor, saliency, target: int, *, steps: int = 50) -> Curve:
    """Probability of ``target`` as the most salient pixels are put back into a blurred copy."""
    image, saliency = _check(model, image, saliency)
    return _curve("insertion", model, image, saliency, target, steps, _blurred(image), image)


def _fill(model: Model, image: torch.Tensor, how: str) -> torch.Tensor:
    if how == "black":
        return model.preprocess.normalize(torch.zeros_like(image)).expand_as(image)
    if how == "grey":
        return model.preprocess.normalize(torch.full_like(image, 0.5)).expand_as(image)
    if how == "blur":
        return _blurred(image)
    raise InputError(f"unknown fill {how!r}; choose 'grey', 'black' or 'blur'")


def _top(model: Model, outputs: torch.Tensor, k: int = 5) -> list[Prediction]:
    return model.top_predictions(outputs, k)[0]


def remove_evidence(
    model: Model, image: torch.Tensor, saliency, target: int, *, fraction: float = 0.1, fill: str = "grey"
) -> dict:
    """Remove the top ``fraction`` of the map's pixels (``fill``: grey, black, blur) and re-classify."""
    image, saliency = _check(model, image, saliency)
    if not 0 < fraction < 1:
        raise InputError(f"fraction must be between 0 and 1, got {fraction}")
    threshold = torch.quantile(saliency.flatten().float(), 1 - fraction)
    mask = (saliency >= threshold).view(1, 1, *saliency.shape)
    removed = torch.where(mask, _fill(model, image, fill), image)
    outputs = _outputs(model, torch.cat([image, removed]))
    before, after = model.probabilities(outputs)
    top = _top(model, outputs[1:])
    return {
        "fraction": fraction,
        "fill": fill,
        "target": target,
        "probability_before": float(before[target]),
        "probability_after": float(after[target]),
        "prediction_after": {
            "class_index": top[0].index,
            "class_name": short_name(top[0].label),
            "probability": top[0].probability,
        },
        "still_predicted": top[0].index == target,
    }


def keep_evidence(model: Model, image: torch.Tensor, saliency, target: int, *, fraction: float = 0.2) -> dict:
    """Crop to the bounding box of the top ``fraction`` of the map, resize to the input, re-classify."""
    image, saliency = _check(model, image, saliency)
    threshold = torch.quantile(saliency.flatten().float(), 1 - fraction)
    ys, xs = torch.nonzero(saliency >= threshold, as_tuple=True)
    top_y, bottom_y, left_x, right_x = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    crop = image[:, :, top_y:bottom_y, left_x:right_x]
    resized = F.interpolate(crop, size=image.shape[-2:], mode="bilinear", align_corners=False)
    outputs = _outputs(model, torch.cat([image, resized]))
    before, after = model.probabilities(outputs)
    return {
        "fraction": fraction,
        "box": [left_x, top_y, right_x, bottom_y],
        "target": target,
        "probability_before": float(before[target]),
        "probability_kept": float(after[target]),
        "confidence_kept": float(after[target] / before[target]) if before[target] > 0 else float("nan"),
        "crop_top5": [
            {"class_index": p.index, "class_name": short_name(p.label), "probability": p.probability}
            for p in _top(model, outputs[1:])
        ],
    }
