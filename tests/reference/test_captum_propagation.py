"""LRP and DeepLIFT against Captum's where the definitions coincide (a model of ReLU modules), and where
Captum's silently fail (a functional ReLU, a ReLU module called twice) while ours keep their axioms."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cnnscope
from cnnscope.models import Model
from cnnscope.testing.models import IDENTITY_PREPROCESS

from ..conftest import pearson

captum_attr = pytest.importorskip("captum.attr")


class Sequential(nn.Module):
    """Convolutions, ReLU modules (one each), average pooling and a linear head, with biases."""

    def __init__(self, reuse: bool = False, functional: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.relu1 = nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()
        self.conv2, self.relu2 = nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()
        self.pool = nn.AvgPool2d(2)
        self.conv3, self.relu3 = nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)
        self.reuse, self.functional = reuse, functional

    def forward(self, x):
        x = self.relu1(self.conv1(x))
        x = self.conv2(x)
        x = F.relu(x) if self.functional else (self.relu1(x) if self.reuse else self.relu2(x))
        x = self.relu3(self.conv3(self.pool(x)))
        return self.fc(self.gap(x).flatten(1))


IMAGES = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def wrap(net: nn.Module) -> Model:
    return Model(net.eval(), labels=list("abcd"), preprocess=IDENTITY_PREPROCESS, name="sequential")


def targets_of(net):
    with torch.no_grad():
        return net(IMAGES).argmax(dim=1)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_lrp_epsilon_equals_captums_lrp():
    net = Sequential().eval()
    targets = targets_of(net)
    ours = cnnscope.get_method("lrp")(wrap(net), composite="epsilon", epsilon=1e-9)(IMAGES, targets.view(-1, 1))
    theirs = captum_attr.LRP(Sequential().eval()).attribute(IMAGES.clone(), target=targets).detach().sum(dim=1)
    for i in range(2):
        assert pearson(ours.raw[i, 0], theirs[i]) >= 0.999
    torch.testing.assert_close(ours.raw[:, 0], theirs, rtol=1e-2, atol=1e-6)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_deeplift_equals_captums_deeplift():
    net = Sequential().eval()
    targets = targets_of(net)
    ours = cnnscope.get_method("deeplift")(wrap(net))(IMAGES, targets.view(-1, 1))
    theirs = captum_attr.DeepLift(Sequential().eval()).attribute(
        IMAGES.clone(), baselines=torch.zeros_like(IMAGES), target=targets
    )
    theirs = theirs.detach().sum(dim=1)
    for i in range(2):
        assert pearson(ours.raw[i, 0], theirs[i]) >= 0.999
    torch.testing.assert_close(ours.raw[:, 0], theirs, rtol=1e-3, atol=1e-6)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_deeplift_multipliers_equal_captums_where_the_image_equals_the_baseline():
    """Where a unit's input equals its reference value (x = x': inside a black patch, with the black baseline)
    the rescale rule takes the slope f'(x), 1 in a ReLU's linear region (a positive bias) and 0 in its dead
    one; the secant elsewhere. The multipliers (Captum's multiply_by_inputs=False) show both; the maps would
    not, being the multipliers times x - x', which is 0 there."""
    net = Sequential().eval()
    images = IMAGES.clone()
    images[:, :, 3:13, 3:13] = 0
    with torch.no_grad():
        targets = net(images).argmax(dim=1)
    method = cnnscope.get_method("deeplift")(wrap(net))
    ours, *_ = method.propagate(images, lambda logits: targets.view(-1, 1), torch.zeros_like(images))
    theirs = captum_attr.DeepLift(Sequential().eval(), multiply_by_inputs=False).attribute(
        images.clone(), baselines=torch.zeros_like(images), target=targets
    )
    inside = theirs.detach()[:, :, 6:10, 6:10]
    assert float(inside.abs().amin()) > 0  # what reaches the patch's pixels went through units with x = x'
    torch.testing.assert_close(ours[:, 0], theirs.detach(), rtol=1e-4, atol=1e-6)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("kind", ["functional", "reuse"])
def test_captums_deeplift_fails_on_functional_or_reused_relus_ours_holds(kind):
    """Captum rescales only ReLU modules it can hook once (its FAQ, issue #1082): a functional relu keeps its
    gradient, so the map no longer sums to f(x) - f(x'); a ReLU module called twice is refused outright. Ours
    finds activations by call and sums exactly on both."""
    baseline = IMAGES.flip(-1)
    net = Sequential(functional=kind == "functional", reuse=kind == "reuse").eval()
    targets = targets_of(net)
    with torch.no_grad():
        gain = net(IMAGES).gather(1, targets.view(-1, 1)) - net(baseline).gather(1, targets.view(-1, 1))
    ours = cnnscope.get_method("deeplift")(wrap(net), baseline=baseline)(IMAGES, targets.view(-1, 1))
    our_gap = (ours.raw.flatten(2).sum(dim=2) - gain).abs().max()
    assert our_gap < 1e-6 + 1e-4 * gain.abs().max()
    theirs = captum_attr.DeepLift(Sequential(functional=kind == "functional", reuse=kind == "reuse").eval())
    if kind == "reuse":
        with pytest.raises(Exception, match="used more than once"):
            theirs.attribute(IMAGES.clone(), baselines=baseline, target=targets)
        return
    captum_map = theirs.attribute(IMAGES.clone(), baselines=baseline, target=targets).detach()
    captum_gap = (captum_map.flatten(1).sum(dim=1, keepdim=True) - gain).abs().max()
    assert captum_gap > 0.5 * gain.abs().max() and captum_gap > 100 * our_gap


class BiasFree(nn.Module):
    """A bias-free ReLU network (LRP-epsilon conserves the score on it) in the variant ``kind``: ``residual`` adds
    the first block's output back after the second (``y + x``), ``twice`` runs the second conv module twice, ``elu``
    has an ELU module instead of the second ReLU."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.kind = kind
        self.conv1, self.relu1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.act2 = nn.ELU() if kind == "elu" else nn.ReLU()
        self.conv3, self.relu3 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.ReLU()
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(8, 4, bias=False)

    def forward(self, x):
        x = self.relu1(self.conv1(x))
        y = self.act2(self.conv2(x))
        if self.kind == "residual":
            y = y + x
        if self.kind == "twice":
            y = self.act2(self.conv2(y))
        x = self.relu3(self.conv3(self.pool(y)))
        return self.fc(x.mean(dim=(2, 3)))


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("kind", ["residual", "twice", "elu"])
def test_captums_lrp_loses_conservation_or_refuses_where_ours_conserves(kind):
    """Captum's LRP needs every residual add rewritten as a module: with a plain ``y + x`` the relevance is not
    split between the two terms, and the map sums to about 17% more than the logit here. It refuses a module
    called twice and any module without a rule (an ELU). Ours splits an add's relevance in proportion to its
    terms, takes a module call by call and passes the relevance through an ELU, and sums to the logit within
    1e-3 (relative) on all three.
    (On a functional relu or a ReLU module called twice Captum's LRP-epsilon keeps conservation: its ReLUs pass
    relevance through, as ours do, unlike its DeepLift above.)"""
    net = BiasFree(kind).eval()
    targets = targets_of(net)
    with torch.no_grad():
        logit = net(IMAGES).gather(1, targets.view(-1, 1))[:, 0]
    ours = cnnscope.get_method("lrp")(wrap(net), composite="epsilon", epsilon=1e-9)(IMAGES, targets.view(-1, 1))
    torch.testing.assert_close(ours.raw[:, 0].flatten(1).sum(dim=1), logit, rtol=1e-3, atol=0.0)
    theirs = captum_attr.LRP(BiasFree(kind).eval())
    if kind == "twice":
        with pytest.raises(RuntimeError, match="used more than once"):
            theirs.attribute(IMAGES.clone(), target=targets)
        return
    if kind == "elu":
        with pytest.raises(TypeError, match="has no rule defined"):
            theirs.attribute(IMAGES.clone(), target=targets)
        return
    captum_sum = theirs.attribute(IMAGES.clone(), target=targets).detach().flatten(1).sum(dim=1)
    assert float(((captum_sum - logit) / logit).abs().min()) > 0.05  # every image off by more than 5%
