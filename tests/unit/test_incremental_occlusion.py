"""Incremental occlusion (Krypton's exact inference, cnnscope.methods.incremental): the maps equal the plain
batched occlusion's, the model is left as it was, and models it does not apply to take the plain path."""

import math
import warnings

import pytest
import torch
from torch import nn

import cnnscope
from cnnscope.methods import Occlusion
from cnnscope.methods.incremental import plan_for
from cnnscope.models import Preprocess
from cnnscope.testing import check_method, check_untouched


def _calibrate_norms(module: nn.Module, shape: tuple[int, ...], seed: int) -> nn.Module:
    """Batch-norm statistics from a few random inputs (as bench/volume.py), so that activations keep their scale
    through the layers and an occluded patch moves the logits by far more than float rounding; the affine
    parameters away from the identity, so that a wrong channel or position shows."""
    generator = torch.Generator().manual_seed(seed)
    for norm in module.modules():
        if isinstance(norm, nn.modules.batchnorm._BatchNorm):
            norm.momentum = None
            norm.weight.data.copy_(torch.rand(norm.num_features, generator=generator) + 0.5)
            norm.bias.data.copy_(torch.randn(norm.num_features, generator=generator) * 0.1)
    with torch.no_grad():
        module.train()(torch.rand(4, *shape, generator=generator))
    return module.eval()


