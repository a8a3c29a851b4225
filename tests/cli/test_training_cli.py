"""``cnnscope movie`` and ``cnnscope compare-models``."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from cnnscope.data import SmallCNN, make_shapes, train_small_cnn
from cnnscope.render.animate import video_available
from cnnscope.samples import sample_image
from cnnscope.training import Recorder

from .test_cli import cat_file, run  # noqa: F401 (a fixture)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("training") / "run"
    recorder = Recorder(make_shapes(3, size=32, seed=4), out=folder)
    train_small_cnn(make_shapes(40, size=32, seed=1), epochs=2, seed=0, blocks=2, on_epoch=recorder.record)
    return folder


def test_movie_writes_the_movies_the_page_and_the_focus_plot(capsys, run_dir, tmp_path):
    code, out, err = run(capsys, "movie", str(run_dir), "-o", str(tmp_path), "--json", "--fps", "4")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["epochs"] == [0, 1, 2] and len(summary["probes"]) == 3
    wanted = ("gif", "mp4") if video_available() else ("gif",)
    for probe in summary["probes"]:
        assert all((tmp_path / probe[key].split("/")[-1]).stat().st_size > 1000 for key in wanted)
        assert len(probe["focus"]) == 3 and len(probe["loss"]) == 3
    assert (tmp_path / "movie.html").exists() and (tmp_path / "focus.png").exists()
    with Image.open(summary["probes"][0]["gif"]) as movie:
        assert movie.n_frames == 3
    code, out, err = run(capsys, "movie", str(run_dir), "-o", str(tmp_path / "text"), "--no-mp4", "--no-gif")
    assert code == 0, err
    assert "3 probes x 3 epochs" in out and "page:" in out
    assert not list((tmp_path / "text").glob("*.gif"))


def test_movie_of_a_folder_without_a_recording_is_one_line(capsys, tmp_path):
    code, _, err = run(capsys, "movie", str(tmp_path), "-o", str(tmp_path / "out"))
    assert code == 2 and err.startswith("cnnscope: error:") and "no recording" in err
    assert err.count("\n") == 1


@pytest.fixture(scope="module")
def small_files(tmp_path_factory):
    """A pickled 4-class SmallCNN taking 64x64 unnormalized input, and its labels file."""
    folder = tmp_path_factory.mktemp("small")
    module = SmallCNN(4, generator=torch.Generator().manual_seed(0)).eval()
    torch.save(module, folder / "small.pt")
    (folder / "labels.txt").write_text("circle\nsquare\ntriangle\ncross\n")
    coffee = folder / "coffee.jpg"
    Image.fromarray(sample_image("coffee")).save(coffee, quality=95)
    return folder


def test_compare_models_across_architectures(capsys, cat_file, small_files, tmp_path):  # noqa: F811
    code, out, err = run(
        capsys,
        "compare-models",
        str(cat_file),
        str(small_files / "coffee.jpg"),
        "--model",
        "efficientnet_lite0",
        "--model",
        str(small_files / "small.pt"),
        "--trust-pickle",
        "--size",
        "-",
        "--size",
        "64",
        "--mean",
        "-",
        "--mean",
        "0,0,0",
        "--std",
        "-",
        "--std",
        "1,1,1",
        "--labels",
        "-",
        "--labels",
        str(small_files / "labels.txt"),
        "-o",
        str(tmp_path),
        "--json",
    )
    assert code == 0, err
    summary = json.loads(out)
    assert summary["layer_a"] == "_swish@1" and summary["layer_b"] == "features"
    rows = summary["images"]
    assert {row["image"] for row in rows} == {"chelsea", "coffee"}
    assert [row["pearson"] for row in rows] == sorted(row["pearson"] for row in rows)  # most disagreeing first
    for row in rows:
        assert -1 <= row["pearson"] <= 1 and row["top1_agree"] is False
        assert row["b"]["top1"]["class_name"] in ("circle", "square", "triangle", "cross")
        with Image.open(row["file"]) as figure:
            assert figure.size[0] > 400
    assert (tmp_path / "models.html").exists()


def test_compare_models_of_a_model_with_itself(capsys, cat_file, tmp_path):  # noqa: F811
    code, out, err = run(
        capsys, "compare-models", str(cat_file), "-m", "efficientnet_lite0", "-m", "efficientnet_lite0", "--json",
        "--no-report", "-o", str(tmp_path),
    )  # fmt: skip
    assert code == 0, err
    row = json.loads(out)["images"][0]
    assert row["pearson"] == pytest.approx(1.0) and row["top_iou"] == 1.0 and row["top1_agree"] is True
    code, out, err = run(capsys, "compare-models", str(cat_file), "-m", "efficientnet_lite0")
    assert code == 2 and "exactly twice" in err
    code, out, _ = run(capsys, "compare-models", str(cat_file), "-m", "efficientnet_lite0", "-m", "x", "--json")
    assert code == 2 and json.loads(out)["kind"]
