"""CAM and Grad-CAM: where their maps peak, how they relate, and what they say when they fail."""

import numpy as np
import pytest
import torch
from torch import nn

import cnnscope
from cnnscope import CnnscopeWarning, MethodError
from cnnscope.methods import CAM, GradCAM
from cnnscope.methods.cam import target_gradients
from cnnscope.models import Model, Preprocess
from cnnscope.testing import quadrant_masks, quadrant_model, tiny_model


@pytest.fixture(scope="module")
def quadrant():
    return quadrant_model()


@pytest.mark.parametrize("quadrant_index", range(4))
def test_gradcam_mass_lies_in_the_quadrant_the_class_reads(quadrant, quadrant_index):
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(quadrant_index))
    explanation = GradCAM(quadrant)(images, quadrant_index)
    masks = quadrant_masks(32, 32)[quadrant_index, 0]
    for i in range(2):
        heat = explanation.maps[i, 0]
        assert float((heat * masks).sum() / heat.sum()) > 0.9
        x, y = explanation.peak(i, 0)
        assert masks[y, x] == 1


def test_all_quadrants_in_one_call_run_one_forward(quadrant):
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    explanation = GradCAM(quadrant)(images, [0, 1, 2, 3])
    # one forward; GAP + linear head, so one backward pass verifies the closed-form gradients of all four
    assert explanation.stats["forwards"] == 1 and explanation.stats["backwards"] == 1
    masks = quadrant_masks(32, 32)[:, 0]
    for i in range(3):
        for q in range(4):
            heat = explanation.maps[i, q]
            assert float((heat * masks[q]).sum() / heat.sum()) > 0.9


@pytest.mark.filterwarnings("ignore::cnnscope.CnnscopeWarning")
def test_gradcam_equals_relu_cam_over_area_on_a_gap_linear_head(default_model, default_batch):
    """Theory: d y_c / d A_k(i, j) = W[c, k] / Z on GAP + linear, so Grad-CAM = ReLU(CAM) / Z."""
    cam = CAM(default_model)(default_batch, "top3")
    grad = GradCAM(default_model)(default_batch, "top3")
    area = cam.raw.shape[-1] * cam.raw.shape[-2]
    torch.testing.assert_close(grad.raw, torch.relu(cam.raw) / area, rtol=1e-4, atol=1e-6)
    assert cam.signed and not grad.signed


def test_cam_refuses_a_head_that_is_not_gap_linear():
    class MaxHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(torch.amax(torch.relu(self.conv(x)), dim=(2, 3)))

    model = Model(MaxHead().eval(), preprocess=Preprocess((16, 16)))
    with pytest.raises(MethodError, match="global average of layer .conv.*they are not.*Use gradcam"):
        CAM(model)(torch.rand(1, 3, 16, 16))
    assert GradCAM(model)(torch.rand(1, 3, 16, 16)).raw.shape == (1, 1, 16, 16)


def test_cam_refuses_a_layer_that_does_not_feed_the_head(default_model):
    with pytest.raises(MethodError, match="takes 1280 features, not the 320 channels.*Use gradcam"):
        CAM(default_model, layer="_blocks.15")


@pytest.mark.filterwarnings("ignore::cnnscope.CnnscopeWarning")
def test_top5_is_one_forward_and_matches_one_target_at_a_time(default_model, default_batch):
    together = GradCAM(default_model)(default_batch, "top5")
    assert together.stats["forwards"] == 1
    for k in range(5):
        alone = GradCAM(default_model)(default_batch, together.targets[:, k : k + 1].tolist())
        torch.testing.assert_close(together.raw[:, k], alone.raw[:, 0], rtol=1e-4, atol=1e-7)


def test_batched_gradients_equal_a_loop(default_model, default_batch):
    layer = default_model.default_layer()
    from cnnscope.hooks import capture

    with capture(default_model.module, [layer]) as record, torch.enable_grad():
        default_model.module.eval()
        logits = default_model.module(default_batch)
    targets = torch.tensor([[285, 3, -1], [967, 968, 1]])
    batched = target_gradients(logits, record[layer.key], targets, retain_graph=True)
    for k in range(3):
        for b in range(2):
            if targets[b, k] < 0:
                assert batched[b, k].abs().max() == 0
                continue
            (single,) = torch.autograd.grad(logits[b, targets[b, k]], record[layer.key], retain_graph=True)
            torch.testing.assert_close(batched[b, k], single[b], rtol=1e-5, atol=1e-8)