def volume_net(size: tuple[int, int, int] = (32, 32, 32), width: int = 4, classes: int = 3) -> nn.Module:
    """bench/volume.py's shape: stages of a stride-2 and a stride-1 Conv3d, each with batch norm and ReLU; a linear
    head on the flattened last stage (not a global average, which would dilute a patch's effect towards float
    rounding)."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    c_in, shape = 1, (1, *size)
    for stage in range(3):
        c_out = width * 2**stage
        layers += [nn.Conv3d(c_in, c_out, 3, stride=2, padding=1), nn.BatchNorm3d(c_out), nn.ReLU()]
        layers += [nn.Conv3d(c_out, c_out, 3, padding=1), nn.BatchNorm3d(c_out), nn.ReLU(inplace=True)]
        c_in = c_out
        size = tuple((n + 1) // 2 for n in size)
    module = nn.Sequential(*layers, nn.Flatten(), nn.Linear(c_in * math.prod(size), classes))
    return _calibrate_norms(module, shape, 1)


def image_net(classes: int = 5) -> nn.Module:
    """A 2-D CNN with a stride-2 stem, padded max pooling, a dilated "same" convolution, average pooling, a nested
    Sequential with a grouped convolution, and a 1x1 stride-2 convolution (a kernel smaller than its stride)."""
    torch.manual_seed(1)
    module = nn.Sequential(
        nn.Conv2d(3, 8, 5, stride=2, padding=2),
        nn.BatchNorm2d(8),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, stride=2, padding=1),
        nn.Conv2d(8, 8, 3, padding="same", dilation=2),
        nn.GELU(),
        nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, groups=2), nn.BatchNorm2d(16), nn.LeakyReLU(0.1)),
        nn.AvgPool2d(2),
        nn.Conv2d(16, 16, 1, stride=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, classes),
    )
    return _calibrate_norms(module, (3, 64, 64), 2)


def as_model(module: nn.Module, size: tuple[int, ...], channels: int) -> cnnscope.Model:
    return cnnscope.load_model(module, preprocess=Preprocess(size=size, mean=(0.0,) * channels, std=(1.0,) * channels))


@pytest.fixture(scope="module")
def volume_model():
    return as_model(volume_net(), (32, 32, 32), 1)


@pytest.fixture(scope="module")
def image_model():
    return as_model(image_net(), (64, 64), 3)


def both(model, inputs, target=0, **options):
    """(incremental, plain) explanations with the same options."""
    options = {"quiet": True, **options}
    incremental = Occlusion(model, **options)(inputs, target)
    plain = Occlusion(model, incremental=False, **options)(inputs, target)
    assert plain.stats["incremental"] == [False] * inputs.shape[0]
    return incremental, plain


def assert_same_map(incremental, plain):
    scale = float(plain.raw.abs().max())
    assert scale > 0, "the plain map is flat: the comparison would say nothing"
    assert torch.allclose(incremental.raw, plain.raw, atol=1e-5 * scale, rtol=0), float(
        (incremental.raw - plain.raw).abs().max() / scale
    )
    assert incremental.stats["winners"] == plain.stats["winners"]


def volume(seed: int = 5, shape=(32, 32, 32)) -> torch.Tensor:
    """A random volume (not from seed 0: the noise fill draws its voxels from that seed)."""
    return torch.rand(1, 1, *shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    ("window", "stride", "fill", "score"),
    [
        (8, 8, "zero", "logit"),  # bench/volume.py's setting, scaled down
        (8, 6, "grey", "probability"),  # the last patch flush with the border on every axis
        ((4, 8, 6), (3, 5, 7), "mean", "logit"),  # window and stride per axis
        (6, 8, "noise", "logit"),  # a stride longer than the window: pixels no patch covers
        (5, 9, "blur", "probability"),
    ],
)
def test_3d_incremental_equals_the_plain_batched_occlusion(volume_model, window, stride, fill, score):
    incremental, plain = both(volume_model, volume(), window=window, stride=stride, fill=fill, score=score)
    assert incremental.stats["incremental"] == [True]
    assert_same_map(incremental, plain)


def test_3d_on_a_non_cubic_volume_and_two_targets():
    model = as_model(volume_net((16, 40, 24), width=3), (16, 40, 24), 1)
    incremental, plain = both(model, volume(3, (16, 40, 24)), target=[0, 2], window=(4, 6, 8), stride=(4, 5, 3))
    assert incremental.stats["incremental"] == [True] and incremental.raw.shape[:2] == (1, 2)
    assert_same_map(incremental, plain)


@pytest.mark.parametrize(
    ("window", "stride", "fill"),
    [(8, 8, "zero"), (12, 10, "grey"), ((5, 12), (3, 7), "blur"), (3, 20, "noise")],
)
def test_2d_incremental_equals_the_plain_batched_occlusion(image_model, window, stride, fill):
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    incremental, plain = both(
        image_model, images, target="top2", window=window, stride=stride, fill=fill, score="logit"
    )
    assert incremental.stats["incremental"] == [True, True]
    assert_same_map(incremental, plain)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths:UserWarning")
def test_even_kernels_dilated_pooling_and_per_axis_strides():
    """Asymmetric "same" padding (an even kernel), dilated padded max pooling, average pooling over zero padding,
    and a convolution with a stride and padding per axis."""
    torch.manual_seed(14)
    module = nn.Sequential(
        nn.Conv2d(3, 4, 4, padding="same"),
        nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1, dilation=2),
        nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=True),
        nn.Conv2d(4, 4, 3, stride=(1, 2), padding=(0, 1)),
        nn.Tanh(),
        nn.Flatten(),
    ).eval()
    model = as_model(nn.Sequential(module, nn.Linear(4 * 23 * 13, 3)).eval(), (52, 52), 3)
    plan = plan_for(model, (52, 52), (6, 9))
    assert [type(step.module) for step in plan.steps if step.window] == [
        nn.Conv2d,
        nn.MaxPool2d,
        nn.AvgPool2d,
        nn.Conv2d,
    ]
    images = torch.randn(1, 3, 52, 52, generator=torch.Generator().manual_seed(15))
    incremental, plain = both(model, images, window=(6, 9), stride=(5, 4), fill="zero", score="logit")
    assert incremental.stats["incremental"] == [True]
    assert_same_map(incremental, plain)


def test_a_hooked_nested_sequential_is_run_whole():
    """A hook on a nested Sequential would be skipped if it were opened: the chain stops before it."""
    torch.manual_seed(16)
    inner = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.ReLU())
    module = nn.Sequential(nn.Conv2d(3, 6, 3, stride=2, padding=1), nn.ReLU(), inner, nn.Flatten()).eval()
    model = as_model(nn.Sequential(module, nn.Linear(6 * 16 * 16, 2)).eval(), (32, 32), 3)
    model.calls()  # the model's one tracing forward, before the hook counts calls
    calls = []
    handle = inner.register_forward_hook(lambda _m, _i, output: calls.append(tuple(output.shape)))
    try:
        plan = plan_for(model, (32, 32), (4, 4))
        assert [type(step.module) for step in plan.steps] == [nn.Conv2d, nn.ReLU] and plan.rest[0] is inner
        images = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(17))
        incremental, plain = both(model, images, window=4, stride=4, fill="zero", score="logit")
    finally:
        handle.remove()
    assert_same_map(incremental, plain)
    assert all(shape[1:] == (6, 16, 16) for shape in calls) and sum(shape[0] for shape in calls) == 2 * (1 + 64)


def test_the_plan_crops_the_first_layers_and_hands_the_rest_full_tensors(volume_model):
    plan = plan_for(volume_model, (32, 32, 32), (8, 8, 8))
    windows = [step for step in plan.steps if step.window is not None]
    # 32^3 -> stride 2: 16^3, box (8 + 3 - 2) // 2 + 1 = 5; then stride 1: 7 of 16; stride 2: 8^3, box 5 (> half
    # of 8^3 is 256 voxels; 5^3 = 125 is not) ...
    assert [step.box for step in windows][:3] == [(5, 5, 5), (7, 7, 7), (5, 5, 5)]
    assert all(2 * step.box[0] ** 3 <= step.size[0] ** 3 for step in windows)
    assert isinstance(plan.rest[-1], nn.Linear)
    # a window as large as the input changes everything: nothing to gain
    assert plan_for(volume_model, (32, 32, 32), (32, 32, 32)) is None


class Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.conv(x))


def residual_net(first: bool) -> nn.Module:
    torch.manual_seed(5)
    stem = [nn.Conv2d(3, 6, 3, stride=2, padding=1), nn.ReLU()]
    tail = [nn.Flatten(), nn.Linear(6 * 24 * 24, 4)]
    layers = [Residual(3), *stem, *tail] if first else [*stem, Residual(6), *tail]
    return nn.Sequential(*layers).eval()


@pytest.mark.parametrize("first", [True, False])
def test_a_residual_block_stops_the_chain_and_the_map_is_still_right(first):
    model = as_model(residual_net(first), (48, 48), 3)
    images = torch.randn(1, 3, 48, 48, generator=torch.Generator().manual_seed(6))
    incremental, plain = both(model, images, window=8, stride=8, fill="zero", score="logit")
    # a residual block first: no leading chain, the plain path; after a stem: the stem is incremental
    assert incremental.stats["incremental"] == [not first]
    assert_same_map(incremental, plain)


class Stem(nn.Module):
    """Not a Sequential, and a forward fx cannot trace (it branches on the data): nothing is assumed about it."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body(x)
        return self.head(x if bool(x.mean() > -1e9) else -x)


