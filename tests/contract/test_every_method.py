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
}
#: On the 224x224 default model: a few large patches are enough to check the contract.
LIGHT_DEFAULT = {"occlusion": {"window": 112, "stride": 112}, "lime": {"samples": 30, "segments": 10}}


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
