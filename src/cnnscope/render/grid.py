"""A comparison grid: rows (methods or layers) x columns (classes), each cell an overlay."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure


def comparison_grid(
    image: np.ndarray,
    rows: Sequence[tuple[str, Sequence[np.ndarray | None]]],
    column_titles: Sequence[str],
    *,
    title: str = "",
) -> Figure:
    """First column the image; then one column per class. ``rows``: (label, one overlay or None per class)."""
    columns = 1 + len(column_titles)
    height = max(1, len(rows))
    aspect = image.shape[1] / max(1, image.shape[0])
    fig = Figure(figsize=(2.4 * aspect * columns + 0.8, 2.4 * height + 0.6), layout="constrained")
    axes = np.atleast_2d(fig.subplots(height, columns, squeeze=False))
    for r, (label, overlays) in enumerate(rows):
        axes[r, 0].imshow(image)
        axes[r, 0].set_ylabel(label, fontsize=9)
        axes[r, 0].set_xticks([])
        axes[r, 0].set_yticks([])
        for c, picture in enumerate(overlays):
            axis = axes[r, c + 1]
            if picture is not None:
                axis.imshow(picture)
            axis.set_axis_off()
            if r == 0:
                axis.set_title(column_titles[c], fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig
