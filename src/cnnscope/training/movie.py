"""The movie of a recorded run: per probe an MP4 and a GIF, one HTML page with an epoch slider, and the focus
track (share of the map on the object per epoch) of every probe with a mask, plotted.

Reads only the run folder (:class:`~cnnscope.training.store.Recording`), one epoch file at a time and one
probe at a time, so a long run renders in the memory of one probe's frames.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..io import safe_filename
from ..models.labels import short_name
from ..render.animate import (
    focus_figure,
    frame_uri,
    movie_frame,
    require_video,
    slider_page,
    write_gif,
    write_mp4,
)
from ..render.colormaps import default_colormap
from ..render.figure import figure_png
from ..render.overlay import overlay
from .metrics import normalize
from .store import Recording


def probe_frames(
    recording: Recording,
    index: int,
    *,
    scalars: dict | None = None,
    picture: np.ndarray | None = None,
    alpha: float = 0.5,
    colormap: str | None = None,
) -> Iterator[np.ndarray]:
    """The frames of probe ``index``, one per recorded epoch, in order (see :func:`movie_frame`)."""
    scalars = scalars if scalars is not None else recording.scalars()
    picture = picture if picture is not None else recording.pictures()[index]
    probe = recording.probes[index]
    classes = recording.classes
    signed = bool(recording.manifest.get("signed", False))
    colormap = colormap or default_colormap(signed)
    label_index = probe.get("label_index")
    true_name = short_name(classes[label_index]) if label_index is not None else None
    for row, epoch in enumerate(recording.epochs):
        heat = normalize(recording.maps(epoch)[index], signed)
        picture_over = overlay(picture, heat, alpha=alpha, colormap=colormap, signed=signed)
        top = [
            (short_name(classes[int(c)]), float(p), label_index is not None and int(c) == label_index)
            for c, p in zip(scalars["top_indices"][row, index], scalars["top_probabilities"][row, index], strict=True)
            if int(c) >= 0
        ]
        target = short_name(classes[int(scalars["targets"][row, index])])
        first = [f"true: {true_name}"] if true_name is not None else []
        if target != true_name:
            first.append(f"map of {target}")
        loss = float(scalars["loss"][row, index])
        if np.isfinite(loss):
            first.append(f"loss {loss:.3f}")
        focus = float(scalars["focus"][row, index])
        second = f"map on the object: {focus:.0%}" if np.isfinite(focus) else ""
        if probe.get("mask") and not np.isfinite(focus):
            second = "map on the object: - (empty map)"
        yield movie_frame(picture_over, epoch=epoch, top=top, title=probe["name"], footer=[" · ".join(first), second])


def focus_tracks(recording: Recording, scalars: dict | None = None) -> list[tuple[str, list[float]]]:
    """(probe name, focus per epoch) for every probe with a mask, and ``("mean", ...)`` over them."""
    scalars = scalars if scalars is not None else recording.scalars()
    masked = [i for i, probe in enumerate(recording.probes) if probe.get("mask")]
    tracks = [(recording.probes[i]["name"], [float(v) for v in scalars["focus"][:, i]]) for i in masked]
    if len(masked) > 1:
        means = []
        for row in scalars["focus"][:, masked]:
            finite = row[np.isfinite(row)]  # an empty map has no share: left out of the mean
            means.append(float(finite.mean()) if finite.size else float("nan"))
        tracks.append(("mean", means))
    return tracks


def _file_stems(recording: Recording) -> list[str]:
    stems, seen = [], set()
    for index, probe in enumerate(recording.probes):
        stem = safe_filename(probe["name"], keep="-_")[:60] or f"probe{index}"
        if stem in seen:
            stem = f"{stem}-{index}"
        seen.add(stem)
        stems.append(stem)
    return stems


def _round(values) -> list[float | None]:
    return [None if not np.isfinite(v) else round(float(v), 6) for v in values]


def render_run(
    run: str | os.PathLike | Recording,
    out: str | os.PathLike,
    *,
    mp4: bool = True,
    gif: bool = True,
    html: bool = True,
    fps: float = 2.0,
    alpha: float = 0.5,
    colormap: str | None = None,
) -> dict:
    """Write the movies of a recorded run into ``out`` and return a JSON-able summary of what was written.

    Per probe ``NAME.mp4`` (needs the ``video`` extra; ``mp4=False`` leaves it out) and ``NAME.gif``, each
    frame the overlay with the epoch number above it and the top-3 bar chart under it; ``movie.html``, every
    probe with one epoch slider; ``focus.png`` where probes have masks (the share of each map on the object
    per epoch, and their mean). ``fps`` frames per second; the last frame is held longer.
    """
    recording = run if isinstance(run, Recording) else Recording.open(run)
    if not recording.epochs:
        raise InputError(f"'{recording.root}' has no recorded epoch yet; call recorder.record(model, epoch) first")
    if mp4:
        require_video()
    target = Path(out)
    if target.exists() and not target.is_dir():
        raise InputError(f"'{target}' is a file; give a folder for the movies")
    target.mkdir(parents=True, exist_ok=True)
    scalars = recording.scalars()
    pictures = recording.pictures()
    stems = _file_stems(recording)
    files: list[str] = []
    probes: list[dict] = []
    rows: list[tuple[str, list[str]]] = []
    for index, probe in enumerate(recording.probes):
        entry = {
            "name": probe["name"],
            "label": probe.get("label"),
            "focus": _round(scalars["focus"][:, index]),
            "loss": _round(scalars["loss"][:, index]),
            "probability": _round(scalars["probability"][:, index]),
        }
        frames = list(
            probe_frames(recording, index, scalars=scalars, picture=pictures[index], alpha=alpha, colormap=colormap)
        )
        if mp4:
            entry["mp4"] = str(write_mp4(frames, target / f"{stems[index]}.mp4", fps=fps))
            files.append(entry["mp4"])
        if gif:
            entry["gif"] = str(write_gif(frames, target / f"{stems[index]}.gif", fps=fps))
            files.append(entry["gif"])
        if html:
            rows.append((probe["name"], [frame_uri(frame) for frame in frames]))
        probes.append(entry)
        del frames
    summary: dict = {
        "run": str(recording.root),
        "method": recording.manifest.get("method"),
        "layer": recording.manifest.get("layer"),
        "target": recording.manifest.get("target"),
        "epochs": list(recording.epochs),
        "probes": probes,
    }
    tracks = focus_tracks(recording, scalars)
    plots: list[tuple[str, bytes]] = []
    if tracks:
        png = figure_png(focus_figure(recording.epochs, tracks, bold=("mean",)))
        path = target / "focus.png"
        path.write_bytes(png)
        summary["focus_plot"] = str(path)
        summary["focus_mean"] = _round(dict(tracks)["mean"]) if "mean" in dict(tracks) else _round(tracks[0][1])
        files.append(str(path))
        plots.append(("share of each map on the object, per epoch", png))
    if html:
        meta = (
            f"{recording.manifest.get('method')} at {recording.manifest.get('layer')} of "
            f"{recording.manifest.get('model')}, target {json.dumps(recording.manifest.get('target'))}; "
            f"{len(recording.probes)} probes, epochs {recording.epochs[0]} to {recording.epochs[-1]}"
        )
        page = slider_page(rows, recording.epochs, meta=meta, plots=plots)
        path = target / "movie.html"
        path.write_text(page, encoding="utf-8")
        summary["html"] = str(path)
        files.append(str(path))
    summary["files"] = files
    return summary
