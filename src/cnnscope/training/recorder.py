"""Record explanations of a fixed set of probe images at every epoch of a training run.

``Recorder(probes, method="gradcam", target="true")`` is called from a plain PyTorch loop as
``recorder.record(model, epoch)`` (epoch 0 before training, then after each epoch), or attached to a
PyTorch Lightning ``Trainer`` as ``recorder.lightning()``. Each record writes one file to the run folder (see
:mod:`cnnscope.training.store`): per probe the map, the target class and its probability, the top-3 classes,
the loss of the probe (cross-entropy of its label) and, where its object mask is known, the share of the map
on the object. Nothing accumulates in memory, so a run of any length costs the same per epoch, and a run
that crashes keeps every epoch recorded before.

A record never changes training. Around it the recorder saves and restores every random state (torch's CPU
generator and, once CUDA is initialised, every CUDA generator; numpy's global generator; Python's
``random``), and the model runs in eval mode (so batch-norm running statistics and their counters do not
move and dropout draws nothing), with each module's ``training`` flag, every ``requires_grad`` flag and every
``.grad`` put back afterwards (the method works with ``torch.autograd.grad``, so no gradient reaches the
parameters). A seeded run gives bit-identical losses and weights with and without the recorder (tested).
"""

from __future__ import annotations

import json
import math
import os
import random
import time
import warnings
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .._registry import METHODS
from ..errors import CnnscopeWarning, InputError, TargetError
from ..io import load_image
from ..models import Model, Preprocess
from ..models.labels import short_name
from ..state import ModelState, model_lock, set_eval
from ..targets import _TOP, class_index
from . import store
from .metrics import focus_share

TOP_K = 3
LIGHTNING_EXTRA = "the Lightning callback needs Lightning: pip install 'cnnscope[lightning]'"


@dataclass(frozen=True)
class Probe:
    """One image to follow through training.

    Args:
        image: a path, an array, a PIL image, or an already preprocessed ``(C, H, W)`` tensor.
        label: its true class (index or name), for ``target="true"`` and the loss.
        mask: where its object is: an ``(H, W)`` bool array of the image's size (for a tensor, of the
            tensor's size), or an image file whose non-black pixels are the object. Gives the focus track.
        name: shown in the movie and used in file names (default: the file's stem, else ``probeN``).
    """

    image: object
    label: int | str | None = None
    mask: object = None
    name: str | None = None


def _as_probes(probes, labels, masks, names) -> list[Probe]:
    """Every accepted form of ``probes`` as a list of :class:`Probe`, with ``labels``, ``masks`` and
    ``names`` (lists, one per probe) filled in."""
    from ..data import ShapesDataset

    if isinstance(probes, ShapesDataset):
        items = [
            Probe(image, int(label), mask, f"{index}-{probes.classes[int(label)]}")
            for index, (image, label, mask) in enumerate(zip(probes.images, probes.labels, probes.masks, strict=True))
        ]
    elif isinstance(probes, torch.Tensor):
        batch = probes.unsqueeze(0) if probes.ndim == 3 else probes
        if batch.ndim != 4:
            raise InputError(f"a probe tensor must be (N, C, H, W) or (C, H, W), got shape {tuple(probes.shape)}")
        items = [Probe(tensor) for tensor in batch]
    elif isinstance(probes, np.ndarray) and probes.ndim == 4:
        items = [Probe(image) for image in probes]
    elif isinstance(probes, (str, os.PathLike, np.ndarray, Probe)):
        items = [probes if isinstance(probes, Probe) else Probe(probes)]
    elif isinstance(probes, (list, tuple)):
        items = [item if isinstance(item, Probe) else Probe(item) for item in probes]
    else:
        raise InputError(
            f"probes must be image paths, arrays or tensors (or Probe objects, or a ShapesDataset), "
            f"not {type(probes).__name__}"
        )
    if not items:
        raise InputError("the recorder needs at least one probe image")
    for given, what in ((labels, "labels"), (masks, "masks"), (names, "names")):
        if given is not None and len(given) != len(items):
            raise InputError(f"{len(given)} {what} for {len(items)} probes; give one per probe")
    stems = [Path(item.image).stem if isinstance(item.image, (str, os.PathLike)) else None for item in items]
    filled = []
    for index, item in enumerate(items):
        label = labels[index] if labels is not None else item.label
        mask = masks[index] if masks is not None else item.mask
        name = names[index] if names is not None else item.name
        if name is None and stems[index] is not None:  # the file's stem, with its folder where stems repeat
            path = Path(item.image)
            name = stems[index] if stems.count(stems[index]) == 1 else f"{path.parent.name}/{path.stem}"
        elif name is None:
            name = f"probe{index}"
        if isinstance(label, (np.integer, torch.Tensor)):
            label = int(label)
        if label is not None and (isinstance(label, bool) or not isinstance(label, (int, str))):
            raise InputError(f"probe {name!r}: a label is a class index or name, not {type(label).__name__}")
        filled.append(Probe(item.image, label, mask, str(name)))
    return filled


