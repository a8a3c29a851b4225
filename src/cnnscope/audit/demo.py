"""``cnnscope demo audit``: a model that is right for the wrong reason, and the audit that finds it.

Shapes on textured backgrounds (:func:`cnnscope.data.make_shapes`), four classes, with a spurious cue drawn
in most images of one class and a few of the others; a small CNN trained on them (seeded, deterministic);
then the audit of held-out images drawn the same way. The cue is easier to see than the shape (a vivid
patch, or a tint of the whole background), so the network leans on it, and the audit flags the cued class;
without the cue nothing is flagged.
"""

from __future__ import annotations

import os
import time

from ..errors import InputError

#: The demo's settings (every one can be overridden by ``demo_audit(**settings)``).
DEMO = {
    "size": 64,
    "classes": ("circle", "ring", "square", "diamond"),
    "scale": (0.25, 0.45),
    "train": 600,
    "test": 240,
    "epochs": 4,
    "class_index": 0,
    "probability": 0.9,
    "elsewhere": 0.05,
    "patch": 10,
    "corner": "bottom-left",
    "strength": None,
    "batch_size": 32,
}
#: The cue strength when ``strength`` is None: a solid patch, and a tint strong enough that the network
#: leans on it (at the data module's default of 0.4 the tint is used less, and flagged with less margin).
CUE_STRENGTH = {"patch": 1.0, "tint": 0.6}


def demo_data(cue: str | None, seed: int, config: dict):
    """(training set, audit set, the cue) for one run of the demo."""
    from ..data import SpuriousCue, make_shapes

    spurious = None
    if cue is not None:
        spurious = SpuriousCue(
            class_index=config["class_index"],
            probability=config["probability"],
            elsewhere=config["elsewhere"],
            corner=config["corner"],
            size=config["patch"],
            kind=cue,
            strength=config["strength"] if config["strength"] is not None else CUE_STRENGTH[cue],
        )
    everything = make_shapes(
        config["train"] + config["test"],
        size=config["size"],
        classes=tuple(config["classes"]),
        seed=seed,
        scale=tuple(config["scale"]),
        spurious=spurious,
    )

    split = config["train"]
    return everything.part(0, split), everything.part(split, len(everything)), spurious


def run_demo(out: str | os.PathLike, *, cue: str | None, seed: int, quiet: bool, report: bool = True, **settings):
    from ..data import CUE_KINDS, accuracy, train_small_cnn
    from . import audit

    unknown = sorted(set(settings) - set(DEMO))
    if unknown:
        raise InputError(f"unknown demo setting(s) {', '.join(unknown)}; the settings are {', '.join(DEMO)}")
    if cue is not None and cue not in CUE_KINDS:
        raise InputError(f"cue must be one of {', '.join(CUE_KINDS)} or None; got {cue!r}")
    config = {**DEMO, **settings}
    started = time.perf_counter()
    train, test, _ = demo_data(cue, seed, config)
    made = time.perf_counter()
    model, history = train_small_cnn(train, epochs=config["epochs"], seed=seed)
    trained = time.perf_counter()
    cued = config["classes"][config["class_index"]] if cue is not None else None
    facts = {
        "demo": {
            "cue": cue,
            "cued_class": cued,
            "seed": seed,
            "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
            "train_accuracy": round(history.accuracies[-1], 4),
            "test_accuracy": round(accuracy(model, test), 4),
            "cued_images": int(test.has_cue.sum()),
            "seconds_data": round(made - started, 2),
            "seconds_training": round(trained - made, 2),
        }
    }
    return audit(
        model,
        test,
        out=out,
        quiet=quiet,
        batch_size=config["batch_size"],
        resume=False,
        report=report,
        extra=facts,
    )
