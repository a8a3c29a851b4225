"""ONNX files as models in .venv (ONNX Runtime, no onnx2torch): the perturbation methods agree with the eager
model, the others say in one line why they cannot run. The onnx2torch path (every method) is tested in
tests/zoo/test_onnx_convert.py, in the zoo environment."""

from __future__ import annotations

import sys
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import cnnscope
from cnnscope.errors import CnnscopeError, MethodError, ModelError

pytest.importorskip("onnxruntime", reason="ONNX models need cnnscope[onnx]")
pytest.importorskip("onnx", reason="torch.onnx.export needs onnx")


class Bright(nn.Module):
    """Class 1 is the brightness of the top-left quarter, class 0 of the bottom-right: the evidence is known."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()
        )  # fmt: skip
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.features(x)
        quarter = x[:, :, :16, :16].mean(dim=(1, 2, 3))
        other = x[:, :, 16:, 16:].mean(dim=(1, 2, 3))
        logits = self.fc(self.pool(feats).flatten(1)) * 0.01
        return logits + torch.stack([4 * other, 4 * quarter, torch.zeros_like(quarter)], dim=1)


def export(module: nn.Module, path, *, dynamic: bool = True, size: int = 32, channels: int = 3) -> None:
    example = torch.zeros(1, channels, size, size)
    axes = {"input": {0: "batch"}, "scores": {0: "batch"}} if dynamic else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # "legacy TorchScript-based ONNX export"
        torch.onnx.export(
            module.eval(), (example,), str(path), input_names=["input"], output_names=["scores"],
            dynamic_axes=axes, dynamo=False,
        )  # fmt: skip


@pytest.fixture(scope="module")
def eager():
    return Bright().eval()


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory, eager):
    path = tmp_path_factory.mktemp("onnx") / "bright.onnx"
    export(eager, path)
    return path


@pytest.fixture
def runtime_only(monkeypatch):
    """Load ONNX files in ONNX Runtime even where onnx2torch is installed."""
    monkeypatch.setitem(sys.modules, "onnx2torch", None)


@pytest.fixture
def batch():
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(3, 3, 32, 32, generator=generator)
    images[1, :, :16, :16] += 2.0  # image 1: class 1's evidence, top-left
    return images


def test_onnx_file_loads_with_preprocessing_from_its_graph(onnx_file, eager, batch, runtime_only):
    model = cnnscope.load_model(onnx_file)
    assert model.name == "bright"
    assert model.preprocess.size == (32, 32)
    assert model.num_classes == 3
    with torch.no_grad():
        expected = eager(batch)
        got = model(batch)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    # a grey model's input gets one mean and std
    grey = onnx_file.parent / "grey.onnx"
    export(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 18 * 18, 4)), grey, size=20, channels=1)
    assert cnnscope.load_model(grey).preprocess.channels == 1


def test_occlusion_through_onnx_runtime_equals_the_eager_model(onnx_file, eager, batch, runtime_only):
    model = cnnscope.load_model(onnx_file)
    reference = cnnscope.Model(eager, preprocess=model.preprocess, name="eager")
    options = dict(window=8, stride=8, fill="zero", score="logit")
    through_onnx = cnnscope.get_method("occlusion")(model, **options)(batch, "top1")
    direct = cnnscope.get_method("occlusion")(reference, **options)(batch, "top1")
    assert torch.equal(through_onnx.targets, direct.targets)
    torch.testing.assert_close(through_onnx.raw, direct.raw, rtol=1e-4, atol=1e-5)
    # the map of image 1 (class 1: the top-left quarter's brightness) peaks there
    assert int(through_onnx.targets[1, 0]) == 1
    heat = through_onnx.raw[1, 0]
    assert heat[:16, :16].mean() > 10 * heat[16:, 16:].abs().mean()


def test_a_fixed_batch_of_one_runs_image_by_image(tmp_path, eager, batch, runtime_only):
    path = tmp_path / "fixed.onnx"
    export(eager, path, dynamic=False)
    model = cnnscope.load_model(path)
    with torch.no_grad():
        torch.testing.assert_close(model(batch), eager(batch), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["gradcam", "saliency", "ig", "eigencam"])
def test_gradient_and_layer_methods_say_why_in_one_line(onnx_file, batch, runtime_only, method):
    model = cnnscope.load_model(onnx_file)
    with pytest.raises(MethodError) as info:
        cnnscope.get_method(method)(model)(batch, "top1")
    message = str(info.value)
    assert "\n" not in message
    assert "ONNX Runtime" in message and "occlusion" in message and "onnx2torch" in message


def test_missing_onnxruntime_names_the_extra(onnx_file, monkeypatch, runtime_only):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ModelError, match=r"pip install 'cnnscope\[onnx\]'"):
        cnnscope.load_model(onnx_file)


def test_a_broken_onnx_file_is_one_line(tmp_path, runtime_only):
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"not a protobuf" * 10)
    with pytest.raises(CnnscopeError) as info:
        cnnscope.load_model(path)
    assert "\n" not in str(info.value) and "broken.onnx" in str(info.value)


def test_cli_explains_an_onnx_file_with_occlusion(onnx_file, tmp_path, capsys, runtime_only):
    import json

    from PIL import Image

    from cnnscope.cli import main

    picture = tmp_path / "quarter.png"
    pixels = np.full((64, 64, 3), 40, dtype=np.uint8)
    pixels[:32, :32] = 250
    Image.fromarray(pixels).save(picture)
    with pytest.raises(SystemExit) as info:
        main(["explain", str(picture), "--model", str(onnx_file), "--method", "occlusion", "--json",
              "--mean", "0,0,0", "--std", "1,1,1", "-o", str(tmp_path / "out"), "--no-report", "-q"])  # fmt: skip
    out = capsys.readouterr().out
    assert info.value.code == 0, out
    summary = json.loads(out)
    image = summary["images"][0]
    assert image["top5"][0]["class_index"] == 1
