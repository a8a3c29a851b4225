"""Watch a model learn, and compare two models.

- :class:`Recorder`: explanations of fixed probe images at every epoch of a training run, written to disk as
  it goes (a plain loop calls ``recorder.record(model, epoch)``; Lightning takes ``recorder.lightning()``);
- :func:`render_run`: the movie of a recorded run (MP4 and GIF per probe, an HTML page with an epoch slider,
  the focus track of each probe with a mask);
- :func:`compare_models`: two models' maps of the same images side by side, with their agreement;
- :func:`demo_training`: the small CNN trained on clean and on cued shapes, both movies side by side.
"""

from __future__ import annotations

from .compare import ImageComparison, ModelComparison, compare_models
from .demo import demo_training
from .metrics import focus_share, pearson, rank_correlation, sign_agreement, top_iou, top_region
from .movie import render_run
from .recorder import Probe, Recorder, lightning_recorder_class
from .store import Recording

__all__ = [
    "ImageComparison",
    "LightningRecorder",
    "ModelComparison",
    "Probe",
    "Recorder",
    "Recording",
    "compare_models",
    "demo_training",
    "focus_share",
    "pearson",
    "rank_correlation",
    "render_run",
    "sign_agreement",
    "top_iou",
    "top_region",
]


def __getattr__(name: str):
    if name == "LightningRecorder":  # built on first use: importing cnnscope.training does not import Lightning
        return lightning_recorder_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
