"""What an audit reads: the images of a dataset, each with its class and, where given, where its object is.

A :class:`Source` is a fixed, ordered list of :class:`Entry` (an image key, a class index in the model's
labels, and a mask file, a box or nothing) and a way to load one entry. Three readers make one:

- :func:`folder_source`: a folder of class folders (the ImageFolder layout); masks from a parallel folder;
- :func:`csv_source`: a CSV of ``path, label[, mask path or box]`` rows;
- :func:`array_source`: images in memory (a :class:`~cnnscope.data.ShapesDataset` included), with masks.

Folder and CSV labels are matched to the model's labels by name, by synonym (``"tabby cat"`` for
``"tabby, tabby cat"``, case and ``_``/``-`` ignored), by class index (a folder named ``285``) or by an
explicit ``mapping``. A label that matches nothing stops the audit before it starts, naming every such
label at once with the closest class names. Problems that do not stop it (an empty class folder, a missing
mask, a CSV row whose file is missing or whose box is malformed) are collected in ``Source.problems``,
one ``{"path", "reason"}`` each; an image that cannot be decoded is found only when it is read, and the
engine records it in ``skipped`` the same way.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .._registry import did_you_mean
from ..errors import InputError, TargetError
from ..io import IMAGE_SUFFIXES, load_image
from ..models.labels import short_name
from ..targets import class_index

#: A box is (x0, y0, x1, y1) in the image's own pixels.
Box = tuple[float, float, float, float]
#: What an entry knows of its object: a mask file, a mask array, a box, or nothing.
MaskRef = str | np.ndarray | Box | None
#: The value of a ``mapping`` entry that leaves a folder or label out of the audit.
IGNORE = ("", "-", None)


@dataclass(frozen=True, eq=False)
class Entry:
    """One image of the audit: ``key`` (its path, or an id for in-memory images), ``label`` (the class index
    in the model's labels) and ``mask`` (a mask file, a (H, W) mask array, a box or None)."""

    key: str
    label: int
    mask: MaskRef = None


@dataclass(eq=False)
class Source:
    """The entries of a dataset in audit order, how to load one, and the problems found while listing.

    ``load_image(entry)`` returns the (H, W, 3) uint8 image (:class:`~cnnscope.errors.InputError` when it
    cannot be read) and ``load_mask(entry, shape)`` its (H, W) bool object mask (None without one).
    ``names`` maps each class index present to the dataset's own name for it (the folder or CSV label).
    ``digest`` identifies the content: a resumed audit must see the same one.
    """

    entries: list[Entry]
    names: dict[int, str]
    description: str
    digest: str
    problems: list[dict] = field(default_factory=list)
    loader: Callable[[Entry], np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.entries)

    def load_image(self, entry: Entry) -> np.ndarray:
        """The (H, W, 3) uint8 image of ``entry``; InputError when it cannot be read."""
        return self.loader(entry) if self.loader is not None else load_image(entry.key)

    def load_mask(self, entry: Entry, shape: tuple[int, int]) -> np.ndarray | None:
        """The (H, W) bool object mask of ``entry`` for an image of ``shape`` (None without one)."""
        return object_mask(entry.mask, shape, entry.key)

    def limited(self, limit: int | None) -> Source:
        """At most ``limit`` entries, spread evenly over the whole list (so every class keeps its share)."""
        if limit is None or limit >= len(self.entries):
            return self
        if limit < 1:
            raise InputError(f"limit must be at least 1, got {limit}")
        picks = np.linspace(0, len(self.entries) - 1, limit).round().astype(int)
        entries = [self.entries[int(i)] for i in picks]
        keys = {entry.key for entry in entries}
        return Source(
            entries=entries,
            names={e.label: self.names[e.label] for e in entries if e.label in self.names},
            description=f"{self.description}, first {limit} of {len(self.entries)} spread evenly",
            digest=_hash([self.digest, "limit", limit]),
            problems=[p for p in self.problems if p.get("path") in keys or p.get("kind") != "mask"],
            loader=self.loader,
        )


def object_mask(mask: MaskRef, shape: tuple[int, int], key: str) -> np.ndarray | None:
    """The (H, W) bool mask of ``mask`` for an image of ``shape``: a mask file or array resized to the image
    if needed (anything above half of its largest value is inside), or a box filled in."""
    if mask is None:
        return None
    height, width = shape
    if isinstance(mask, tuple):
        x0, y0, x1, y1 = mask
        region = np.zeros((height, width), dtype=bool)
        region[
            max(0, int(np.floor(y0))) : max(0, int(np.ceil(y1))), max(0, int(np.floor(x0))) : max(0, int(np.ceil(x1)))
        ] = True
        return region
    if isinstance(mask, np.ndarray):
        values = mask.astype(np.float32) if mask.ndim == 2 else mask.astype(np.float32).max(axis=-1)
    else:
        try:
            values = load_image(mask).max(axis=-1).astype(np.float32)
        except InputError as exc:
            raise InputError(f"the mask of '{key}' cannot be read: {exc}") from None
    top = float(values.max()) if values.size else 0.0
    inside = values > top / 2 if top > 0 else np.zeros(values.shape, dtype=bool)
    if inside.shape != (height, width):
        from PIL import Image

        inside = np.asarray(Image.fromarray(inside).resize((width, height), Image.Resampling.NEAREST))
    return inside


# -- matching dataset labels to the model's ---------------------------------------------------------------
def match_labels(
    names: Sequence[str], labels: Sequence[str], mapping: Mapping[str, str | int | None] | None, what: str
) -> dict[str, int | None]:
    """Each dataset label -> a class index of the model (None: left out through ``mapping``).

    Tried in turn: the mapping, the label or a synonym of it (case, spaces, ``_`` and ``-`` ignored), a class
    index. Every label that matches nothing is named in one :class:`InputError`, before anything runs."""
    mapping = dict(mapping or {})
    found: dict[str, int | None] = {}
    unknown: list[str] = []
    for name in names:
        if name in mapping:
            found[name] = _mapped(name, mapping[name], labels)
            continue
        index = _by_name(name, labels)
        if index is None:
            unknown.append(name)
        else:
            found[name] = index
    stray = sorted(set(mapping) - set(names))
    if stray:
        raise InputError(f"the mapping names {', '.join(map(repr, stray))}, which is not a {what} of this dataset")
    if unknown:
        table = sorted({short_name(label) for label in labels})
        described = "; ".join(f"'{name}'{did_you_mean(_spaced(name), table, n=2)}" for name in unknown[:10])
        more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
        raise InputError(
            f"{len(unknown)} {what}(s) match no class of the model: {described}{more}. Map them with "
            f"--map NAME=LABEL (mapping={{NAME: LABEL}} in Python; NAME=- leaves one out); cnnscope labels "
            "lists the model's classes"
        )
    return found


def _spaced(name: str) -> str:
    return " ".join(name.replace("_", " ").replace("-", " ").split())


def _by_name(name: str, labels: Sequence[str]) -> int | None:
    for candidate in dict.fromkeys((name, _spaced(name))):
        try:
            return class_index(candidate, labels)
        except TargetError:
            continue
    text = name.strip()
    if text.isdigit() and int(text) < len(labels):
        return int(text)
    return None


def _mapped(name: str, value: str | int | None, labels: Sequence[str]) -> int | None:
    if value in IGNORE:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        index = value
    else:
        index = _by_name(str(value), labels)
        if index is None:
            raise InputError(
                f"the mapping sends '{name}' to '{value}', which is not a class of the model"
                f"{did_you_mean(str(value), sorted({short_name(label) for label in labels}), n=2)}"
            )
    if not 0 <= index < len(labels):
        raise InputError(f"the mapping sends '{name}' to class {index}; the model has classes 0 to {len(labels) - 1}")
    return index


# -- readers ----------------------------------------------------------------------------------------------
def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _mask_file(masks: Path, relative: Path) -> Path | None:
    """``masks/relative`` with any image suffix (or .npy), also directly in ``masks``; None when absent."""
    for folder in (masks / relative.parent, masks):
        for suffix in (relative.suffix, ".png", *IMAGE_SUFFIXES, ".npy"):
            candidate = folder / (relative.stem + suffix)
            if candidate.is_file():
                return candidate
    return None


def _file_mask(path: Path) -> str | np.ndarray:
    return np.load(path) if path.suffix == ".npy" else str(path)


def folder_source(
    root: str | os.PathLike,
    labels: Sequence[str],
    *,
    mapping: Mapping[str, str | int | None] | None = None,
    masks: str | os.PathLike | None = None,
) -> Source:
    """The ImageFolder layout: ``root/CLASS/*.jpg``. ``masks``: a folder holding ``CLASS/NAME.png`` (or
    ``NAME.png``) for ``root/CLASS/NAME.jpg``; any image whose pixels above half the maximum mark the object."""
    base = Path(root)
    if not base.is_dir():
        raise InputError(f"'{base}' is not a folder; give a folder of class folders or a CSV file")
    folders = sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        loose = _images_in(base)
        hint = f" (it holds {len(loose)} images directly: put them in one folder per class)" if loose else ""
        raise InputError(f"'{base}' has no class folders{hint}")
    matched = match_labels([p.name for p in folders], labels, mapping, "class folder")
    mask_root = Path(masks) if masks is not None else None
    if mask_root is not None and not mask_root.is_dir():
        raise InputError(f"--masks '{mask_root}' is not a folder")
    entries: list[Entry] = []
    names: dict[int, str] = {}
    problems: list[dict] = []
    digest = hashlib.blake2b(digest_size=16)
    for folder in folders:
        index = matched[folder.name]
        if index is None:
            continue
        files = _images_in(folder)
        if not files:
            problems.append(
                {"path": str(folder), "reason": f"class folder '{folder}' holds no images", "kind": "empty"}
            )
            continue
        names.setdefault(index, folder.name)
        for path in files:
            mask: MaskRef = None
            if mask_root is not None:
                found = _mask_file(mask_root, path.relative_to(base))
                if found is None:
                    problems.append(
                        {
                            "path": str(path),
                            "reason": f"no mask for '{path}' in '{mask_root}' (audited without one)",
                            "kind": "mask",
                        }
                    )
                else:
                    mask = _file_mask(found)
            entries.append(Entry(str(path), index, mask))
            _update(digest, path.relative_to(base).as_posix(), index, path.stat().st_size, _mask_id(mask))
    if not entries:
        raise InputError(f"no images in the class folders of '{base}'")
    return Source(entries, names, f"folder '{base}'", digest.hexdigest(), problems)


#: Column names accepted in a CSV header (case-insensitive).
PATH_COLUMNS = ("path", "image", "file", "filename")
LABEL_COLUMNS = ("label", "class", "target")
MASK_COLUMNS = ("mask", "mask_path")
BOX_COLUMNS = (("x0", "y0", "x1", "y1"), ("xmin", "ymin", "xmax", "ymax"))


def csv_source(
    path: str | os.PathLike,
    labels: Sequence[str],
    *,
    mapping: Mapping[str, str | int | None] | None = None,
    masks: str | os.PathLike | None = None,
) -> Source:
    """A CSV of ``path, label`` and optionally a mask path or a box per row, with or without a header
    (``path``/``image``/``file``, ``label``/``class``, ``mask``, ``box`` or ``x0,y0,x1,y1``). A box is four
    numbers ``x0 y0 x1 y1`` in the image's pixels. Relative paths are read from the CSV's folder, masks
    also from ``masks``. A row whose file is missing or whose box is malformed is a problem, not an error."""
    csv_path = Path(path)
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise InputError(f"cannot read '{csv_path}': {exc.strerror}") from None
    rows = [row for row in csv.reader(text.splitlines()) if any(cell.strip() for cell in row)]
    if not rows:
        raise InputError(f"'{csv_path}' has no rows")
    header = [cell.strip().lower() for cell in rows[0]]
    columns = _columns(header)
    start = 1 if columns is not None else 0
    columns = columns or {"path": 0, "label": 1, "extra": 2}
    base = csv_path.parent
    mask_root = Path(masks) if masks is not None else base
    parsed: list[tuple[int, str, str, MaskRef]] = []
    problems: list[dict] = []
    for number, row in enumerate(rows[start:], start=start + 1):
        try:
            parsed.append((number, *_parse_row(row, columns, base, mask_root)))
        except InputError as exc:
            problems.append(
                {"path": f"{csv_path}:{number}", "reason": f"{csv_path} row {number}: {exc}", "kind": "row"}
            )
    matched = match_labels(sorted({label for _, _, label, _ in parsed}), labels, mapping, "CSV label")
    entries: list[Entry] = []
    names: dict[int, str] = {}
    digest = hashlib.blake2b(digest_size=16)
    for number, image_path, label, mask in parsed:
        index = matched[label]
        if index is None:
            continue
        if not Path(image_path).is_file():
            problems.append(
                {"path": image_path, "reason": f"{csv_path} row {number}: '{image_path}': no such file", "kind": "row"}
            )
            continue
        if isinstance(mask, str) and not Path(mask).is_file():
            problems.append(
                {
                    "path": image_path,
                    "reason": f"{csv_path} row {number}: mask '{mask}': no such file (audited without one)",
                    "kind": "mask",
                }
            )
            mask = None
        names.setdefault(index, label)
        entries.append(Entry(image_path, index, _file_mask(Path(mask)) if isinstance(mask, str) else mask))
        _update(digest, image_path, index, Path(image_path).stat().st_size, _mask_id(mask))
    if not entries:
        raise InputError(f"no usable rows in '{csv_path}'" + (f": {problems[0]['reason']}" if problems else ""))
    return Source(entries, names, f"CSV '{csv_path}'", digest.hexdigest(), problems)


def _columns(header: list[str]) -> dict[str, int | tuple[int, ...]] | None:
    path = next((header.index(name) for name in PATH_COLUMNS if name in header), None)
    label = next((header.index(name) for name in LABEL_COLUMNS if name in header), None)
    if path is None or label is None:
        return None
    columns: dict[str, int | tuple[int, ...]] = {"path": path, "label": label}
    for name in MASK_COLUMNS:
        if name in header:
            columns["mask"] = header.index(name)
    if "box" in header:
        columns["box"] = header.index("box")
    for names in BOX_COLUMNS:
        if all(name in header for name in names):
            columns["box"] = tuple(header.index(name) for name in names)
    return columns


def _cell(row: list[str], index: int) -> str:
    return row[index].strip() if index < len(row) else ""


def _parse_row(row: list[str], columns: dict, base: Path, mask_root: Path) -> tuple[str, str, MaskRef]:
    image = _cell(row, columns["path"])
    label = _cell(row, columns["label"])
    if not image or not label:
        raise InputError("needs a path and a label")
    image_path = str(Path(image) if Path(image).is_absolute() else base / image)
    mask: MaskRef = None
    if "extra" in columns:  # no header: a third cell is a box (four numbers) or a mask path
        cells = [_cell(row, i) for i in range(2, len(row))]
        cells = [c for c in cells if c]
        if len(cells) == 4 or (len(cells) == 1 and len(cells[0].replace(";", " ").split()) == 4):
            mask = _box(" ".join(cells))
        elif len(cells) == 1:
            mask = _mask_path(cells[0], mask_root)
        elif cells:
            raise InputError(f"a row takes path, label and one mask path or a box x0 y0 x1 y1; got {len(row)} cells")
    else:
        if "mask" in columns and _cell(row, columns["mask"]):
            mask = _mask_path(_cell(row, columns["mask"]), mask_root)
        box = columns.get("box")
        if isinstance(box, tuple) and any(_cell(row, i) for i in box):
            mask = _box(" ".join(_cell(row, i) for i in box))
        elif isinstance(box, int) and _cell(row, box):
            mask = _box(_cell(row, box))
    return image_path, label, mask


def _mask_path(text: str, mask_root: Path) -> str:
    return str(Path(text) if Path(text).is_absolute() else mask_root / text)


def _box(text: str) -> Box:
    parts = text.replace(";", " ").replace(",", " ").split()
    try:
        x0, y0, x1, y1 = (float(p) for p in parts)
    except ValueError:
        raise InputError(f"a box is four numbers x0 y0 x1 y1 (pixels); got '{text}'") from None
    if not (x1 > x0 and y1 > y0) or min(x0, y0) < 0:
        raise InputError(f"a box needs 0 <= x0 < x1 and 0 <= y0 < y1 (pixels); got '{text}'")
    return (x0, y0, x1, y1)


def array_source(
    images: np.ndarray | Sequence[np.ndarray],
    labels_of_images: Sequence[int],
    *,
    masks: np.ndarray | Sequence[np.ndarray | Box | None] | None = None,
    keys: Sequence[str] | None = None,
    names: Mapping[int, str] | None = None,
    num_classes: int | None = None,
) -> Source:
    """Images in memory (RGB uint8 arrays or anything ``load_image`` reads) with their class indices and,
    optionally, one mask array or box per image."""
    count = len(images)
    if count == 0:
        raise InputError("no images given")
    if len(labels_of_images) != count:
        raise InputError(f"{len(labels_of_images)} labels for {count} images; give one class index per image")
    if masks is not None and len(masks) != count:
        raise InputError(f"{len(masks)} masks for {count} images; give one per image (None where there is none)")
    if keys is not None and len(keys) != count:
        raise InputError(f"{len(keys)} keys for {count} images")
    keys = list(keys) if keys is not None else [f"image{i:06d}" for i in range(count)]
    if len(set(keys)) != count:
        raise InputError("image keys must be unique")
    digest = hashlib.blake2b(digest_size=16)
    entries = []
    for i in range(count):
        label = int(labels_of_images[i])
        if label < 0 or (num_classes is not None and label >= num_classes):
            raise InputError(f"image {keys[i]} has class index {label}; the model has classes 0 to {num_classes - 1}")
        mask = None if masks is None else masks[i]
        mask = tuple(float(v) for v in mask) if isinstance(mask, (tuple, list)) else mask
        entries.append(Entry(keys[i], label, mask))
        picture = images[i]
        raw = picture.tobytes() if isinstance(picture, np.ndarray) else repr(picture).encode()
        digest.update(hashlib.blake2b(raw, digest_size=16).digest())
        _update(digest, keys[i], label, _mask_id(mask))
    by_key = {key: i for i, key in enumerate(keys)}
    present = sorted({entry.label for entry in entries})
    chosen = {i: names[i] for i in present if i in names} if names is not None else {}
    return Source(
        entries,
        chosen,
        f"{count} images in memory",
        digest.hexdigest(),
        [],
        lambda e: load_image(images[by_key[e.key]]),
    )


def _mask_id(mask: MaskRef) -> object:
    if isinstance(mask, np.ndarray):
        return hashlib.blake2b(np.ascontiguousarray(mask).tobytes(), digest_size=8).hexdigest()
    return mask


def _update(digest, *parts: object) -> None:
    digest.update(json.dumps(parts, default=str).encode())


def _hash(parts: list) -> str:
    return hashlib.blake2b(json.dumps(parts, default=str).encode(), digest_size=16).hexdigest()


def open_source(
    data: object,
    labels: Sequence[str],
    *,
    mapping: Mapping[str, str | int | None] | None = None,
    masks: str | os.PathLike | None = None,
) -> Source:
    """A :class:`Source` from what ``audit`` was given: a folder, a CSV file, a ShapesDataset, a
    ``(images, labels)`` or ``(images, labels, masks)`` tuple, or a Source."""
    if isinstance(data, Source):
        return data
    from ..data import ShapesDataset

    if isinstance(data, ShapesDataset):
        matched = match_labels(list(data.classes), labels, mapping, "class")
        missing = [name for name, index in matched.items() if index is None]
        if missing:
            raise InputError(f"a ShapesDataset's classes cannot be left out; map {', '.join(missing)} to a class")
        indices = np.array([matched[name] for name in data.classes])
        return array_source(
            data.images,
            indices[data.labels],
            masks=data.masks,
            names={int(indices[i]): name for i, name in enumerate(data.classes)},
            num_classes=len(labels),
        )
    if isinstance(data, tuple) and len(data) in (2, 3):
        return array_source(
            data[0], data[1], masks=data[2] if len(data) == 3 else None, names=None, num_classes=len(labels)
        )
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if path.is_dir():
            return folder_source(path, labels, mapping=mapping, masks=masks)
        if path.suffix.lower() in (".csv", ".tsv", ".txt") and path.is_file():
            return csv_source(path, labels, mapping=mapping, masks=masks)
        if not path.exists():
            raise InputError(f"'{path}': no such file or folder")
        raise InputError(f"'{path}' is neither a folder of class folders nor a .csv file")
    raise InputError(
        f"cannot audit a {type(data).__name__}; give a folder of class folders, a CSV file, a ShapesDataset "
        "or an (images, labels[, masks]) tuple"
    )
