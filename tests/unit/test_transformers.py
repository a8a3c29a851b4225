"""CAMs on vision transformers: the token grid is inferred, not asked for."""

import pytest
import torch

import cnnscope
from cnnscope import MethodError
from cnnscope.testing import check_method, tiny_vit
from cnnscope.tokens import to_grid, token_grid


@pytest.mark.parametrize(
    ("tokens", "size", "expected"),
    [
        (197, (224, 224), (1, 14, 14)),  # ViT-B/16: class token
        (198, (224, 224), (2, 14, 14)),  # DeiT distilled: class + distillation tokens
        (201, (224, 224), (5, 14, 14)),  # class + 4 registers
        (196, (224, 224), (0, 14, 14)),  # no class token
        (129, (256, 512), (1, 8, 16)),  # a wide input
        (7, (224, 224), None),
    ],
)
def test_token_grid(tokens, size, expected):
    assert token_grid(tokens, size) == expected


def test_default_layer_is_the_last_blocks_input_norm():
    model = tiny_vit()
    assert model.default_layer().key == "blocks.1.norm1"


@pytest.mark.parametrize("extra", [1, 2, 5])
def test_gradcam_on_tokens_equals_the_formula(extra):
    model = tiny_vit(extra_tokens=extra)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    explanation = cnnscope.get_method("gradcam")(model, relu=False)(images, [0, 2])
    assert explanation.raw.shape == (2, 2, 8, 8) and explanation.maps.shape == (2, 2, 32, 32)
    layer = model.module.blocks[1]["norm1"]
    kept = []
    handle = layer.register_forward_hook(lambda m, i, o: kept.append(o))
    logits = model.module(images)
    handle.remove()
    for k, c in enumerate([0, 2]):
        (grad,) = torch.autograd.grad(logits[:, c].sum(), kept[0], retain_graph=True)
        a, g = to_grid(kept[0].detach(), (extra, 8, 8)), to_grid(grad, (extra, 8, 8))
        expected = (g.mean(dim=(2, 3))[:, :, None, None] * a).sum(1)
        torch.testing.assert_close(explanation.raw[:, k], expected, rtol=1e-4, atol=1e-6)


@pytest.mark.filterwarnings("ignore::cnnscope.CnnscopeWarning")
@pytest.mark.parametrize(
    "name", ["gradcam", "gradcam++", "hirescam", "layercam", "xgradcam", "eigencam", "scorecam", "ablationcam"]
)
def test_cams_pass_the_contract_on_a_vit(name):
    model = tiny_vit()
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    check_method(cnnscope.get_method(name), model, images, target="top2")


def test_eigencam_and_scorecam_read_the_token_grid():
    model = tiny_vit(extra_tokens=2)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    layer = model.module.blocks[1]["norm1"]
    kept = []
    handle = layer.register_forward_hook(lambda m, i, o: kept.append(o.detach()))
    with torch.no_grad():
        model.module(images)
    handle.remove()
    grid = to_grid(kept[0], (2, 8, 8))  # (B, D, 8, 8)
    # Eigen-CAM: the grid's first principal component (sign: along the activation energy per position)
    eigen = cnnscope.get_method("eigencam")(model, relu=False)(images, 0)
    for b in range(2):
        matrix = grid[b].flatten(1).T.double()
        centred = matrix - matrix.mean(0)
        component = torch.linalg.svd(centred, full_matrices=False)[2][0]
        projection = (centred @ component).view(8, 8).float()
        expected = projection * torch.sign(
            torch.corrcoef(torch.stack([projection.flatten(), grid[b].pow(2).sum(0).flatten()]))[0, 1]
        )
        torch.testing.assert_close(eigen.raw[b, 0], expected, rtol=1e-4, atol=1e-5)
    # Score-CAM: channel d of the grid masks the input; the masked scores, softmaxed, weigh the channels
    score = cnnscope.get_method("scorecam")(model, relu=False)(images[:1], 1)
    masks = torch.nn.functional.interpolate(
        grid[:1].transpose(0, 1), size=(32, 32), mode="bilinear", align_corners=True
    )
    low, high = masks.flatten(1).amin(1)[:, None, None, None], masks.flatten(1).amax(1)[:, None, None, None]
    with torch.no_grad():
        masked = model.module(images[:1] * (masks - low) / (high - low + 1e-8))[:, 1]
    expected = (torch.softmax(masked, 0)[:, None, None] * grid[0]).sum(0)
    torch.testing.assert_close(score.raw[0, 0], expected, rtol=1e-4, atol=1e-5)


