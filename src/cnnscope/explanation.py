"""``Explanation``: what a method computed, and what produced it.

Maps keep their sign and scale: ``raw`` is at the explained layer's resolution (or the input's,
for pixel methods) and ``maps`` is ``raw`` upsampled to the model input. ``normalized()`` is the
view that renderers use; metrics should use ``raw``/``maps``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import InputError
from .io import safe_filename
from .models.labels import short_name
from .models.model import Prediction
from .render.colormaps import default_colormap
from .render.overlay import overlay as blend
from .render.overlay import save_png


@dataclass(frozen=True, eq=False)
class Explanation:
    """Maps for B images x K targets.

    Attributes:
        raw: (B, K, h, w) float maps as the method computed them (sign and scale kept).
        maps: (B, K, H, W) ``raw`` bilinearly upsampled to the model input size (computed on first
        use, so explaining 1,000 classes does not pay for 1,000 upsampled maps nobody looks at).
        targets: (B, K) class indices; -1 where an image has fewer targets than K.
        scores: (B, K) the targets' logits (NaN for -1).
        probabilities: (B, C) softmax (or sigmoid, multi-label) of every class.
        labels: the model's class labels.
        top: the top-5 predictions of each image.
        images: the original RGB uint8 images; names: a name per image.
        method, layer, options: what produced the maps. signed: whether negative values mean
        something (drawn with a diverging colormap). stats: forward/backward counts and seconds.
        notes: warnings about the result (also issued as ``CnnscopeWarning``).
        channels: for pixel methods, the (B, K, 3, H, W) attributions before the colour channels were
        reduced to one map (None for layer methods).
    """

    raw: torch.Tensor
    input_size: tuple[int, ...]
    targets: torch.Tensor
    scores: torch.Tensor
    probabilities: torch.Tensor
    labels: tuple[str, ...]
    top: list[list[Prediction]]
    images: Sequence[np.ndarray]
    names: list[str]
    method: str
    layer: str | None
    options: dict = field(default_factory=dict)
    signed: bool = False
    stats: dict = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    channels: torch.Tensor | None = None

    # -- access ----------------------------------------------------------------------------------
    @cached_property
    def maps(self) -> torch.Tensor:
        if tuple(self.raw.shape[2:]) == tuple(self.input_size):
            return self.raw
        mode = "bilinear" if self.raw.ndim == 4 else "trilinear"  # volumes and clips: trilinear
        return F.interpolate(self.raw, size=tuple(self.input_size), mode=mode, align_corners=False)

    def __len__(self) -> int:
        return self.raw.shape[0]

    def __repr__(self) -> str:
        b, k, *spatial = self.raw.shape
        size = "x".join(map(str, spatial))
        return f"Explanation({self.method}, {b} image(s) x {k} target(s), raw {size}, layer={self.layer})"

    def items(self) -> Iterator[tuple[int, int]]:
        """(image, target slot) pairs that hold a target (skips -1 padding)."""
        for i in range(self.targets.shape[0]):
            for k in range(self.targets.shape[1]):
                if int(self.targets[i, k]) >= 0:
                    yield i, k

    def record(self, i: int, k: int) -> dict:
        """One map as JSON-able facts: method, class index, name and label, probability, layer and peak
        (x, y) in original-image pixels. The CLI's ``--json``, reports and the web API all use it."""
        index = int(self.targets[i, k])
        return {
            "method": self.method,
            "class_index": index,
            "class_name": short_name(self.labels[index]),
            "label": self.labels[index],
            "probability": round(self.probability(i, k), 6),
            "layer": self.layer,
            "peak": list(self.peak(i, k)),
        }

    def records(self) -> Iterator[tuple[int, int, dict]]:
        """(image, target slot, :meth:`record`) for every map that holds a target."""
        for i, k in self.items():
            yield i, k, self.record(i, k)

    def target_label(self, i: int, k: int) -> str:
        index = int(self.targets[i, k])
        return self.labels[index] if index >= 0 else ""

    def probability(self, i: int, k: int) -> float:
        index = int(self.targets[i, k])
        return float(self.probabilities[i, index]) if index >= 0 else float("nan")

    def numpy(self) -> np.ndarray:
        """``maps`` as a (B, K, H, W) float32 array."""
        return self.maps.detach().cpu().float().numpy()

    def normalized(self) -> torch.Tensor:
        """``maps`` scaled per map for display: to [0, 1] by the maximum (negative parts clipped),
        or to [-1, 1] by the largest magnitude when the method is signed. All-zero maps stay zero."""
        maps = self.maps.detach().float()
        space = tuple(range(2, maps.ndim))
        if self.signed:
            scale = maps.abs().amax(dim=space, keepdim=True)
            return torch.where(scale > 0, maps / scale.clamp_min(1e-30), torch.zeros_like(maps))
        positive = maps.clamp_min(0)
        scale = positive.amax(dim=space, keepdim=True)
        return torch.where(scale > 0, positive / scale.clamp_min(1e-30), torch.zeros_like(maps))

    def peak(self, i: int = 0, k: int = 0) -> tuple[int, ...]:
        """(x, y) of the map's maximum, in the original image's pixels; (x, y, z) for a volume, in its voxels (z the
        slice; x the column, the last axis of an ``.npy``; y the row), and (x, y, t) for a clip, t the index among
        the frames given to the model (``Clip.frames[t]`` is the input frame; the CLI reports that one)."""
        self._check(i, k)
        heat = self.maps[i, k]
        if heat.ndim == 3:
            depth_in, height_in, width_in = heat.shape
            z, rest = divmod(int(torch.argmax(heat)), height_in * width_in)
            y, x = divmod(rest, width_in)
            shape = self.images[i].shape[:3] if self.images[i].ndim == 4 else (depth_in, height_in, width_in)
            return tuple(
                int(min(n - 1, (v + 0.5) * n / m))
                for v, n, m in ((x, shape[2], width_in), (y, shape[1], height_in), (z, shape[0], depth_in))
            )
        flat = int(torch.argmax(heat))
        height, width = heat.shape
        y, x = divmod(flat, width)
        original_h, original_w = self.images[i].shape[:2]
        return (
            int(min(original_w - 1, (x + 0.5) * original_w / width)),
            int(min(original_h - 1, (y + 0.5) * original_h / height)),
        )

    def _check(self, i: int, k: int) -> None:
        b, kk = self.targets.shape
        if not (0 <= i < b and 0 <= k < kk):
            raise InputError(f"no map ({i}, {k}); this explanation has {b} image(s) x {kk} target(s)")

    # -- pictures --------------------------------------------------------------------------------
    def overlay(self, i: int = 0, k: int = 0, *, alpha: float = 0.5, colormap: str | None = None) -> np.ndarray:
        """The map blended over the original image, as (H, W, 3) uint8."""
        self._check(i, k)
        heat = self.normalized()[i, k].cpu().numpy()
        if heat.ndim == 3:  # a volume or clip: planes through the peak (render.slices)
            from .render.slices import volume_montage

            return volume_montage(
                self.images[i], heat, self.peak(i, k), alpha=alpha, colormap=colormap, signed=self.signed
            )
        return blend(
            self.images[i],
            heat,
            alpha=alpha,
            colormap=colormap or default_colormap(self.signed),
            signed=self.signed,
        )

    def caption(self, i: int, k: int) -> str:
        return f"{self.method} · {short_name(self.target_label(i, k))} ({self.probability(i, k):.1%})"

    def figure(self, i: int = 0, *, alpha: float = 0.5, colormap: str | None = None, top_k: int = 5):
        """A matplotlib Figure: image | one overlay per target | top-k bar chart."""
        from .render.figure import explanation_figure

        overlays = [
            (self.caption(i, k), self.overlay(i, k, alpha=alpha, colormap=colormap))
            for ii, k in self.items()
            if ii == i
        ]
        top = [(short_name(p.label), p.probability) for p in self.top[i][:top_k]]
        picture = self.images[i]
        if picture.ndim == 4:  # a volume or clip: the slice through the first map's peak
            picture = picture[self.peak(i, next(k for ii, k in self.items() if ii == i))[2]]
        return explanation_figure(picture, overlays, top, title=self.names[i])

    def save(self, directory: str | os.PathLike, *, alpha: float = 0.5, colormap: str | None = None) -> list[Path]:
        """Write one overlay PNG per (image, target): ``NAME_METHOD_CLASS.png``. Returns the paths."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        for i, k in self.items():
            path = out / overlay_filename(self.names[i], self.method, int(self.targets[i, k]), self.labels)
            save_png(self.overlay(i, k, alpha=alpha, colormap=colormap), str(path))
            paths.append(path)
        return paths

    def _repr_png_(self) -> bytes:
        """Jupyter shows the first image's figure."""
        from .render.figure import figure_png

        return figure_png(self.figure(0))


def overlay_filename(name: str, method: str, index: int, labels: tuple[str, ...] | list[str]) -> str:
    label = short_name(labels[index]) if 0 <= index < len(labels) else str(index)
    return f"{safe_filename(name)}_{method}_{index}-{safe_filename(label, keep='-_')}.png"
