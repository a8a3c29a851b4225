"""Loading torchvision and timm models by name: model, preprocessing, labels; the default layer table; local
weights files (the weights' transforms and categories, no download)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("torchvision", reason="zoo tests run in .venv-zoo: make test-zoo")
pytest.importorskip("timm", reason="zoo tests run in .venv-zoo: make test-zoo")

import cnnscope
from cnnscope.errors import ModelError
from cnnscope.models.labels import imagenet_labels

from .archs import DEFAULT_LAYERS, full_size


@pytest.mark.parametrize("name", list(DEFAULT_LAYERS))
def test_default_layer_table(name):
    model = full_size(name)
    ref = model.default_layer()
    assert ref.key == DEFAULT_LAYERS[name]
    if ref.layout.kind == "tokens":  # class token (and DeiT's distillation token) dropped, 14x14 patches
        extra = 2 if "distilled" in name else 1
        assert ref.layout.grid == (extra, 14, 14)
        assert ref.output_shape[-1] in (384, 768)  # the residual stream, not qkv's 3x
    else:
        assert len(ref.output_shape) == 4 and min(ref.output_shape[-2:]) > 1


@pytest.mark.parametrize(
    ("name", "size", "mean"),
    [
        ("torchvision:resnet50", (224, 224), (0.485, 0.456, 0.406)),
        ("timm:vit_small_patch16_224", (224, 224), (0.5, 0.5, 0.5)),
        ("timm:convnext_nano", (224, 224), (0.485, 0.456, 0.406)),
    ],
)
def test_load_model_builds_model_preprocessing_and_labels(name, size, mean):
    flag = {"pretrained": False} if name.startswith("timm:") else {"weights": False}
    model = cnnscope.load_model(name, **flag)
    assert model.name == f"{name} (random weights)"  # in the JSON summary, reports and figures
    assert model.preprocess.size == size
    assert model.preprocess.mean == pytest.approx(mean)
    assert model.num_classes == 1000 and model.labels[281] == imagenet_labels()[281]
    assert not model.module.training


def test_unknown_names_get_suggestions():
    with pytest.raises(ModelError, match="resnet50"):
        cnnscope.load_model("torchvision:resnet05", weights=False)
    with pytest.raises(ModelError, match="vit_small_patch16_224"):
        cnnscope.load_model("timm:vit_smal_patch16_224", pretrained=False)


def test_torchvision_local_weights_file_uses_the_weights_transforms_and_categories(tmp_path):
    """A user's file of DEFAULT weights: no download, the weights' crop size, mean, std and categories."""
    from torchvision import models

    torch.manual_seed(1)
    module = models.regnet_y_400mf(weights=None)
    path = tmp_path / "regnet.pth"
    torch.save(module.state_dict(), path)
    enum = models.get_model_weights("regnet_y_400mf").DEFAULT
    model = cnnscope.load_model("torchvision:regnet_y_400mf", weights=path)
    transforms = enum.transforms()
    assert model.preprocess.size == (transforms.crop_size[0], transforms.crop_size[0])
    assert model.preprocess.mean == pytest.approx(tuple(transforms.mean))
    assert model.labels == list(enum.meta["categories"])
    for name, tensor in model.module.state_dict().items():
        assert torch.equal(tensor, module.state_dict()[name])


def test_torchvision_weights_from_torch_cache_without_network(tmp_path, monkeypatch):
    """weights=True with the file already in torch's hub cache (where a first download puts it)."""
    from torchvision import models

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    enum = models.get_model_weights("resnet18").DEFAULT
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.manual_seed(2)
    saved = models.resnet18(weights=None).state_dict()
    torch.save(saved, checkpoints / enum.url.rsplit("/", 1)[-1])
    model = cnnscope.load_model("torchvision:resnet18")
    assert model.labels == list(enum.meta["categories"])
    assert torch.equal(model.module.fc.weight, saved["fc.weight"])


def test_timm_local_weights_file(tmp_path):
    import timm

    torch.manual_seed(3)
    module = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / "resnet18.pth"
    torch.save(module.state_dict(), path)
    model = cnnscope.load_model("timm:resnet18", weights=path)
    assert torch.equal(model.module.fc.weight, module.fc.weight)
    config = timm.data.resolve_model_data_config(module)
    assert model.preprocess.size == tuple(config["input_size"][1:])
    assert model.labels[0].startswith("tench")


def test_a_weights_file_that_does_not_fit_is_one_line(tmp_path):
    path = tmp_path / "wrong.pth"
    torch.save({"weight": torch.zeros(3)}, path)
    with pytest.raises(ModelError) as info:
        cnnscope.load_model("torchvision:resnet18", weights=path)
    assert "\n" not in str(info.value) and "wrong.pth" in str(info.value)
