"""3-D volumes (issue 21): a Conv3d model whose evidence is a bright cube at a known voxel, NIfTI and DICOM
readers, the montage of planes through the peak."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import cnnscope
from cnnscope.models import Model, Preprocess

#: The cube: slices z 4-7, rows y 8-11, columns x 20-23 of a 16 x 16 x 32 (D, H, W) volume; its centre voxel.
CUBE = (slice(4, 8), slice(8, 12), slice(20, 24))
CENTRE = (21.5, 9.5, 5.5)  # (x, y, z)
#: The head's weight on the cube detector: the cube moves the class-1 logit by several units.
EVIDENCE = 3000.0


class CubeNet(nn.Module):
    """Class 1 detects bright cubes: a box filter (mean over 3^3 voxels) minus 0.5, a ReLU, global average
    pooling and a linear head; class 0 is a constant logit of 2, which the cube's evidence (about 4) has to beat.
    On a dim volume (values <= 0.4) only a bright cube makes the box filter pass 0.5, so the evidence of class 1
    is the cube and nothing else."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv3d(1, 2, 3, padding=1)
        with torch.no_grad():
            self.features.weight.zero_()
            self.features.weight[0] = 1.0 / 27
            self.features.bias.copy_(torch.tensor([-0.5, 0.0]))
            self.features.weight[1, 0, 1, 1, 1] = 1.0
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.head = nn.Linear(2, 2)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[0.0, 0.0], [EVIDENCE, 0.0]]))
            self.head.bias.copy_(torch.tensor([2.0, 0.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.relu(self.features(x))), 1))


def cube_model() -> Model:
    preprocess = Preprocess(size=(16, 16, 32), mean=(0.0,), std=(1.0,))
    return Model(CubeNet().eval(), preprocess=preprocess, labels=["brightness", "cube"], name="cube")


def cube_volume() -> np.ndarray:
    volume = np.random.default_rng(0).random((16, 16, 32)).astype(np.float32) * 0.4
    volume[CUBE] = 1.0
    return volume


def near_cube(peak: tuple[int, ...], cell: float = 4.0) -> bool:
    """Within one cell (the cube's own size) of its centre on every axis."""
    return all(abs(p - c) <= cell for p, c in zip(peak, CENTRE, strict=True))


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("gradcam", {}),
        ("scorecam", {}),
        ("ablationcam", {}),
        ("gradcam++", {}),
        ("layercam", {}),
        ("saliency", {}),
        ("integrated-gradients", {"steps": 16}),
        ("smoothgrad", {"samples": 4}),
        ("occlusion", {"window": 4, "stride": 4, "score": "logit"}),
        ("occlusion", {"window": 4, "stride": 4, "score": "logit", "fill": "blur"}),
        ("integrated-gradients", {"steps": 16, "baseline": "blur", "blur_sigma": 3.0}),
        ("rise", {"masks": 300, "cells": 4}),
        ("eigencam", {}),
        ("guided-gradcam", {}),
    ],
)
def test_3d_maps_peak_on_the_bright_cube(method, options):
    explanation = cnnscope.explain(cube_model(), cube_volume(), method=method, target=1, **options)
    assert explanation.maps.shape == (1, 1, 16, 16, 32)  # upsampled trilinearly to the input
    peak = explanation.peak(0, 0)
    assert len(peak) == 3 and near_cube(peak), (method, peak)
    record = explanation.record(0, 0)
    assert record["peak"] == list(peak)


def test_3d_occlusion_slides_a_cube_over_every_spatial_dim():
    explanation = cnnscope.explain(
        cube_model(), cube_volume(), method="occlusion", target=1, window=4, stride=4, score="logit", fill="zero"
    )
    assert explanation.stats["forwards"] == 1 + 1  # the unperturbed pass, then all 4 x 4 x 8 cubes in one pass
    winners = explanation.stats["winners"][0]
    assert np.asarray(winners).shape == (4, 4, 8)  # the grid of (z, y, x) positions
    # only the cube's own position (z 4-7, y 8-11, x 20-23) loses the evidence: its drop is the largest
    drops = explanation.maps[0, 0, ::4, ::4, ::4]
    assert tuple(int(v) for v in np.unravel_index(int(drops.argmax()), drops.shape)) == (1, 2, 5)


def test_gradcam_on_a_gap_head_is_the_activation_weighted_by_the_head():
    model = cube_model()
    volume = cube_volume()
    explanation = cnnscope.explain(model, volume, method="gradcam", target=1)
    with torch.no_grad():
        activation = model.module.relu(model.module.features(torch.from_numpy(volume)[None, None]))
    # d y / d A[c] = W[1, c] / (d h w): channel 0 weighs EVIDENCE / n, channel 1 nothing
    expected = activation[:, 0] * EVIDENCE / activation[0, 0].numel()
    assert torch.allclose(explanation.raw[:, 0], expected, rtol=1e-4, atol=1e-7)


