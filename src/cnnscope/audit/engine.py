"""The audit loop: one step function per batch of images -> one record per image, and the local engine
that runs it over the shards of a :class:`~cnnscope.audit.store.Store`.

:class:`AuditStep` holds what a worker needs (the model and the method, built once) and turns a batch into
columns; it knows nothing of files, shards or scheduling, so a distributed engine (a Ray actor pool calling
``map_batches``) can hold one per actor and call the same step. :func:`run_local` is the in-process engine:
it decodes the next batch on a thread while the current one is explained, writes each shard as soon as it is
complete, and keeps no more than two batches of images in memory, however large the dataset.

One call of the method explains both the true and the predicted class of every image: the targets are the
true classes, and the resolver adds the predicted class (the argmax of the same forward pass) where it
differs, so Grad-CAM gets both maps from one forward and one batched backward. The penultimate features
(the input of the model's last ``nn.Linear``) are recorded during that same forward by a pre-hook that lives
only inside the call; a model without a linear head gets the global average of the explained layer (or of
its default layer) from one extra forward pass that stops at that layer.
"""

from __future__ import annotations

import io
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..errors import InputError
from ..hooks import capture, forward_until
from ..methods import get_method
from ..models import Model
from ..models.labels import short_name
from ..progress import Progress, check_cancelled
from ..state import model_lock, preserved
from ..targets import NO_TARGET
from .sources import Entry, Source
from .stats import MAP_SIZE, STAT_NAMES, map_statistics, mask_grid, to_grid

#: Longest side of the thumbnails kept in the store for the report's galleries (JPEG).
THUMB_SIDE = 72
THUMB_QUALITY = 85


@dataclass(frozen=True)
class Loaded:
    """One image read for a batch."""

    position: int
    entry: Entry
    image: np.ndarray
    mask: np.ndarray | None


def head_linear(model: Model) -> nn.Linear | None:
    """The last ``nn.Linear`` that runs in the model's forward (its input: the penultimate features)."""
    try:
        calls = model.calls()
    except Exception:  # a model whose forward cannot be traced (TorchScript): no hooks either
        return None
    named = dict(model.module.named_modules())
    linears = [row for row in calls if isinstance(named.get(row.name), nn.Linear)]
    if not linears:
        return None
    return named[max(linears, key=lambda row: row.finished).name]


