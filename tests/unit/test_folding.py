"""BatchNorm folding: the working copy computes what the model computes, and the model is untouched."""

import numpy as np
import pytest
import torch
from torch import nn

from cnnscope import deep_dream, maximize
from cnnscope.models import Model, Preprocess
from cnnscope.models.folding import fold_batchnorm

PLAIN = Preprocess((32, 32), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def state_of(module: nn.Module) -> dict:
    return {key: value.clone() for key, value in module.state_dict().items()}


def test_the_folded_copy_gives_the_same_logits_and_leaves_the_model_alone(default_model, default_batch):
    before = state_of(default_model.module)
    hooks = sum(len(m._forward_hooks) for m in default_model.module.modules())
    working, folded = fold_batchnorm(default_model)
    assert folded == 49  # every BatchNorm of EfficientNet-Lite0 follows its convolution
    assert working is not default_model and working.module is not default_model.module
    assert not any(isinstance(m, nn.BatchNorm2d) for m in working.module.modules())
    with torch.no_grad():
        expected, got = default_model.module(default_batch), working.module(default_batch)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # the user's model: the same weights and statistics, its BatchNorms, no hook left behind
    after = state_of(default_model.module)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in default_model.module.modules()) == 49
    assert sum(len(m._forward_hooks) for m in default_model.module.modules()) == hooks


def test_a_convolution_whose_output_is_read_is_not_folded(default_model, default_batch):
    conv = default_model.layer("_blocks.10._project_conv")
    working, folded = fold_batchnorm(default_model, keep=[conv])
    assert folded == 48
    outputs = []
    for model in (default_model, working):
        module = dict(model.module.named_modules())["_blocks.10._project_conv"]
        handle = module.register_forward_hook(lambda m, i, o: outputs.append(o))
        with torch.no_grad():
            model.module(default_batch)
        handle.remove()
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-4, atol=1e-5)  # still before the BatchNorm


class SkipAroundNorm(nn.Module):
    """The convolution's output feeds the BatchNorm and, unnormalized, a skip connection."""

    def __init__(self, running_stats: bool = True):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4, track_running_stats=running_stats)
        self.fc = nn.Linear(4, 2)
        if running_stats:
            with torch.no_grad():
                self.norm.running_mean.uniform_(-1, 1)
                self.norm.running_var.uniform_(0.5, 2)

    def forward(self, x):
        c = self.conv(x)
        return self.fc((self.norm(c) + c).mean(dim=(2, 3)))


def test_folds_that_would_change_the_function_are_refused():
    skip = Model(SkipAroundNorm().eval(), preprocess=PLAIN)
    working, folded = fold_batchnorm(skip)  # the BatchNorm output matches, the logits would not
    assert working is skip and folded == 0
    training = Model(SkipAroundNorm().train(), preprocess=PLAIN)
    assert fold_batchnorm(training) == (training, 0)  # train-mode statistics come from each batch
    batch_stats = Model(SkipAroundNorm(running_stats=False).eval(), preprocess=PLAIN)
    assert fold_batchnorm(batch_stats) == (batch_stats, 0)
    doubles = Model(SkipAroundNorm().double().eval(), preprocess=PLAIN)  # the float32 probe fails: no folding
    assert fold_batchnorm(doubles) == (doubles, 0)


def stage(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


def test_batchnorms_inside_sequentials_fold_too():
    torch.manual_seed(0)
    net = nn.Sequential(stage(3, 8), stage(8, 8), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).eval()
    for norm in (m for m in net.modules() if isinstance(m, nn.BatchNorm2d)):
        with torch.no_grad():
            norm.running_mean.uniform_(-1, 1), norm.running_var.uniform_(0.5, 2), norm.weight.uniform_(0.5, 2)
    model = Model(net, preprocess=PLAIN)
    working, folded = fold_batchnorm(model)
    assert folded == 2 and isinstance(working.module[0][1], nn.Identity) and isinstance(net[0][1], nn.BatchNorm2d)
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(working.module(x), net(x), rtol=1e-4, atol=1e-5)


def test_input_gradients_through_the_copy_are_the_models(default_model):
    working, _ = fold_batchnorm(default_model)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    grads = []
    for module in (default_model.module, working.module):
        inputs = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(module(inputs)[:, 1].sum(), inputs)
        grads.append(grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-4 * float(grads[0].abs().max()))


@pytest.mark.filterwarnings("ignore::cnnscope.CnnscopeWarning")
def test_maximize_and_dream_use_the_folded_copy(default_model, chelsea):
    common = dict(steps=4, size=64, seed=2, quiet=True)
    fast = maximize(default_model, [1, "channel:_blocks.10:3"], fold_bn=True, **common)
    plain = maximize(default_model, [1, "channel:_blocks.10:3"], fold_bn=False, **common)
    assert fast.stats["batchnorm_folded"] == 49 and plain.stats["batchnorm_folded"] == 0
    np.testing.assert_allclose(fast.start, plain.start, rtol=1e-4, atol=1e-4)  # the same function
    # Adam's first steps are close to sign(gradient): rounding differences move the paths apart (changing
    # the thread count does the same), so the results are compared by what they achieve, not pixel by pixel
    assert all(f > s + 3 for s, f in zip(fast.start, fast.final, strict=True))
    dreams = [
        deep_dream(default_model, chelsea, "_blocks.5", "0-1", octaves=2, iterations=2, fold_bn=fold, quiet=True)
        for fold in (True, False)
    ]
    assert dreams[0].stats["batchnorm_folded"] > 0 and dreams[1].stats["batchnorm_folded"] == 0
    np.testing.assert_allclose(dreams[0].after, dreams[1].after, rtol=1e-2)  # measured: within 0.3%
    assert np.abs(dreams[0].images.astype(int) - dreams[1].images.astype(int)).mean() < 0.5  # measured 0.03