@pytest.mark.filterwarnings("ignore::cnnscope.CnnscopeWarning")
def test_all_thousand_classes_closed_form_equals_chunked_autograd(default_model, chelsea, monkeypatch):
    """On a GAP + linear tail the gradients come in closed form (verified by one backward pass); they
    must equal autograd's, here forced in chunks of 7 targets."""
    import cnnscope.methods.cam as cam_module

    closed = GradCAM(default_model)(chelsea, list(range(1000)))
    assert closed.stats == {**closed.stats, "forwards": 1, "backwards": 1}
    monkeypatch.setattr(cam_module, "ANALYTIC_MIN_TARGETS", 10**9)
    monkeypatch.setattr(cam_module, "GRADIENT_BUDGET_BYTES", 1280 * 49 * 4 * 7)
    chunked = GradCAM(default_model)(chelsea, list(range(1000)))
    assert chunked.stats["backwards"] == 1000
    scale = float(chunked.raw.abs().max())
    torch.testing.assert_close(closed.raw, chunked.raw, rtol=1e-4, atol=1e-6 * scale)
    assert closed.raw.shape == (1, 1000, 7, 7)


@pytest.mark.parametrize("layer", ["conv3", "conv2", "act3"])
def test_tails_that_are_not_gap_linear_fall_back_to_autograd(layer):
    """conv3 is followed by a ReLU6 (not the identity here), conv2 by a ReLU and pooling: the closed form must
    not be used; act3 feeds GAP + linear directly, where it is."""
    model = tiny_model()
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 4
    together = GradCAM(model, layer=layer)(images, [0, 1, 2, 3])
    assert together.stats["backwards"] == (1 if layer == "act3" else 4)
    for k in range(4):
        alone = GradCAM(model, layer=layer)(images, k)
        scale = float(alone.raw.abs().max()) or 1.0
        torch.testing.assert_close(together.raw[:, k], alone.raw[:, 0], rtol=1e-4, atol=1e-6 * scale)


def test_empty_gradcam_says_so_and_counterfactual_shows_the_negative_evidence(quadrant):
    images = torch.zeros(1, 3, 32, 32)
    images[:, :, :16, :16] = 1.0  # evidence only for class 0 (top-left)
    model = quadrant
    # class 1 has no evidence, so its map is empty; make class 1 *disfavour* channels of group 0
    net = model.module
    with torch.no_grad():
        saved = net.fc.weight.clone()
        net.fc.weight[1] = -saved[0]
    try:
        with pytest.warns(CnnscopeWarning, match="map of 'top-right' is empty.*counterfactual=True"):
            empty = GradCAM(model)(images, 1)
        assert float(empty.raw.max()) == 0.0 and empty.notes
        counter = GradCAM(model, counterfactual=True)(images, 1)
        masks = quadrant_masks(32, 32)[0, 0]
        heat = counter.maps[0, 0]
        assert float(heat.sum()) > 0 and float((heat * masks).sum() / heat.sum()) > 0.9
    finally:
        with torch.no_grad():
            net.fc.weight.copy_(saved)


def test_near_identical_maps_of_different_classes_are_flagged(default_model, coffee):
    with pytest.warns(CnnscopeWarning, match="'cup' and 'coffee mug' are nearly identical"):
        explanation = GradCAM(default_model)(coffee, ["cup", "coffee mug"])
    assert any("nearly identical" in note for note in explanation.notes)


def test_maps_keep_sign_and_scale_and_upsample(default_model, chelsea):
    explanation = cnnscope.explain(default_model, chelsea, "cam", target="tench")
    assert explanation.raw.shape == (1, 1, 7, 7) and explanation.maps.shape == (1, 1, 224, 224)
    assert float(explanation.raw.min()) < 0 < float(explanation.raw.max())  # signed, unscaled
    normalized = explanation.normalized()
    assert float(normalized.abs().max()) == pytest.approx(1.0)
    overlay = explanation.overlay(0, 0)
    assert overlay.shape == chelsea.shape  # drawn on the original, not the 224x224 input


