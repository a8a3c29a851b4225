"""``cnnscope evaluate --demo``: every registered method measured on data whose ground truth is known.

Synthetic shapes with object masks (:func:`cnnscope.data.make_shapes`, four classes, fixed seed), a small
GAP CNN trained on them (:func:`cnnscope.data.train_small_cnn`, deterministic), then :func:`evaluate` on
held-out images drawn the same way, with the cascading randomization sanity check. The table it prints
(``--markdown``) is the one in the README.
"""

from __future__ import annotations

from .run import BASELINES, METRICS, Evaluation, evaluate

#: The demo's settings.
DEMO = {
    "size": 64,
    "classes": ("circle", "ring", "square", "diamond"),
    "scale": (0.2, 0.4),
    "train": 800,
    "test": 100,
    "epochs": 5,
}


def demo_model_and_data(seed: int = 0, *, test: int | None = None):
    """(trained Model, held-out ShapesDataset, training accuracy) of the demo."""
    from ..data import make_shapes, train_small_cnn

    count = DEMO["train"] + (test if test is not None else DEMO["test"])
    everything = make_shapes(count, size=DEMO["size"], classes=DEMO["classes"], seed=seed, scale=tuple(DEMO["scale"]))
    split = DEMO["train"]
    model, history = train_small_cnn(everything.part(0, split), epochs=DEMO["epochs"], seed=seed)
    return model, everything.part(split, count), history.accuracies[-1]


def demo_evaluate(
    *,
    methods: str = "all",
    seed: int = 0,
    images: int | None = None,
    sanity: bool = True,
    options: dict | None = None,
    max_seconds: float | None = None,
    quiet: bool = True,
) -> Evaluation:
    """Train the demo model and evaluate ``methods`` on ``images`` held-out shapes (default 100)."""
    from ..data import accuracy

    model, held_out, _ = demo_model_and_data(seed, test=images)
    evaluation = evaluate(
        model,
        held_out,
        methods=methods,
        sanity=sanity,
        options=options,
        seed=seed,
        max_seconds=max_seconds,
        quiet=quiet,
    )
    evaluation.settings["demo"] = {**DEMO, "test": len(held_out), "seed": seed}
    evaluation.settings["accuracy"] = round(accuracy(model, held_out), 4)
    return evaluation


def _cell(value) -> str:
    return "–" if value is None else f"{value:.3f}"


COLUMNS = (
    ("pointing_game", "pointing game ↑"),
    ("energy_pointing_game", "energy in mask ↑"),
    ("deletion_auc", "deletion AUC ↓"),
    ("insertion_auc", "insertion AUC ↑"),
    ("road_morf", "ROAD MoRF ↓"),
    ("road_lerf", "ROAD LeRF ↑"),
    ("gini", "Gini"),
)


def markdown_table(evaluation: Evaluation) -> str:
    """The README's table: one row per method and baseline; the last column is the Spearman rank
    correlation (of |map|) with the trained model's map once every stage is randomized (lower: the map
    depends on what the model learned), and its name in bold where a metric is not better than a random map."""
    header = ["method", *(title for _, title in COLUMNS), "constant", "rank corr. after randomization ↓"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for entry in evaluation.methods:
        metrics = entry["metrics"]
        sanity = entry.get("sanity") or []
        last = _cell(sanity[-1]["spearman_abs"]) if sanity else "–"
        weak = set(entry.get("not_better_than_random", []))
        cells = [f"**{_cell(metrics[key])}**" if key in weak else _cell(metrics[key]) for key, _ in COLUMNS]
        lines.append(f"| {entry['name']} | " + " | ".join(cells) + f" | {metrics['constant_fraction']:.2f} | {last} |")
    for name in BASELINES:
        metrics = evaluation.baselines[name]["metrics"]
        cells = [_cell(metrics[key]) for key, _ in COLUMNS]
        lines.append(f"| *{name} baseline* | " + " | ".join(cells) + f" | {metrics['constant_fraction']:.2f} | – |")
    return "\n".join(lines)


__all__ = ["DEMO", "METRICS", "demo_evaluate", "demo_model_and_data", "markdown_table"]
