"""Beyond RGB photos (issue 21): any channel count, 16-bit and float values, windows, the input read from the
model's first layer, one-line errors, grey overlays, and TorchScript inside a user's module."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import cnnscope
from cnnscope.errors import CnnscopeWarning, InputError, MethodError, ModelError
from cnnscope.io import display_rgb, read_image
from cnnscope.models import Model, Preprocess
from cnnscope.models.preprocess import first_layer_input, unit_range


class Digits(nn.Module):
    """The keras-vis digits model rebuilt: conv32, conv64, max-pool, dense128, dense10; one grey channel, 28 px."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3)
        self.conv2 = nn.Conv2d(32, 64, 3)
        self.fc1 = nn.Linear(64 * 12 * 12, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


def digits() -> nn.Module:
    torch.manual_seed(0)
    return Digits().eval()


class SpotNet(nn.Module):
    """A 1-channel model whose class-1 evidence is the brightness of a 4x4 spot at rows 4-7, columns 20-23 (class 0
    reads the whole picture's mean): 1x1 conv (weight 1) -> ReLU -> spatial weights -> sums."""

    def __init__(self, size: int = 32, channels: int = 1) -> None:
        super().__init__()
        self.features = nn.Conv2d(channels, 1, 1, bias=False)
        with torch.no_grad():
            self.features.weight.fill_(1.0)
        spot = torch.zeros(1, 1, size, size)
        spot[..., 4:8, 20:24] = 1.0
        self.register_buffer("spot", spot, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.features(x))
        return torch.stack([a.mean(dim=(1, 2, 3)), (a * self.spot).sum(dim=(1, 2, 3))], dim=1)


def script(module: nn.Module) -> torch.jit.ScriptModule:
    """TorchScript, as users still save it (torch deprecates the scripting itself)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.script(module)


GREY = Preprocess(size=(32, 32), mean=(0.0,), std=(1.0,))


def test_preprocess_takes_any_channel_count():
    assert Preprocess(size=(28, 28), mean=(0.0,), std=(1.0,)).channels == 1
    five = Preprocess(size=(8, 8), mean=(0.5,) * 5, std=(0.25,) * 5)
    values = np.random.default_rng(0).random((8, 8, 5)).astype(np.float32)
    batch = five([values])
    assert batch.shape == (1, 5, 8, 8)
    assert torch.allclose(batch[0], (torch.from_numpy(values).permute(2, 0, 1) - 0.5) / 0.25, atol=1e-6)
    with pytest.raises(InputError, match="has 5 channels but the model takes 3"):
        Preprocess(size=(8, 8))([values])


def test_values_scale_by_their_own_range_and_never_wrap():
    assert unit_range(np.array([0, 65535], dtype=np.uint16)).tolist() == [0.0, 1.0]
    assert unit_range(np.array([0, 255], dtype=np.uint8)).tolist() == [0.0, 1.0]
    assert unit_range(np.array([0.25, 0.5], dtype=np.float32)).tolist() == [0.25, 0.5]  # already in [0, 1]
    assert unit_range(np.array([-1000.0, 0.0, 1000.0])).tolist() == [0.0, 0.5, 1.0]  # its own range
    assert unit_range(np.array([-1024, 3071], dtype=np.int16)).tolist() == [0.0, 1.0]
    windowed = unit_range(np.array([-1000.0, -100.0, 0.0, 100.0, 1000.0]), window=(-100, 100))
    assert windowed.tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]
    # a 16-bit picture overlaid: bright stays bright (torchcam's overlay wraps 65535 to 255 - 1 = 254 ... or 0)
    deep = np.array([[0, 300, 65535]], dtype=np.uint16)
    assert display_rgb(deep)[0, :, 0].tolist() == [0, 1, 255]
    with pytest.raises(InputError, match="window"):
        Preprocess(window=(5, 5))


def test_eight_and_sixteen_bit_copies_give_the_same_prediction(tmp_path):
    picture = (np.random.default_rng(1).random((40, 36)) * 255).round().astype(np.uint8)
    Image.fromarray(picture).save(tmp_path / "eight.png")
    Image.fromarray(picture.astype(np.uint16) * 257).save(tmp_path / "sixteen.png")
    eight, sixteen = read_image(tmp_path / "eight.png"), read_image(tmp_path / "sixteen.png")
    assert eight.dtype == np.uint8 and sixteen.dtype == np.uint16 and sixteen.max() > 255
    model = Model(digits(), preprocess=Preprocess(size=(28, 28), mean=(0.1307,), std=(0.3081,)))
    batch = model.prepare([eight, sixteen]).tensor
    assert batch.shape == (2, 1, 28, 28)
    assert torch.allclose(batch[0], batch[1], atol=1e-5)  # resized through the same filter, scaled alike
    with torch.no_grad():
        logits = model(batch)
    assert torch.allclose(logits[0], logits[1], atol=1e-4) and logits[0].argmax() == logits[1].argmax()


def test_photos_become_grey_for_a_grey_model_with_a_note_and_grey_repeats_for_rgb():
    rgb = np.zeros((32, 32, 3), dtype=np.uint8)
    rgb[..., 0] = 200
    grey_model = Model(SpotNet(), preprocess=GREY)
    with pytest.warns(CnnscopeWarning, match="grey by luminance"):
        batch = grey_model.prepare(rgb)
    assert torch.allclose(batch.tensor, torch.full((1, 1, 32, 32), 0.299 * 200 / 255), atol=1e-6)
    rgb_model = Model(SpotNet(channels=3), preprocess=Preprocess(size=(32, 32), mean=(0.0,) * 3, std=(1.0,) * 3))
    repeated = rgb_model.prepare(np.full((32, 32), 51, dtype=np.uint8)).tensor  # lossless: no note
    assert repeated.shape == (1, 3, 32, 32) and torch.allclose(repeated, torch.full_like(repeated, 0.2))


def test_rgba_and_multipage_tiff_and_npy_keep_their_channels(tmp_path):
    rgba = np.zeros((6, 6, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    assert read_image(tmp_path / "a.png").shape == (6, 6, 4)
    pages = [Image.fromarray(np.full((5, 7), 1000 * (i + 1), dtype=np.uint16)) for i in range(4)]
    pages[0].save(tmp_path / "stack.tif", save_all=True, append_images=pages[1:])
    stack = read_image(tmp_path / "stack.tif")
    assert stack.shape == (5, 7, 4) and stack[0, 0].tolist() == [1000, 2000, 3000, 4000]
    bands = np.random.default_rng(0).random((9, 9, 6)).astype(np.float32)
    np.save(tmp_path / "bands.npy", bands)
    assert np.array_equal(read_image(tmp_path / "bands.npy"), bands)
    six = Preprocess(size=(9, 9), mean=(0.0,) * 6, std=(1.0,) * 6)
    assert torch.allclose(six([read_image(tmp_path / "bands.npy")])[0], torch.from_numpy(bands).permute(2, 0, 1))


def test_channels_and_size_come_from_the_first_layer():
    assert first_layer_input(digits()) == (1, 2)
    assert first_layer_input(script(digits())) == (1, 2)
    assert first_layer_input(nn.Sequential(nn.Conv3d(2, 4, 3))) == (2, 3)
    model = Model(digits())  # no preprocessing: 1 channel from conv1; 224 fails at fc1, 28 x 28 runs
    assert model.preprocess.channels == 1
    with pytest.warns(CnnscopeWarning, match="1-channel 28x28"):
        assert model.num_classes == 10
    assert model.preprocess.size == (28, 28)


def test_a_model_that_fails_at_every_size_is_one_line_naming_the_shape_and_the_flags():
    model = Model(digits(), preprocess=Preprocess(size=(64, 64), mean=(0.0,), std=(1.0,)))
    with pytest.raises(ModelError) as info:
        model.predict(np.zeros((28, 28), dtype=np.uint8))
    message = str(info.value)
    assert "\n" not in message and "(1, 1, 64, 64)" in message and "--size" in message and "--mean" in message
    assert "mat1 and mat2" in message  # the model's own reason, not its traceback


def test_a_grey_model_map_peaks_on_its_evidence_and_the_overlay_is_grey():
    model = Model(SpotNet().eval(), preprocess=GREY, labels=["mean", "spot"])
    picture = np.full((64, 64), 128, dtype=np.uint8)  # resized to 32: the spot is rows 8-15, columns 40-47 here
    for method in ("saliency", "integrated-gradients", "layercam"):
        explanation = cnnscope.explain(model, picture, method=method, target=1)
        x, y = explanation.peak(0, 0)
        assert 40 <= x < 48 and 8 <= y < 16, (method, x, y)
    shown = explanation.images[0]
    assert shown.shape == (64, 64, 3) and (shown == 128).all()  # the grey picture under the colour map
    overlay = explanation.overlay(0, 0).astype(int)
    assert abs(overlay[10, 44] - overlay[40, 10]).sum() > 100  # the evidence is coloured, the rest is not


class Outer(nn.Module):
    """An eager model with a TorchScript block inside."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.body = script(nn.Sequential(nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()))
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.stem(x)).mean(dim=(2, 3)))


