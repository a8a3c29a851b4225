"""ONNX files converted to PyTorch with onnx2torch (which needs torchvision, hence the zoo environment): every
method works, Grad-CAM through the conversion equals Grad-CAM on the eager model, and a graph with an operator
onnx2torch cannot convert falls back to ONNX Runtime for the black-box methods, saying so."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("onnx2torch", reason="zoo tests run in .venv-zoo: make test-zoo")
pytest.importorskip("onnxruntime", reason="ONNX models need cnnscope[onnx]")

import cnnscope
from cnnscope.errors import CnnscopeWarning, MethodError
from cnnscope.models.onnx import OnnxRuntimeModule
from cnnscope.testing import check_method


def small_cnn(pool: nn.Module | None = None) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        pool or nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 5),
    ).eval()


def export(module: nn.Module, path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # "legacy TorchScript-based ONNX export"
        torch.onnx.export(
            module, (torch.zeros(1, 3, 32, 32),), str(path), input_names=["input"], output_names=["scores"],
            dynamic_axes={"input": {0: "batch"}, "scores": {0: "batch"}}, dynamo=False,
        )  # fmt: skip


@pytest.fixture(scope="module")
def eager():
    return small_cnn()


@pytest.fixture(scope="module")
def converted(tmp_path_factory, eager):
    path = tmp_path_factory.mktemp("onnx") / "small.onnx"
    export(eager, path)
    return cnnscope.load_model(path)


@pytest.fixture
def batch():
    return torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_the_converted_model_is_pytorch_and_gives_the_same_scores(converted, eager, batch):
    assert not isinstance(converted.module, OnnxRuntimeModule)
    assert converted.preprocess.size == (32, 32)
    with torch.no_grad():
        torch.testing.assert_close(converted(batch), eager(batch), rtol=1e-4, atol=1e-5)


def test_gradcam_through_the_conversion_equals_the_eager_model(converted, eager, batch):
    reference = cnnscope.Model(eager, preprocess=converted.preprocess, name="eager")
    ours = cnnscope.get_method("gradcam")(converted)(batch, "top2")
    theirs = cnnscope.get_method("gradcam")(reference, layer="5")(batch, "top2")  # the last ReLU
    assert ours.raw.shape == theirs.raw.shape == (3, 2, 16, 16)
    assert torch.equal(ours.targets, theirs.targets)
    torch.testing.assert_close(ours.raw, theirs.raw, rtol=1e-4, atol=1e-6)
    saliency = cnnscope.get_method("saliency")(converted)(batch, "top1").channels
    expected = cnnscope.get_method("saliency")(reference)(batch, "top1").channels
    torch.testing.assert_close(saliency, expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("gradcam", {}),
        ("gradcam++", {}),
        ("eigencam", {}),
        ("scorecam", {}),
        ("guided-backprop", {}),
        ("ig", {"steps": 8}),
        ("smoothgrad", {"samples": 4}),
        ("occlusion", {"window": 8, "stride": 8}),
        ("rise", {"masks": 64}),
    ],
)
@pytest.mark.filterwarnings("ignore:.*nearly identical:cnnscope.CnnscopeWarning")  # random weights: top-2 alike
def test_every_method_passes_the_contract_on_the_converted_model(converted, batch, method, options):
    check_method(cnnscope.get_method(method), converted, batch[:2], **options)


def test_an_operator_that_does_not_convert_falls_back_to_onnx_runtime(tmp_path, batch):
    from onnx2torch import convert

    # an L2 pool exports with opset 20 Constant nodes, which onnx2torch 1.5 has no converter for
    module = small_cnn(pool=nn.Sequential(nn.LPPool2d(2, 2), nn.AdaptiveAvgPool2d(1)))
    path = tmp_path / "lppool.onnx"
    export(module, path)
    import onnx

    with pytest.raises(NotImplementedError):  # the premise: conversion fails
        convert(onnx.load(str(path)))
    with pytest.warns(CnnscopeWarning, match=r"onnx2torch could not convert 'lppool.onnx'.*occlusion"):
        model = cnnscope.load_model(path)
    assert isinstance(model.module, OnnxRuntimeModule)
    reference = cnnscope.Model(module, preprocess=model.preprocess, name="eager")
    options = {"window": 8, "stride": 8}
    through = cnnscope.get_method("occlusion")(model, **options)(batch, "top1")
    direct = cnnscope.get_method("occlusion")(reference, **options)(batch, "top1")
    torch.testing.assert_close(through.raw, direct.raw, rtol=1e-4, atol=1e-5)
    with pytest.raises(MethodError, match="onnx2torch could not convert it"):
        cnnscope.get_method("gradcam")(model)(batch, "top1")
