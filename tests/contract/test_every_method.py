"""Every registered method through the shipped contract checks (cnnscope.testing)."""

import pytest
import torch

import cnnscope
from cnnscope.testing import check_method, check_untouched, tiny_model

METHODS = cnnscope.list_methods()
#: Fewer samples where a method's cost is a multiple of passes; the definitions are tested elsewhere.
LIGHT = {
    "integrated-gradients": {"steps": 4},
    "smoothgrad": {"samples": 3},
    "scorecam": {},
    "occlusion": {"window": 8, "stride": 8},
    "rise": {"masks": 24},
    "lime": {"samples": 40, "segments": 8},
    "patches": {"grid": 2},
    "deeplift-shap": {"references": 2, "blur_sigma": 2},
    "gradient-shap": {"samples": 4, "references": 2, "blur_sigma": 2},
    "kernel-shap": {"samples": 40, "segments": 8},
    "extremal-perturbation": {"steps": 6, "learning_rate": 0.2},
}
#: On the 224x224 default model: a few large patches are enough to check the contract.
LIGHT_DEFAULT = {
    "occlusion": {"window": 112, "stride": 112},
    "lime": {"samples": 30, "segments": 10},
    "kernel-shap": {"samples": 30, "segments": 10},
    "extremal-perturbation": {"steps": 2},
}


def light(name: str) -> dict:
    return LIGHT.get(name, {})


@pytest.mark.parametrize("name", METHODS)
def test_contract_on_a_tiny_model_with_inplace_and_functional_relus(name):
    model = tiny_model()
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    check_method(cnnscope.get_method(name), model, images, target="top2", **light(name))


@pytest.mark.filterwarnings("ignore::cnnscope.CnnscopeWarning")
@pytest.mark.parametrize("name", METHODS)
def test_contract_on_the_default_model(name, default_model, default_batch):
    if name == "scorecam":
        pytest.skip("scorecam runs ~500 masked passes per image here; its contract runs on the tiny model")
    check_method(
        cnnscope.get_method(name), default_model, default_batch, target="top2", **LIGHT_DEFAULT.get(name, light(name))
    )


@pytest.mark.parametrize("name", METHODS)
def test_a_first_in_place_module_leaves_the_callers_images_as_they_were(name):
    """nn.ReLU(inplace=True) as the model's first module writes into whatever it is given: every method (its
    unperturbed, perturbed and gradient passes) must give it a copy, not the caller's tensor or a grad leaf."""
    torch.manual_seed(0)
    module = torch.nn.Sequential(
        torch.nn.ReLU(inplace=True),
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 3),
    ).eval()
    from cnnscope.models import Model
    from cnnscope.testing.models import IDENTITY_PREPROCESS

    model = Model(module, labels=list("abc"), preprocess=IDENTITY_PREPROCESS, name="inplace-first")
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))  # negative pixels: ReLU changes them
    kept = images.clone()
    explanation = cnnscope.get_method(name)(model, **light(name))(images, "top1")
    assert torch.equal(images, kept)
    assert torch.isfinite(explanation.maps).all()


@pytest.mark.parametrize("name", METHODS)
def test_train_mode_and_grads_and_requires_grad_are_restored(name):
    model = tiny_model()
    module = model.module
    module.train()
    module.conv2.training = False  # a mixed state must come back exactly
    module.conv1.weight.requires_grad_(False)
    module.fc.weight.grad = torch.full_like(module.fc.weight, 3.0)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with pytest.warns(cnnscope.CnnscopeWarning, match="train mode"):
        check_untouched(lambda: cnnscope.get_method(name)(model, **light(name))(images, "top2"), model, images)
    assert module.training and not module.conv2.training and module.relu1.training


@pytest.mark.parametrize("name", METHODS)
def test_errors_in_target_resolution_leave_nothing_behind(name, default_model, default_batch):
    from cnnscope.testing import Snapshot

    before = Snapshot.take(default_model.module)
    with pytest.raises(cnnscope.TargetError):
        cnnscope.get_method(name)(default_model)(default_batch, "no such class at all")
    assert not before.differences(Snapshot.take(default_model.module))


@pytest.mark.filterwarnings("ignore::cnnscope.CnnscopeWarning")  # empty or alike maps of weak classes are notes
@pytest.mark.parametrize("kind", ["multilabel", "probabilities"])
@pytest.mark.parametrize("name", METHODS)
def test_probabilities_and_targets_are_the_models_own(name, kind):
    """Every method reports the model's own probabilities and resolves targets from the model's own
    outputs: on a multi-label model (a sigmoid per class; 'positive' at a threshold that gives images
    different numbers of classes) and on a model whose forward already ends in a softmax."""
    multilabel = kind == "multilabel"
    model = tiny_model(multilabel=multilabel, outputs="logits" if multilabel else "probabilities")
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    cls = cnnscope.get_method(name)
    if name == "cam" and not multilabel:
        with pytest.raises(cnnscope.MethodError, match="CAM needs the logits to be a linear layer"):
            cls(model)(images, "top2")
        return
    target, threshold = ("positive", 0.01) if multilabel else ("top2", 0.5)
    check_method(cls, model, images, target=target, threshold=threshold, **light(name))


class _Wrapped(torch.nn.Module):
    """TinyCNN whose forward returns a tuple, a dict or a Hugging Face-style object."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        from cnnscope.testing import TinyCNN

        self.net = TinyCNN().eval()
        self.kind = kind

    def forward(self, x):
        logits = self.net(x)
        features = torch.zeros(x.shape[0], 2)
        if self.kind == "tuple":
            return logits, features
        if self.kind == "dict":
            return {"features": features, "logits": logits}
        return type("Output", (), {"logits": logits, "hidden": features})()


@pytest.mark.parametrize("kind", ["tuple", "dict", "object"])
@pytest.mark.parametrize("name", METHODS)
def test_models_returning_tuples_dicts_or_objects(name, kind):
    from cnnscope.testing.models import IDENTITY_PREPROCESS

    model = cnnscope.load_model(_Wrapped(kind).eval(), preprocess=IDENTITY_PREPROCESS)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    check_method(cnnscope.get_method(name), model, images, target="top2", **light(name))
    plain = tiny_model()
    expected = cnnscope.get_method(name)(plain, **light(name))(images, "top2")
    got = cnnscope.get_method(name)(model, **light(name))(images, "top2")
    torch.testing.assert_close(got.raw, expected.raw, rtol=1e-5, atol=1e-6)


def test_an_output_selector_picks_the_scores():
    from cnnscope.testing.models import IDENTITY_PREPROCESS

    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    model = cnnscope.load_model(_Wrapped("tuple").eval(), preprocess=IDENTITY_PREPROCESS, output=1)
    assert model.num_classes == 2  # the second element of the tuple
    model = cnnscope.load_model(_Wrapped("dict").eval(), preprocess=IDENTITY_PREPROCESS, output="nothing")
    with pytest.raises(cnnscope.ModelError, match="output='nothing' finds no tensor of scores"):
        cnnscope.get_method("saliency")(model)(images)
