"""The gradient family: definitions checked on models where the answer is known."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cnnscope
from cnnscope import CnnscopeWarning, MethodError
from cnnscope.methods import IntegratedGradients, Saliency, SmoothGrad
from cnnscope.methods.modifiers import modified_backprop
from cnnscope.models import Model, Preprocess
from cnnscope.testing import quadrant_masks, quadrant_model, tiny_model


class Activations(nn.Module):
    """y = sum over a linear map of act(x) for each kind of activation call."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.module = {
            "relu": nn.ReLU(),
            "relu_": nn.ReLU(inplace=True),
            "relu6": nn.ReLU6(),
            "silu": nn.SiLU(),
            "gelu": nn.GELU(),
        }.get(kind)

    def forward(self, x):
        if self.kind == "F.relu":
            return F.relu(x)
        if self.kind == "torch.relu":
            return torch.relu(x)
        if self.kind == "method":
            return x.relu()
        return self.module(x * 1.0)


DERIVATIVES = {
    "relu": lambda x: (x > 0).float(),
    "relu_": lambda x: (x > 0).float(),
    "F.relu": lambda x: (x > 0).float(),
    "torch.relu": lambda x: (x > 0).float(),
    "method": lambda x: (x > 0).float(),
    "relu6": lambda x: ((x > 0) & (x < 6)).float(),
    "silu": lambda x: torch.sigmoid(x) * (1 + x * (1 - torch.sigmoid(x))),
    "gelu": None,
}


@pytest.mark.parametrize("kind", list(DERIVATIVES))
def test_guided_and_rectified_rules_for_every_activation_call(kind):
    net = Activations(kind)
    x = torch.linspace(-8, 8, 41).requires_grad_(True)
    upstream = torch.linspace(-1, 1, 41)
    for rule in ("guided", "rectified"):
        with modified_backprop(net, rule) as mode:
            y = net(x)
        (grad,) = torch.autograd.grad(y, x, grad_outputs=upstream)
        assert mode.seen == 1
        if rule == "rectified":
            expected = upstream.clamp_min(0)
        elif DERIVATIVES[kind] is None:
            leaf = x.detach().requires_grad_(True)
            (derivative,) = torch.autograd.grad(F.gelu(leaf).sum(), leaf)
            expected = upstream.clamp_min(0) * derivative
        else:
            expected = upstream.clamp_min(0) * DERIVATIVES[kind](x.detach())
        torch.testing.assert_close(grad, expected)
        torch.testing.assert_close(y, net(x))  # the forward is unchanged


def test_unmodifiable_activations_are_reported():
    class CustomSwish(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x * torch.sigmoid(x)

        @staticmethod
        def backward(ctx, grad):
            (x,) = ctx.saved_tensors
            s = torch.sigmoid(x)
            return grad * s * (1 + x * (1 - s))

    class MemoryEfficientSwish(nn.Module):
        def forward(self, x):
            return CustomSwish.apply(x)

    net = nn.Sequential(nn.Linear(4, 4), MemoryEfficientSwish(), nn.Linear(4, 2))
    x = torch.randn(1, 4, requires_grad=True)
    with pytest.warns(CnnscopeWarning) as record, modified_backprop(net, "guided"):
        net(x)
    messages = " | ".join(str(w.message) for w in record)
    assert "MemoryEfficientSwish ('1')" in messages and "equals the plain gradient" in messages


def test_saliency_lies_in_the_quadrant_the_class_reads():
    model = quadrant_model()
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    explanation = Saliency(model)(images, [0, 1, 2, 3])
    masks = quadrant_masks(32, 32)[:, 0]
    for q in range(4):
        heat = explanation.maps[:, q]
        inside = (heat * masks[q]).sum() / heat.sum()
        assert float(inside) > 0.97  # the 3x3 convolution reaches one pixel beyond the quadrant


def test_reductions_and_sign(default_model, chelsea):
    for reduce, signed in [("max-abs", False), ("abs-sum", False), ("l2", False), ("sum", True)]:
        explanation = Saliency(default_model, reduce=reduce)(chelsea, 285)
        assert explanation.signed is signed
        assert explanation.raw.shape == (1, 1, 224, 224) and explanation.channels.shape == (1, 1, 3, 224, 224)
    g = explanation.channels[0, 0]
    torch.testing.assert_close(Saliency(default_model)(chelsea, 285).raw[0, 0], g.abs().amax(0))
    with pytest.raises(MethodError, match="option reduce of saliency takes one of: max-abs, abs-sum, l2, sum; got"):
        Saliency(default_model, reduce="mean")


def test_integrated_gradients_completeness_and_baselines():
    model = tiny_model()
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    explanation = IntegratedGradients(model, steps=64)(images, "top2")
    gains = []
    for baseline in ("black", "blur", "noise"):
        e = IntegratedGradients(model, steps=64, baseline=baseline)(images, 1)
        gap = torch.tensor(e.stats["completeness_gap"])
        with torch.no_grad():
            full = model.module(images)[:, 1]
        gains.append(full)
        assert float(gap.abs().max()) < 0.02 * float(full.abs().max() + 1)  # sum(IG) = F(x) - F(baseline)
    assert explanation.signed and explanation.stats["forwards"] >= 2
    custom = IntegratedGradients(model, steps=8, baseline=torch.zeros(3, 32, 32))(images, 1)
    black = IntegratedGradients(model, steps=8)(images, 1)
    torch.testing.assert_close(custom.raw, black.raw)  # identity preprocessing: black is all zeros
    with pytest.raises(MethodError, match="baseline tensor has shape"):
        IntegratedGradients(model, baseline=torch.zeros(3, 8, 8))(images, 1)
    with pytest.raises(MethodError, match="option baseline of integrated-gradients takes one of: black, blur, noise"):
        IntegratedGradients(model, baseline="grey")(images, 1)


def test_smoothgrad_definition():
    model = tiny_model()
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    plain = Saliency(model)(images, "top2")
    no_noise = SmoothGrad(model, samples=3, noise=0.0)(images, "top2")
    torch.testing.assert_close(no_noise.raw, plain.raw)  # averaging identical maps
    first = SmoothGrad(model, samples=8, seed=3)(images, "top2")
    again = SmoothGrad(model, samples=8, seed=3)(images, "top2")
    other = SmoothGrad(model, samples=8, seed=4)(images, "top2")
    assert torch.equal(first.raw, again.raw) and not torch.equal(first.raw, other.raw)
    assert torch.equal(first.targets, plain.targets)  # targets chosen on the clean image
    ig = SmoothGrad(model, base="integrated-gradients", samples=2)(images, 0)
    assert ig.signed
    with pytest.raises(MethodError, match="option base of smoothgrad takes one of: saliency"):
        SmoothGrad(model, base="gradcam")


def test_gradient_methods_leave_the_input_and_grads_alone(default_model, default_batch):
    copy = default_batch.clone()
    for name in ("saliency", "guided-backprop", "gradxinput"):
        cnnscope.get_method(name)(default_model)(default_batch, 285)
    assert torch.equal(copy, default_batch) and not default_batch.requires_grad
    assert all(p.grad is None for p in default_model.module.parameters())


def test_guided_backprop_on_a_model_with_functional_relu_warns_about_nothing():
    model = Model(
        nn.Sequential(nn.Conv2d(3, 2, 1), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 8 * 8, 2)).eval(),
        preprocess=Preprocess((8, 8)),
    )
    cnnscope.get_method("guided-backprop")(model)(torch.rand(1, 3, 8, 8), 0)  # warnings are errors here
