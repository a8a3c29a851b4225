"""Two models, the same images: do they look at the same places?

``compare_models(a, b, images)`` explains every image with each model, each with its own preprocessing,
input size and default layer, brings both maps onto one grid over the original image (nothing is cropped by a
``Preprocess``, so a map covers the whole picture whatever the model's input size) and measures per image:

- ``pearson``: Pearson's correlation of the two maps;
- ``rank_correlation``: Spearman's rho with ties given their average rank;
- ``top_iou``: the IoU of the two maps' top regions (the top 20% of pixels by default; ties kept together,
  zero-evidence pixels never counted as top; see :mod:`cnnscope.training.metrics`);
- ``sign_agreement``: the share of pixels with evidence in either map where both have the same sign;
- whether the two top-1 classes agree (by index where both models have the same classes, else by name).

The images are listed with the most disagreeing (lowest Pearson) first; each has a difference map (A's
normalized map minus B's: red where A looks more, blue where B does).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .._registry import METHODS
from ..errors import InputError
from ..io import load_image, safe_filename
from ..models import Model, load_model
from ..models.labels import short_name
from ..render.colormaps import default_colormap
from ..render.figure import figure_png
from ..render.overlay import overlay, resize_map
from ..render.report import ReportRow, write_report
from .metrics import normalize, pearson, rank_correlation, sign_agreement, top_iou


@dataclass(frozen=True)
class Side:
    """What one model said about one image: its top-1, the class its map explains, and the map on the common
    grid (sign and scale kept)."""

    model: str
    top1_index: int
    top1_label: str
    top1_probability: float
    target_index: int
    target_label: str
    map: np.ndarray
    signed: bool

    def record(self) -> dict:
        return {
            "model": self.model,
            "top1": {
                "class_index": self.top1_index,
                "class_name": short_name(self.top1_label),
                "probability": round(self.top1_probability, 6),
            },
            "explained": {"class_index": self.target_index, "class_name": short_name(self.target_label)},
        }


def _number(value: float) -> float | None:
    return None if not math.isfinite(value) else round(float(value), 6)


@dataclass(frozen=True)
class ImageComparison:
    """One image seen by both models, and how far their maps agree."""

    name: str
    image: np.ndarray
    a: Side
    b: Side
    pearson: float
    rank_correlation: float
    top_iou: float
    sign_agreement: float
    top1_agree: bool

    @property
    def difference(self) -> np.ndarray:
        """A's map minus B's, each scaled to [0, 1] (or [-1, 1] when signed) first: in [-1, 1] (-2..2 signed)."""
        return normalize(self.a.map, self.a.signed) - normalize(self.b.map, self.b.signed)

    def record(self) -> dict:
        return {
            "image": self.name,
            "pearson": _number(self.pearson),
            "rank_correlation": _number(self.rank_correlation),
            "top_iou": _number(self.top_iou),
            "sign_agreement": _number(self.sign_agreement),
            "top1_agree": self.top1_agree,
            "a": self.a.record(),
            "b": self.b.record(),
        }

    def overlays(self, *, alpha: float = 0.5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A's overlay, B's overlay and the difference (diverging colours) on the image."""
        pictures = []
        for side in (self.a, self.b):
            heat = normalize(side.map, side.signed)
            pictures.append(
                overlay(self.image, heat, alpha=alpha, colormap=default_colormap(side.signed), signed=side.signed)
            )
        difference = np.clip(self.difference, -1.0, 1.0)
        pictures.append(overlay(self.image, difference, alpha=min(1.0, alpha + 0.2), colormap="bwr", signed=True))
        return pictures[0], pictures[1], pictures[2]

    def caption(self) -> str:
        def show(value: float) -> str:
            return "n/a" if not math.isfinite(value) else f"{value:.2f}"

        return (
            f"r {show(self.pearson)} · rho {show(self.rank_correlation)} · top-IoU {show(self.top_iou)} · "
            f"sign {show(self.sign_agreement)} · top-1 {'agrees' if self.top1_agree else 'differs'}"
        )

    def figure(self, *, alpha: float = 0.5):
        """image | A's map | B's map | difference, with the figures of agreement in the title."""
        from matplotlib.figure import Figure

        first, second, difference = self.overlays(alpha=alpha)
        aspect = self.image.shape[1] / max(1, self.image.shape[0])
        fig = Figure(figsize=(2.9 * aspect * 4 + 0.4, 3.4), layout="constrained")
        axes = fig.subplots(1, 4)
        captions = [
            "image",
            f"A {self.a.model}: {short_name(self.a.target_label)} ({self.a.top1_probability:.0%} top-1)",
            f"B {self.b.model}: {short_name(self.b.target_label)} ({self.b.top1_probability:.0%} top-1)",
            "A - B (red: A more, blue: B more)",
        ]
        for axis, picture, caption in zip(axes, (self.image, first, second, difference), captions, strict=True):
            axis.imshow(picture)
            axis.set_title(caption, fontsize=8)
            axis.set_axis_off()
        fig.suptitle(f"{self.name}: {self.caption()}", fontsize=9)
        return fig


