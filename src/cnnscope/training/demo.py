"""``cnnscope demo training``: the small CNN trained twice on CPU, once on clean shapes and once on shapes where
every circle carries a red mark in its bottom-left corner (and no other shape does), with the same 8 probe
images recorded at every epoch; both movies side by side.

The data were chosen by measuring Grad-CAM's share on the object for circles carrying the mark, after 10
epochs (training seeds 0, 1, 2): with 120 training images the clean model puts 47-56% of its map on the circle
and the cued one 17-28% (10-13% on the 10x10 mark alone, 2.4% of the picture); with 200 images the gap shrinks
(52% against 38%), with the mark in 90% of circles and 5% of other shapes it shrinks more, and with 600 images
the cue is dropped by the end of training. The cued model scores 73-81% on held-out shapes without the mark
(the clean one 86-97%): it learned circles partly as "the thing with the red corner".
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..data import SpuriousCue, accuracy, make_shapes, train_small_cnn
from ..render.animate import (
    focus_figure,
    frame_uri,
    side_by_side,
    slider_page,
    video_available,
    write_gif,
    write_mp4,
)
from ..render.figure import figure_png
from .movie import _file_stems, probe_frames
from .recorder import Probe, Recorder
from .store import Recording

CLASSES = ("circle", "square", "triangle", "cross")
#: The cue of the demo: a 10-pixel red square in the bottom-left corner of every circle, of no other shape.
CUE = SpuriousCue(class_index=0, probability=1.0, elsewhere=0.0, corner="bottom-left", size=10)
TRAIN_IMAGES = 120
EPOCHS = 10
#: Images the probes are picked from, and held-out images the accuracies are measured on.
PROBE_POOL, HELD_OUT = 64, 160
RUNS = (("clean", "clean data"), ("cued", "every circle carries a red mark"))


def demo_probes(seed: int = 0) -> list[Probe]:
    """8 held-out probes: 4 circles with the mark, 1 circle without it, and a square, a triangle and a cross
    with the mark; each with its label and object mask. Marks that touch the object are avoided."""
    marked = make_shapes(PROBE_POOL, classes=CLASSES, seed=seed + 1000, spurious=replace(CUE, elsewhere=1.0))
    plain = make_shapes(PROBE_POOL, classes=CLASSES, seed=seed + 1000)
    whole = CUE.size * CUE.size
    clear = marked.cue_masks.sum(axis=(1, 2)) == whole  # the whole mark visible, apart from the shape
    chosen: list[tuple[str, int]] = []
    circles = [i for i in range(len(marked)) if marked.labels[i] == 0 and clear[i]]
    chosen += [("marked", i) for i in circles[:4]]
    chosen += [("plain", next(i for i in range(len(plain)) if plain.labels[i] == 0 and i not in circles[:4]))]
    for label in (1, 2, 3):
        chosen.append(("marked", next(i for i in range(len(marked)) if marked.labels[i] == label and clear[i])))
    probes = []
    for kind, index in chosen:
        source = marked if kind == "marked" else plain
        label = int(source.labels[index])
        name = f"{CLASSES[label]}-{'mark' if kind == 'marked' else 'no-mark'}-{index}"
        probes.append(Probe(source.images[index], label, source.masks[index], name))
    return probes


def train_runs(
    root: str | Path,
    *,
    seed: int = 0,
    epochs: int = EPOCHS,
    count: int = TRAIN_IMAGES,
    quiet: bool = True,
) -> dict:
    """Train the two models (clean, cued) with a :class:`Recorder` on the demo probes; the recordings go to
    ``root/clean/run`` and ``root/cued/run``. Returns per run the recording folder, the focus tracks, the
    training time and the held-out accuracies (on clean shapes, and with the mark on every shape)."""
    root = Path(root)
    probes = demo_probes(seed)
    held_out = make_shapes(HELD_OUT, classes=CLASSES, seed=seed + 2000)
    marked_everywhere = make_shapes(HELD_OUT, classes=CLASSES, seed=seed + 2000, spurious=replace(CUE, elsewhere=1.0))
    results = {}
    for key, title in RUNS:
        data = make_shapes(count, classes=CLASSES, seed=seed, spurious=CUE if key == "cued" else None)
        recorder = Recorder(probes, method="gradcam", target="true", out=root / key / "run")
        started = time.perf_counter()

        live = not quiet and sys.stderr.isatty()

        def on_epoch(model, epoch, recorder=recorder, key=key, live=live) -> None:
            recorder.record(model, epoch)
            if live:
                sys.stderr.write(f"\rtraining on {key} data: epoch {epoch}/{epochs}")
                sys.stderr.flush()

        model, history = train_small_cnn(data, epochs=epochs, seed=seed, on_epoch=on_epoch)
        seconds = time.perf_counter() - started
        if not quiet:
            sys.stderr.write(f"{chr(13) if live else ''}trained on {key} data: {epochs} epochs in {seconds:.0f} s\n")
        recording = Recording.open(recorder.run_dir)
        focus = recording.scalars()["focus"]
        results[key] = {
            "title": title,
            "run": str(recorder.run_dir),
            "seconds": round(seconds, 2),
            "losses": [round(v, 6) for v in history.losses],
            "accuracy_clean": round(accuracy(model, held_out), 4),
            "accuracy_mark_everywhere": round(accuracy(model, marked_everywhere), 4),
            "focus_marked_circles": _mean_track(focus, _marked_circles(probes)),
            "focus_all": _mean_track(focus, list(range(len(probes)))),
            "focus_per_probe": {
                probe.name: [round(float(v), 6) if np.isfinite(v) else None for v in focus[:, i]]
                for i, probe in enumerate(probes)
            },
        }
    results["epochs"] = list(range(epochs + 1))
    results["probes"] = [probe.name for probe in probes]
    return results


def _marked_circles(probes: list[Probe]) -> list[int]:
    return [i for i, probe in enumerate(probes) if probe.label == 0 and "-mark-" in probe.name]


def _mean_track(focus: np.ndarray, columns: list[int]) -> list[float | None]:
    """The mean over ``columns`` per epoch of the probes whose map is not empty (None where all are: an
    all-zero Grad-CAM has no share anywhere)."""
    chosen = focus[:, columns]
    track: list[float | None] = []
    for row in chosen:
        finite = row[np.isfinite(row)]
        track.append(round(float(finite.mean()), 6) if finite.size else None)
    return track


def demo_training(out: str | Path, *, seed: int = 0, quiet: bool = False, mp4: bool | None = None) -> dict:
    """Train, record and render the demo into ``out`` and return a JSON-able summary: both runs' focus tracks
    (mean share of Grad-CAM on the object, per epoch, over the marked circles and over all probes), their
    accuracies and the files written:

    - ``out/side-by-side/PROBE.mp4`` and ``.gif``: the clean run's frame next to the cued run's, per epoch;
    - ``out/training.html``: every probe side by side with one epoch slider, and the focus plot;
    - ``out/focus.png``: the two runs' focus on the marked circles per epoch;
    - ``out/clean/run`` and ``out/cued/run``: each run's recording (``cnnscope movie out/cued/run`` renders
      one run on its own).

    ``mp4``: write MP4s (None: when the ``video`` extra is installed; GIFs and the page are always written).
    """
    started = time.perf_counter()
    out = Path(out)
    mp4 = video_available() if mp4 is None else mp4
    results = train_runs(out, seed=seed, quiet=quiet)
    files: list[str] = []
    if not quiet:
        sys.stderr.write("rendering the movies side by side\n")
    recordings = [Recording.open(results[key]["run"]) for key, _ in RUNS]
    captions = [title for _, title in RUNS]
    stems = _file_stems(recordings[0])
    pictures = recordings[0].pictures()
    scalars = [recording.scalars() for recording in recordings]
    rows = []
    pairs_dir = out / "side-by-side"
    side_files = []
    for index, probe in enumerate(recordings[0].probes):
        streams = [
            probe_frames(recording, index, scalars=table, picture=pictures[index])
            for recording, table in zip(recordings, scalars, strict=True)
        ]
        frames = [side_by_side(pair, captions) for pair in zip(*streams, strict=True)]
        if mp4:
            side_files.append(str(write_mp4(frames, pairs_dir / f"{stems[index]}.mp4")))
        side_files.append(str(write_gif(frames, pairs_dir / f"{stems[index]}.gif")))
        rows.append((probe["name"], [frame_uri(frame) for frame in frames]))
    epochs = results["epochs"]
    tracks = [(f"{title}: marked circles", results[key]["focus_marked_circles"]) for key, title in RUNS] + [
        (f"{title}: all probes", results[key]["focus_all"]) for key, title in RUNS
    ]
    focus_png = figure_png(
        focus_figure(
            epochs,
            tracks,
            title="Grad-CAM mass on the object, per epoch",
            bold=tuple(name for name, _ in tracks if name.endswith("marked circles")),
        )
    )
    focus_path = out / "focus.png"
    focus_path.write_bytes(focus_png)
    page = slider_page(
        rows,
        epochs,
        title="cnnscope: two models learning, side by side",
        meta=(
            f"SmallCNN, {TRAIN_IMAGES} training images, {EPOCHS} epochs, seed {seed}; left: {RUNS[0][1]}, right: "
            f"{RUNS[1][1]}. Grad-CAM of each probe's true class; green bar: the true class."
        ),
        plots=[("share of Grad-CAM on the object per epoch", focus_png)],
    )
    page_path = out / "training.html"
    page_path.write_text(page, encoding="utf-8")
    files += [*side_files, str(focus_path), str(page_path)]
    summary = {
        "seconds": round(time.perf_counter() - started, 2),
        "seed": seed,
        "epochs": epochs,
        "probes": results["probes"],
        "runs": {key: results[key] for key, _ in RUNS},
        "side_by_side": side_files,
        "html": str(page_path),
        "focus_plot": str(focus_path),
        "mp4": bool(mp4),
        "files": files,
    }
    summary["text"] = _text(summary, out)
    return summary


def _text(summary: dict, out: Path) -> str:
    """The summary for a person: per run the focus on the marked circles before and after, the accuracies;
    then the files."""

    def share(value: float | None) -> str:
        return "-" if value is None else f"{value:.0%}"

    lines = []
    for key, title in RUNS:
        run = summary["runs"][key]
        track = run["focus_marked_circles"]
        lines.append(
            f"{title}: {len(track) - 1} epochs in {run['seconds']:.0f} s; Grad-CAM on the marked circles "
            f"{share(track[0])} -> {share(track[-1])} on the shape; accuracy {run['accuracy_clean']:.0%} "
            f"({run['accuracy_mark_everywhere']:.0%} with the mark on every shape)"
        )
    kinds = "*.mp4 and *.gif" if summary["mp4"] else "*.gif (pip install 'cnnscope[video]' for MP4s)"
    lines.append(f"side by side: {out / 'side-by-side'}/{kinds}")
    lines.append(f"page with an epoch slider: {summary['html']}")
    lines.append(f"focus per epoch: {summary['focus_plot']}")
    return "\n".join(lines)