def test_ablationcam_on_tokens_zeroes_each_feature_of_every_token():
    model = tiny_vit(extra_tokens=1)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    explanation = cnnscope.get_method("ablationcam")(model, relu=False)(images, [[0], [2]])
    layer = model.module.blocks[1]["norm1"]
    for b, target in enumerate([0, 2]):
        kept = []
        handle = layer.register_forward_hook(lambda m, i, o, kept=kept: kept.append(o.detach()))
        with torch.no_grad():
            score = model.module(images[b : b + 1])[0, target]
        handle.remove()
        tokens = kept[0]  # (1, 65, D): the class token and an 8x8 grid
        drops = []
        for d in range(tokens.shape[-1]):
            ablated = tokens.clone()
            ablated[..., d] = 0
            handle = layer.register_forward_hook(lambda m, i, o, ablated=ablated: ablated)
            with torch.no_grad():
                drops.append(score - model.module(images[b : b + 1])[0, target])
            handle.remove()
        weights = torch.stack(drops) / score
        expected = (weights[:, None, None] * to_grid(tokens, (1, 8, 8))[0]).sum(0)
        torch.testing.assert_close(explanation.raw[b, 0], expected, rtol=1e-4, atol=1e-5)


def test_cam_on_a_class_token_head_says_why_not():
    with pytest.raises(MethodError, match="CAM needs"):
        cnnscope.get_method("cam")(tiny_vit())(torch.rand(1, 3, 32, 32), 0)


@pytest.mark.skipif(not __import__("importlib").util.find_spec("torchvision"), reason="torchvision not installed")
def test_torchvision_vit_b_16_architecture():  # pragma: no cover - runs where torchvision imports
    try:
        import torchvision  # noqa: F401
    except Exception:
        pytest.skip("torchvision does not import beside this torch")
    model = cnnscope.load_model("torchvision:vit_b_16", weights=False)
    assert model.default_layer().key == "encoder.layers.encoder_layer_11.ln_1"
    explanation = cnnscope.explain(model, torch.rand(1, 3, 224, 224), "gradcam", target=3)
    assert explanation.raw.shape == (1, 1, 14, 14)


class ChannelsLast(torch.nn.Module):
    """Swin/ConvNeXt style: a patch embedding, then LayerNorm and a token-wise MLP on (N, h, w, C)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Conv2d(3, 12, 4, stride=4)
        self.norm = torch.nn.LayerNorm(12)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(12, 12), torch.nn.GELU())
        self.head = torch.nn.Linear(12, 3)

    def forward(self, x):
        hidden = self.mlp(self.norm(self.embed(x).permute(0, 2, 3, 1)))  # (N, 8, 16, 12): a wide input
        return self.head(hidden.mean(dim=(1, 2)))


def test_channels_last_layers_are_recognised():
    from cnnscope.models import Model, Preprocess
    from cnnscope.tokens import is_channels_last

    assert is_channels_last((1, 8, 16, 12), (32, 64)) and not is_channels_last((1, 12, 8, 16), (32, 64))
    assert not is_channels_last((1, 7, 7, 7), (224, 224))  # ambiguous: channels-first
    model = Model(ChannelsLast().eval(), preprocess=Preprocess((32, 64), mean=(0, 0, 0), std=(1, 1, 1)))
    images = torch.rand(2, 3, 32, 64, generator=torch.Generator().manual_seed(2))
    explanation = cnnscope.get_method("gradcam")(model, layer="mlp", relu=False)(images, 1)
    assert explanation.raw.shape == (2, 1, 8, 16)
    kept = []
    handle = model.module.mlp.register_forward_hook(lambda m, i, o: kept.append(o))
    logits = model.module(images)
    handle.remove()
    (grad,) = torch.autograd.grad(logits[:, 1].sum(), kept[0])
    a, g = kept[0].detach().permute(0, 3, 1, 2), grad.permute(0, 3, 1, 2)
    expected = (g.mean(dim=(2, 3))[:, :, None, None] * a).sum(1)
    torch.testing.assert_close(explanation.raw[:, 0], expected, rtol=1e-4, atol=1e-6)
    layers = cnnscope.get_method("gradcam")(model, relu=False).explain_layers(images, ["mlp", "embed"], 1)
    torch.testing.assert_close(layers["mlp"].raw, explanation.raw, rtol=1e-4, atol=1e-6)
    # the head is pooling + linear on the channels-last map: CAM is W[c] . A, and Ablation-CAM's drops are
    # W[c, k] mean(A[k]) (its closed form, verified on the input, applies to the map view)
    weight = model.module.head.weight.detach()[1]
    cam = cnnscope.get_method("cam")(model, layer="mlp")(images, 1)
    torch.testing.assert_close(cam.raw[:, 0], torch.einsum("c,bchw->bhw", weight, a), rtol=1e-4, atol=1e-5)
    ablation = cnnscope.get_method("ablationcam")(model, layer="mlp", relu=False)(images, 1)
    drops = weight * a.mean(dim=(2, 3))  # (B, C)
    expected = torch.einsum("bc,bchw->bhw", drops / logits[:, 1:2].detach(), a)
    torch.testing.assert_close(ablation.raw[:, 0], expected, rtol=1e-4, atol=1e-5)
    layers = cnnscope.get_method("ablationcam")(model, relu=False).explain_layers(images, ["mlp"], 1)
    torch.testing.assert_close(layers["mlp"].raw, ablation.raw)