@dataclass(frozen=True)
class ModelComparison:
    """Per image (most disagreeing first) the two maps and their agreement; averages in :meth:`to_json`."""

    model_a: str
    model_b: str
    method: str
    layer_a: str | None
    layer_b: str | None
    top_fraction: float
    images: list[ImageComparison] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> ImageComparison:
        return self.images[index]

    def mean(self, key: str) -> float:
        values = [getattr(row, key) for row in self.images]
        finite = [float(v) for v in values if math.isfinite(float(v))]
        return float(np.mean(finite)) if finite else math.nan

    def to_json(self) -> dict:
        return {
            "model_a": self.model_a,
            "model_b": self.model_b,
            "method": self.method,
            "layer_a": self.layer_a,
            "layer_b": self.layer_b,
            "top_fraction": self.top_fraction,
            "mean": {
                key: _number(self.mean(key)) for key in ("pearson", "rank_correlation", "top_iou", "sign_agreement")
            },
            "top1_agreement": _number(float(np.mean([row.top1_agree for row in self.images]))),
            "images": [row.record() for row in self.images],
        }

    def save(self, out: str | os.PathLike, *, report: bool = True, alpha: float = 0.5) -> list[Path]:
        """One PNG per image (image | A | B | difference) and ``models.html``, in ``out``."""
        target = Path(out)
        target.mkdir(parents=True, exist_ok=True)
        paths = []
        for rank, row in enumerate(self.images):
            path = target / f"{rank:02d}_{safe_filename(row.name, keep='-_')}_models.png"
            path.write_bytes(figure_png(row.figure(alpha=alpha)))
            paths.append(path)
        if report:
            rows = []
            for row in self.images:
                first, second, difference = row.overlays(alpha=alpha)
                rows.append(
                    ReportRow(
                        name=row.name,
                        image=row.image,
                        top=[
                            (f"A: {short_name(row.a.top1_label)}", row.a.top1_probability),
                            (f"B: {short_name(row.b.top1_label)}", row.b.top1_probability),
                        ],
                        overlays=[
                            (f"A {self.model_a}", first),
                            (f"B {self.model_b}", second),
                            (f"A - B: {row.caption()}", difference),
                        ],
                    )
                )
            meta = (
                f"{self.method}: A = {self.model_a} at {self.layer_a}, B = {self.model_b} at {self.layer_b}; "
                f"most disagreeing image first; mean Pearson {self.mean('pearson'):.2f}"
            )
            paths.append(write_report(target / "models.html", rows, title="cnnscope: two models compared", meta=meta))
        return paths