def test_the_montage_shows_the_three_planes_through_the_peak():
    explanation = cnnscope.explain(cube_model(), cube_volume(), method="gradcam", target=1)
    picture = explanation.overlay(0, 0)
    assert picture.ndim == 3 and picture.shape[2] == 3 and picture.dtype == np.uint8
    assert explanation.images[0].shape == (16, 16, 32, 3)  # the volume as grey RGB slices
    from cnnscope.render.slices import orthogonal_planes

    planes = orthogonal_planes(explanation.images[0], explanation.normalized()[0, 0].numpy(), explanation.peak())
    assert [plane.shape[:2] for _, plane in planes] == [(16, 32), (16, 32), (16, 16)]


def test_nifti_round_trip_keeps_the_affine(tmp_path):
    nibabel = pytest.importorskip("nibabel")
    from cnnscope.io_volumes import read_volume, write_nifti

    affine = np.array([[0.8, 0, 0, -90.0], [0, 0.8, 0, -120.0], [0, 0, 2.5, 30.0], [0, 0, 0, 1]])
    scan = np.swapaxes(cube_volume(), 0, 2)  # NIfTI order (x, y, z)
    nibabel.save(nibabel.Nifti1Image(scan, affine), str(tmp_path / "scan.nii.gz"))
    volume = read_volume(tmp_path / "scan.nii.gz")
    assert volume.values.shape == (16, 16, 32, 1) and np.array_equal(volume.values[..., 0], cube_volume())
    explanation = cnnscope.explain(cube_model(), volume, method="gradcam", target=1)
    assert near_cube(explanation.peak())
    written = nibabel.load(str(write_nifti(tmp_path / "map.nii.gz", explanation.numpy()[0, 0], volume)))
    assert np.allclose(written.affine, affine) and written.shape == scan.shape
    heat = np.asarray(written.dataobj)
    x, y, z = np.unravel_index(int(heat.argmax()), heat.shape)  # the map lies on the scan: its peak is the cube's
    assert near_cube((x, y, z))


def test_a_dicom_series_is_sorted_by_position_and_rescaled(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    from cnnscope.io_volumes import read_dicom_series

    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    base = template.pixel_array.astype(np.int16)
    for index, z in enumerate([30.0, 10.0, 20.0]):  # written out of order
        dataset = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        dataset.ImagePositionPatient = [0.0, 0.0, z]
        dataset.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        dataset.RescaleSlope, dataset.RescaleIntercept = 2, -1024
        dataset.PixelData = (base + int(z)).astype(base.dtype).tobytes()
        dataset.save_as(tmp_path / f"slice{index}.dcm")
    (tmp_path / "README.txt").write_text("not a slice")
    volume = read_dicom_series(tmp_path)
    assert volume.values.shape == (3, *base.shape, 1)
    for slot, z in enumerate([10, 20, 30]):  # sorted by position, each rescaled: 2 * stored - 1024
        assert np.array_equal(volume.values[slot, ..., 0], (base + z).astype(np.float32) * 2 - 1024)
    assert volume.affine[2, 2] == pytest.approx(10.0)


def test_a_3d_blur_is_separable_smooth_and_per_channel():
    from cnnscope.methods.gradient import gaussian_blur

    generator = torch.Generator().manual_seed(0)
    noise = torch.rand((1, 2, 12, 16, 20), generator=generator)
    blurred = gaussian_blur(noise, 1.5)
    assert blurred.shape == noise.shape

    def roughness(values: torch.Tensor) -> float:  # mean squared difference between neighbours, every axis
        return sum(float(values.diff(dim=axis).pow(2).mean()) for axis in (2, 3, 4))

    assert roughness(blurred) < 0.05 * roughness(noise)  # smooth on every axis, the slices included
    assert float(blurred.mean()) == pytest.approx(float(noise.mean()), abs=0.01)  # the kernel sums to 1
    # a delta in channel 0 spreads as the product of three 1-D Gaussians, and never into channel 1
    delta = torch.zeros((1, 2, 13, 13, 13))
    delta[0, 0, 6, 6, 6] = 1.0
    spread = gaussian_blur(delta, 1.0)
    line = torch.exp(-(torch.arange(-3, 4.0) ** 2) / 2)
    line = line / line.sum()
    expected = torch.einsum("i,j,k->ijk", line, line, line)
    assert torch.allclose(spread[0, 0, 3:10, 3:10, 3:10], expected, atol=1e-7)
    assert float(spread[0, 1].abs().max()) == 0.0
    # slices that are all the same picture: each blurred slice is that picture's 2-D blur
    picture = noise[:, :, 0]
    stack = picture.unsqueeze(2).repeat(1, 1, 5, 1, 1)
    assert torch.allclose(gaussian_blur(stack, 1.5)[:, :, 2], gaussian_blur(picture, 1.5), atol=1e-6)
    # a clip with fewer frames than the kernel's radius: replicate padding along time, still a smooth average
    short = gaussian_blur(torch.rand((1, 3, 2, 16, 16), generator=generator), 2.0)
    assert short.shape == (1, 3, 2, 16, 16) and torch.isfinite(short).all()
