"""Class impressions: the single-object metrics, the saliency-driven objective, fused images, the model left alone."""

import numpy as np
import pytest
import torch

from cnnscope import InputError, TargetError, class_impressions
from cnnscope.features import Transforms, salient_regions
from cnnscope.features.impressions import main_region_masks, plainness, region_weights
from cnnscope.features.param import make_param
from cnnscope.testing import check_cleanup_on_error, check_untouched
from cnnscope.testing.models import tiny_model


def test_one_region_is_counted_and_its_share_is_exact():
    saliency = np.zeros((10, 10))
    saliency[2:5, 2:5] = 1.0  # one 3x3 block at the peak
    saliency[8, 8] = 0.2  # below half the peak: mass, but no region
    saliency[0, 9] = -3.0  # negative evidence counts as zero
    found = salient_regions(saliency)
    assert found.count == 1
    assert found.largest_share == pytest.approx(9.0 / 9.2, abs=1e-12)
    assert found.labels[3, 3] == found.main and found.labels[8, 8] == 0 and (found.labels > 0).sum() == 9


def test_two_regions_are_counted_and_the_main_one_holds_the_most_mass():
    saliency = np.full((10, 10), 0.1)
    saliency[1:3, 1:3] = 1.0  # 4 cells at the peak: mass 4.0
    saliency[6:8, 4:7] = 0.8  # 6 cells above half the peak: mass 4.8, the main region
    found = salient_regions(torch.from_numpy(saliency))
    total = 4.0 + 4.8 + 0.1 * (100 - 10)
    assert found.count == 2
    assert found.largest_share == pytest.approx(4.8 / total, abs=1e-12)
    assert found.labels[6, 4] == found.main and found.labels[1, 1] not in (0, found.main)
    # at a higher threshold the 0.8 block drops out: one region, the peak's
    strict = salient_regions(saliency, fraction=0.9)
    assert strict.count == 1 and strict.largest_share == pytest.approx(4.0 / total, abs=1e-12)


def test_cells_touching_at_a_corner_are_one_region_and_a_blank_map_has_none():
    diagonal = np.eye(4)
    assert salient_regions(diagonal).count == 1 and salient_regions(diagonal).largest_share == pytest.approx(1.0)
    blank = salient_regions(np.zeros((5, 5)) - 1.0)
    assert blank.count == 0 and blank.largest_share == 0.0 and blank.main == 0
    with pytest.raises(InputError, match="2-D"):
        salient_regions(np.zeros((1, 5, 5)))
    with pytest.raises(InputError, match="fraction"):
        salient_regions(diagonal, fraction=0.0)


def test_the_loss_mask_is_the_main_region_grown_as_asked():
    saliency = torch.zeros(2, 7, 7)
    saliency[0, 1, 1] = 1.0  # a small region of high mass...
    saliency[0, 4:6, 4:6] = 0.9  # ...and the main one (mass 3.6)
    core = torch.zeros(7, 7)
    core[4:6, 4:6] = 1.0
    grown = torch.zeros(7, 7)
    grown[3:7, 3:7] = 1.0
    assert torch.equal(main_region_masks(saliency)[0], core)
    masks = main_region_masks(saliency, grow=1)
    assert torch.equal(masks[0], grown)
    assert torch.equal(masks[1], torch.ones(7, 7))  # nothing salient yet: nothing is penalized


