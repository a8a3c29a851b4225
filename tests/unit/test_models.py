import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

import cnnscope
from cnnscope import LayerNotFoundError, ModelError
from cnnscope.models import Model, Preprocess, load_model
from cnnscope.testing import TinyCNN, tiny_model


def test_default_model_classifies_the_samples(default_model, chelsea, coffee):
    top = default_model.predict([chelsea, coffee], top_k=5)
    assert top[0][0].index == 285 and top[0][0].label == "Egyptian cat"
    assert 0.6 < top[0][0].probability < 0.95
    assert top[1][0].index == 967 and top[1][0].label == "espresso"
    assert len(top[0]) == 5 and top[0][0].probability >= top[0][1].probability


def test_default_layer_is_the_head_call_of_the_shared_activation(default_model):
    """The model calls one ReLU6 object at the stem and at the head: the target must be the head call."""
    layer = default_model.default_layer()
    assert (layer.name, layer.call, layer.calls) == ("_swish", 1, 2)
    assert layer.output_shape == (1, 1280, 7, 7)
    assert default_model.layer("_swish@0").output_shape == (1, 32, 112, 112)
    assert default_model.layer("_swish").call == 1  # a bare name means the last call


def test_layer_lookup_errors(default_model):
    with pytest.raises(LayerNotFoundError, match="did you mean '_blocks.15'"):
        default_model.layer("_bloks.15")
    with pytest.raises(LayerNotFoundError, match="use @0 to @1"):
        default_model.layer("_swish@2")


def test_summary_table(default_model):
    text = default_model.summary()
    assert "_swish@1" in text and "1280x7x7" in text and "total params: 4,652,008" in text
    rows = default_model.layers()
    fc = next(row for row in rows if row.name == "_fc")
    assert fc.params == 1280 * 1000 + 1000 and fc.output_shape == (1, 1000)


def test_tensor_input_is_not_modified(default_model, default_batch):
    copy = default_batch.clone()
    batch = default_model.prepare(default_batch)
    assert torch.equal(default_batch, copy) and batch.tensor.shape == (2, 3, 224, 224)
    assert batch.originals[0].shape == (224, 224, 3) and batch.originals[0].dtype == np.uint8


def test_any_module_with_labels_and_preprocessing():
    model = load_model(TinyCNN(), labels=list("abcde"), preprocess=Preprocess((32, 32)))
    assert model.num_classes == 5 and model.labels[2] == "c"
    assert model.default_layer().name == "act3"
    with pytest.raises(ModelError, match="3 labels given but the model has 5 outputs"):
        Model(TinyCNN(), labels=["a", "b", "c"]).num_classes  # noqa: B018


def test_state_dict_with_architecture(tmp_path, default_model):
    path = tmp_path / "weights.pt"
    torch.save(default_model.module.state_dict(), path)
    with pytest.raises(ModelError, match="is a state_dict; say which architecture"):
        load_model(path)
    loaded = load_model(path, arch="efficientnet_lite0")
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(loaded.module(x), default_model.module.eval()(x), atol=1e-5)
    assert loaded.labels[285] == "Egyptian cat"


def test_fine_tuned_state_dict_infers_the_class_count(tmp_path):
    tiny = load_model("efficientnet_lite0", weights=False)
    module = tiny.module
    module._fc = nn.Linear(1280, 3)
    path = tmp_path / "simpsons.pt"
    torch.save(module.state_dict(), path)
    model = load_model(path, arch="efficientnet_lite0", labels=["bart", "homer", "krusty"])
    assert model.num_classes == 3 and model.labels == ["bart", "homer", "krusty"]


def test_full_module_file_needs_trust(tmp_path):
    path = tmp_path / "full.pt"
    torch.save(TinyCNN(), path)
    with pytest.raises(ModelError, match="trust_pickle=True"):
        load_model(path)
    model = load_model(path, trust_pickle=True, preprocess=Preprocess((32, 32)))
    assert model.num_classes == 5


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_torchscript_file(tmp_path):
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.trace(TinyCNN().eval(), torch.zeros(1, 3, 32, 32)), str(path))
    model = load_model(path, preprocess=Preprocess((32, 32)))
    assert model.num_classes == 5
    assert len(model.predict(np.zeros((32, 32, 3), dtype=np.uint8))[0]) == 5
    with pytest.raises(ModelError, match="TorchScript model, whose layers cannot be hooked"):
        cnnscope.explain(model, np.zeros((32, 32, 3), dtype=np.uint8))


def test_unknown_names_and_files():
    with pytest.raises(ModelError, match="did you mean 'efficientnet_lite0'"):
        load_model("efficientnet_lite")
    with pytest.raises(ModelError, match="not found"):
        load_model("nowhere/model.pt")
    with pytest.raises(ModelError, match="cannot load a model from a int"):
        load_model(3)


def test_torchvision_missing_or_broken_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)
    with pytest.raises(ModelError, match="needs torchvision"):
        load_model("torchvision:resnet18")


def _fake_torchvision(fail_download: bool):
    """A stand-in for torchvision.models exposing the registration API load_model uses."""

    class Weights:
        def __init__(self):
            self.meta = {"categories": [f"tv{i}" for i in range(5)]}

        def transforms(self):
            return types.SimpleNamespace(crop_size=[32], mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])

    def builder(weights=None, num_classes=5):
        if weights is not None and fail_download:
            raise OSError("network unreachable")
        return TinyCNN(classes=num_classes)

    models = types.ModuleType("torchvision.models")
    models.list_models = lambda: ["tinynet"]
    models.get_model_builder = lambda name: builder
    models.get_model_weights = lambda name: types.SimpleNamespace(DEFAULT=Weights())
    package = types.ModuleType("torchvision")
    package.models = models
    return package, models


@pytest.mark.parametrize("fail", [False, True])
def test_torchvision_path(monkeypatch, fail):
    package, models = _fake_torchvision(fail)
    monkeypatch.setitem(sys.modules, "torchvision", package)
    monkeypatch.setitem(sys.modules, "torchvision.models", models)
    if fail:
        with pytest.raises(ModelError, match="could not get the pretrained weights.*--no-weights"):
            load_model("torchvision:tinynet")
        assert load_model("torchvision:tinynet", weights=False).num_classes == 5
        return
    model = load_model("torchvision:tinynet")
    assert model.labels[3] == "tv3" and model.preprocess.size == (32, 32) and model.preprocess.mean == (0.5,) * 3
    with pytest.raises(ModelError, match="did you mean 'tinynet'"):
        load_model("torchvision:tinynt")


@pytest.mark.skipif(not __import__("importlib").util.find_spec("torchvision"), reason="torchvision not installed")
def test_real_torchvision_architecture():  # pragma: no cover - runs where torchvision imports
    try:
        import torchvision  # noqa: F401
    except Exception:
        pytest.skip("torchvision does not import beside this torch")
    model = load_model("torchvision:resnet18", weights=False)
    assert model.default_layer().name == "layer4" and model.num_classes == 1000


def test_model_in_train_mode_gets_a_warning_and_keeps_its_mode():
    model = tiny_model()
    model.module.train()
    with pytest.warns(cnnscope.CnnscopeWarning, match="train mode"):
        cnnscope.explain(model, torch.rand(1, 3, 32, 32))
    assert all(m.training for m in model.module.modules())
