"""``cnnscope filters|activations|maximize|dream`` and ``layers --diagram``."""

import json

import pytest
from PIL import Image

from .test_cli import cat_file, run  # noqa: F401 (a fixture)


def test_filters_writes_the_plate(capsys, tmp_path):
    code, out, err = run(capsys, "filters", "-o", str(tmp_path), "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["layer"] == "_conv_stem" and summary["kernel_shape"] == [32, 3, 3, 3]
    with Image.open(summary["file"]) as picture:
        assert picture.mode == "RGB" and picture.size[0] > 100


def test_activations_lists_the_strongest_channels(capsys, cat_file, tmp_path):  # noqa: F811
    code, out, err = run(
        capsys, "activations", str(cat_file), "--layer", "_blocks.10", "--top", "4", "-o", str(tmp_path)
    )
    assert code == 0, err
    assert "channel" in out and "_blocks.10" in out
    code, out, _ = run(capsys, "activations", str(cat_file), "--layer", "_blocks.10", "-o", str(tmp_path), "--json")
    summary = json.loads(out)
    means = [entry["mean"] for entry in summary["top"]]
    assert summary["channels"] == 112 and means == sorted(means, reverse=True) and len(means) == 16
    assert all((tmp_path / name).exists() for name in map(lambda f: f.split("/")[-1], summary["files"]))


def test_maximize_classes_and_objectives(capsys, tmp_path):
    code, out, err = run(
        capsys,
        "maximize",
        "--class",
        "goldfish",
        "--channel",
        "_blocks.10:3",
        "--objective",
        "class:pizza + 0.5*channel:_blocks.10:3",
        "--steps",
        "12",
        "--crop",
        "0.8",
        "--colour",
        "0.1",
        "-o",
        str(tmp_path),
        "--json",
        "-q",
    )
    assert code == 0, err
    summary = json.loads(out)
    names = [entry["objective"] for entry in summary["objectives"]]
    assert names == ["class:goldfish", "channel:_blocks.10:3", "class:pizza + 0.5*channel:_blocks.10:3"]
    assert all(entry["final"] > entry["start"] for entry in summary["objectives"])
    assert summary["objectives"][0]["top1"]["class_name"] == "goldfish"
    assert len(summary["files"]) == 4
    for file in summary["files"]:
        with Image.open(file) as picture:
            assert picture.size[0] >= 224


def test_maximize_copies_with_diversity(capsys, tmp_path):
    code, out, err = run(
        capsys, "maximize", "--channel", "_blocks.10:3", "--copies", "2", "--diversity", "10", "--steps", "8",
        "--size", "64", "--snapshot", "4", "-o", str(tmp_path), "--json", "-q",
    )  # fmt: skip
    assert code == 0, err
    summary = json.loads(out)
    assert [entry["objective"] for entry in summary["objectives"]] == ["channel:_blocks.10:3"] * 2
    assert summary["similarity_final"] < summary["similarity_start"] and summary["batchnorm_folded"] == 49
    assert [file.rsplit("/", 1)[-1] for file in summary["files"][:2]] == ["maximize.png", "maximize_step4.png"]
    assert len(summary["files"]) == 4
    code, out, err = run(capsys, "maximize", "--class", "1", "--copies", "2", "--steps", "2", "--size", "32",
                         "-o", str(tmp_path))  # fmt: skip
    assert code == 0 and "similarity of the copies at" in out, err


def test_dream_plate(capsys, cat_file, tmp_path):  # noqa: F811
    code, out, err = run(
        capsys, "dream", str(cat_file), "--layer", "_blocks.5", "--channels", "0-3", "--octaves", "2",
        "--iterations", "2", "--no-fold-bn", "-o", str(tmp_path), "--json", "-q",
    )  # fmt: skip
    assert code == 0, err
    summary = json.loads(out)
    assert [entry["channels"] for entry in summary["images"]] == [[0], [1], [2], [3]]
    assert summary["batchnorm_folded"] == 0  # --no-fold-bn: the model as it is
    assert all(entry["after"] > entry["before"] for entry in summary["images"])


def test_layers_diagram(capsys, tmp_path):
    code, _, err = run(capsys, "layers", "--diagram", str(tmp_path / "model.svg"))
    assert code == 0 and "16 boxes" in err
    assert (tmp_path / "model.svg").read_text().startswith("<svg")
    code, _, err = run(capsys, "layers", "--diagram", str(tmp_path / "model.png"), "-q")
    assert code == 0 and (tmp_path / "model.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["maximize"], "nothing to maximize"),
        (["maximize", "--class", "goldfsh", "--steps", "1"], "did you mean 'goldfish'"),
        (["maximize", "--channel", "_blocks.10", "--steps", "1"], "LAYER:INDEX"),
        (["maximize", "--class", "1", "--param", "wavelet", "--steps", "1"], "'fourier' or 'pixel'"),
        (["maximize", "--class", "1", "--scale", "2", "--steps", "1"], "LOW,HIGH"),
        (["maximize", "--class", "1", "--scale", "1.2,0.9", "--steps", "1"], "smallest <= largest"),
        (["maximize", "--class", "1", "--diversity", "5", "--steps", "1"], "set copies to 2 or more"),
        (["maximize", "--class", "1", "--snapshot", "9", "--steps", "2"], "between 1 and steps"),
        (["filters", "--layer", "_bn0"], "not a Conv2d"),
        (["dream", "{cat}", "--channels", "9-2"], "runs backwards"),
        (["activations", "{cat}", "--layer", "_fc"], "not a feature map"),
        (["layers", "--diagram", "model.pdf"], ".svg or .png"),
    ],
)
def test_feature_errors_are_one_line(capsys, cat_file, tmp_path, args, fragment):  # noqa: F811
    args = [a.replace("{cat}", str(cat_file)) for a in args] + ["-o", str(tmp_path)] * (args[0] != "layers")
    code, _, err = run(capsys, *args)
    assert code == 2 and fragment in err and err.count("\n") == 1, err