def test_torchscript_inside_a_users_module():
    torch.manual_seed(0)
    module = Outer().eval()
    model = Model(module, preprocess=GREY)
    batch = torch.rand(2, 1, 32, 32)
    # the pixel-gradient and perturbation methods work; saliency equals the gradient autograd gives
    saliency = cnnscope.explain(model, batch, method="saliency", target=0, reduce="sum")
    inputs = batch.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(module(inputs)[:, 0].sum(), inputs)
    assert torch.allclose(saliency.raw[:, 0], grad[:, 0], atol=1e-6)
    for method, options in [
        ("integrated-gradients", {"steps": 8}),
        ("smoothgrad", {"samples": 4}),
        ("occlusion", {"window": 8, "stride": 8}),
        ("rise", {"masks": 40}),
    ]:
        assert cnnscope.explain(model, batch, method=method, **options).raw.shape == (2, 1, 32, 32)
    assert cnnscope.explain(model, batch, method="gradcam", layer="stem").layer == "stem"  # outside the script
    # a method that needs a layer inside it: one line saying why and what gives every method
    for call in (
        lambda: cnnscope.explain(model, batch, method="gradcam"),
        lambda: cnnscope.explain(model, batch, method="gradcam", layer="body.1"),
    ):
        with pytest.raises(ModelError, match="TorchScript submodule 'body'.*eager nn.Module or an ONNX export"):
            call()
    with pytest.raises(MethodError, match="TorchScript"):
        cnnscope.explain(model, batch, method="guided-backprop")
    assert not module.training and all(p.requires_grad and p.grad is None for p in module.parameters())
    assert not module.stem._forward_hooks and not module.stem._forward_pre_hooks
