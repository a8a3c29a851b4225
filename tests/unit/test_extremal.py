"""Extremal perturbations (issue 22): on a model whose only evidence is a bright square, the preserve and the
delete masks of the square's area cover the square; the area constraint holds; one parameter tensor for every
image, target and area gives each the mask it gets alone; the user's model is untouched."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import cnnscope
from cnnscope.methods.extremal import (
    ExtremalPerturbation,
    SmoothMask,
    area_reference,
    gaussian_smooth,
    parse_areas,
    perturb,
    perturbation_pyramid,
    rewards,
)
from cnnscope.models import Model, Preprocess
from cnnscope.testing import check_method, check_untouched, tiny_model

SIZE = 32
SIDE = 8  # the square: 8 x 8 pixels of a 32 x 32 image, area 1/16
AREA = SIDE * SIDE / SIZE**2
#: The evidence's weight: a whole bright square is worth a logit of 125 (its input gradient is what the mask
#: optimisation climbs, so it is as steep as a trained network's, about 4 per pixel).
EVIDENCE = 4000.0
#: TorchRay's 800 steps at learning rate 0.01 take about 10 s per image here; 250 steps at 0.05 reach the same
#: masks on this model in 3 s (the area weight grows per step, so these masks are a little larger).
FAST = {"steps": 250, "learning_rate": 0.05, "quiet": True}


class SquareNet(nn.Module):
    """Class 0 sees bright pixels: EVIDENCE x the mean over pixels of ReLU(grey - 0.5); class 1 is a constant
    logit 2. On a dim image (values <= 0.4) only the bright square passes 0.5, so it is the only evidence of
    class 0, and blurring it (or fading it) removes that evidence."""

    def __init__(self) -> None:
        super().__init__()
        self.evidence = EVIDENCE

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        evidence = torch.relu(x.mean(dim=1) - 0.5).flatten(1).mean(dim=1) * self.evidence
        return torch.stack([evidence, torch.full_like(evidence, 2.0)], dim=1)


def square_model(channels: int = 3) -> Model:
    preprocess = Preprocess(size=(SIZE, SIZE), mean=(0.0,) * channels, std=(1.0,) * channels)
    return Model(SquareNet().eval(), preprocess=preprocess, labels=["square", "plain"], name="square")


def square_image(top: int, left: int, channels: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A dim noisy image with a bright SIDE x SIDE square at (top, left), and the square's boolean mask."""
    image = torch.rand(channels, SIZE, SIZE, generator=torch.Generator().manual_seed(seed)) * 0.4
    image[:, top : top + SIDE, left : left + SIDE] = 1.0
    square = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    square[top : top + SIDE, left : left + SIDE] = True
    return image, square


def iou_of_top(mask: torch.Tensor, region: torch.Tensor) -> float:
    """IoU of the region with the mask's top pixels, as many as the region has."""
    count = int(region.sum())
    chosen = torch.zeros(mask.numel(), dtype=torch.bool)
    chosen[mask.flatten().topk(count).indices] = True
    region = region.flatten()
    return float((chosen & region).sum() / (chosen | region).sum())


@pytest.fixture(scope="module")
def squares():
    first, first_square = square_image(4, 18)
    second, second_square = square_image(20, 6, seed=1)
    return torch.stack([first, second]), torch.stack([first_square, second_square])


@pytest.mark.parametrize("variant", ["preserve", "delete", "dual"])
def test_the_mask_of_the_squares_area_covers_the_square(variant, squares):
    batch, regions = squares
    model = square_model()
    explanation = cnnscope.explain(
        model, batch, method="extremal-perturbation", target=0, areas=AREA, variant=variant, **FAST
    )
    for i in range(2):
        mask = explanation.raw[i, 0]
        inside = float(mask[regions[i]].sum() / mask.sum())
        assert iou_of_top(mask, regions[i]) >= 0.5, variant
        assert inside >= 4 * AREA, f"{variant}: {inside:.2f} of the mask's mass on the square of area {AREA}"
        assert float(mask[regions[i]].mean()) > 0.8
    # the reward went where it should: the square kept (preserve) scores high, the square removed low
    reward = explanation.stats["reward"][0][0][0]
    assert (reward > 60) if variant != "delete" else (reward > -60), reward  # the intact square: 123