class AuditStep:
    """Explains a batch of images for their true and predicted classes and returns one record per image.

    Args:
        model: the :class:`~cnnscope.models.Model`.
        method: a registered method name; layer and options go to it.
        map_size: side of the stored maps.
        images_per_pass: images per forward pass inside the method (default: its own choice).
    """

    def __init__(
        self,
        model: Model,
        method: str = "gradcam",
        *,
        layer=None,
        options: dict | None = None,
        map_size: int = MAP_SIZE,
        images_per_pass: int | None = None,
        feature_layer: str | None = None,
    ) -> None:
        self.model = model
        #: What a distributed engine needs to build the same step next to its own copy of the model.
        self.spec = {
            "method": method,
            "layer": layer,
            "options": dict(options or {}),
            "map_size": map_size,
            "images_per_pass": images_per_pass,
            "feature_layer": feature_layer,
        }
        kwargs = {"layer": layer} if layer is not None else {}
        self.method = get_method(method)(model, **kwargs, **(options or {}))
        self.method.resolve = self._resolver(self.method.resolve)
        _without_notes(self.method)
        self.map_size = map_size
        self.images_per_pass = images_per_pass
        self.head = head_linear(model)
        self.feature_layer = None
        self.features_from = None
        if feature_layer is not None:  # features asked of a layer: its pooled output, from one more forward
            self.feature_layer = model.layer(feature_layer)
            self.features_from = self.feature_layer.key
            self.head = None
        elif self.head is None:
            self.feature_layer = self.method.layer
            if self.feature_layer is None:
                try:
                    self.feature_layer = model.default_layer()
                except Exception:
                    self.feature_layer = None
        self.extra_forwards = 0

    def identity(self) -> dict:
        """What the manifest records of the method: name, layer and every option's value."""
        return {
            "name": self.method.name,
            "layer": self.method.layer.key if self.method.layer is not None else None,
            "options": {key: _jsonable(value) for key, value in sorted(dict(self.method.config).items())},
            "map_size": self.map_size,
            **({"features": self.features_from} if self.features_from is not None else {}),
        }

    def _resolver(self, resolve: Callable) -> Callable:
        """Targets = the true class; the predicted class is added where it differs (-1 elsewhere)."""
        model = self.model

        def true_and_predicted(target, logits, threshold=0.5):
            truth = resolve(target, logits, threshold)[:, :1]
            predicted = model.probabilities(logits.detach()).argmax(dim=1, keepdim=True)
            if bool((predicted == truth).all()):
                return truth
            return torch.cat([truth, torch.where(predicted == truth, NO_TARGET, predicted)], dim=1)

        return true_and_predicted

    # -- the step ---------------------------------------------------------------------------------
    def __call__(self, batch: Sequence[Loaded]) -> dict[str, object]:
        """Columns of one record per image of ``batch`` (see :mod:`cnnscope.audit` for their meaning)."""
        images = [item.image for item in batch]
        labels = [item.entry.label for item in batch]
        features: list[torch.Tensor] = []
        calls = [0]
        with model_lock(self.model.module), self._record_features(features, calls, len(images)):
            explanation = self.method(
                images,
                [[label] for label in labels],
                names=[item.entry.key for item in batch],
                images_per_pass=self.images_per_pass,
            )
        # the head's inputs are the images' own features only when every forward of the call was one pass of
        # the images (CAM and gradient methods); methods with forwards of their own get one more forward
        stacked = torch.cat(features) if features else None
        if stacked is None or stacked.shape[0] != len(images) or calls[0] != explanation.stats.get("forwards"):
            stacked = self._extra_features(explanation)
        return self._records(batch, explanation, stacked)

    def _record_features(self, store: list[torch.Tensor], calls: list[int], count: int):
        """A forward pre-hook on the head that keeps its inputs (up to ``count`` rows) and counts its calls
        during the method call; removed afterwards."""
        from contextlib import contextmanager

        @contextmanager
        def recording():
            if self.head is None:
                yield
                return

            def keep(_module, args):
                calls[0] += 1
                if sum(part.shape[0] for part in store) < count and args and isinstance(args[0], torch.Tensor):
                    store.append(args[0].detach().flatten(1).float().cpu())

            handle = self.head.register_forward_pre_hook(keep)
            try:
                yield
            finally:
                handle.remove()

        return recording()

    def _extra_features(self, explanation) -> torch.Tensor | None:
        """The pooled output of the feature layer from one more forward pass (models without a linear
        head, and methods whose own forwards could not be told apart)."""
        layer = self.feature_layer
        if layer is None and self.head is None:
            return None
        batch = self.model.prepare(list(explanation.images)).tensor
        self.extra_forwards += 1
        with preserved(self.model.module), torch.inference_mode():
            if self.head is not None:
                kept: list[torch.Tensor] = []
                handle = self.head.register_forward_pre_hook(lambda _m, args: kept.append(args[0].flatten(1)))
                try:
                    self.model(batch)
                finally:
                    handle.remove()
                return kept[0].float().cpu()
            with capture(self.model.module, [layer], stop=True) as record:
                forward_until(self.model.module, batch)
            output = layer.layout.to_map(record[layer.key]) if layer.layout is not None else record[layer.key]
            return output.float().mean(dim=tuple(range(2, output.ndim))).cpu()

    def _records(self, batch: Sequence[Loaded], explanation, features: torch.Tensor | None) -> dict[str, object]:
        count = len(batch)
        targets = explanation.targets
        raw = to_grid(explanation.raw, self.map_size)  # (B, K, s, s)
        true_maps = raw[:, 0]
        second = targets.shape[1] > 1
        pred_maps = torch.where((targets[:, 1] >= 0)[:, None, None], raw[:, 1], raw[:, 0]) if second else true_maps
        probabilities = explanation.probabilities
        top_p, top_i = probabilities.topk(min(5, probabilities.shape[1]), dim=1)
        predicted = probabilities.argmax(dim=1)
        labels = torch.tensor([item.entry.label for item in batch])
        grids = [mask_grid(item.mask, self.map_size) if item.mask is not None else None for item in batch]
        masks = torch.stack(
            [
                torch.from_numpy(grid) if grid is not None else torch.full((self.map_size, self.map_size), float("nan"))
                for grid in grids
            ]
        )
        names = self.model.labels
        columns: dict[str, object] = {
            "position": np.array([item.position for item in batch], dtype=np.int64),
            "key": [item.entry.key for item in batch],
            "label": labels.numpy().astype(np.int32),
            "label_name": [short_name(names[int(i)]) for i in labels],
            "predicted": predicted.numpy().astype(np.int32),
            "predicted_name": [short_name(names[int(i)]) for i in predicted],
            "correct": (predicted == labels).numpy(),
            "probability": top_p[:, 0].numpy().astype(np.float32),
            "label_probability": probabilities.gather(1, labels[:, None])[:, 0].numpy().astype(np.float32),
            "top5": top_i.numpy().astype(np.int32),
            "top5_probability": top_p.numpy().astype(np.float32),
            "width": np.array([item.image.shape[1] for item in batch], dtype=np.int32),
            "height": np.array([item.image.shape[0] for item in batch], dtype=np.int32),
            "has_mask": np.array([grid is not None for grid in grids]),
            "mask_area": np.array(
                [float(grid.mean()) if grid is not None else np.nan for grid in grids], dtype=np.float32
            ),
            "map_true": true_maps.reshape(count, -1).numpy().astype(np.float32),
            "map_pred": pred_maps.reshape(count, -1).numpy().astype(np.float32),
        }
        for prefix, maps in (("true", true_maps), ("pred", pred_maps)):
            statistics = map_statistics(maps, masks)
            for name in STAT_NAMES:
                columns[f"{prefix}_{name}"] = statistics[name]
        columns["features"] = features.numpy().astype(np.float32) if features is not None else None
        columns["thumbnail"] = [thumbnail(item.image) for item in batch]
        return columns


