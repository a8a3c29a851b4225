"""The CAM variants of issue 22 against pytorch-grad-cam 1.5.7's on torchvision's resnet50 (random weights, seeded;
the BatchNorm statistics and affine parameters randomized too, so that FullGrad's implicit biases are not 0).

pytorch-grad-cam rescales each map to [0, 1] and resizes it to the input with cv2.resize (bilinear, half-pixel
centres); ours keep the layer's grid and scale. Ours are compared after the same bilinear upsampling (torch's,
half-pixel, as cv2's for enlarging) and the same [0, 1] scaling, by Pearson r per image."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("torchvision", reason="zoo tests run in .venv-zoo: make test-zoo")
pytest.importorskip("pytorch_grad_cam", reason="grad-cam (pytorch-grad-cam) is a zoo dependency (requirements/zoo.txt)")

import cnnscope
from cnnscope.models import Model, Preprocess

from ..conftest import pearson

SIZE = 112  # layer3: 7x7, layer4: 4x4
LAYER = "layer3"


@pytest.fixture(scope="module")
def resnet():
    from torchvision import models

    torch.manual_seed(0)
    module = models.resnet50(weights=None).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, torch.nn.BatchNorm2d):
                n = sub.num_features
                sub.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
                sub.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
                sub.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                sub.bias.copy_(torch.randn(n, generator=generator) * 0.1)
        module.fc.weight.mul_(0.01)  # logits of std ~3, not ~260: a softmax that is not saturated (ReST, FinerCAM)
    model = Model(module, preprocess=Preprocess((SIZE, SIZE)), name="resnet50")
    batch = model.preprocess.normalize(torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2)))
    with torch.no_grad():
        top = module(batch).argmax(dim=1)
    return model, batch, top


def as_theirs(raw: torch.Tensor) -> torch.Tensor:
    """(B, h, w) maps upsampled to the input (half-pixel bilinear, as cv2.resize) and scaled to [0, 1] per image."""
    if raw.shape[-1] != SIZE:
        raw = F.interpolate(raw[:, None], size=(SIZE, SIZE), mode="bilinear", align_corners=False)[:, 0]
    low = raw.flatten(1).amin(1)[:, None, None]
    high = raw.flatten(1).amax(1)[:, None, None]
    return (raw - low) / (high - low + 1e-12)


def theirs(cls_name: str, model, batch, targets, layer=LAYER, **call) -> tuple[torch.Tensor, object]:
    """Their map for (B,) targets (a fresh copy of the module: they set .grad and eval())."""
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    module = copy.deepcopy(model.module)
    cls = getattr(pytorch_grad_cam, cls_name)
    layers = [] if cls_name == "FullGrad" else [module.get_submodule(layer)]
    make_target = call.pop("make_target", ClassifierOutputTarget)
    cam = cls(module, layers)
    wanted = None if targets is None else [make_target(int(t)) for t in targets]
    result = cam(batch.clone(), wanted, **call)
    return torch.from_numpy(np.asarray(result)), cam


def assert_agree(ours: torch.Tensor, their: torch.Tensor, limit: float = 0.999) -> None:
    for i in range(ours.shape[0]):
        r = pearson(ours[i], their[i])
        assert r >= limit, f"image {i}: r = {r:.5f}"


@pytest.mark.filterwarnings("ignore::cnnscope.CnnscopeWarning")
def test_gradcam_elementwise_equals_theirs(resnet):
    model, batch, top = resnet
    ours = cnnscope.get_method("gradcam-elementwise")(model, layer=LAYER)(batch, top.view(-1, 1)).raw[:, 0]
    their, _ = theirs("GradCAMElementWise", model, batch, top)
    assert_agree(as_theirs(ours), their)


@pytest.mark.filterwarnings("ignore::cnnscope.CnnscopeWarning")
def test_finercam_equals_theirs(resnet):
    """Their FinerCAM with no targets: the top class against the three classes whose logits are closest."""
    model, batch, _ = resnet
    ours = cnnscope.get_method("finercam")(model, layer=LAYER)(batch, "top1").raw[:, 0]
    their, _ = theirs("FinerCAM", model, batch, None)
    assert_agree(as_theirs(ours), their)


@pytest.mark.filterwarnings("ignore::cnnscope.CnnscopeWarning")
@pytest.mark.parametrize("score", ["logit", "rest"])
def test_shapleycam_equals_theirs(resnet, score):
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputReST, ClassifierOutputTarget

    model, batch, top = resnet
    ours = cnnscope.get_method("shapleycam")(model, layer=LAYER, score=score)(batch, top.view(-1, 1)).raw[:, 0]
    make = ClassifierOutputReST if score == "rest" else ClassifierOutputTarget
    their, _ = theirs("ShapleyCAM", model, batch, top, make_target=make)
    assert_agree(as_theirs(ours), their, limit=0.99999)
    if score == "rest":  # the Hessian term is what makes them agree this closely: without it, r is ~0.9995
        gradcam = cnnscope.get_method("gradcam")(model, layer=LAYER)
        for i in range(batch.shape[0]):

            def rest(logits, c=int(top[i])):
                return 2 * logits[:, c] - torch.logsumexp(logits, dim=1)

            first_order = gradcam(batch[i : i + 1], rest).raw[:, 0]
            assert pearson(as_theirs(first_order)[0], their[i]) < 0.9999


def test_fullgrad_equals_theirs_with_their_scaling(resnet):
    """scaling="channel" is pytorch-grad-cam's post-processing (each channel to [0, 1], half-pixel upsampling); the
    default (the paper's: per layer, aligned corners) is a different picture, so it is not compared."""
    model, batch, top = resnet
    ours = cnnscope.get_method("fullgrad")(model, scaling="channel")(batch, top.view(-1, 1)).raw[:, 0]
    their, _ = theirs("FullGrad", model, batch, top)
    assert_agree(as_theirs(ours), their)


def _their_projection(cam, weighted_of) -> torch.Tensor:
    """Their first principal component of the weighted activations from the last call's activations and gradients
    (before their ReLU: the sign of an SVD is arbitrary, theirs is left to chance and ours is fixed, so the
    comparison is of the projection up to sign)."""
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection

    activations = cam.activations_and_grads.activations[0].numpy()
    grads = cam.activations_and_grads.gradients[0].numpy()
    return torch.from_numpy(get_2d_projection(weighted_of(activations, grads)))


@pytest.mark.filterwarnings("ignore::cnnscope.CnnscopeWarning")
@pytest.mark.parametrize(
    ("name", "cls_name", "options", "weighted_of"),
    [
        ("eigengradcam", "EigenGradCAM", {}, lambda a, g: g * a),
        (
            "gradcam",
            "GradCAM",
            {"eigen_smooth": True},
            lambda a, g: g.mean(axis=(2, 3), keepdims=True) * a,
        ),
    ],
)
def test_first_principal_components_equal_theirs_up_to_sign(resnet, name, cls_name, options, weighted_of):
    model, batch, top = resnet
    ours = cnnscope.get_method(name)(model, layer=LAYER, relu=False, **options)(batch, top.view(-1, 1)).raw[:, 0]
    _, cam = theirs(cls_name, model, batch, top, **({"eigen_smooth": True} if options else {}))
    projection = _their_projection(cam, weighted_of)
    for i in range(batch.shape[0]):
        assert abs(pearson(ours[i], projection[i])) >= 0.999
    # with the ReLU, ours equals theirs whenever their sign happened to agree with the summed map
    with_relu = cnnscope.get_method(name)(model, layer=LAYER, **options)(batch, top.view(-1, 1)).raw[:, 0]
    their_maps, _ = theirs(cls_name, model, batch, top, **({"eigen_smooth": True} if options else {}))
    for i in range(batch.shape[0]):
        if pearson(ours[i], projection[i]) > 0:
            assert pearson(as_theirs(with_relu)[i], their_maps[i]) >= 0.999


@pytest.mark.filterwarnings("ignore::cnnscope.CnnscopeWarning")
def test_aug_smooth_averages_the_same_six_views_as_theirs(resnet):
    """Theirs scales each of the six maps to [0, 1] before averaging; ours averages the raw maps (raw keeps its
    scale). The augmentations and the flip back are the same: their average equals the average of our six plain
    maps scaled as theirs, and our aug_smooth map equals the average of the same six raw maps."""
    model, batch, top = resnet
    targets = top.view(-1, 1)
    plain = cnnscope.get_method("gradcam")(model, layer=LAYER)
    views = []
    for flip in (False, True):
        for factor in (0.9, 1.0, 1.1):
            augmented = batch * factor
            raw = plain(augmented.flip(-1) if flip else augmented, targets).raw[:, 0]
            views.append(raw.flip(-1) if flip else raw)
    their, _ = theirs("GradCAM", model, batch, top, aug_smooth=True)
    assert_agree(sum(as_theirs(v) for v in views) / 6, their)
    ours = cnnscope.get_method("gradcam")(model, layer=LAYER, aug_smooth=True)(batch, targets).raw[:, 0]
    torch.testing.assert_close(ours, sum(views) / 6, rtol=1e-4, atol=1e-6 * float(ours.abs().max()))
    assert_agree(as_theirs(ours), their)  # the scaling order aside, the same picture (r ~0.99999 here)