def test_the_area_constraint_holds(squares):
    """The ranking loss pulls the sorted mask towards a fraction `area` of ones: areas larger than the evidence
    are met closely (the reward does not pull against them)."""
    batch, _ = squares
    explanation = cnnscope.explain(
        square_model(), batch[:1], method="extremal-perturbation", target=0, areas=[0.2, 0.4], **FAST
    )
    for a, mask in zip([0.2, 0.4], torch.tensor(explanation.stats["area_masks"][0][0]), strict=True):
        assert abs(float(mask.mean()) - a) <= 0.1 * a
        assert abs(float((mask > 0.5).float().mean()) - a) <= 0.15 * a
    assert explanation.stats["mask_area"][0][0] == pytest.approx([0.2, 0.4], rel=0.1)


@pytest.mark.slow
def test_the_area_constraint_holds_against_the_reward_with_torchrays_schedule(squares):
    """Areas at and below the evidence's, where the reward pulls the mask wider: with TorchRay's 800 steps at
    learning rate 0.01 (the defaults) the growing area weight wins, to within about a third (with 250 steps the
    mask of area 0.03 stays at 0.1: fewer steps do not enforce the area)."""
    batch, _ = squares
    explanation = cnnscope.explain(
        square_model(), batch[:1], method="extremal-perturbation", target=0, areas=[0.03, AREA], quiet=True
    )
    for a, mask in zip([0.03, AREA], torch.tensor(explanation.stats["area_masks"][0][0]), strict=True):
        assert abs(float(mask.mean()) - a) <= 0.4 * a
        assert abs(float((mask > 0.5).float().mean()) - a) <= 0.4 * a


def test_several_areas_sum_their_masks_and_keep_each(squares):
    batch, regions = squares
    model = square_model()
    areas = [AREA, 0.15]
    explanation = cnnscope.explain(
        model, batch[:1], method="extremal-perturbation", target=0, areas="0.0625, 0.15", **FAST
    )
    assert explanation.stats["areas"][0] == areas
    masks = torch.tensor(explanation.stats["area_masks"][0][0])
    assert masks.shape == (2, SIZE, SIZE)
    torch.testing.assert_close(masks.sum(dim=0), explanation.raw[0, 0], atol=2e-4, rtol=0)
    assert float(masks[1].mean()) > float(masks[0].mean())  # the larger area gives the larger mask
    assert iou_of_top(masks[0], regions[0]) >= 0.5
    assert bool((masks[1][regions[0]] > 0.5).float().mean() > 0.9)  # the larger mask holds the square too
    # one area alone gives the same mask as in company (each area is its own row)
    alone = cnnscope.explain(model, batch[:1], method="extremal-perturbation", target=0, areas=AREA, **FAST)
    torch.testing.assert_close(alone.raw[0, 0], masks[0], atol=2e-4, rtol=0)


def test_images_and_targets_in_one_run_equal_each_alone(squares):
    """Two images x two targets (x two areas) are one (8, 1, h, w) parameter tensor; each mask is the one it
    gets alone, also when inputs_per_pass splits the rows into passes."""
    batch, _ = squares
    model = square_model()
    options = {"steps": 40, "learning_rate": 0.05, "quiet": True, "areas": [0.1, 0.2]}
    together = cnnscope.explain(model, batch, method="extremal-perturbation", target=[0, 1], **options)
    assert together.stats["forwards"] == 1 + 40  # one pass per step for every row
    split = cnnscope.explain(model, batch, method="extremal-perturbation", target=[0, 1], inputs_per_pass=3, **options)
    assert split.stats["forwards"] == 1 + 40 * 3
    torch.testing.assert_close(split.raw, together.raw, rtol=1e-4, atol=1e-5)
    for i in range(2):
        for k, target in enumerate([0, 1]):
            alone = cnnscope.explain(model, batch[i : i + 1], method="extremal-perturbation", target=target, **options)
            torch.testing.assert_close(together.raw[i, k], alone.raw[0, 0], rtol=1e-4, atol=1e-5)