def _side(model: Model, explanation, index: int, grid: tuple[int, int]) -> Side:
    top = explanation.top[index][0]
    target = int(explanation.targets[index, 0])
    heat = explanation.raw[index, 0].detach().float().cpu().numpy()
    return Side(
        model=model.name,
        top1_index=top.index,
        top1_label=top.label,
        top1_probability=float(top.probability),
        target_index=target,
        target_label=model.labels[target],
        map=resize_map(heat, *grid).astype(np.float64),
        signed=bool(explanation.signed),
    )


def _same_classes(a: Model, b: Model) -> bool:
    return a.num_classes == b.num_classes and list(a.labels) == list(b.labels)


def compare_models(
    a,
    b,
    images,
    *,
    method: str = "gradcam",
    target: object = "top1",
    layer_a: str | None = None,
    layer_b: str | None = None,
    top: float = 0.2,
    grid: int | None = None,
    names: Sequence[str] | None = None,
    **options,
) -> ModelComparison:
    """Explain ``images`` with models ``a`` and ``b`` (anything ``load_model`` takes) and compare the maps.

    Args:
        images: paths, arrays or PIL images (one or a list): both models read the same pixels, each through
            its own preprocessing.
        method: a registered method (its options as keyword arguments), run on both models.
        target: what each model's map explains: ``"top1"`` (each model its own top class) or a class index
            or name (resolved by each model against its own classes), or one per image.
        layer_a, layer_b: the layers (default: each model's default target layer).
        top: the fraction of pixels in a map's top region (``top_iou``).
        grid: the longer side of the common grid the maps are compared on (default: the larger of the two
            models' input sides, at most the image's own longer side).
        names: a name per image (default: file stems, else ``imageN``).
    """
    first, second = load_model(a), load_model(b)
    cls = METHODS.get(method)
    if not 0 < top <= 1:
        raise InputError(f"top must be a fraction in (0, 1], got {top}")
    if isinstance(images, (str, os.PathLike, np.ndarray)) and not (isinstance(images, np.ndarray) and images.ndim == 4):
        images = [images]
    sources = list(images)
    if not sources:
        raise InputError("compare_models needs at least one image")
    pictures = [load_image(source) for source in sources]
    if names is None:
        names = [
            Path(source).stem if isinstance(source, (str, os.PathLike)) else f"image{index}"
            for index, source in enumerate(sources)
        ]
    elif len(names) != len(pictures):
        raise InputError(f"{len(names)} names for {len(pictures)} images")
    explanations = []
    for model, layer in ((first, layer_a), (second, layer_b)):
        kwargs = {"layer": layer} if layer is not None else {}
        explained = cls(model, **kwargs, **options)(pictures, target, names=list(names))
        if explained.targets.shape[1] != 1:
            raise InputError(f"compare_models compares one map per image and model; target {target!r} gave more")
        explanations.append(explained)
    side = grid or max(*first.preprocess.size, *second.preprocess.size)
    same = _same_classes(first, second)
    rows = []
    for index, picture in enumerate(pictures):
        height, width = picture.shape[:2]
        scale = min(side, max(height, width)) / max(height, width)
        cells = (max(1, round(height * scale)), max(1, round(width * scale)))
        left = _side(first, explanations[0], index, cells)
        right = _side(second, explanations[1], index, cells)
        agree = (
            left.top1_index == right.top1_index
            if same
            else short_name(left.top1_label).lower() == short_name(right.top1_label).lower()
        )
        rows.append(
            ImageComparison(
                name=names[index],
                image=picture,
                a=left,
                b=right,
                pearson=pearson(left.map, right.map),
                rank_correlation=rank_correlation(left.map, right.map),
                top_iou=top_iou(left.map, right.map, top),
                sign_agreement=sign_agreement(left.map, right.map),
                top1_agree=bool(agree),
            )
        )
    rows.sort(key=lambda row: row.pearson if math.isfinite(row.pearson) else -math.inf)
    return ModelComparison(
        model_a=first.name,
        model_b=second.name,
        method=method,
        layer_a=explanations[0].layer,
        layer_b=explanations[1].layer,
        top_fraction=top,
        images=rows,
    )
