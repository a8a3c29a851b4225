"""DeepLIFT-SHAP, GradientSHAP and KernelSHAP: their sums, the dummy axiom, seeds."""

import numpy as np
import pytest
import torch

import cnnscope
from cnnscope.methods.shapley import constrained_shapley_fit, shapley_kernel_samples
from cnnscope.testing import quadrant_model

from .test_propagation import IMAGES, mixed


def test_deeplift_shap_sums_to_the_mean_output_difference():
    model = mixed(bias=True)
    references = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    explanation = cnnscope.get_method("deeplift-shap")(model, baselines=references)(IMAGES, "top2")
    with torch.no_grad():
        gain = model(IMAGES).gather(1, explanation.targets) - model(references).mean(0)[explanation.targets]
    torch.testing.assert_close(explanation.raw.flatten(2).sum(2), gain, rtol=1e-4, atol=1e-4)
    # and it is the mean of DeepLIFT against each reference
    single = [cnnscope.get_method("deeplift")(model, baseline=r)(IMAGES, explanation.targets).raw for r in references]
    torch.testing.assert_close(explanation.raw, torch.stack(single).mean(0), rtol=1e-4, atol=1e-6)


def test_deeplift_shap_default_references_are_blurred_noised_and_seeded():
    model = mixed(bias=True)
    first = cnnscope.get_method("deeplift-shap")(model, blur_sigma=2, references=3)(IMAGES, "top1")
    again = cnnscope.get_method("deeplift-shap")(model, blur_sigma=2, references=3)(IMAGES, "top1")
    other = cnnscope.get_method("deeplift-shap")(model, blur_sigma=2, references=3, seed=1)(IMAGES, "top1")
    assert torch.equal(first.raw, again.raw) and not torch.equal(first.raw, other.raw)
    assert max(abs(v) for row in first.stats["completeness_gap"] for v in row) < 1e-4
    with pytest.raises(cnnscope.MethodError, match="blur_sigma=.* is too wide"):
        cnnscope.get_method("deeplift-shap")(model, blur_sigma=10)(IMAGES, "top1")


def test_gradient_shap_from_one_reference_approaches_integrated_gradients():
    """With a single reference and no noise, expected gradients is IG with random nodes on the path."""
    model = mixed(bias=True)
    reference = torch.full((1, 3, 16, 16), 0.2)
    shap = cnnscope.get_method("gradient-shap")(model, baselines=reference, samples=400)(IMAGES, "top1")
    ig = cnnscope.get_method("integrated-gradients")(model, baseline=reference[0], steps=64)(IMAGES, "top1")
    sums, ig_sums = shap.raw.flatten(2).sum(2), ig.raw.flatten(2).sum(2)
    torch.testing.assert_close(sums, ig_sums, rtol=0.1, atol=0.05)
    a, b = shap.raw.flatten(), ig.raw.flatten()
    assert float(torch.corrcoef(torch.stack([a, b]))[0, 1]) > 0.95


def test_kernel_shap_values_sum_to_on_minus_off_and_dummies_get_zero():
    """Quadrant q's class reads only quadrant q: with the quadrants as the regions, every other region is a
    dummy player (value 0) and quadrant q gets f(x) - f(all off)."""
    model = quadrant_model()
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) + 0.1
    regions = np.zeros((32, 32), dtype=np.int64)
    regions[:16, 16:], regions[16:, :16], regions[16:, 16:] = 1, 2, 3
    explanation = cnnscope.get_method("kernel-shap")(model, feature_mask=regions, samples=40, fill="zero", quiet=True)(
        images, [[0, 1, 2, 3]]
    )
    values = explanation.raw[0][:, [0, 0, 16, 16], [0, 16, 0, 16]]  # (class, region)
    with torch.no_grad():
        gain = model(images)[0] - model(torch.zeros_like(images))[0]
    torch.testing.assert_close(torch.diagonal(values), gain, rtol=1e-4, atol=1e-5)
    off_diagonal = values - torch.diag(torch.diagonal(values))
    assert float(off_diagonal.abs().max()) < 1e-5


def test_kernel_shap_on_superpixels_sums_exactly_and_is_seeded():
    model = mixed(bias=True)
    method = cnnscope.get_method("kernel-shap")(model, samples=60, segments=8, quiet=True)
    first, again = method(IMAGES, "top1"), method(IMAGES, "top1")
    assert torch.equal(first.raw, again.raw)
    with torch.no_grad():
        logits = model(IMAGES).gather(1, first.targets)
    for i in range(2):
        labels = torch.from_numpy(
            cnnscope.methods.perturbation.superpixels(
                method.pixels(IMAGES[i : i + 1])[0].permute(1, 2, 0).numpy().astype(np.float64), "slic", 8, {}
            )
        )
        region_values = [first.raw[i, 0][labels == s][0] for s in range(int(labels.max()) + 1)]
        total = torch.stack(region_values).sum()
        torch.testing.assert_close(total, logits[i, 0] - first.stats["off_score"][i][0], rtol=1e-4, atol=1e-4)


def test_the_constrained_fit_recovers_an_additive_game():
    rng = np.random.default_rng(0)
    true = rng.normal(size=(6, 2))
    rows = shapley_kernel_samples(6, 80, seed=3)
    assert rows[0].all() and not rows[1].any()
    scores = rows @ true + 0.5
    torch.testing.assert_close(torch.from_numpy(constrained_shapley_fit(rows, scores)), torch.from_numpy(true))
