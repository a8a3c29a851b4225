"""aug_smooth and eigen_smooth, the two smoothing options every CAM method takes (pytorch-grad-cam's meaning)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cnnscope
from cnnscope.methods import CAMBase, FullGrad
from cnnscope.models import Model, Preprocess
from cnnscope.testing import check_method, tiny_model

PLAIN = Preprocess((16, 16), mean=(0, 0, 0), std=(1, 1, 1))
CAMS = sorted(name for name in cnnscope.list_methods() if issubclass(cnnscope.get_method(name), CAMBase))


def test_every_cam_declares_both_options():
    assert {"eigencam", "gradcam", "scorecam", "ablationcam", "shapleycam", "finercam"} <= set(CAMS)
    for name in CAMS:
        options = cnnscope.get_method(name).options
        assert options["aug_smooth"].kind == options["eigen_smooth"].kind == "bool", name
    assert "aug_smooth" in FullGrad.options


class RankOne(nn.Module):
    """Every channel of ``features`` is a positive multiple of the first colour channel (a 1x1 conv without bias
    reading only that channel), then GAP + linear with positive weights: for any channel weights w the weighted
    activations w[c] u[c] x0 have rank 1."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(3)
        self.features = nn.Conv2d(3, 5, 1, bias=False)
        self.fc = nn.Linear(5, 3)
        with torch.no_grad():
            self.features.weight.zero_()
            self.features.weight[:, 0, 0, 0] = torch.rand(5, generator=generator) + 0.5
            self.fc.weight.copy_(torch.rand(3, 5, generator=generator) + 0.1)
            self.fc.bias.zero_()

    def forward(self, x):
        return self.fc(self.features(x).mean(dim=(2, 3)))


#: channel-weight CAMs and those whose element-wise weights are constant over space on a GAP + linear head
RANK_ONE = ["gradcam", "gradcam++", "hirescam", "layercam", "xgradcam", "scorecam", "ablationcam", "cam"]
RANK_ONE += ["shapleycam", "finercam"]


@pytest.mark.filterwarnings("ignore::cnnscope.CnnscopeWarning")
@pytest.mark.parametrize("name", RANK_ONE)
def test_eigen_smooth_of_rank_one_weighted_activations_is_the_plain_map_up_to_scale(name):
    model = Model(RankOne().eval(), preprocess=PLAIN)
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    images[:, 0] -= images[:, 0].mean(dim=(1, 2), keepdim=True)  # zero mean: centring changes nothing
    method = cnnscope.get_method(name)
    plain = method(model, layer="features", relu=False)(images, [0, 2]).raw
    smooth = method(model, layer="features", relu=False, eigen_smooth=True)(images, [0, 2]).raw
    for b in range(2):
        for k in range(2):
            p, s = plain[b, k].flatten().double(), smooth[b, k].flatten().double()
            scale = float(s @ p / (p @ p))
            assert scale > 0, (name, b, k)  # the sign agrees with the summed map
            torch.testing.assert_close(s, scale * p, rtol=1e-4, atol=1e-5 * float(s.abs().max()))


@pytest.mark.filterwarnings("ignore::cnnscope.CnnscopeWarning")
def test_eigen_smooth_is_the_first_principal_component_of_the_weighted_activations():
    model = tiny_model()
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    smooth = cnnscope.get_method("gradcam")(model, layer="conv3", relu=False, eigen_smooth=True)(images, [1]).raw
    net = model.module
    inputs = images.clone().requires_grad_(True)
    activations = net.conv3(net.pool(F.relu(net.conv2(net.relu1(net.conv1(inputs))))))
    logits = net.fc(torch.flatten(net.gap(net.act3(activations)), 1))
    (grads,) = torch.autograd.grad(logits[:, 1].sum(), activations)
    weighted = grads.mean(dim=(2, 3), keepdim=True) * activations.detach()
    for b in range(2):
        matrix = weighted[b].flatten(1).T.double()
        centred = matrix - matrix.mean(0)
        _, _, vh = torch.linalg.svd(centred, full_matrices=False)
        projection = centred @ vh[0]
        summed = matrix.sum(1)
        if float((projection - projection.mean()) @ (summed - summed.mean())) < 0:
            projection = -projection
        torch.testing.assert_close(smooth[b, 0].flatten().double(), projection, rtol=1e-4, atol=1e-6)
    plain = cnnscope.get_method("gradcam")(model, layer="conv3", relu=False)(images, [1]).raw
    assert float((plain - smooth).abs().max()) > 1e-3 * float(plain.abs().max())  # a real change here


