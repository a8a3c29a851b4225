"""A recording on disk: one ``.npz`` per recorded epoch, written as training goes, and a small manifest.

Layout of a run folder::

    RUN/manifest.json            what was recorded (method, target, layer, options, class names, probes)
    RUN/probes.npz               the probes' pictures (image_0, image_1, ...) and masks (mask_0, ...)
    RUN/epochs/epoch-000003.npz  per probe: the map, the target, the top-3 classes and probabilities,
                                 the loss and the focus on the object, after epoch 3

Every file is written to a temporary name, flushed to disk and renamed into place, so a run that crashes
(or is killed) at any moment keeps every epoch it finished and nothing half-written: a reader sees an
epoch's file complete or not at all. Epoch files are found by name, so the manifest is written once, at the
first record, and never rewritten as epochs come (append-only). Recording into a folder that already holds a
run continues it when the method, target, layer, options and probes are the same (an epoch recorded again
replaces its file), and is refused otherwise.

Nothing here needs cnnscope to read: ``numpy.load("RUN/epochs/epoch-000003.npz")`` gives the arrays.
"""

from __future__ import annotations

import io
import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..io import write_atomically

FORMAT = "cnnscope-recording/1"
MANIFEST = "manifest.json"
PROBES = "probes.npz"
EPOCHS = "epochs"
_EPOCH_FILE = re.compile(r"^epoch-(\d{6,})\.npz$")
#: The per-probe arrays of an epoch file, besides ``maps``.
SCALARS = ("targets", "probability", "loss", "focus", "top_indices", "top_probabilities")
#: What must match for a second recorder to continue a run in the same folder.
IDENTITY = ("method", "options", "target", "layer", "probes")


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def epoch_path(root: Path, epoch: int) -> Path:
    return root / EPOCHS / f"epoch-{epoch:06d}.npz"


def read_manifest(root: Path) -> dict | None:
    """The run's manifest, None where the folder has none yet; an error for a foreign or broken one."""
    path = root / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"'{path}' cannot be read ({exc}); remove it or record into another folder") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format", "foreign") if isinstance(manifest, dict) else "foreign"
        raise InputError(f"'{root}' holds a {found!r} folder, not a {FORMAT} run; choose another folder")
    return manifest


def start_run(root: Path, manifest: dict, pictures: list[np.ndarray], masks: list[np.ndarray | None]) -> dict:
    """Create the run folder with ``manifest`` and the probes, or check that the run already there is the same
    recording (see ``IDENTITY``) and return its manifest."""
    if root.exists() and not root.is_dir():
        raise InputError(f"'{root}' is a file; the recorder needs a folder")
    previous = read_manifest(root)
    if previous is not None:
        for key in IDENTITY:
            if previous.get(key) != manifest.get(key):
                raise InputError(
                    f"'{root}' holds a recording with another {key} ({_describe(previous.get(key))}; this recorder: "
                    f"{_describe(manifest.get(key))}); record into another folder"
                )
        return previous
    (root / EPOCHS).mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {}
    for index, (picture, mask) in enumerate(zip(pictures, masks, strict=True)):
        arrays[f"image_{index}"] = np.ascontiguousarray(picture, dtype=np.uint8)
        if mask is not None:
            arrays[f"mask_{index}"] = np.ascontiguousarray(mask, dtype=bool)
    write_atomically(root / PROBES, _npz_bytes(arrays))
    manifest = {"format": FORMAT, **manifest, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    write_atomically(root / MANIFEST, json.dumps(manifest, indent=1).encode("utf-8"))
    return manifest


def write_epoch(root: Path, epoch: int, arrays: dict[str, np.ndarray]) -> Path:
    """One epoch's record; replaces an earlier record of the same epoch."""
    path = epoch_path(root, epoch)
    write_atomically(path, _npz_bytes({"epoch": np.asarray(epoch, dtype=np.int64), **arrays}))
    return path


def _describe(value: object) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass(frozen=True)
class Recording:
    """A run folder opened for reading: the manifest, the probes and the epochs recorded so far.

    ``epochs`` lists the recorded epochs in order; ``scalars()`` stacks the small per-probe figures of all of
    them (``(epochs, probes)`` arrays; ``top_indices`` and ``top_probabilities`` ``(epochs, probes, 3)``);
    maps are read one epoch at a time (``maps(epoch)``), so reading a long run stays small.
    """

    root: Path
    manifest: dict
    epochs: tuple[int, ...]

    @classmethod
    def open(cls, root: str | os.PathLike) -> Recording:
        path = Path(root)
        if not path.is_dir():
            raise InputError(f"'{path}' is not a folder; give the folder a Recorder wrote (its out=)")
        manifest = read_manifest(path)
        if manifest is None:
            raise InputError(f"'{path}' holds no recording (no {MANIFEST}); give the folder a Recorder wrote")
        found = []
        folder = path / EPOCHS
        if folder.is_dir():
            for entry in folder.iterdir():
                match = _EPOCH_FILE.match(entry.name)
                if match:
                    found.append(int(match.group(1)))
        return cls(path, manifest, tuple(sorted(found)))

    # -- probes -----------------------------------------------------------------------------------
    @property
    def probes(self) -> list[dict]:
        """One ``{"name", "label", "label_index", "mask"}`` per probe."""
        return list(self.manifest["probes"])

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["classes"])

    def pictures(self) -> list[np.ndarray]:
        with np.load(self.root / PROBES) as data:
            return [data[f"image_{i}"] for i in range(len(self.probes))]

    def masks(self) -> list[np.ndarray | None]:
        with np.load(self.root / PROBES) as data:
            return [data[f"mask_{i}"] if f"mask_{i}" in data.files else None for i in range(len(self.probes))]

    # -- epochs -----------------------------------------------------------------------------------
    def read(self, epoch: int) -> dict[str, np.ndarray]:
        """Every array of one epoch's record."""
        if epoch not in self.epochs:
            raise InputError(f"epoch {epoch} was not recorded in '{self.root}'; recorded: {_span(self.epochs)}")
        with np.load(epoch_path(self.root, epoch)) as data:
            return {key: data[key] for key in data.files}

    def maps(self, epoch: int) -> np.ndarray:
        """(probes, h, w) float32 maps of one epoch, with their sign and scale."""
        with np.load(epoch_path(self.root, epoch)) as data:
            return data["maps"]

    def iter_maps(self) -> Iterator[tuple[int, np.ndarray]]:
        for epoch in self.epochs:
            yield epoch, self.maps(epoch)

    def scalars(self) -> dict[str, np.ndarray]:
        """The per-probe figures of every epoch, stacked: ``epochs`` (E,) and each of ``SCALARS``."""
        columns: dict[str, list[np.ndarray]] = {key: [] for key in SCALARS}
        for epoch in self.epochs:
            with np.load(epoch_path(self.root, epoch)) as data:
                for key in SCALARS:
                    columns[key].append(data[key])
        count = len(self.probes)
        empty = {"top_indices": (0, count, 3), "top_probabilities": (0, count, 3)}
        stacked = {
            key: np.stack(values) if values else np.zeros(empty.get(key, (0, count))) for key, values in columns.items()
        }
        return {"epochs": np.asarray(self.epochs, dtype=np.int64), **stacked}


def _span(epochs: tuple[int, ...]) -> str:
    if not epochs:
        return "none"
    return ", ".join(map(str, epochs)) if len(epochs) <= 6 else f"{epochs[0]} to {epochs[-1]} ({len(epochs)} epochs)"
