"""FullGrad: the full-gradient decomposition is complete, and the map is the paper's post-processing of it."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cnnscope
from cnnscope.models import Model, Preprocess
from cnnscope.testing import check_method, quadrant_model

PLAIN = Preprocess((16, 16), mean=(0, 0, 0), std=(1, 1, 1))


def _randomized(module: nn.Module, seed: int) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
        for sub in module.modules():
            if isinstance(sub, nn.BatchNorm2d):
                sub.running_mean.copy_(torch.randn(sub.num_features, generator=generator) * 0.3)
                sub.running_var.copy_(torch.rand(sub.num_features, generator=generator) + 0.5)
    return module.eval()


class PiecewiseLinear(nn.Module):
    """A ReLU network with every way of calling a layer: conv + BN modules, an in-place ReLU, a functional relu,
    a conv module called twice, a functional batch norm with its own statistics, a residual add, max pooling and a
    linear head with a bias. Piecewise linear, so its full-gradient decomposition is exact."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.relu = nn.ReLU(inplace=True)
        self.shared = nn.Conv2d(6, 6, 3, padding=1)
        self.gamma = nn.Parameter(torch.ones(6))
        self.beta = nn.Parameter(torch.zeros(6))
        self.register_buffer("mean", torch.zeros(6))
        self.register_buffer("var", torch.ones(6))
        self.fc = nn.Linear(6, 4)
        _randomized(self, seed)
        with torch.no_grad():
            self.mean.copy_(torch.linspace(-0.5, 0.5, 6))
            self.var.copy_(torch.linspace(0.5, 2.0, 6))

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.shared(x))
        y = F.batch_norm(self.shared(y), self.mean, self.var, self.gamma, self.beta, False, 0.1, 1e-5)
        x = F.max_pool2d(torch.relu(x + y), 2)
        return self.fc(x.mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def piecewise():
    return Model(PiecewiseLinear(), labels=[f"c{i}" for i in range(4)], preprocess=PLAIN)


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def test_the_full_gradients_sum_to_the_logit_through_shared_functional_and_inplace_calls(piecewise, images):
    explanation = cnnscope.get_method("fullgrad")(piecewise)(images, [0, 1, 2, 3])
    gaps = torch.tensor(explanation.stats["completeness_gap"])
    assert gaps.shape == (3, 4)
    assert float(gaps.abs().max()) < 1e-4 * (1 + float(explanation.scores.abs().max()))


def test_a_missed_call_would_show_in_the_gap(piecewise, images):
    """The completeness check is not vacuous: dropping the second call of the shared conv breaks it."""
    from cnnscope.methods import cam

    original = cam._BiasGradientRecorder.__torch_function__
    seen = {"shared": 0}

    def skip_second_shared_call(self, func, types, args=(), kwargs=None):
        if func is torch.conv2d and len(args) > 1 and args[1] is piecewise.module.shared.weight:
            seen["shared"] += 1
            if seen["shared"] % 2 == 0:
                return func(*args, **(kwargs or {}))
        return original(self, func, types, args, kwargs)

    cam._BiasGradientRecorder.__torch_function__ = skip_second_shared_call
    try:
        explanation = cnnscope.get_method("fullgrad")(piecewise)(images, [0])
    finally:
        cam._BiasGradientRecorder.__torch_function__ = original
    assert float(torch.tensor(explanation.stats["completeness_gap"]).abs().max()) > 1e-2


def _by_hand(net: PiecewiseLinear, images: torch.Tensor, target: int, per_channel: bool) -> torch.Tensor:
    """The paper's post-processing, written out on the unrolled forward pass."""
    x = images.clone().requires_grad_(True)
    z1 = net.conv1(x)
    z2 = net.bn1(z1)
    a = torch.relu(z2)
    z3 = net.shared(a)
    z4 = net.shared(torch.relu(z3))
    z5 = F.batch_norm(z4, net.mean, net.var, net.gamma, net.beta, False, 0.1, 1e-5)
    out = net.fc(F.max_pool2d(torch.relu(a + z5), 2).mean(dim=(2, 3)))
    zs = [z1, z2, z3, z4, z5]
    grads = torch.autograd.grad(out[:, target].sum(), [x, *zs])
    bn1_bias = net.bn1.bias - net.bn1.running_mean * net.bn1.weight / torch.sqrt(net.bn1.running_var + 1e-5)
    f_bias = net.beta - net.mean * net.gamma / torch.sqrt(net.var + 1e-5)
    biases = [net.conv1.bias, bn1_bias, net.shared.bias, net.shared.bias, f_bias]

    def psi(t):
        t = t.abs()
        dims = (2, 3) if per_channel else (1, 2, 3)
        low = t.amin(dim=dims, keepdim=True)
        return (t - low) / (t.amax(dim=dims, keepdim=True) - low)

    result = psi(grads[0] * images).sum(1)
    for grad, bias in zip(grads[1:], biases, strict=True):
        result = result + psi(grad * bias.detach()[None, :, None, None]).sum(1)  # same size as the input here
    return result.detach()


@pytest.mark.parametrize("scaling", ["layer", "channel"])
def test_the_map_is_the_post_processed_decomposition(piecewise, images, scaling):
    explanation = cnnscope.get_method("fullgrad")(piecewise, scaling=scaling)(images, [2])
    expected = _by_hand(piecewise.module, images, 2, per_channel=scaling == "channel")
    torch.testing.assert_close(explanation.raw[:, 0], expected, rtol=1e-4, atol=1e-5)
    assert not explanation.signed


def test_layer_outputs_smaller_than_the_input_are_upsampled_as_the_paper():
    """A strided conv's bias-gradient map is scaled per layer, then upsampled with aligned corners."""

    class Strided(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 4, stride=4)
            self.fc = nn.Linear(4, 2)
            _randomized(self, 3)

        def forward(self, x):
            return self.fc(F.relu(self.conv(x)).mean(dim=(2, 3)))

    model = Model(Strided(), preprocess=PLAIN)
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    explanation = cnnscope.get_method("fullgrad")(model)(x, [1])
    net = model.module
    inputs = x.clone().requires_grad_(True)
    z = net.conv(inputs)
    gx, gz = torch.autograd.grad(net.fc(F.relu(z).mean(dim=(2, 3)))[:, 1].sum(), [inputs, z])
    expected = sum(
        F.interpolate(
            ((t := (g * b).abs()) - t.min()) / (t.max() - t.min()),
            size=(16, 16),
            mode="bilinear",
            align_corners=True,
        ).sum(1)
        for g, b in [(gx, x), (gz, net.conv.bias.detach()[None, :, None, None])]
    )
    torch.testing.assert_close(explanation.raw[:, 0], expected, rtol=1e-4, atol=1e-5)


def test_the_map_peaks_on_the_class_evidence():
    model = quadrant_model()
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    explanation = cnnscope.get_method("fullgrad")(model)(images, [0, 1, 2, 3])
    for k in range(4):
        mass = [float((explanation.raw[:, k] * mask[0]).sum()) for mask in model.module.masks]
        assert max(range(4), key=lambda q: mass[q]) == k


def test_layer_is_refused_in_one_line(piecewise):
    with pytest.raises(cnnscope.MethodError, match="fullgrad takes no layer") as info:
        cnnscope.get_method("fullgrad")(piecewise, layer="conv1")
    assert "\n" not in str(info.value)


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_torchscript_is_refused(piecewise, images):
    scripted = Model(torch.jit.trace(piecewise.module, images[:1]), preprocess=PLAIN)
    with pytest.raises(cnnscope.MethodError, match="TorchScript"):
        cnnscope.get_method("fullgrad")(scripted)(images, [0])


@pytest.mark.parametrize("options", [{}, {"scaling": "channel", "aug_smooth": True}])
def test_contract_on_the_piecewise_model(piecewise, images, options):
    check_method(cnnscope.get_method("fullgrad"), piecewise, images, target="top2", **options)
