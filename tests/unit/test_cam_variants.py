"""The CAM variants against formulas computed by hand on a one-convolution model."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cnnscope
from cnnscope.models import Model, Preprocess


class OneConv(nn.Module):
    """x -> conv (4 channels, 3x3) -> ReLU -> GAP -> linear (3 classes): A = relu(conv(x))."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(7)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(4, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=generator))

    def forward(self, x):
        return self.fc(self.act(self.conv(x)).mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def setup():
    net = OneConv().eval()
    model = Model(net, preprocess=Preprocess((12, 12), mean=(0, 0, 0), std=(1, 1, 1)))
    images = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        activations = net.act(net.conv(images))  # (B, 4, 12, 12)
    return model, images, activations, net.fc.weight.detach()


def by_hand(name, activations, weight, targets, model=None, images=None):
    area = activations.shape[-1] * activations.shape[-2]
    maps = []
    for b in range(activations.shape[0]):
        row = []
        for c in targets:
            a = activations[b]
            g = (weight[c] / area)[:, None, None].expand_as(a)  # d y_c / d A on a GAP + linear head
            if name == "gradcam++":
                s = a.sum(dim=(1, 2), keepdim=True)
                alpha = g**2 / (2 * g**2 + s * g**3)
                alpha = torch.where(g != 0, alpha, 0.0)
                w = (alpha * torch.relu(g)).sum(dim=(1, 2))
                m = torch.relu((w[:, None, None] * a).sum(0))
            elif name == "hirescam":
                m = torch.relu((g * a).sum(0))
            elif name == "layercam":
                m = torch.relu((torch.relu(g) * a).sum(0))
            elif name == "xgradcam":
                totals = a.sum(dim=(1, 2), keepdim=True)
                w = ((a / torch.where(totals != 0, totals, 1.0)) * g).sum(dim=(1, 2))  # all-zero channels: 0
                m = torch.relu((w[:, None, None] * a).sum(0))
            elif name == "scorecam":
                scores = []
                for k in range(a.shape[0]):
                    up = F.interpolate(a[k][None, None], size=images.shape[-2:], mode="bilinear", align_corners=True)[
                        0, 0
                    ]
                    mask = (up - up.min()) / (up.max() - up.min() + 1e-8)
                    with torch.no_grad():
                        scores.append(model.module(images[b : b + 1] * mask)[0, c])
                w = torch.softmax(torch.stack(scores), dim=0)
                m = torch.relu((w[:, None, None] * a).sum(0))
            elif name == "ablationcam":
                with torch.no_grad():
                    y = model.module.fc(a.mean(dim=(1, 2)))[c]
                    w = torch.stack(
                        [
                            (y - model.module.fc((a * (torch.arange(4) != k)[:, None, None]).mean(dim=(1, 2)))[c]) / y
                            for k in range(4)
                        ]
                    )
                m = torch.relu((w[:, None, None] * a).sum(0))
            row.append(m)
        maps.append(torch.stack(row))
    return torch.stack(maps)


@pytest.mark.filterwarnings("ignore::cnnscope.CnnscopeWarning")  # a 4-channel model gives empty/similar maps
@pytest.mark.parametrize("name", ["gradcam++", "hirescam", "layercam", "xgradcam", "scorecam", "ablationcam"])
@pytest.mark.parametrize("targets", [[1], [0, 1, 2]])  # one target: autograd; three: the closed form
def test_variant_equals_its_formula(setup, name, targets):
    model, images, activations, weight = setup
    explanation = cnnscope.get_method(name)(model, layer="act")(images, targets)
    expected = by_hand(name, activations, weight, targets, model, images)
    torch.testing.assert_close(explanation.raw, expected, rtol=1e-4, atol=1e-6)


def test_eigencam_is_the_first_principal_component(setup):
    model, images, activations, _ = setup
    explanation = cnnscope.get_method("eigencam")(model, layer="act")(images, [0, 2])
    for b in range(2):
        matrix = activations[b].flatten(1).T.double()  # (hw, C)
        centred = matrix - matrix.mean(0)
        _, _, vh = torch.linalg.svd(centred, full_matrices=False)
        projection = (centred @ vh[0]).view(12, 12).float()
        if torch.corrcoef(torch.stack([projection.flatten(), activations[b].pow(2).sum(0).flatten()]))[0, 1] < 0:
            projection = -projection
        torch.testing.assert_close(explanation.raw[b, 0], torch.relu(projection), rtol=1e-4, atol=1e-5)
        assert torch.equal(explanation.raw[b, 0], explanation.raw[b, 1])  # class-agnostic
    assert not explanation.notes  # no "nearly identical maps" note for a class-agnostic method


def test_hirescam_equals_gradcam_on_gap_linear(default_model, default_batch):
    hires = cnnscope.get_method("hirescam")(default_model)(default_batch, 285)
    grad = cnnscope.get_method("gradcam")(default_model)(default_batch, 285)
    torch.testing.assert_close(hires.raw, grad.raw, rtol=1e-4, atol=1e-7)


def test_ablationcam_closed_form_equals_real_ablation_on_the_default_model(default_model, chelsea):
    """The closed form y - y_c = W[c] mean(A_c) against ablating channels for real through the hook path."""
    from cnnscope.hooks import capture
    from cnnscope.methods.cam import LayerRun

    batch = default_model.preprocess([chelsea])
    layer = default_model.default_layer()

    with capture(default_model.module, [layer]) as record, torch.no_grad():
        logits = default_model.module(batch)
    activations = record[layer.key]
    active = (activations[0].flatten(1).amax(1) > 0).nonzero().flatten()[:6]
    ablated = activations.repeat(len(active), 1, 1, 1)
    ablated[torch.arange(len(active)), active] = 0
    run = LayerRun(default_model, layer, batch, logits, activations)
    out = run.scores_with_layer_output(batch, ablated)
    assert run.forwards == 1  # the part before the layer ran once for all the ablated copies
    real_drop = logits[0, 285] - out[:, 285]
    closed = default_model.module._fc.weight[285, active] * activations[0, active].mean(dim=(1, 2))
    torch.testing.assert_close(real_drop, closed.detach(), rtol=1e-4, atol=1e-5)


def test_ablationcam_hook_path_when_the_tail_is_not_linear():
    from cnnscope.testing import tiny_model

    model = tiny_model()
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    explanation = cnnscope.get_method("ablationcam")(model, layer="conv3")(images, 1)
    assert explanation.stats["forwards"] == 1 + 2  # the first pass, then one pass per image (prefix once)
    net = model.module
    with torch.no_grad():
        for b in range(2):
            x = net.pool(F.relu(net.conv2(net.relu1(net.conv1(images[b : b + 1].clone())))))
            a = net.conv3(x)
            y = net.fc(net.gap(net.act3(a)).flatten(1))[0, 1]
            weights = []
            for k in range(a.shape[1]):
                cut = a.clone()
                cut[:, k] = 0
                weights.append((y - net.fc(net.gap(net.act3(cut)).flatten(1))[0, 1]) / y)
            expected = torch.relu((torch.stack(weights)[:, None, None] * a[0]).sum(0))
            torch.testing.assert_close(explanation.raw[b, 0], expected, rtol=1e-4, atol=1e-6)


@pytest.mark.filterwarnings("ignore::cnnscope.CnnscopeWarning")
def test_scorecam_skips_constant_channels_without_changing_the_result(setup):
    model, images, activations, _ = setup
    method = cnnscope.get_method("scorecam")(model, layer="act", inputs_per_pass=1)
    explanation = method(images, [0])
    constant = sum(
        int((activations[b].flatten(1).amax(1) == activations[b].flatten(1).amin(1)).sum()) for b in range(2)
    )
    # one pass for the forward, then one per varying channel and one shared by the constant ones
    assert explanation.stats["forwards"] == 1 + 2 * 4 - constant + sum(
        int((activations[b].flatten(1).amax(1) == activations[b].flatten(1).amin(1)).any()) for b in range(2)
    )


@pytest.mark.filterwarnings("ignore::cnnscope.CnnscopeWarning")
def test_shapleycam_of_a_logit_after_a_linear_tail_is_gradcam(setup):
    """After GAP + linear the logit's Hessian w.r.t. the activation is 0, so ShapleyCAM's weights are Grad-CAM's."""
    model, images, _, _ = setup
    shapley = cnnscope.get_method("shapleycam")(model, layer="act")(images, [0, 2])
    grad = cnnscope.get_method("gradcam")(model, layer="act")(images, [0, 2])
    torch.testing.assert_close(shapley.raw, grad.raw, rtol=1e-5, atol=1e-7)


@pytest.mark.filterwarnings("ignore::cnnscope.CnnscopeWarning")
def test_shapleycam_of_the_rest_score_takes_half_the_hessian_vector_product(setup):
    """ReST = 2 y_c - logsumexp(y) with y = W mean(A) + b. In terms of m = mean(A): the gradient is 2 W_c - W^T p and
    the Hessian -W^T (diag p - p p^T) W; per position of A both are divided by the area, and H A = Hessian_m m / area.
    So weight = (2 W_c - W^T p + 1/2 W^T (diag p - p p^T) W m) / area, by hand."""
    model, images, activations, weight = setup
    explanation = cnnscope.get_method("shapleycam")(model, layer="act", score="rest", relu=False)(images, [0, 1, 2])
    area = activations.shape[-1] * activations.shape[-2]
    bias = model.module.fc.bias.detach()
    for b in range(2):
        m = activations[b].mean(dim=(1, 2)).double()
        w = weight.double()
        p = torch.softmax(w @ m + bias.double(), dim=0)
        hessian = -w.T @ (torch.diag(p) - torch.outer(p, p)) @ w
        for k, c in enumerate([0, 1, 2]):
            channel_weights = (2 * w[c] - w.T @ p - 0.5 * hessian @ m) / area
            expected = (channel_weights[:, None, None] * activations[b].double()).sum(0).float()
            torch.testing.assert_close(explanation.raw[b, k], expected, rtol=1e-4, atol=1e-6)


@pytest.mark.filterwarnings("ignore::cnnscope.CnnscopeWarning")
def test_shapleycam_differs_from_gradcam_of_the_same_score_by_the_hessian_term(setup):
    model, images, _, _ = setup

    def rest(logits):
        return 2 * logits[:, 1] - torch.logsumexp(logits, dim=1)

    shapley = cnnscope.get_method("shapleycam")(model, layer="act", score="rest", relu=False)(images, [1])
    first_order = cnnscope.get_method("gradcam")(model, layer="act", relu=False)(images, rest)
    assert float((shapley.raw - first_order.raw).abs().max()) > 1e-3 * float(first_order.raw.abs().max())


@pytest.mark.filterwarnings("ignore::cnnscope.CnnscopeWarning")
@pytest.mark.parametrize(("name", "options"), [("shapleycam", {"score": "rest"}), ("finercam", {"compared": 2})])
def test_variants_with_a_score_of_their_own_keep_it_at_several_layers(name, options):
    """explain_layers runs FinerCAM's and ShapleyCAM's own score at each layer, not plain Grad-CAM's."""
    from cnnscope.testing import tiny_model

    model = tiny_model()
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    method = cnnscope.get_method(name)(model, relu=False, aug_smooth=True, **options)
    by_layer = method.explain_layers(images, ["conv2", "conv3"], [1])
    for layer in ("conv2", "conv3"):
        alone = cnnscope.get_method(name)(model, layer=layer, relu=False, aug_smooth=True, **options)(images, [1])
        torch.testing.assert_close(by_layer[layer].raw, alone.raw)
        gradcam = cnnscope.get_method("gradcam")(model, layer=layer, relu=False, aug_smooth=True)(images, [1])
        assert float((alone.raw - gradcam.raw).abs().max()) > 1e-4 * float(gradcam.raw.abs().max())