class VGGLike(nn.Module):
    """torchvision's VGG layout: ``features`` (a Sequential) and a classifier called from a custom forward."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(9)
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(4)
        self.classifier = nn.Sequential(nn.Linear(16 * 16, 32), nn.ReLU(), nn.Linear(32, 5))
        with torch.no_grad():  # weights that keep the activations' scale, so a patch moves the logits well above
            for layer in self.modules():  # float rounding
                if isinstance(layer, (nn.Conv2d, nn.Linear)):
                    layer.weight.mul_(2.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


class ResNetLike(nn.Module):
    """A ResNet's layout: a stem of modules, then a residual block written in the forward."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(10)
        self.conv1 = nn.Conv2d(3, 8, 5, stride=2, padding=2, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.block = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.relu(x + self.block(x))  # the stem's output goes two ways: the chain ends there
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("build", [VGGLike, ResNetLike], ids=["vgg-like", "resnet-like"])
def test_a_traced_forward_runs_its_leading_modules_incrementally(build):
    """Models with their own forward: fx finds the modules that take the input one after the other, and the rest
    of the traced graph runs on the full tensors; the maps equal the plain path's."""
    module = build().eval()
    if isinstance(module, ResNetLike):
        module = _calibrate_norms(module, (3, 64, 64), 11)
    model = as_model(module, (64, 64), 3)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(12))
    plan = plan_for(model, (64, 64), (8, 8))
    assert plan is not None and plan.finish is not None and plan.rest == []
    expected = 8 if isinstance(module, VGGLike) else 4  # every features layer / the stem up to the residual block
    assert len(plan.steps) == expected
    incremental, plain = both(model, images, target="top1", window=8, stride=4, fill="zero", score="logit")
    assert incremental.stats["incremental"] == [True, True]
    assert_same_map(incremental, plain)