def test_the_cat_map_lies_on_the_cat(default_model, chelsea):
    """chelsea is a close-up of a cat's face: its Grad-CAM peak must be on the face, not the border."""
    explanation = GradCAM(default_model)(chelsea, "Egyptian cat")
    x, y = explanation.peak()
    height, width = chelsea.shape[:2]
    assert 0.1 * width < x < 0.8 * width and 0.1 * height < y < 0.9 * height
    assert explanation.probability(0, 0) > 0.6


def test_grayscale_and_other_inputs_work(default_model):
    gray = np.full((50, 70), 128, dtype=np.uint8)
    explanation = cnnscope.explain(default_model, [gray, gray], "gradcam", "top2")
    assert explanation.raw.shape == (2, 2, 7, 7)


def test_deterministic_and_frozen_model_ok():
    model = tiny_model()
    for param in model.module.parameters():
        param.requires_grad_(False)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    first = GradCAM(model)(images, "top2")
    second = GradCAM(model)(images, "top2")
    assert torch.equal(first.raw, second.raw)
    assert not any(p.requires_grad for p in model.module.parameters())


def test_layers_earlier_in_the_network(default_model, chelsea):
    explanation = GradCAM(default_model, layer="_blocks.10")(chelsea, 285)
    assert explanation.raw.shape[-1] == 14 and explanation.layer == "_blocks.10"
    assert explanation.maps.shape[-2:] == (224, 224)


def test_images_per_pass_splits_the_batch_exactly(default_model):
    from cnnscope.methods.base import auto_images_per_pass
    from cnnscope.samples import SAMPLES, sample_image

    images = [sample_image(name) for name in SAMPLES]
    targets = [[285], ["espresso", "cup"], [1, 2, 3], []]
    whole = GradCAM(default_model)(images, targets, images_per_pass=4)
    split = GradCAM(default_model)(images, targets, images_per_pass=1)
    assert whole.stats["forwards"] == 1 and split.stats["forwards"] == 4
    assert whole.targets.tolist() == split.targets.tolist() == [[285, -1, -1], [967, 968, -1], [1, 2, 3], [-1] * 3]
    torch.testing.assert_close(whole.raw, split.raw, rtol=1e-4, atol=1e-6)
    # every layer output of a pass stays under 24 MiB: the 96x112x112 expansion is 4.8 MB per image
    assert auto_images_per_pass(default_model) == 5


def test_multilabel_positive_targets():
    model = quadrant_model()
    multilabel = cnnscope.load_model(model, multilabel=True)
    images = torch.zeros(2, 3, 32, 32)
    images[0, :, :16, :16] = 1.0  # top-left
    images[0, :, 16:, 16:] = 1.0  # and bottom-right
    images[1, :, :16, 16:] = 1.0  # top-right only
    explanation = GradCAM(multilabel)(images, "positive", threshold=0.6)
    assert explanation.targets.tolist() == [[0, 3], [1, -1]]
    assert float(explanation.probabilities[0, 0]) == pytest.approx(torch.sigmoid(explanation.scores[0, 0]).item())
    with pytest.raises(cnnscope.TargetError, match="no class passes the threshold 0.99"):
        GradCAM(multilabel)(torch.zeros(1, 3, 32, 32), "positive", threshold=0.99)


@pytest.mark.filterwarnings("ignore::cnnscope.CnnscopeWarning")
def test_several_layers_in_one_pass_equal_one_layer_at_a_time(default_model, default_batch):
    layers = ["_blocks.5", "_blocks.10", "_swish@1"]
    together = GradCAM(default_model).explain_layers(default_batch, layers, "top2")
    assert list(together) == layers
    for layer in layers:
        explanation = together[layer]
        assert explanation.layer == layer and explanation.stats["forwards"] == 1
        assert explanation.stats["backwards"] == 2  # one per target, for all three layers at once
        alone = GradCAM(default_model, layer=layer)(default_batch, "top2")
        scale = float(alone.raw.abs().max())
        torch.testing.assert_close(explanation.raw, alone.raw, rtol=1e-4, atol=1e-6 * scale)
    sizes = [together[layer].raw.shape[-1] for layer in layers]
    assert sizes == [default_model.layer(layer).output_shape[-1] for layer in layers] == [14, 14, 7]
    ablation = cnnscope.get_method("ablationcam")(default_model).explain_layers(default_batch, ["_swish@1"], 285)
    assert ablation["_swish@1"].raw.shape == (2, 1, 7, 7)
