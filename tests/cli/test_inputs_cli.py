"""The issue's grey 28-px digits model saved as TorchScript, from the command line (issue 21)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cnnscope.errors import CnnscopeWarning
from tests.unit.test_inputs_channels import digits

from .test_cli import run

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")


@pytest.fixture(scope="module")
def digit_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("digits")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(digits()).save(str(folder / "digits.pt"))
    picture = np.zeros((28, 28), dtype=np.uint8)
    picture[6:22, 12:16] = 255
    Image.fromarray(picture).save(folder / "digit.png")
    Image.fromarray(picture.astype(np.uint16) * 257).save(folder / "digit16.png")
    return folder


def test_the_torchscript_digits_model_is_explained_from_a_grey_png(capsys, digit_files, tmp_path):
    model, image = str(digit_files / "digits.pt"), str(digit_files / "digit.png")
    with warnings.catch_warnings():  # the CLI prints warnings on stderr
        warnings.simplefilter("always", CnnscopeWarning)
        code, out, err = run(capsys, "explain", image, "--model", model, "--method", "saliency", "-o", str(tmp_path))
    assert code == 0, err
    assert "1-channel 28x28" in err  # the input read from the model, and said so
    code, out, err = run(
        capsys, "explain", image, "--model", model, "--size", "28", "--mean", "0", "--std", "1",
        "--method", "saliency,ig", "-o", str(tmp_path), "--json",
    )  # fmt: skip
    assert code == 0, err
    entries = json.loads(out)["images"][0]["explanations"]
    assert [entry["method"] for entry in entries] == ["saliency", "integrated-gradients"]
    assert all(len(entry["peak"]) == 2 for entry in entries)
    # the 16-bit copy gives the same prediction as the 8-bit one
    code, out16, _ = run(
        capsys, "predict", str(digit_files / "digit16.png"), image, "--model", model, "--size", "28",
        "--mean", "0", "--std", "1", "--json",
    )  # fmt: skip
    first, second = (result["predictions"] for result in json.loads(out16)["results"])
    assert first[0]["class_index"] == second[0]["class_index"]
    assert first[0]["probability"] == pytest.approx(second[0]["probability"], abs=1e-5)


def test_what_cannot_run_is_one_line(capsys, digit_files, tmp_path):
    model, image = str(digit_files / "digits.pt"), str(digit_files / "digit.png")
    common = ("--mean", "0", "--std", "1", "-o", str(tmp_path))
    code, _, err = run(capsys, "explain", image, "--model", model, "--size", "64", "--method", "saliency", *common)
    assert code == 2 and err.count("\n") == 1
    assert "(1, 1, 64, 64)" in err and "--size" in err and "mat1 and mat2" in err
    code, _, err = run(capsys, "explain", image, "--model", model, "--size", "28", *common)  # Grad-CAM on TorchScript
    assert code == 2 and err.count("\n") == 1 and "TorchScript" in err
    code, _, err = run(capsys, "predict", image, "--model", model, "--window", "5,1")
    assert code == 2 and err.count("\n") == 1 and "--window takes LOW,HIGH" in err


def test_a_volume_from_the_command_line(capsys, tmp_path):
    nibabel = pytest.importorskip("nibabel")
    from tests.unit.test_inputs_volumes import CubeNet, cube_volume, near_cube

    torch.save(CubeNet().eval(), tmp_path / "cube.pt")
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    nibabel.save(nibabel.Nifti1Image(np.swapaxes(cube_volume(), 0, 2), affine), str(tmp_path / "scan.nii.gz"))
    code, out, err = run(
        capsys, "explain", str(tmp_path / "scan.nii.gz"), "--model", str(tmp_path / "cube.pt"), "--trust-pickle",
        "--size", "16,16,32", "--mean", "0", "--std", "1", "--method", "gradcam,occlusion", "-t", "1",
        "--option", "window=4", "--option", "stride=4", "-o", str(tmp_path / "out"), "--json",
    )  # fmt: skip
    assert code == 0, err
    image = json.loads(out)["images"][0]
    assert image["size"] == [32, 16, 16]  # [W, H, D]
    for entry in image["explanations"]:
        assert len(entry["peak"]) == 3 and near_cube(tuple(entry["peak"])), entry
        with Image.open(entry["file"]) as montage:  # the planes through the peak
            assert montage.size[0] > 32
        written = nibabel.load(entry["nifti"])  # the map on the scan's affine, for 3D Slicer or ITK-SNAP
        assert np.allclose(written.affine, affine) and written.shape == (32, 16, 16)


@pytest.mark.parametrize(
    "suffix",
    [
        ".gif",
        # imageio-ffmpeg leaves its ffmpeg pipe to the garbage collector even after reader.close(): the
        # ResourceWarning surfaces wherever GC next runs (this test when run alone), not in our code
        pytest.param(".mp4", marks=pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")),
    ],
)
def test_a_clip_from_the_command_line(capsys, tmp_path, suffix):
    from cnnscope.render.animate import video_available, write_gif, write_mp4
    from tests.unit.test_inputs_clips import LIT, FlashNet, flash_frames

    if suffix == ".mp4" and not video_available():
        pytest.skip("needs cnnscope[video]")
    torch.save(FlashNet().eval(), tmp_path / "flash.pt")
    frames = [np.repeat(np.repeat(frame, 2, axis=0), 2, axis=1) for frame in flash_frames()]  # 64 x 64 frames
    if suffix == ".gif":
        write_gif(frames, tmp_path / "clip.gif", fps=8, hold=1.0)
    else:
        write_mp4(frames, tmp_path / "clip.mp4", fps=8)
    code, out, err = run(
        capsys, "explain", str(tmp_path / f"clip{suffix}"), "--model", str(tmp_path / "flash.pt"), "--trust-pickle",
        "--size", "8,32,32", "--mean", "0,0,0", "--std", "1,1,1", "--method", "gradcam", "-t", "1",
        "-o", str(tmp_path / "out"), "--json",
    )  # fmt: skip
    assert code == 0, err
    entry = json.loads(out)["images"][0]["explanations"][0]
    x, y, t = entry["peak"]  # in the input's pixels and frames
    assert 40 <= x < 56 and 16 <= y < 32 and t in LIT, entry["peak"]
    assert entry["frames"] == [0, 3, 7, 10, 13, 16, 20, 23] and len(entry["temporal"]) == 8
    assert sum(share for share, frame in zip(entry["temporal"], entry["frames"], strict=True) if frame in LIT) > 0.9
    with Image.open(entry["file"]) as strip, Image.open(entry["gif"]) as gif:
        assert strip.size[0] > 8 * 96 and gif.n_frames == 8
    assert entry["mp4"] is None or Path(entry["mp4"]).stat().st_size > 0


def test_compare_a_volume(capsys, tmp_path):
    """cnnscope compare on a 3-D model: a volume's rows are its planes through the peak (peak [x, y, z]), as explain
    draws them."""
    from tests.unit.test_inputs_volumes import CubeNet, cube_volume, near_cube

    torch.save(CubeNet().eval(), tmp_path / "cube.pt")
    np.save(tmp_path / "scan.npy", cube_volume())
    code, out, err = run(
        capsys, "compare", str(tmp_path / "scan.npy"), "--model", str(tmp_path / "cube.pt"), "--trust-pickle",
        "--size", "16,16,32", "--mean", "0", "--std", "1", "--methods", "gradcam,occlusion", "-t", "1",
        "--option", "window=4,4,4", "--option", "stride=4", "-o", str(tmp_path / "volume"), "--json",
    )  # fmt: skip
    assert code == 0, err
    summary = json.loads(out)
    assert summary["image"] == "scan" and [row["method"] for row in summary["rows"]] == ["gradcam", "occlusion"]
    for row in summary["rows"]:
        assert near_cube(tuple(row["maps"][0]["peak"])), row
    assert (tmp_path / "volume" / "scan_compare.png").stat().st_size > 0


def test_compare_windows_a_volume_as_explain_does(capsys, tmp_path):
    """--window on compare: raw values (CT-like, with one outlier voxel that would squash the cube's contrast if the
    volume were scaled by its own range) are mapped through the window, and the maps equal those of the volume
    already in [0, 1]."""
    from tests.unit.test_inputs_volumes import CubeNet, cube_volume

    torch.save(CubeNet().eval(), tmp_path / "cube.pt")
    volume = cube_volume()
    np.save(tmp_path / "plain.npy", volume)
    raw = volume * 2000.0 - 1000.0
    raw[0, 0, 0] = 30000.0  # clipped by the window
    np.save(tmp_path / "raw.npy", raw)
    common = ("--model", str(tmp_path / "cube.pt"), "--trust-pickle", "--size", "16,16,32", "--mean", "0", "--std", "1")
    common += ("--methods", "gradcam", "-t", "1", "--json")
    code, out, err = run(capsys, "compare", str(tmp_path / "plain.npy"), *common, "-o", str(tmp_path / "a"))
    assert code == 0, err
    plain = json.loads(out)["rows"][0]["maps"][0]
    code, out, err = run(
        capsys, "compare", str(tmp_path / "raw.npy"), *common, "--window", "-1000,1000", "-o", str(tmp_path / "b")
    )
    assert code == 0, err
    windowed = json.loads(out)["rows"][0]["maps"][0]
    assert windowed["peak"] == plain["peak"]
    assert windowed["probability"] == pytest.approx(plain["probability"], abs=1e-4)


def test_compare_a_clip(capsys, tmp_path):
    """A clip's rows are frame strips, with peak [x, y, t] and temporal in the JSON."""
    from cnnscope.render.animate import write_gif
    from tests.unit.test_inputs_clips import LIT, FlashNet, flash_frames

    torch.save(FlashNet().eval(), tmp_path / "flash.pt")
    write_gif(flash_frames(), tmp_path / "clip.gif", fps=8, hold=1.0)
    code, out, err = run(
        capsys, "compare", str(tmp_path / "clip.gif"), "--model", str(tmp_path / "flash.pt"), "--trust-pickle",
        "--size", "8,32,32", "--mean", "0,0,0", "--std", "1,1,1", "--methods", "gradcam,saliency", "-t", "1",
        "-o", str(tmp_path / "clip"), "--json",
    )  # fmt: skip
    assert code == 0, err
    for row in json.loads(out)["rows"]:
        entry = row["maps"][0]
        x, y, t = entry["peak"]
        assert 20 <= x < 28 and 8 <= y < 16 and t in LIT, (row["method"], entry["peak"])
        lit = sum(share for share, frame in zip(entry["temporal"], entry["frames"], strict=True) if frame in LIT)
        assert lit > 0.9, (row["method"], entry["temporal"])
    with Image.open(tmp_path / "clip" / "clip_compare.png") as grid:  # 8 frames in 2 rows of 4 per picture
        assert grid.size[1] < grid.size[0] < 4 * grid.size[1]


def test_the_report_of_a_clip_shows_its_frames(tmp_path):
    """explain's report.html: a clip's row picture is the strip of its input frames, its map the overlay strip."""
    import base64
    import io
    import re

    from cnnscope.io_volumes import Clip
    from cnnscope.runner import explain_images
    from tests.unit.test_inputs_clips import flash_frames, flash_model

    frames = np.stack(flash_frames()[::3])
    clip = Clip(frames, frames=tuple(range(0, 24, 3)), total=24)
    summary = explain_images(flash_model(), [clip], ["flash"], target=1, out_dir=tmp_path)
    page = Path(summary["report"]).read_text()
    pictures = [
        Image.open(io.BytesIO(base64.b64decode(data)))
        for data in re.findall(r"src=\"data:image/png;base64,([^\"]+)\"", page)
    ]
    assert len(pictures) == 2  # the clip's frames, the map's strip
    for picture in pictures:
        assert picture.size[0] > 4 * picture.size[1]  # 8 frames side by side
    assert len(summary["images"][0]["explanations"][0]["temporal"]) == 8