def test_a_chain_that_saves_little_of_the_forward_keeps_the_plain_path():
    """A cheap stem before an expensive body: cropping the stem would save under MIN_SAVED of the multiply-adds,
    and the crops and pastes cost about that, so the plan is not used (the map is the plain path's)."""
    from cnnscope.methods.incremental import MIN_SAVED, saved_share

    torch.manual_seed(14)
    module = nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(), Residual(4), nn.Conv2d(4, 64, 3, padding=1), nn.ReLU()
    )
    module = nn.Sequential(*module, nn.Conv2d(64, 64, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model = as_model(module.eval(), (32, 32), 3)
    assert plan_for(model, (32, 32), (8, 8)) is None
    vgg = as_model(VGGLike().eval(), (64, 64), 3)
    plan = plan_for(vgg, (64, 64), (8, 8))
    assert saved_share(vgg, plan.steps, (64, 64)) > 0.5 > MIN_SAVED


def test_a_hook_anywhere_in_a_traced_model_keeps_the_plain_path():
    """The traced graph runs the modules it traced through without their hooks: a hooked container (here the
    classifier) must see its forward, so the model takes the plain path, and the hook runs."""
    model = as_model(VGGLike().eval(), (64, 64), 3)
    model.calls()
    seen = []
    handle = model.module.classifier.register_forward_hook(lambda module, args, out: seen.append(out.shape[0]))
    try:
        assert plan_for(model, (64, 64), (8, 8)) is None
        images = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(13))
        explanation = Occlusion(model, window=16, stride=16, quiet=True)(images, 0)
        assert explanation.stats["incremental"] == [False]
        assert sum(seen) >= 16 + 1  # every occluded copy and the image itself
    finally:
        handle.remove()


def script(module: nn.Module) -> torch.jit.ScriptModule:
    """TorchScript, as users still save it (torch deprecates the scripting itself)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.script(module)


def _stem_with(first: nn.Module, channels: int = 6) -> nn.Module:
    torch.manual_seed(7)
    return nn.Sequential(first, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 4)).eval()


@pytest.mark.parametrize(
    "build",
    [
        lambda: Stem().eval(),  # a custom module fx cannot trace
        lambda: script(_stem_with(nn.Conv2d(3, 6, 3, stride=2, padding=1))),  # TorchScript
        lambda: _stem_with(nn.Conv2d(3, 6, 3, stride=2, padding=1, padding_mode="reflect")),  # not zero padding
        lambda: nn.Sequential(  # a batch norm without running statistics normalizes each batch: not local
            nn.BatchNorm2d(3, track_running_stats=False), *_stem_with(nn.Conv2d(3, 6, 3, stride=2, padding=1))
        ).eval(),
        lambda: _stem_with(nn.MaxPool2d(3, stride=2, ceil_mode=True), channels=3),  # ceil mode
    ],
    ids=["custom-module", "torchscript", "reflect-padding", "batch-statistics", "ceil-mode"],
)
def test_models_it_does_not_apply_to_take_the_plain_path(build):
    model = as_model(build(), (32, 32), 3)
    images = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    incremental, plain = both(model, images, window=8, stride=8, fill="zero", score="logit")
    assert incremental.stats["incremental"] == [False]
    assert torch.equal(incremental.raw, plain.raw)


def test_a_users_hook_in_the_chain_still_sees_every_forward(image_model):
    """A hooked module is run as the user's module on full tensors (the chain stops before it), and the hook is
    neither removed nor added to."""
    image_model.calls()  # the model's one tracing forward, before the hook counts calls
    calls = []
    conv = image_model.module[4]
    handle = conv.register_forward_hook(lambda _m, _i, output: calls.append(tuple(output.shape)))
    try:
        images = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(9))
        incremental, plain = both(image_model, images, window=16, stride=16, fill="zero", score="logit")
    finally:
        handle.remove()
    assert incremental.stats["incremental"] == [True]
    assert_same_map(incremental, plain)
    assert all(shape[1:] == (8, 16, 16) for shape in calls)  # full tensors only, never a crop
    assert sum(shape[0] for shape in calls) == 2 * (1 + 16)  # the image and 16 patches, in each of the two runs


def test_the_model_and_the_input_are_untouched(image_model):
    module = image_model.module
    module.train()
    module[0].weight.requires_grad_(False)
    try:
        images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(10))
        occlusion = Occlusion(image_model, window=16, stride=12, fill="zero", quiet=True)
        with pytest.warns(cnnscope.CnnscopeWarning, match="train mode"):
            explanation = check_untouched(lambda: occlusion(images, 1), image_model, images)
        assert explanation.stats["incremental"] == [True, True]
        assert module.training and all(sub.training for sub in module.modules())
        assert not module[0].weight.requires_grad and module[4].weight.requires_grad
    finally:
        module[0].weight.requires_grad_(True)
        module.eval()


def test_an_in_place_first_module_writes_into_its_own_copies():
    """The image's activations and the patches are cropped from copies: an in-place first ReLU changes neither the
    image nor the activations the crops are cut from (the maps stay equal to the plain path's)."""
    torch.manual_seed(11)
    module = nn.Sequential(
        nn.ReLU(inplace=True), nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(inplace=True), nn.Flatten()
    ).eval()
    model = as_model(module, (32, 32), 3)
    images = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(12))
    kept = images.clone()
    prepared = plan_for(model, (32, 32), (6, 6)).prepare(images)
    assert torch.equal(images, kept)
    fill = torch.full_like(images, -1.0)
    with torch.inference_mode():
        outputs = prepared.outputs(fill, [(0, 0), (26, 13)])
        expected = []
        for y, x in [(0, 0), (26, 13)]:
            occluded = images.clone()
            occluded[:, :, y : y + 6, x : x + 6] = -1.0
            expected.append(module(occluded))
    assert torch.equal(images, kept)
    torch.testing.assert_close(outputs, torch.cat(expected), rtol=0, atol=1e-6)
    assert outputs.shape == (2, 4 * 16 * 16) and not torch.equal(outputs[0], outputs[1])


def test_the_method_contract_holds_on_the_incremental_path(image_model):
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(13))
    check_method(Occlusion, image_model, images, window=16, stride=16, quiet=True)
    assert Occlusion(image_model, window=16, stride=16, quiet=True)(images).stats["incremental"] == [True, True]
