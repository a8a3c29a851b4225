"""Agreement with Captum where the definitions coincide (Captum is a dev dependency)."""

import pytest
import torch

from cnnscope.methods import GradCAM
from cnnscope.testing import tiny_model

from ..conftest import pearson

captum_attr = pytest.importorskip("captum.attr")


def _captum_gradcam(module, layer, batch, targets, relu=True):
    module.eval()
    explainer = captum_attr.LayerGradCam(module, layer)
    return explainer.attribute(batch, target=targets, relu_attributions=relu).detach()


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("layer_name", ["_bn1", "_conv_head", "_blocks.15._bn1"])
def test_gradcam_matches_captum_layergradcam_on_the_default_model(default_model, default_batch, layer_name):
    """Compared signed (relu off on both sides), which is stricter than comparing clipped maps."""
    ours = GradCAM(default_model, layer=layer_name, relu=False)(default_batch, [[285], [967]])
    layer = dict(default_model.module.named_modules())[layer_name]
    theirs = _captum_gradcam(default_model.module, layer, default_batch, [285, 967], relu=False)
    for i in range(2):
        assert pearson(ours.raw[i, 0], theirs[i, 0]) >= 0.999
        torch.testing.assert_close(ours.raw[i, 0], theirs[i, 0], rtol=1e-3, atol=1e-6)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_default_layer_matches_captum_on_the_shared_activation(default_model, default_batch):
    """Captum hooks the module object and keeps its last call; our default is that call, '_swish@1'."""
    ours = GradCAM(default_model, relu=False)(default_batch, [[285], [967]])
    theirs = _captum_gradcam(default_model.module, default_model.module._swish, default_batch, [285, 967], relu=False)
    assert ours.layer == "_swish@1"
    for i in range(2):
        assert pearson(ours.raw[i, 0], theirs[i, 0]) >= 0.999


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_gradcam_matches_captum_on_a_model_with_inplace_relus():
    model = tiny_model()
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    ours = GradCAM(model, layer="conv3")(images, 2)
    theirs = _captum_gradcam(model.module, model.module.conv3, images, 2)
    torch.testing.assert_close(ours.raw[:, 0], theirs[:, 0], rtol=1e-4, atol=1e-6)


@pytest.mark.filterwarnings("ignore::cnnscope.CnnscopeWarning")
def test_the_shared_module_trap_we_avoid(default_model, default_batch):
    """Hooking the module object ``_swish`` naively yields the stem's 112x112 call (pytorch-grad-cam's
    trap); cnnscope's default layer is the head call, a 7x7 map that matches Grad-CAM at ``_bn1``
    followed by the ReLU6 (positive where the head is active)."""
    ours = GradCAM(default_model)(default_batch, [[285], [967]])
    assert ours.layer == "_swish@1" and ours.raw.shape[-2:] == (7, 7)
    first_call = GradCAM(default_model, layer="_swish@0")(default_batch, [[285], [967]])
    assert first_call.raw.shape[-2:] == (112, 112)


def _inplace_relu_model():
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    ).eval()
    from cnnscope.models import Model, Preprocess

    return Model(net, preprocess=Preprocess((16, 16)))


GRADIENT_PAIRS = [
    ("saliency", "Saliency", {"abs": False}),
    ("gradxinput", "InputXGradient", {}),
    ("guided-backprop", "GuidedBackprop", {}),
    ("deconvnet", "Deconvolution", {}),
]


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(("ours", "theirs", "kwargs"), GRADIENT_PAIRS)
def test_pixel_methods_match_captum_on_a_model_with_inplace_relus(ours, theirs, kwargs):
    import cnnscope

    model = _inplace_relu_model()
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    mine = cnnscope.get_method(ours)(model)(images, 2).channels[:, 0]
    captum = getattr(captum_attr, theirs)(model.module).attribute(images.clone(), target=2, **kwargs).detach()
    torch.testing.assert_close(mine, captum, rtol=1e-4, atol=1e-7)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(("ours", "theirs", "kwargs"), GRADIENT_PAIRS[:2])
def test_pixel_methods_match_captum_on_the_default_model(default_model, default_batch, ours, theirs, kwargs):
    import cnnscope

    mine = cnnscope.get_method(ours)(default_model)(default_batch, [[285], [967]]).channels[:, 0]
    captum = getattr(captum_attr, theirs)(default_model.module).attribute(
        default_batch.clone(), target=[285, 967], **kwargs
    )
    for i in range(2):
        assert pearson(mine[i], captum[i].detach()) >= 0.999


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_the_guided_backprop_trap_on_the_default_model(default_model, default_batch):
    """Captum's GuidedBackprop only hooks nn.ReLU; the default model uses ReLU6, so Captum returns the
    plain gradient. Ours modifies the ReLU6 calls and differs from the plain gradient."""
    import cnnscope

    plain = cnnscope.get_method("saliency")(default_model)(default_batch, 285).channels[:, 0]
    captum = captum_attr.GuidedBackprop(default_model.module).attribute(default_batch.clone(), target=285).detach()
    guided = cnnscope.get_method("guided-backprop")(default_model)(default_batch, 285).channels[:, 0]
    assert pearson(captum[0], plain[0]) > 0.9999  # the trap: nothing was guided
    assert pearson(guided[0], plain[0]) < 0.9  # ours was
    assert float((guided * plain < 0).float().mean()) < float((plain < 0).float().mean())


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_guided_gradcam_matches_captum():
    import cnnscope

    model = _inplace_relu_model()
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    layer = model.module[2]
    mine = cnnscope.get_method("guided-gradcam")(model, layer="2", upsample="nearest")(images, 1).channels[:, 0]
    captum = captum_attr.GuidedGradCam(model.module, layer).attribute(images.clone(), target=1).detach()
    torch.testing.assert_close(mine, captum, rtol=1e-4, atol=1e-8)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_integrated_gradients_matches_captum(default_model, default_batch):
    import cnnscope

    explanation = cnnscope.get_method("integrated-gradients")(default_model, steps=16)(default_batch[:1], 285)
    baseline = (
        (torch.zeros(1, 3, 1, 1) - torch.tensor(default_model.preprocess.mean).view(1, 3, 1, 1))
        / torch.tensor(default_model.preprocess.std).view(1, 3, 1, 1)
    ).expand_as(default_batch[:1])
    captum, delta = captum_attr.IntegratedGradients(default_model.module).attribute(
        default_batch[:1].clone(),
        baselines=baseline.contiguous(),
        target=285,
        n_steps=16,
        method="gausslegendre",
        return_convergence_delta=True,
    )
    assert pearson(explanation.channels[0, 0], captum[0].detach()) >= 0.999
    assert explanation.stats["completeness_gap"][0][0] == pytest.approx(float(delta[0]), abs=1e-2)