def _without_notes(method) -> None:
    """Drop the per-image notes this (private) method instance would issue as warnings: an empty map (a wrong
    class with no evidence for it) is a finding of the audit, kept in the statistics (its peak is <= 0), not
    a warning per image. Not done with ``warnings.catch_warnings``: the decoding threads enter and leave
    their own, and the warning filters are one list for the whole process."""
    package = method._package

    def package_without_notes(batch, computed, *args, **kwargs):
        computed.notes = []
        return package(batch, computed, *args, **kwargs)

    method._package = package_without_notes
    method._similar_map_notes = lambda *args, **kwargs: []


def thumbnail(image: np.ndarray, side: int = THUMB_SIDE) -> bytes:
    """A small JPEG of the image (longest side ``side``) for the galleries."""
    picture = Image.fromarray(image)
    picture.thumbnail((side, side), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=THUMB_QUALITY)
    return buffer.getvalue()


def _jsonable(value: object) -> object:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return f"tensor{tuple(value.shape)}"
    return repr(value)


# -- the local engine ---------------------------------------------------------------------------------------
def read_batches(
    source: Source, start: int, stop: int, batch_size: int, workers: int = 2
) -> Iterator[tuple[list[Loaded], list[dict], list[dict]]]:
    """Positions ``start`` to ``stop`` of ``source`` in batches: (images read, images skipped with the reason,
    notes such as an unreadable mask). The next batch is decoded on threads while the caller works on this
    one; at most two batches are held."""

    def load(position: int) -> tuple[str, object]:
        entry = source.entries[position]
        try:
            image = source.load_image(entry)
        except InputError as exc:
            return "skip", {"path": entry.key, "reason": str(exc)}
        try:
            mask = source.load_mask(entry, image.shape[:2])
        except InputError as exc:
            return "note", (Loaded(position, entry, image, None), {"path": entry.key, "reason": str(exc)})
        return "ok", Loaded(position, entry, image, mask)

    def collect(futures: list[Future]) -> tuple[list[Loaded], list[dict], list[dict]]:
        loaded, skipped, notes = [], [], []
        for future in futures:
            kind, value = future.result()
            if kind == "skip":
                skipped.append(value)
            elif kind == "note":
                loaded.append(value[0])
                notes.append(value[1])
            else:
                loaded.append(value)
        return loaded, skipped, notes

    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="cnnscope-audit-read") as pool:
        waiting: deque[list[Future]] = deque()
        for first in range(start, stop, batch_size):
            waiting.append([pool.submit(load, p) for p in range(first, min(stop, first + batch_size))])
            if len(waiting) > 1:
                yield collect(waiting.popleft())
        while waiting:
            yield collect(waiting.popleft())


