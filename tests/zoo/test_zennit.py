"""LRP composites against Zennit 0.5.1's on vgg16 and resnet18 (random weights, seeded, 64x64 inputs).

Zennit needs its canonizers (BatchNorm merged, the residual add as a module) and starts from the output it is
given; started from the target's one-hot times its logit, its relevance is ours."""

from __future__ import annotations

import copy

import pytest
import torch

import cnnscope

from ..conftest import pearson
from .archs import images, small

pytest.importorskip("torchvision", reason="zoo tests run in .venv-zoo: make test-zoo")
zennit = pytest.importorskip("zennit", reason="Zennit 0.5.1 is a zoo dependency (requirements/zoo.txt)")

from zennit.attribution import Gradient  # noqa: E402
from zennit.composites import EpsilonAlpha2Beta1Flat, EpsilonGammaBox, EpsilonPlus, EpsilonPlusFlat  # noqa: E402
from zennit.torchvision import ResNetCanonizer, VGGCanonizer  # noqa: E402

COMPOSITES = {
    "epsilon-plus-flat": EpsilonPlusFlat,
    "epsilon-plus": EpsilonPlus,
    "epsilon-gamma-box": EpsilonGammaBox,
    "epsilon-alpha2-beta1-flat": EpsilonAlpha2Beta1Flat,
}
CANONIZERS = {"torchvision:vgg16": VGGCanonizer, "torchvision:resnet18": ResNetCanonizer}


def zennit_relevance(model, name, batch, targets, composite_name):
    module = copy.deepcopy(model.module).eval()
    kwargs = {"canonizers": [CANONIZERS[name]()]}
    if composite_name == "epsilon-gamma-box":
        kwargs["low"] = model.preprocess.normalize(torch.zeros(1, 3, 1, 1))
        kwargs["high"] = model.preprocess.normalize(torch.ones(1, 3, 1, 1))
    composite = COMPOSITES[composite_name](**kwargs)
    with torch.no_grad():
        logits = module(batch)
    start = torch.zeros_like(logits).scatter(1, targets.view(-1, 1), logits.gather(1, targets.view(-1, 1)))
    with Gradient(model=module, composite=composite) as attributor:
        _, relevance = attributor(batch.clone(), start)
    return relevance.sum(dim=1)


@pytest.mark.parametrize("composite", list(COMPOSITES))
@pytest.mark.parametrize("name", ["torchvision:vgg16", "torchvision:resnet18"])
def test_lrp_composites_equal_zennits(name, composite):
    if name == "torchvision:resnet18":  # torchvision's own ResNet (ResNetCanonizer knows its blocks)
        from torchvision import models

        from cnnscope.models import Model

        torch.manual_seed(0)
        model = Model(models.resnet18(weights=None).eval(), preprocess=small(name.replace("18", "50")).preprocess)
    else:
        model = small(name)
    batch = images(model)
    with torch.no_grad():
        targets = model(batch).argmax(dim=1)
    ours = cnnscope.get_method("lrp")(model, composite=composite)(batch, targets.view(-1, 1)).raw[:, 0]
    theirs = zennit_relevance(model, name, batch, targets, composite)
    for i in range(batch.shape[0]):
        assert pearson(ours[i], theirs[i]) >= 0.999