def test_deterministic_and_the_model_untouched(squares):
    batch, _ = squares
    model = square_model()
    model.module.train()
    explainer = ExtremalPerturbation(model, steps=20, quiet=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cnnscope.CnnscopeWarning)  # the train-mode note
        first = check_untouched(lambda: explainer(batch, 0), model, batch)
        second = explainer(batch, 0)
    assert torch.equal(first.raw, second.raw)
    assert model.module.training


@pytest.mark.parametrize("name", ["extremal-perturbation"])
def test_contract(name):
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    light = {"steps": 6, "learning_rate": 0.2, "quiet": True}
    check_method(
        cnnscope.get_method(name), tiny_model(), images, target="top2", areas=[0.1, 0.3], variant="dual", **light
    )


def test_any_channel_count_and_torchscript_inside():
    """A one-channel picture, and a model with a TorchScript block: only the input gradient is needed."""
    image, square = square_image(10, 12, channels=1)
    grey = square_model(channels=1)
    explanation = cnnscope.explain(grey, image[None], method="extremal-perturbation", target=0, areas=AREA, **FAST)
    assert iou_of_top(explanation.raw[0, 0], square) >= 0.5

    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                self.body = torch.jit.script(SquareNet())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x)

    scripted = Model(Outer().eval(), preprocess=grey.preprocess, labels=["square", "plain"])
    short = {"steps": 30, "quiet": True}
    again = cnnscope.explain(scripted, image[None], method="extremal-perturbation", target=0, **short)
    eager = cnnscope.explain(grey, image[None], method="extremal-perturbation", target=0, **short)
    torch.testing.assert_close(again.raw, eager.raw, rtol=1e-4, atol=1e-5)
    assert not torch.equal(eager.raw, torch.ones_like(eager.raw))  # the mask moved: the gradient came through


