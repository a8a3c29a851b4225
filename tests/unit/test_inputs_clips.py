"""Video clips (issue 21): a (N, C, T, H, W) model whose evidence appears in a few frames; the peak and the
map's mass per frame point there."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import cnnscope
from cnnscope.errors import MethodError
from cnnscope.io_volumes import Clip, read_clip, sample_frames
from cnnscope.models import Model, Preprocess
from cnnscope.render.clips import frame_strip, overlay_frames, temporal_mass

#: 24 input frames; a bright square at rows 8-15, columns 20-27 of frames 9-14 only.
FRAMES, LIT = 24, range(9, 15)


class FlashNet(nn.Module):
    """Class 1 is the amount of bright pixels (mean over RGB above 0.6), anywhere in space and time: a 1x1x1
    Conv3d (1/3 per channel, bias -0.6), a ReLU, global average pooling and a linear head; class 0 is constant."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv3d(3, 1, 1)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.head = nn.Linear(1, 2)
        with torch.no_grad():
            self.features.weight.fill_(1.0 / 3)
            self.features.bias.fill_(-0.6)
            self.head.weight.copy_(torch.tensor([[0.0], [200.0]]))
            self.head.bias.copy_(torch.tensor([1.0, 0.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.relu(self.features(x))), 1))


def flash_model() -> Model:
    preprocess = Preprocess(size=(8, 32, 32), mean=(0.0,) * 3, std=(1.0,) * 3)
    return Model(FlashNet().eval(), preprocess=preprocess, labels=["nothing", "flash"], name="flash")


def flash_frames() -> list[np.ndarray]:
    generator = np.random.default_rng(0)
    frames = []
    for t in range(FRAMES):
        frame = (generator.random((32, 32, 3)) * 100).astype(np.uint8)
        if t in LIT:
            frame[8:16, 20:28] = 250
        frames.append(frame)
    return frames


def test_frames_are_sampled_uniformly():
    assert sample_frames(24, 8) == [0, 3, 7, 10, 13, 16, 20, 23]
    assert sample_frames(3, 5) == [0, 0, 1, 2, 2]  # a short clip repeats frames


def test_a_clip_model_points_at_the_frames_and_the_place_of_its_evidence(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    for t, frame in enumerate(flash_frames()):
        Image.fromarray(frame).save(folder / f"frame{t:03d}.png")
    clip = read_clip(folder, 8)
    assert isinstance(clip, Clip) and clip.values.shape == (8, 32, 32, 3)
    assert clip.frames == (0, 3, 7, 10, 13, 16, 20, 23) and clip.total == FRAMES
    model = flash_model()
    for method, options in [("gradcam", {}), ("saliency", {}), ("integrated-gradients", {"steps": 8})]:
        explanation = cnnscope.explain(model, clip, method=method, target=1, **options)
        x, y, step = explanation.peak(0, 0)
        assert 20 <= x < 28 and 8 <= y < 16, (method, x, y)
        assert clip.frames[step] in LIT, (method, step)
        mass = temporal_mass(explanation.maps[0, 0].abs())
        lit = [slot for slot, frame in enumerate(clip.frames) if frame in LIT]
        assert sum(mass[slot] for slot in lit) > 0.9, (method, mass)
    frames = overlay_frames(explanation.images[0], explanation.normalized()[0, 0].numpy())
    assert len(frames) == 8 and frames[0].shape == (32, 32, 3)
    assert frame_strip(frames).shape == (96, 8 * 96 + 7 * 4, 3)
    tile = frame_strip(frames, columns=3)  # rows of 3, 3 and 2 frames
    assert tile.shape == (3 * 96 + 2 * 4, 3 * 96 + 2 * 4, 3)
    assert (tile[:96, :96] == frame_strip(frames[:1])).all() and (tile[-96:, -96:] == 255).all()


def test_occlusion_window_per_axis_localizes_the_lit_frames():
    """A window of 1 frame in time (and 8 x 8 in space) puts the clip's mass in the lit frames; a window spanning
    all 8 frames spreads it over every frame: per-axis windows make ``temporal`` sharp."""
    model = flash_model()
    clip = Clip(np.stack(flash_frames())[list(sample_frames(FRAMES, 8))], frames=tuple(sample_frames(FRAMES, 8)))
    lit = [slot for slot, frame in enumerate(clip.frames) if frame in LIT]
    shares = {}
    for window, stride in [("1,8,8", "1,4,4"), ((8, 8, 8), (1, 4, 4))]:  # CLI text and a Python tuple
        explanation = cnnscope.explain(
            model, clip, method="occlusion", target=1, window=window, stride=stride, score="logit", quiet=True
        )
        mass = temporal_mass(explanation.maps[0, 0])
        shares[window] = sum(mass[slot] for slot in lit)
        x, y, _ = explanation.peak(0, 0)
        assert 16 <= x < 32 and 4 <= y < 20, (window, x, y)
    assert shares["1,8,8"] > 0.99  # only the lit frames lose the flash when occluded
    assert shares[(8, 8, 8)] == pytest.approx(len(lit) / 8, abs=1e-6)  # every frame is in every patch: uniform


def test_occlusion_window_with_the_wrong_count_is_one_line():
    model = flash_model()
    clip = np.stack(flash_frames()[:8])
    with pytest.raises(MethodError, match=r"window has 2 values but the input has 3 spatial axes 8x32x32.*\(t, h, w\)"):
        cnnscope.explain(model, clip, method="occlusion", target=1, window="8,8", quiet=True)
    with pytest.raises(MethodError, match=r"stride has 4 values"):
        cnnscope.explain(model, clip, method="occlusion", target=1, window=4, stride=[1, 2, 2, 2], quiet=True)
    with pytest.raises(MethodError, match=r"option window of occlusion: takes one whole number .* 4,16,16"):
        cnnscope.explain(model, clip, method="occlusion", target=1, window="4,x,16", quiet=True)
    with pytest.raises(MethodError, match=r"window 9x8x8 does not fit a 8x32x32 input; give at most 8,32,32"):
        cnnscope.explain(model, clip, method="occlusion", target=1, window=(9, 8, 8), quiet=True)
