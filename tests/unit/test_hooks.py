import pytest
import torch
from torch import nn

from cnnscope.hooks import capture
from cnnscope.models import Model, Preprocess
from cnnscope.testing import Snapshot


class InPlaceAfter(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.act = nn.ReLU(inplace=True)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = self.act(self.conv(x))
        x.mul_(2)  # an in-place op downstream of the captured layer
        return self.fc(x.mean(dim=(2, 3)))


def test_capture_takes_the_requested_call_of_a_shared_module(default_model, default_batch):
    stem, head = default_model.layer("_swish@0"), default_model.layer("_swish@1")
    with capture(default_model.module, [stem, head]) as record, torch.no_grad():
        default_model.module.eval()(default_batch)
    assert record["_swish@0"].shape == (2, 32, 112, 112)
    assert record["_swish@1"].shape == (2, 1280, 7, 7)
    assert record.forwards == 1


def test_captured_values_survive_in_place_ops_downstream():
    model = Model(InPlaceAfter().eval(), preprocess=Preprocess((4, 4)))
    x = torch.randn(1, 3, 4, 4)
    conv = model.layer("conv")
    with capture(model.module, [conv]) as record, torch.enable_grad():
        model.module(x)
    expected = model.module.conv(x)
    assert torch.allclose(record["conv"], expected), "the ReLU(inplace) after the layer changed the record"
    assert record["conv"].requires_grad  # usable with autograd.grad even with frozen params


def test_hooks_removed_after_an_exception(default_model, default_batch):
    before = Snapshot.take(default_model.module)
    with (
        pytest.raises(RuntimeError, match="boom"),
        capture(default_model.module, [default_model.default_layer()]),
    ):
        raise RuntimeError("boom")
    assert not before.differences(Snapshot.take(default_model.module))


def test_paused_capture_records_nothing(default_model, default_batch):
    layer = default_model.default_layer()
    with capture(default_model.module, [layer]) as record, torch.no_grad():
        with record.paused():
            default_model.module.eval()(default_batch[:1])
        assert record.activations == {} and record.forwards == 0


def test_submodules_matches_modules(default_model):
    from cnnscope.state import submodules
    from cnnscope.testing import TinyCNN

    for module in (default_model.module, TinyCNN()):
        assert {id(m) for m in submodules(module)} == {id(m) for m in module.modules()}
        assert len(submodules(module)) == len(list(module.modules()))