def test_the_focus_weights_sum_to_one_in_the_region_and_fill_raises_the_weak_cells():
    saliency = torch.tensor([[[1.0, 0.5, 0.0], [0.8, 0.2, 0.0], [0.0, 0.0, 0.9]]])
    region = torch.tensor([[[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])  # peak 1.0, cells 0.5 and 0.8
    by_saliency = region_weights(saliency, region, "saliency")
    torch.testing.assert_close(by_saliency[0, 0], torch.tensor([1.0, 0.5, 0.0]) / 2.3)
    torch.testing.assert_close(by_saliency[0, 1, 0], torch.tensor(0.8 / 2.3))
    torch.testing.assert_close(region_weights(saliency, region, "region"), region / 3)
    fill = region_weights(saliency, region, "fill")  # peak - G inside: 0, 0.5, 0.2 -> the weakest cell most
    torch.testing.assert_close(fill[0, 0], torch.tensor([0.0, 0.5 / 0.7, 0.0]))
    torch.testing.assert_close(fill[0, 1, 0], torch.tensor(0.2 / 0.7))
    assert float(fill[0, 2, 2]) == 0.0 and float(by_saliency.sum()) == pytest.approx(1.0)
    flat = region_weights(torch.ones(1, 3, 3), torch.ones(1, 3, 3), "fill")  # an even region has nothing to fill
    assert float(flat.abs().sum()) == 0.0
    with pytest.raises(InputError, match="focus_weights"):
        region_weights(saliency, region, "peak")


def test_plainness_counts_only_the_view_outside_the_region():
    region = torch.zeros(1, 2, 2)
    region[0, 0, 0] = 1.0  # the top-left quarter of the view
    view = torch.zeros(1, 3, 8, 8)
    view[:, :, :4, :4] = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(0))  # texture inside
    view[:, :, 4:, :] = 2.0  # a flat colour outside, not the same as the rest of the outside
    outside = torch.ones(8, 8)
    outside[:4, :4] = 0
    values = view[0][:, outside.bool()]  # (3, 48) pixels outside
    expected = (values - values.mean(dim=1, keepdim=True)).square().sum() / 64
    torch.testing.assert_close(plainness(view, region), expected[None])
    plain = view.clone()
    plain[:, :, 4:, :] = 0.0  # the outside all one colour: plain
    torch.testing.assert_close(plainness(plain, region), torch.zeros(1))


def test_without_the_saliency_terms_it_is_plain_maximize():
    """focus = outside = 0 leaves the class score alone: the same start, transforms and steps as maximize."""
    model = tiny_model()
    result = class_impressions(
        model, [0, 3], steps=6, size=32, lr=0.1, seed=3, focus=0.0, outside=0.0, background=0.0, quiet=True
    )
    assert result.baseline is not None
    torch.testing.assert_close(result.tensor, result.baseline.tensor, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.history, result.baseline.history, rtol=1e-5, atol=1e-5)


def test_the_saliency_terms_change_the_images_and_the_objective_rises():
    model = tiny_model()
    common = dict(steps=8, size=32, lr=0.1, seed=3, quiet=True, baseline=False)
    driven = class_impressions(model, [0, 3], **common)
    even = class_impressions(model, [0, 3], focus_weights="region", grow=0, background=0.0, momentum=0.0, **common)
    peaked = class_impressions(model, [0, 3], focus_weights="saliency", **common)
    plain = class_impressions(model, [0, 3], focus=0.0, outside=0.0, background=0.0, **common)
    held = class_impressions(model, [0, 3], momentum=0.5, **common)
    for other in (plain, even, peaked, held):
        assert not torch.allclose(driven.tensor, other.tensor)
    for result in (driven, even, peaked, held):
        assert (result.objective_history[-1] > result.objective_history[0]).all()
    # with the terms off the objective is the score itself
    np.testing.assert_array_equal(plain.objective_history, plain.history)


def test_on_the_default_model_the_loss_falls_and_the_class_score_rises_in_a_few_steps(default_model):
    # without transforms every step sees the image itself, so the history is the objective's own path
    result = class_impressions(
        default_model, ["goldfish"], steps=6, size=128, seed=0, transforms=Transforms.none(), quiet=True, baseline=False
    )
    objectives = result.objective_history[:, 0]
    assert objectives[-1] > objectives[0] + 1.0, objectives  # the loss (the objective's negative) went down
    start = make_param("fourier", 1, (128, 128), torch.Generator().manual_seed(0)).image()  # the run's start
    with torch.no_grad():
        logits = default_model(default_model.preprocess.normalize(torch.cat([start, result.tensor])))
    assert logits[1, 1] > logits[0, 1] + 1.0, logits[:, 1]  # the goldfish logit
    probability = float(default_model.probabilities(logits)[1, 1])
    assert result.probabilities[0] == pytest.approx(probability, rel=1e-4)
    assert result.images.shape == (1, 128, 128, 3) and result.images.dtype == np.uint8
    assert result.options["layer"] == default_model.default_layer().key
    assert result.stats["batchnorm_folded"] > 0 and len(result.predictions[0]) == 5


@pytest.mark.slow
def test_a_fused_image_has_both_classes_in_its_top5(default_model):
    # 48 steps at 160 px: with the saliency terms' defaults, 16-32 steps at 128 px left the fusion to chance (it
    # failed or passed with the seed and the number of torch threads); 48 at 160 held for seeds 0 and 1 on 1 and 2
    # threads (the issue's own check, 64 steps at 224 px, holds on seeds 0, 1 and 2: bench/impressions.py)
    result = class_impressions(
        default_model, [], fuse=["goldfish+pizza"], steps=48, size=160, seed=0, quiet=True, baseline=False
    )
    assert result.fused == [(1, 963)] and result.classes == []
    top5 = [p.index for p in result.predictions[0]]
    assert 1 in top5 and 963 in top5, [p.name for p in result.predictions[0]]


def test_a_seed_repeats_the_run_and_snapshots_are_kept():
    model = tiny_model()
    common = dict(fuse=["class 1+class 2"], steps=4, size=24, quiet=True, snapshots=[2])
    first = class_impressions(model, [0], seed=5, **common)
    second = class_impressions(model, [0], seed=5, **common)
    assert torch.equal(first.tensor, second.tensor) and np.array_equal(first.history, second.history)
    assert first.fused == [(1, 2)] and first.tensor.shape[0] == 2
    assert sorted(first.snapshots) == [2] and first.snapshots[2].shape == (2, 24, 24, 3)
    assert sorted(first.baseline.snapshots) == [2]
    fig = first.figure()
    assert len([axis for axis in fig.axes if axis.images]) == 3  # impression, its plain maximize, the fused image
    assert first.figure(step=2) is not None
    with pytest.raises(InputError, match="no snapshot"):
        first.figure(step=3)


def test_the_model_is_left_as_it_was_also_after_an_error():
    model = tiny_model()
    model.module.conv1.weight.requires_grad_(False)
    check_untouched(lambda: class_impressions(model, [0], fuse=["0+1"], steps=2, size=16, quiet=True), model)
    assert not model.module.conv1.weight.requires_grad and model.module.conv2.weight.grad is None
    inputs = torch.zeros(1, 3, 16, 16)
    check_cleanup_on_error(lambda _: class_impressions(model, [0], steps=2, size=16, quiet=True), model, inputs)


def test_bad_input_says_what_to_do():
    model = tiny_model()
    with pytest.raises(InputError, match="two or more different classes"):
        class_impressions(model, [], fuse=["class 1"], steps=1, size=16)
    with pytest.raises(InputError, match="joined by"):
        class_impressions(model, [], fuse=["class 1+"], steps=1, size=16)
    with pytest.raises(TargetError):
        class_impressions(model, ["no such class"], steps=1, size=16)
    with pytest.raises(InputError, match="at least one class"):
        class_impressions(model, [], steps=1, size=16)
    with pytest.raises(InputError, match="snapshot"):
        class_impressions(model, [0], steps=2, size=16, snapshots=[3])
    with pytest.raises(InputError, match="outside"):
        class_impressions(model, [0], steps=2, size=16, outside=-1.0)
    with pytest.raises(InputError, match="grow"):
        class_impressions(model, [0], steps=2, size=16, grow=-1)
    with pytest.raises(InputError, match="focus_weights"):
        class_impressions(model, [0], steps=2, size=16, focus_weights="peak")
    with pytest.raises(InputError, match="background"):
        class_impressions(model, [0], steps=2, size=16, background=-1.0)
    with pytest.raises(InputError, match="momentum"):
        class_impressions(model, [0], steps=2, size=16, momentum=1.0)
    with pytest.raises(InputError, match="transforms"):
        class_impressions(model, [0], steps=2, size=16, transforms="jitter")
