"""ROAD's imputation solver: its fast parts equal their definitions, the answer does not depend on how the
holes are batched or deduplicated, and it reaches the exact solve on CAM-like and scattered holes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cnnscope.evaluate import road
from cnnscope.evaluate.road import impute, removal_masks

STENCIL = torch.tensor([[1.0, 2.0, 1.0], [2.0, 0.0, 2.0], [1.0, 2.0, 1.0]]) / 12


def _photo_like(side: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return F.avg_pool2d(torch.rand(1, 3, side, side, generator=generator), 5, 1, 2) * 4 - 2


def _maps(side: int, seed: int) -> torch.Tensor:
    """A CAM-like map (7x7 upsampled) and a gradient-like one (per pixel)."""
    generator = torch.Generator().manual_seed(seed)
    cam = F.interpolate(torch.rand(1, 1, 7, 7, generator=generator), size=(side, side), mode="bilinear")[0, 0]
    return torch.stack([cam, torch.rand(side, side, generator=generator)])


def test_the_fast_stencil_resampling_and_dot_equal_their_definitions():
    x = torch.randn(2, 3, 13, 10)
    expected = F.conv2d(x.reshape(6, 1, 13, 10), STENCIL.view(1, 1, 3, 3), padding=1).view_as(x)
    torch.testing.assert_close(road._neighbours(x), expected, atol=1e-6, rtol=0)  # zero outside the image
    coarse = torch.randn(2, 3, 7, 5)
    doubled = F.interpolate(coarse, scale_factor=2, mode="bilinear", align_corners=False)
    torch.testing.assert_close(road._doubled(coarse, (14, 10)), doubled, atol=1e-6, rtol=0)
    torch.testing.assert_close(road._doubled(coarse, (13, 9)), doubled[..., :13, :9], atol=1e-6, rtol=0)
    even = torch.randn(2, 3, 8, 6)
    torch.testing.assert_close(road._block_sums(even), 4 * F.avg_pool2d(even, 2), atol=1e-5, rtol=0)
    odd = road._block_sums(x)  # the last row alone where the size is odd
    assert odd.shape[-2:] == (7, 5)
    torch.testing.assert_close(odd[..., -1, :], x[..., -1, 0::2] + x[..., -1, 1::2], atol=1e-6, rtol=0)
    a, b = torch.randn(3, 2, 5, 5), torch.randn(3, 2, 5, 5)
    torch.testing.assert_close(road._dot(a, b), (a * b).flatten(1).sum(1), atol=1e-5, rtol=1e-5)


def test_the_answer_does_not_depend_on_the_batches_or_on_repeated_holes(monkeypatch):
    """Cache-sized batches, images leaving a batch as they converge, and holes that repeat for one image
    (solved once) give each image exactly the answer it gets alone; the noise stays per frame."""
    image = _photo_like(48, 0)
    holes = torch.cat(
        [
            removal_masks(_maps(48, 1), road.FRACTIONS, most_relevant=True).flatten(0, 1),
            removal_masks(torch.zeros(1, 48, 48), (0.3, 0.5), most_relevant=True).flatten(0, 1),
            removal_masks(torch.zeros(1, 48, 48), (0.3, 0.5), most_relevant=False).flatten(0, 1),  # the same
        ]
    )
    share = road.block_share(holes.float())
    assert bool((share >= road.MULTIGRID_SHARE).any()) and bool((share < road.MULTIGRID_SHARE).any())
    frames = image.expand(len(holes), -1, -1, -1)
    alone = torch.cat([impute(image, holes[k : k + 1], noise=0.0) for k in range(len(holes))])
    monkeypatch.setattr(road, "CHUNK_BYTES", 3 * image[0].numel() * 4)  # batches of 3 images
    together = impute(frames, holes, noise=0.0)
    assert torch.equal(together, alone)
    assert torch.equal(impute(frames.clone(), holes, noise=0.0), alone)  # equal images, not an expanded one
    generator = torch.Generator().manual_seed(0)
    noisy = impute(frames, holes, generator=generator)
    assert not torch.equal(noisy[-1], noisy[-3])  # a repeated hole still gets its own noise
    sigma = road.NOISE * float(image.max() - image.min())
    assert (noisy - alone).abs().max() < 6 * sigma and (noisy - alone)[holes.expand_as(noisy)].std() > 0.9 * sigma


@pytest.mark.parametrize("kind", [0, 1], ids=["CAM-like", "scattered"])
def test_reaches_the_exact_solve_at_the_default_tolerance(kind):
    """At 128 px (a CAM-like map takes the V-cycle from its push-pull start, a per-pixel map nested Jacobi),
    every fraction, both orders: within 0.2% of the value range of one sparse solve, a fifth of the noise."""
    side = 128
    image = _photo_like(side, 2)
    maps = _maps(side, 3)[kind : kind + 1]
    holes = torch.cat(
        [removal_masks(maps, road.FRACTIONS, most_relevant=order).flatten(0, 1) for order in (True, False)]
    )
    got = impute(image.expand(len(holes), -1, -1, -1), holes, noise=0.0)
    spread = float(image.max() - image.min())
    for k in range(len(holes)):
        expected = road.exact_imputation(image[0].double().numpy(), holes[k, 0].numpy())
        assert np.abs(got[k].numpy() - expected).max() < 0.002 * spread