def _read_mask(mask: object, name: str) -> np.ndarray | None:
    if mask is None:
        return None
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    if isinstance(mask, np.ndarray) and mask.ndim == 2:
        return mask.astype(bool)
    if isinstance(mask, np.ndarray) and mask.ndim == 3 and mask.shape[-1] == 1:
        return mask[..., 0].astype(bool)
    try:
        pixels = load_image(mask)
    except InputError as exc:
        raise InputError(f"probe {name!r}: its mask cannot be read: {exc}") from None
    return pixels.max(axis=2) > 127


# -- what a record must leave as it was ------------------------------------------------------------
def random_states() -> dict:
    """Every global random state training may depend on: torch (CPU, and CUDA once initialised),
    numpy's global generator and Python's ``random``."""
    states = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_random_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states:
        torch.cuda.set_rng_state_all(states["cuda"])


@contextmanager
def untouched(module: nn.Module) -> Iterator[None]:
    """Inside: the module in eval mode, gradients on (also under ``torch.inference_mode`` or ``no_grad``, as
    in Lightning's hooks). On exit, also after an error: every random state, every module's ``training``
    flag, every ``requires_grad`` flag and every ``.grad`` as they were on entry."""
    with model_lock(module):
        states = random_states()
        model_state = ModelState.of(module)
        set_eval(module, [m for m, _ in model_state.training])  # before anything runs: no batch-norm update
        try:
            with torch.inference_mode(False), torch.enable_grad():
                yield
        finally:
            model_state.restore()
            set_random_states(states)


