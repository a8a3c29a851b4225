"""The one place where target classes are parsed: every spelling becomes a (batch, k) index tensor.

Accepted ``target`` values (one spelling per call):

- ``None`` or ``"top1"``, ``"top5"``, ``"topK"``: the K highest-scoring classes of each image;
- an int or a digit string (``285``, ``"285"``), or a class name (``"Egyptian cat"``, any of its
  comma-separated synonyms, case-insensitive): the same class for every image;
- a list of those: several classes for every image;
- a list with one list per image: different classes per image (lists may differ in length);
- ``"positive"`` for multi-label models: every class whose sigmoid score passes ``threshold``.

Where images get different numbers of targets, the rows are padded with -1 (no target).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from functools import lru_cache

import torch

from ._registry import did_you_mean
from .errors import TargetError

NO_TARGET = -1
_TOP = re.compile(r"^top\s*(\d+)$", re.IGNORECASE)


def resolve_targets(
    target: object,
    logits: torch.Tensor,
    labels: Sequence[str],
    *,
    multilabel: bool = False,
    threshold: float = 0.5,
    probabilities: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """(B, K) long tensor of class indices (-1 where an image has fewer targets than K).

    ``logits`` are the model's raw outputs for the unperturbed images; ``probabilities`` turns them
    into the model's own probabilities (softmax, multi-label sigmoid, or the outputs themselves for a
    model that outputs probabilities) for the ``"positive"`` threshold (default: sigmoid)."""
    batch, classes = logits.shape
    if target is None:
        target = "top1"
    if isinstance(target, torch.Tensor):
        target = target.tolist()
    if isinstance(target, str):
        spec = target.strip()
        match = _TOP.match(spec)
        if match:
            k = int(match.group(1))
            if not 1 <= k <= classes:
                raise TargetError(f"target {spec!r}: K must be between 1 and {classes}, the number of classes")
            return logits.detach().topk(k, dim=1).indices
        if spec.lower() in ("positive", "positives"):
            if not multilabel:
                raise TargetError(
                    "target 'positive' is for multi-label models; this model is single-label "
                    "(load it with multilabel=True, or use 'top1')"
                )
            scores = probabilities(logits.detach()) if probabilities is not None else torch.sigmoid(logits.detach())
            passed = scores >= threshold
            rows = [torch.nonzero(passed[i]).flatten().tolist() for i in range(batch)]
            return _pad(rows, logits.device)  # all -1 where nothing passes; the caller says so
    if _is_per_image(target):
        rows = list(target)  # type: ignore[arg-type]
        if len(rows) != batch:
            raise TargetError(f"{len(rows)} per-image target lists for {batch} images; give one list per image")
        return _pad([[_one(t, labels) for t in _expand(_as_list(row), labels)] for row in rows], logits.device)
    row = [_one(t, labels) for t in _expand(_as_list(target), labels)]
    if not row:
        raise TargetError("the target list is empty; give at least one class, or 'top1'")
    return torch.tensor([row] * batch, dtype=torch.long, device=logits.device)


def parse_target_text(values: str | Sequence[str] | None) -> object:
    """Targets typed as text (the CLI's ``--target``, repeatable, and the web API's ``target`` field):
    parts separated by ``;``; a lone ``topK`` or ``positive`` is kept as that word, anything else is a
    list of class indices or names. A part with commas is split at them unless it is a class label
    itself (``"tabby, tabby cat"``): :func:`resolve_targets` decides, since it knows the labels."""
    if values is None:
        return "top1"
    texts = [values] if isinstance(values, str) else list(values)
    parts = [part.strip() for text in texts for part in str(text).split(";") if part.strip()]
    if not parts:
        return "top1"
    if len(parts) == 1 and (_TOP.match(parts[0]) or parts[0].lower() in ("positive", "positives")):
        return parts[0]
    return parts


def _expand(items: list, labels: Sequence[str]) -> list:
    """Split text items at commas (``"281, 285"``) unless the whole text names a class."""
    expanded: list = []
    for item in items:
        if isinstance(item, str) and "," in item and " ".join(item.lower().split()) not in _name_table(tuple(labels)):
            expanded.extend(part.strip() for part in item.split(",") if part.strip())
        else:
            expanded.append(item)
    return expanded


def slice_per_image(target: object, start: int, stop: int, total: int) -> object:
    """The part of ``target`` for images start..stop of a batch of ``total`` (per-image lists are cut)."""
    if _is_per_image(target):
        rows = list(target)  # type: ignore[arg-type]
        if len(rows) != total:
            raise TargetError(f"{len(rows)} per-image target lists for {total} images; give one list per image")
        return rows[start:stop]
    return target


def _as_list(value: object) -> list:
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def _is_per_image(target: object) -> bool:
    return (
        isinstance(target, (list, tuple))
        and len(target) > 0
        and all(isinstance(item, (list, tuple)) for item in target)
    )


def _pad(rows: list[list[int]], device: torch.device) -> torch.Tensor:
    width = max(1, max(len(r) for r in rows))
    padded = [r + [NO_TARGET] * (width - len(r)) for r in rows]
    return torch.tensor(padded, dtype=torch.long, device=device)


def _one(value: object, labels: Sequence[str]) -> int:
    classes = len(labels)
    if isinstance(value, bool):
        raise TargetError(f"target {value!r} is a bool; give a class index or name")
    if isinstance(value, int):
        index = value
    elif isinstance(value, str) and value.strip().lstrip("-").isdigit():
        index = int(value.strip())
    elif isinstance(value, str):
        return class_index(value, labels)
    else:
        raise TargetError(f"target {value!r} is a {type(value).__name__}; give a class index, name or 'topK'")
    if not 0 <= index < classes:
        raise TargetError(f"class index {index} is out of range; this model has classes 0 to {classes - 1}")
    return index


def class_index(name: str, labels: Sequence[str]) -> int:
    """Index of a class by its label or any comma-separated synonym, case-insensitive."""
    table = _name_table(tuple(labels))
    key = " ".join(name.lower().split())
    found = table.get(key, [])
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        options = ", ".join(f"{i} ({labels[i]})" for i in found)
        raise TargetError(f"class name {name!r} is ambiguous: {options}; give the index")
    hint = did_you_mean(key, list(table), n=3)
    raise TargetError(f"unknown class {name!r}{hint} (cnnscope labels lists the classes)")


@lru_cache(maxsize=8)
def _name_table(labels: tuple[str, ...]) -> dict[str, list[int]]:
    table: dict[str, list[int]] = {}
    for index, label in enumerate(labels):
        names = {" ".join(label.lower().split())}
        names.update(" ".join(part.lower().split()) for part in label.split(",") if part.strip())
        for name in names:
            table.setdefault(name, []).append(index)
    return table
