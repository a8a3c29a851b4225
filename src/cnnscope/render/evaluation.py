"""Figures of an evaluation (:mod:`cnnscope.evaluate`): the mean deletion, insertion and ROAD curves of every
method beside the baselines, and the sanity check's similarity per randomization stage (the curves of
Adebayo et al. 2018). They take the evaluation's JSON-able numbers, never a model."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

CURVE_TITLES = {
    "deletion": "deletion (most salient first, black) ↓",
    "insertion": "insertion (into a blurred copy) ↑",
    "road_morf": "ROAD, most relevant removed first ↓",
    "road_lerf": "ROAD, least relevant removed first ↑",
}
BASELINE_STYLE = {"center": ":", "random": "--", "random_smooth": "-."}


def curves_figure(curves: Mapping[str, Mapping[str, Sequence[float]]], road_fractions: Sequence[float]) -> Figure:
    """Four panels, one per curve kind; one line per method, baselines dashed and grey."""
    fig = Figure(figsize=(11, 7.5), layout="constrained")
    axes = fig.subplots(2, 2).ravel()
    for axis, (kind, title) in zip(axes, CURVE_TITLES.items(), strict=True):
        for name, by_kind in curves.items():
            values = by_kind.get(kind)
            if not values:
                continue
            xs = np.linspace(0, 1, len(values)) if kind in ("deletion", "insertion") else list(road_fractions)
            if name in BASELINE_STYLE:
                axis.plot(xs, values, BASELINE_STYLE[name], color="0.45", label=f"({name})", linewidth=1.2)
            else:
                axis.plot(xs, values, label=name, linewidth=1.4)
        axis.set_title(title, fontsize=9)
        axis.set_xlabel("fraction of pixels", fontsize=8)
        axis.set_ylabel("probability of the class", fontsize=8)
        axis.set_ylim(0, 1.02)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize=7)
    return fig


def sanity_figure(methods: Sequence[Mapping], *, key: str = "sanity") -> Figure | None:
    """Similarity to the trained model's map per randomization stage (head first), one panel per measure."""
    rows = [m for m in methods if m.get(key)]
    if not rows:
        return None
    measures = (
        ("spearman_abs", "Spearman of |map|"),
        ("spearman", "Spearman, signed"),
        ("ssim", "SSIM"),
        ("hog", "HOG"),
    )
    fig = Figure(figsize=(12, 4.2), layout="constrained")
    axes = fig.subplots(1, len(measures), sharey=True)
    stages = [stage["stage"] for stage in rows[0][key]]
    for axis, (measure, title) in zip(axes, measures, strict=True):
        for entry in rows:
            values = [1.0] + [stage[measure] for stage in entry[key]]
            axis.plot(range(len(values)), values, marker="o", markersize=3, label=entry["name"])
        axis.axhline(0, color="0.6", linewidth=0.8)
        axis.set_xticks(range(len(stages) + 1), ["trained", *stages], rotation=70, fontsize=6, ha="right")
        axis.set_title(title, fontsize=9)
        axis.set_ylim(-1.05, 1.05)
    kind = "cascading" if key == "sanity" else "independent"
    axes[0].set_ylabel(f"similarity to the trained model's map ({kind})", fontsize=8)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize=7)
    return fig