# -- the recorder --------------------------------------------------------------------------------
class Recorder:
    """Explain the same probe images at every ``every``-th epoch of a training run and store what was seen.

    Args:
        probes: image paths, arrays (one, a list, or an ``(N, H, W, 3)`` stack), PIL images, a preprocessed
            ``(N, C, H, W)`` tensor, :class:`Probe` objects, or a ``ShapesDataset`` (labels and masks come
            with it).
        method: any registered method (``cnnscope methods``); its options as keyword arguments.
        target: ``"true"`` (each probe's label), ``"top1"`` (what the model predicts at that epoch), or one
            class (index or name) or one class per probe; default ``"true"`` where every probe has a label,
            else ``"top1"``. One map per probe and epoch.
        layer: the layer of a layer method (default: the model's default target layer).
        every: record the epochs divisible by this (epoch 0 included).
        out: the run folder (default: a new ``cnnscope-runs/run-YYYYmmdd-HHMMSS``). A folder that already
            holds the same recording is continued; another recording there is refused.
        labels, masks, names: one per probe, instead of (or over) those of ``Probe`` objects.
        classes: class names, when ``record`` gets a bare ``nn.Module`` (a ``cnnscope.Model`` has its own).
        preprocess: how a bare ``nn.Module`` takes images (default: the tensor probes' size with no
            normalisation, or cnnscope's 224x224 ImageNet ``Preprocess`` for image probes).
    """

    def __init__(
        self,
        probes,
        method: str = "gradcam",
        target: object = None,
        layer: str | None = None,
        every: int = 1,
        *,
        out: str | os.PathLike | None = None,
        labels: Sequence | None = None,
        masks: Sequence | None = None,
        names: Sequence[str] | None = None,
        classes: Sequence[str] | None = None,
        preprocess: Preprocess | None = None,
        **options,
    ) -> None:
        self.method_class = METHODS.get(method)
        self.method = method
        self.options = dict(options)
        self.layer = layer
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise InputError(f"every must be a whole number >= 1, got {every!r}")
        self.every = every
        self.probes = _as_probes(probes, labels, masks, names)
        kinds = {isinstance(p.image, torch.Tensor) for p in self.probes}
        if len(kinds) > 1:
            raise InputError("probes must be all images or all preprocessed tensors, not a mix")
        self._tensor: torch.Tensor | None = None
        self._pictures: list[np.ndarray] | None = None
        if kinds == {True}:
            shapes = {tuple(p.image.shape) for p in self.probes}
            if len(shapes) > 1:
                raise InputError(f"probe tensors must all have one shape, got {sorted(shapes)}")
            self._tensor = torch.stack([p.image.detach() for p in self.probes]).clone()
        else:
            self._pictures = [load_image(p.image) for p in self.probes]
        self.masks = [_read_mask(p.mask, p.name) for p in self.probes]
        if self._pictures is not None:
            for probe, picture, mask in zip(self.probes, self._pictures, self.masks, strict=True):
                if mask is not None and mask.shape != picture.shape[:2]:
                    raise InputError(
                        f"probe {probe.name!r}: its mask is {mask.shape[1]}x{mask.shape[0]}, the image "
                        f"{picture.shape[1]}x{picture.shape[0]}; give a mask of the image's size"
                    )
        elif self._tensor is not None:
            size = tuple(self._tensor.shape[-2:])
            for probe, mask in zip(self.probes, self.masks, strict=True):
                if mask is not None and mask.shape != size:
                    raise InputError(f"probe {probe.name!r}: its mask is {mask.shape}, the tensor {size}")
        labelled = all(p.label is not None for p in self.probes)
        if target is None:
            target = "true" if labelled else "top1"
        if isinstance(target, str) and target.strip().lower() == "true":
            if not labelled:
                missing = [p.name for p in self.probes if p.label is None][:3]
                raise InputError(
                    f"target='true' needs a label for every probe (none for {', '.join(missing)}); give labels= "
                    "or target='top1'"
                )
            target = "true"
        self.target = target
        self._check_one_target(target)
        self.classes = list(classes) if classes is not None else None
        self.preprocess = preprocess
        self.run_dir = Path(out) if out is not None else _new_run_dir()
        self._cached: tuple[weakref.ref, Model, object] | None = None
        self._manifest: dict | None = None

    def __repr__(self) -> str:
        return (
            f"Recorder({len(self.probes)} probes, method={self.method!r}, target={self.target!r}, "
            f"every={self.every}, out='{self.run_dir}')"
        )

    @staticmethod
    def _check_one_target(target: object) -> None:
        if isinstance(target, str):
            match = _TOP.match(target.strip())
            if match and int(match.group(1)) != 1:
                raise InputError(f"the recorder follows one class per probe; got target={target!r} (use 'top1')")
        elif isinstance(target, (list, tuple)) and target and isinstance(target[0], (list, tuple)):
            if any(len(row) != 1 for row in target):
                raise InputError("the recorder follows one class per probe; give one class in each probe's list")
        elif isinstance(target, (list, tuple)) and len(target) != 1:
            raise InputError("the recorder follows one class per probe; give one class, or one list per probe")

    # -- the model ---------------------------------------------------------------------------------
    def _model(self, model) -> tuple[Model, object]:
        """The ``cnnscope.Model`` and the method instance for ``model``, built once per model object."""
        if self._cached is not None and self._cached[0]() is model:
            return self._cached[1], self._cached[2]
        if isinstance(model, Model):
            wrapped = model
        elif isinstance(model, nn.Module):
            preprocess = self.preprocess
            if preprocess is None and self._tensor is not None:
                channels = int(self._tensor.shape[1])
                preprocess = Preprocess(
                    size=tuple(self._tensor.shape[-2:]), mean=(0.0,) * channels, std=(1.0,) * channels
                )
            wrapped = Model(model, labels=self.classes, preprocess=preprocess)
        else:
            raise InputError(f"record needs a torch nn.Module or a cnnscope.Model, not {type(model).__name__}")
        kwargs = {"layer": self.layer} if self.layer is not None else {}
        method = self.method_class(wrapped, **kwargs, **self.options)
        self._cached = (weakref.ref(model), wrapped, method)
        return wrapped, method

    def _targets(self, model: Model) -> object:
        if self.target != "true":
            return self.target
        rows = []
        for probe in self.probes:
            label = probe.label
            if isinstance(label, int):
                if not 0 <= label < model.num_classes:
                    raise TargetError(
                        f"probe {probe.name!r}: label {label} is out of range; the model has classes 0 to "
                        f"{model.num_classes - 1}"
                    )
                rows.append([label])
            else:
                rows.append([class_index(label, model.labels)])
        return rows

    # -- recording ---------------------------------------------------------------------------------
    def should_record(self, epoch: int) -> bool:
        return epoch % self.every == 0

    def record(self, model: nn.Module | Model, epoch: int, *, force: bool = False) -> dict | None:
        """Explain the probes with ``model`` as it is after ``epoch`` epochs (0: before training) and write the
        epoch's file. Skipped (returns None) unless ``epoch`` is a multiple of ``every`` or ``force``.

        Returns what was recorded: the file, and per probe the focus on the object, the loss and the top-3
        classes. Training is left exactly as it was (see the module's notes).
        """
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise InputError(f"epoch must be a whole number >= 0, got {epoch!r}")
        epoch = int(epoch)
        if not force and not self.should_record(epoch):
            return None
        started = time.perf_counter()
        module = model.module if isinstance(model, Model) else model
        if not isinstance(module, nn.Module):
            raise InputError(f"record needs a torch nn.Module or a cnnscope.Model, not {type(model).__name__}")
        notes: list[str] = []
        with untouched(module), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            wrapped, method = self._model(model)
            images = self._tensor.to(wrapped.device) if self._tensor is not None else self._pictures
            explanation = method(images, self._targets(wrapped), names=[p.name for p in self.probes])
        for warning in caught:  # the method's notes (an empty map at epoch 0...) go into the record
            if issubclass(warning.category, CnnscopeWarning):
                notes.append(str(warning.message))
            else:
                warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
        if explanation.targets.shape[1] != 1:
            raise InputError(
                f"the recorder follows one class per probe; target {self.target!r} gave {explanation.targets.shape[1]}"
            )
        arrays = self._arrays(explanation, wrapped)
        if self._manifest is None:
            self._manifest = store.start_run(
                self.run_dir,
                self._describe(wrapped, method, explanation),
                [np.asarray(explanation.images[i]) for i in range(len(self.probes))],
                self.masks,
            )
        arrays["notes"] = np.asarray(json.dumps(notes))
        arrays["seconds"] = np.asarray(time.perf_counter() - started)
        path = store.write_epoch(self.run_dir, epoch, arrays)
        return self._summary(epoch, path, arrays, wrapped)

    def _arrays(self, explanation, model: Model) -> dict[str, np.ndarray]:
        maps = explanation.raw[:, 0].detach().float().cpu().numpy()
        targets = explanation.targets[:, 0].cpu().numpy().astype(np.int64)
        probabilities = explanation.probabilities.detach().double().cpu()
        count = len(self.probes)
        k = min(TOP_K, probabilities.shape[1])
        values, indices = probabilities.topk(k, dim=1)
        top_indices = np.full((count, TOP_K), -1, dtype=np.int64)
        top_probabilities = np.full((count, TOP_K), np.nan, dtype=np.float32)
        top_indices[:, :k] = indices.numpy()
        top_probabilities[:, :k] = values.numpy()
        rows = np.arange(count)
        probability = probabilities.numpy()[rows, targets].astype(np.float32)
        loss = np.full(count, np.nan, dtype=np.float32)
        for index, label in enumerate(self._label_indices(model)):
            if label is not None:
                loss[index] = -math.log(max(float(probabilities[index, label]), 1e-30))
        focus = np.full(count, np.nan, dtype=np.float32)
        for index, mask in enumerate(self.masks):
            if mask is not None:
                focus[index] = focus_share(maps[index], mask)
        return {
            "maps": maps,
            "targets": targets,
            "probability": probability,
            "loss": loss,
            "focus": focus,
            "top_indices": top_indices,
            "top_probabilities": top_probabilities,
        }

    def _label_indices(self, model: Model) -> list[int | None]:
        found: list[int | None] = []
        for probe in self.probes:
            if probe.label is None:
                found.append(None)
            elif isinstance(probe.label, int):
                found.append(probe.label if 0 <= probe.label < model.num_classes else None)
            else:
                found.append(class_index(probe.label, model.labels))
        return found

    def _describe(self, model: Model, method, explanation) -> dict:
        label_indices = self._label_indices(model)
        return {
            "method": self.method,
            "options": json.loads(json.dumps(self.options, default=repr)),
            "target": self.target if isinstance(self.target, str) else json.loads(json.dumps(self.target, default=str)),
            "layer": explanation.layer,
            "signed": bool(explanation.signed),
            "every": self.every,
            "model": model.name,
            "classes": list(model.labels),
            "probes": [
                {
                    "name": probe.name,
                    "label": probe.label,
                    "label_index": index,
                    "mask": mask is not None,
                }
                for probe, index, mask in zip(self.probes, label_indices, self.masks, strict=True)
            ],
        }

    def _summary(self, epoch: int, path: Path, arrays: dict, model: Model) -> dict:
        labels = model.labels

        def number(value: float) -> float | None:
            return None if not np.isfinite(value) else round(float(value), 6)

        return {
            "epoch": epoch,
            "file": str(path),
            "seconds": round(float(arrays["seconds"]), 4),
            "probes": [
                {
                    "name": probe.name,
                    "target": int(arrays["targets"][i]),
                    "probability": number(arrays["probability"][i]),
                    "loss": number(arrays["loss"][i]),
                    "focus": number(arrays["focus"][i]),
                    "top": [
                        {"class_index": int(c), "class_name": short_name(labels[c]), "probability": number(p)}
                        for c, p in zip(arrays["top_indices"][i], arrays["top_probabilities"][i], strict=True)
                        if c >= 0
                    ],
                }
                for i, probe in enumerate(self.probes)
            ],
        }

    # -- afterwards --------------------------------------------------------------------------------
    def recording(self) -> store.Recording:
        """The run folder opened for reading (:class:`~cnnscope.training.store.Recording`)."""
        return store.Recording.open(self.run_dir)

    def render(self, out: str | os.PathLike, **options) -> dict:
        """The movies of this run (see :func:`cnnscope.training.render_run`)."""
        from .movie import render_run

        return render_run(self.run_dir, out, **options)

    def lightning(self):
        """This recorder as a PyTorch Lightning callback (``Trainer(callbacks=[recorder.lightning()])``)."""
        return lightning_recorder_class()(self)


def _new_run_dir() -> Path:
    base = Path("cnnscope-runs") / time.strftime("run-%Y%m%d-%H%M%S")
    candidate, suffix = base, 1
    while candidate.exists():
        suffix += 1
        candidate = base.with_name(f"{base.name}-{suffix}")
    return candidate


def _lightning_callback():
    try:
        from lightning.pytorch import Callback
    except ImportError:
        try:
            from pytorch_lightning import Callback
        except ImportError:
            raise InputError(LIGHTNING_EXTRA) from None
    return Callback


@lru_cache(maxsize=1)
def lightning_recorder_class() -> type:
    """The ``LightningRecorder`` class (built on first use, so Lightning is imported only when asked for)."""
    callback = _lightning_callback()

    class LightningRecorder(callback):
        """A :class:`Recorder` as a PyTorch Lightning callback: records epoch 0 when training starts (or the
        epoch a resumed run starts from) and epoch N after the N-th training epoch, on the global-zero process
        only. ``LightningRecorder(recorder)`` or ``LightningRecorder(probes, method=..., ...)``."""

        def __init__(self, recorder=None, /, *args, **kwargs) -> None:
            super().__init__()
            self.recorder = recorder if isinstance(recorder, Recorder) else Recorder(recorder, *args, **kwargs)

        def on_train_start(self, trainer, pl_module) -> None:
            if trainer.is_global_zero:
                self.recorder.record(pl_module, int(trainer.current_epoch))

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            if trainer.is_global_zero:
                self.recorder.record(pl_module, int(trainer.current_epoch) + 1)

    LightningRecorder.__module__ = __name__
    return LightningRecorder
