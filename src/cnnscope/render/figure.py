"""Matplotlib figures: image | overlays | top-k bar chart."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure  # a bare Figure renders with Agg; pyplot is never imported


def explanation_figure(
    image: np.ndarray,
    overlays: Sequence[tuple[str, np.ndarray]],
    top: Sequence[tuple[str, float]],
    *,
    title: str = "",
) -> Figure:
    """One row: the image, each (caption, overlay), and a horizontal bar chart of (label, probability)."""
    columns = 2 + len(overlays)
    fig = Figure(figsize=(3.2 * columns, 3.4), layout="constrained")
    axes = fig.subplots(1, columns)
    axes[0].imshow(image)
    axes[0].set_title("image", fontsize=9)
    for axis, (caption, picture) in zip(axes[1:-1], overlays, strict=True):
        axis.imshow(picture)
        axis.set_title(caption, fontsize=9)
    for axis in axes[:-1]:
        axis.set_axis_off()
    bars = axes[-1]
    names = [label[:28] for label, _ in top][::-1]
    values = [p for _, p in top][::-1]
    bars.barh(range(len(values)), values, color="#4c72b0")
    bars.set_yticks(range(len(values)), names, fontsize=8)
    bars.set_xlim(0, 1)
    bars.set_xlabel("probability", fontsize=8)
    bars.set_title("top predictions", fontsize=9)
    for position, value in enumerate(values):
        bars.text(min(value + 0.02, 0.8), position, f"{value:.1%}", va="center", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def figure_png(fig: Figure, dpi: int = 100) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


class FigureResult:
    """Mixed into results that define ``figure()`` (a matplotlib Figure): ``save(path)`` writes it as PNG
    and Jupyter shows it (``_repr_png_``)."""

    def save(self, path: str) -> None:
        """The figure as a PNG file."""
        with open(path, "wb") as handle:
            handle.write(figure_png(self.figure()))  # type: ignore[attr-defined]

    def _repr_png_(self) -> bytes:
        return figure_png(self.figure())  # type: ignore[attr-defined]


def curves_figure(curves, *, title: str = "") -> Figure:
    """Deletion / insertion curves (``cnnscope.evaluate.Curve``) with their AUC in the legend."""
    fig = Figure(figsize=(5.5, 3.6), layout="constrained")
    axis = fig.subplots()
    for curve in curves:
        axis.plot(curve.fractions, curve.scores, label=f"{curve.kind} (AUC {curve.auc:.3f})")
    axis.set_xlabel("fraction of pixels removed / inserted, most salient first")
    axis.set_ylabel("probability of the class")
    axis.set_ylim(0, 1)
    axis.legend(fontsize=8)
    if title:
        axis.set_title(title, fontsize=9)
    return fig