def test_volumes_go_through_the_same_code():
    """A Conv3d-style model on (N, C, D, H, W): the mask is a smooth 3-D mask that finds a bright cube."""

    class CubeNet(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            evidence = torch.relu(x.mean(dim=1) - 0.5).flatten(1).mean(dim=1) * EVIDENCE
            return torch.stack([evidence, torch.full_like(evidence, 2.0)], dim=1)

    volume = torch.rand(1, 1, 8, 12, 12, generator=torch.Generator().manual_seed(0)) * 0.4
    volume[:, :, 2:5, 6:9, 2:5] = 1.0
    cube = torch.zeros(8, 12, 12, dtype=torch.bool)
    cube[2:5, 6:9, 2:5] = True
    model = Model(CubeNet().eval(), preprocess=Preprocess(size=(8, 12, 12), mean=(0.0,), std=(1.0,)))
    area = float(cube.float().mean())
    explanation = cnnscope.explain(
        model,
        volume,
        method="extremal-perturbation",
        target=0,
        areas=area,
        sigma=1.0,
        max_blur=2.0,
        steps=100,
        learning_rate=0.2,
        quiet=True,
    )
    assert explanation.raw.shape == (1, 1, 8, 12, 12)
    assert iou_of_top(explanation.raw[0, 0], cube) >= 0.5


def test_max_seconds_stops_after_a_step_and_says_so(squares):
    batch, _ = squares
    explanation = cnnscope.explain(
        square_model(), batch, method="extremal-perturbation", target=0, steps=5000, max_seconds=0, quiet=True
    )
    assert explanation.stats["steps_done"] == [1, 1] and explanation.stats["stopped_early"] == [True, True]
    assert torch.isfinite(explanation.raw).all()


def test_options_are_checked_with_one_line_errors():
    model = square_model()
    for options, message in [
        ({"areas": 1.5}, "in \\(0, 1\\)"),
        ({"areas": "0.1,zero"}, "0.05,0.1,0.2"),
        ({"areas": []}, "at least one"),
        ({"steps": 0}, "steps"),
        ({"steps": 100_000}, "steps"),
        ({"variant": "keep"}, "preserve, delete, dual"),
        ({"reward": "odd"}, "contrastive, simple"),
    ]:
        with pytest.raises(cnnscope.MethodError, match=message):
            ExtremalPerturbation(model, **options)
    assert parse_areas("0.05,0.1,0.2") == [0.05, 0.1, 0.2] and parse_areas([0.1, "0.2"]) == [0.1, 0.2]
    assert parse_areas("[0.3]") == 0.3 and parse_areas(0.25) == 0.25
    assert ExtremalPerturbation(model, areas="0.05, 0.1").config["areas"] == [0.05, 0.1]
    huge = Model(SquareNet().eval(), preprocess=Preprocess(size=(64, 64, 64), mean=(0.0,), std=(1.0,)))
    with pytest.raises(cnnscope.MethodError, match="raise step or lower sigma"):  # sigma=step would fit
        ExtremalPerturbation(huge, steps=1, sigma=12, step=2)(torch.rand(1, 1, 32, 32, 32), 0)
    with pytest.raises(cnnscope.MethodError, match="too large .* crop or resize"):  # nothing fits
        ExtremalPerturbation(huge, steps=1, sigma=12, step=2)(torch.rand(1, 1, 64, 64, 64), 0)


def test_the_parts_follow_their_definitions():
    # the pyramid: last level is the image, the first the image blurred (or faded) the most
    image = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    pyramid = perturbation_pyramid(image, 5, "fade", 3.0)
    torch.testing.assert_close(pyramid[:, -1], image)
    torch.testing.assert_close(pyramid[:, 2], image * 0.5)
    blurred = perturbation_pyramid(image, 3, "blur", 2.0)
    torch.testing.assert_close(blurred[:, 0], gaussian_smooth(image, 2.0))
    torch.testing.assert_close(blurred[:, 1], gaussian_smooth(image, 1.0))
    # the blur is TorchRay's imsmooth: a normalised Gaussian of radius ceil(4 sigma), zero padding
    offsets = torch.arange(-8, 9, dtype=torch.float32)
    kernel = torch.exp(-(offsets**2) / 8)
    kernel = (kernel / kernel.sum()).view(1, 1, -1)
    rows = torch.nn.functional.conv1d(image.reshape(-1, 1, 16), kernel, padding=8).reshape(2, 3, 16, 16)
    direct = torch.nn.functional.conv1d(rows.transpose(2, 3).reshape(-1, 1, 16), kernel, padding=8)
    torch.testing.assert_close(gaussian_smooth(image, 2.0), direct.reshape(2, 3, 16, 16).transpose(2, 3))
    # perturb reads level m (L - 1), linearly interpolated, from the row's own image
    masks = torch.tensor([0.0, 0.375, 1.0]).view(3, 1, 1).expand(3, 16, 16)
    owners = torch.tensor([1, 0, 1])
    out = perturb(pyramid, owners, masks)
    torch.testing.assert_close(out[0], torch.zeros(3, 16, 16))
    torch.testing.assert_close(out[1], image[0] * 0.375)
    torch.testing.assert_close(out[2], image[1])
    # the reference of the ranking loss: int(P (1 - a)) zeros, then ones
    reference = area_reference([0.25, 0.1], 10)
    assert reference[0].tolist() == [0.0] * 7 + [1.0] * 3 and reference[1].tolist() == [0.0] * 9 + [1.0]
    # the contrastive reward: the target's output minus the largest other one
    outputs = torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, -1.0]])
    assert rewards(outputs, torch.tensor([0, 2]), True).tolist() == [1.0, -6.0]
    assert rewards(outputs, torch.tensor([0, 2]), False).tolist() == [3.0, -1.0]
    # the smooth max-convolution: one grid point on gives a blob around it, flat (1) within sigma / 2
    generator = SmoothMask((32, 32), 4, 6.0, torch.device("cpu"))
    parameters = torch.zeros(1, 1, *generator.grid)
    parameters[0, 0, 4, 5] = 1.0  # the grid point at pixel (16, 20)
    blob = generator(parameters)[0]
    assert float(blob[16, 20]) == pytest.approx(1.0, abs=1e-6)
    assert float(blob[16, 23]) == pytest.approx(1.0, abs=1e-6)  # 3 px = sigma / 2 away
    assert 0.0 < float(blob[16, 29]) < 0.5 and float(blob[0, 0]) < 1e-6
    assert float(blob[12, 20]) == pytest.approx(float(blob[20, 20]), abs=1e-6)  # symmetric about the point