def run_local(
    source: Source,
    store,
    step: AuditStep,
    *,
    batch_size: int = 32,
    workers: int = 2,
    quiet: bool = False,
    on_shard: Callable[[int], None] | None = None,
) -> int:
    """Run ``step`` over every pending shard of ``store`` and write each shard when it is complete.
    Returns the number of images explained in this run. ``on_shard(index)`` is called after each write."""
    from .records import to_table

    pending = store.pending()
    progress = Progress(sum(shard.stop - shard.start for shard in pending), "auditing", quiet=quiet)
    done = 0
    try:
        for shard in pending:
            parts, skipped, notes = [], [], []
            for loaded, skipped_here, notes_here in read_batches(source, shard.start, shard.stop, batch_size, workers):
                check_cancelled()
                skipped.extend(skipped_here)
                notes.extend(notes_here)
                if loaded:
                    parts.append(step(loaded))
                    done += len(loaded)
                progress.update(len(loaded) + len(skipped_here))
            store.write(shard, to_table(parts, step.map_size), skipped + [{**n, "kind": "note"} for n in notes])
            if on_shard is not None:
                on_shard(shard.index)
    finally:
        progress.close()
    return done


# -- engine selection ---------------------------------------------------------------------------------------
ENGINES = ("local", "ray")


def check_engine(engine: str, address: str | None = None) -> None:
    """InputError for an unknown engine, an ``address`` without Ray, or Ray not installed."""
    if engine not in ENGINES:
        raise InputError(f"unknown engine '{engine}'; choose one of {', '.join(ENGINES)}")
    if engine == "local" and address is not None:
        raise InputError("--address is the address of a Ray cluster: use it with --engine ray")
    if engine == "ray":
        from .ray_engine import require_ray

        require_ray()


def run_engine(
    engine: str,
    source: Source,
    store,
    step: AuditStep,
    *,
    batch_size: int = 32,
    workers: int = 2,
    quiet: bool = False,
    on_shard: Callable[[int], None] | None = None,
    address: str | None = None,
    actors: int | None = None,
    num_gpus: float = 0.0,
) -> int:
    """Run ``step`` over the pending shards of ``store`` with the ``local`` or the ``ray`` engine; both write
    the same shards (returns the images explained in this run)."""
    check_engine(engine, address)
    if engine == "ray":
        from .ray_engine import run_ray

        return run_ray(
            source,
            store,
            step,
            batch_size=batch_size,
            workers=workers,
            quiet=quiet,
            on_shard=on_shard,
            address=address,
            actors=actors,
            num_gpus=num_gpus,
        )
    return run_local(source, store, step, batch_size=batch_size, workers=workers, quiet=quiet, on_shard=on_shard)
