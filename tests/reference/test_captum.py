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