@pytest.mark.filterwarnings("ignore::cnnscope.CnnscopeWarning")
@pytest.mark.parametrize("name", ["eigencam", "eigengradcam"])
def test_eigen_smooth_leaves_the_eigen_methods_as_they_are(name):
    model = tiny_model()
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    plain = cnnscope.get_method(name)(model)(images, "top2").raw
    smooth = cnnscope.get_method(name)(model, eigen_smooth=True)(images, "top2").raw
    torch.testing.assert_close(smooth, plain)


class Symmetric(nn.Module):
    """Bias-free ReLU convolutions whose kernels are symmetric left-right, then GAP + linear: flipping the input
    flips every layer's output, and scaling the input scales them (positively homogeneous)."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(7)
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1, bias=False)
        self.fc = nn.Linear(8, 3, bias=False)
        with torch.no_grad():
            for conv in (self.conv1, self.conv2):
                weight = torch.randn(conv.weight.shape, generator=generator)
                conv.weight.copy_(weight + weight.flip(-1))
            self.fc.weight.copy_(torch.randn(3, 8, generator=generator))

    def forward(self, x):
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.fc(x.mean(dim=(2, 3)))


@pytest.mark.filterwarnings("ignore::cnnscope.CnnscopeWarning")
@pytest.mark.parametrize("name", ["gradcam", "hirescam", "gradcam++", "layercam", "scorecam", "fullgrad"])
def test_aug_smooth_of_a_flip_symmetric_homogeneous_model_is_the_plain_map(name):
    """Each flipped map, flipped back, is the plain map, and the x0.9 / x1.1 maps average to it (Grad-CAM's maps
    scale with the input here and FullGrad's scaled terms do not change). Grad-CAM++ and Score-CAM are not
    homogeneous in the input: their smoothed map is the mean of the plain maps at the three brightness factors."""
    model = Model(Symmetric().eval(), preprocess=PLAIN)
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(8))
    options = {} if name == "fullgrad" else {"layer": "conv2"}
    plain = cnnscope.get_method(name)(model, **options)(images, [0, 1])
    smooth = cnnscope.get_method(name)(model, aug_smooth=True, **options)(images, [0, 1])
    scale = float(plain.raw.abs().max())
    expected = plain.raw
    if name in ("scorecam", "gradcam++"):
        method = cnnscope.get_method(name)(model, **options)
        expected = sum(method(images * factor, [0, 1]).raw for factor in (0.9, 1.0, 1.1)) / 3
    torch.testing.assert_close(smooth.raw, expected, rtol=1e-4, atol=1e-5 * scale)
    assert smooth.stats["forwards"] == 6 * plain.stats["forwards"]


class BlobDetector(nn.Module):
    """A seeded, asymmetric 5x5 filter of the red channel, a thresholded ReLU (``act``), GAP + linear: class 0 is
    'a red blob anywhere'."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(9)
        self.conv = nn.Conv2d(3, 4, 5, padding=2, bias=False)
        self.act = nn.ReLU()
        self.fc = nn.Linear(4, 2)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[:, 0] = torch.rand(4, 5, 5, generator=generator)
            self.fc.weight.copy_(torch.tensor([[1.0, 1.0, 1.0, 1.0], [-1.0, -1.0, -1.0, -1.0]]))
            self.fc.bias.zero_()

    def forward(self, x):
        return self.fc(self.act(self.conv(x) - 3.0).mean(dim=(2, 3)))


@pytest.mark.parametrize("name", ["gradcam", "layercam", "gradcam-elementwise", "finercam", "fullgrad"])
def test_aug_smooth_still_peaks_on_evidence_that_is_on_one_side(name):
    size = 32
    model = Model(BlobDetector().eval(), preprocess=Preprocess((size, size), mean=(0, 0, 0), std=(1, 1, 1)))
    images = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(10)) * 0.2
    images[:, 0, 10:16, 4:10] = 1.0  # a red blob left of the centre
    options = {} if name == "fullgrad" else {"layer": "act"}
    if name == "finercam":
        options["compared"] = 1
    raw = cnnscope.get_method(name)(model, aug_smooth=True, **options)(images, [0]).raw[0, 0]
    raw = F.interpolate(raw[None, None], size=(size, size), mode="nearest")[0, 0]
    row, column = divmod(int(raw.argmax()), size)
    assert 8 <= row < 18 and 2 <= column < 12, (row, column)
    assert float(raw[:, : size // 2].sum()) > 4 * float(raw[:, size // 2 :].sum())


@pytest.mark.filterwarnings("ignore::cnnscope.CnnscopeWarning")
@pytest.mark.parametrize("name", [*CAMS, "fullgrad"])
def test_contract_with_both_options(name):
    model = tiny_model()
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    options = {"aug_smooth": True} if name == "fullgrad" else {"aug_smooth": True, "eigen_smooth": True}
    if name == "cam":
        model = cnnscope.testing.quadrant_model()
    check_method(cnnscope.get_method(name), model, images, target="top2", **options)
