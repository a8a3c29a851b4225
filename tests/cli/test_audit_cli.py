"""``cnnscope audit``: a model file with its preprocessing options, JSON summary, skips, problems, resume."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from cnnscope.data import SmallCNN, make_shapes

from .test_cli import run

CLASSES = ("circle", "square", "triangle", "cross")


def write_shapes_dataset(root):
    """Under ``root``: ``data/`` (24 shapes of 32 px in class folders), ``model.pt`` (a pickled small CNN) and
    ``labels.txt``; ``_model_args(root)`` are the options that load that model."""
    data = make_shapes(24, size=32, seed=5)
    for index, (image, label) in enumerate(zip(data.images, data.labels, strict=True)):
        folder = root / "data" / data.classes[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"img{index:02d}.png")
    module = SmallCNN(4, width=4, blocks=2, generator=torch.Generator().manual_seed(0)).eval()
    torch.save(module, root / "model.pt")
    (root / "labels.txt").write_text("\n".join(CLASSES) + "\n")
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A folder of class folders (with one corrupt file), a pickled model file and its labels file."""
    root = write_shapes_dataset(tmp_path_factory.mktemp("audit-cli"))
    (root / "data" / "cross" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is no jpeg")
    return root


def _model_args(root):
    return [
        "--model",
        str(root / "model.pt"),
        "--trust-pickle",
        "--size",
        "32",
        "--mean",
        "0,0,0",
        "--std",
        "1,1,1",
        "--labels",
        str(root / "labels.txt"),
    ]


def test_audit_json_summary_skips_and_resume(capsys, dataset, tmp_path):
    out = tmp_path / "out"
    args = ["audit", str(dataset / "data"), *_model_args(dataset), "-o", str(out), "--json", "-q"]
    code, stdout, stderr = run(capsys, *args, "--shard-size", "10")
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert summary["images"] == 24 and summary["complete"] and not summary["resumed"]
    assert [item["path"].split("/")[-1] for item in summary["skipped"]] == ["corrupt.jpg"]
    assert summary["skipped"][0]["reason"]
    assert [entry["name"] for entry in summary["classes"]] == list(CLASSES)
    for entry in summary["classes"]:
        assert isinstance(entry["accuracy"], float) and isinstance(entry["flags"], list)
    assert (out / "report.html").exists() and len(list((out / "shards").glob("*.parquet"))) == 3
    code, stdout, stderr = run(capsys, *args)  # the same command again: resumes, redoes nothing
    again = json.loads(stdout)
    assert code == 0 and again["resumed"] and again["images"] == 24
    code, stdout, _ = run(capsys, *args, "--restart")
    assert code == 0 and not json.loads(stdout)["resumed"]


def test_audit_text_output_and_problems(capsys, dataset, tmp_path):
    (dataset / "data" / "empty").mkdir(exist_ok=True)
    try:
        code, stdout, stderr = run(
            capsys,
            "audit",
            str(dataset / "data"),
            *_model_args(dataset),
            "-o",
            str(tmp_path / "out"),
            "--map",
            "empty=circle",
            "--no-report",
        )
    finally:
        (dataset / "data" / "empty").rmdir()
    assert code == 0, stderr
    assert "class folder" in stderr and "holds no images" in stderr  # one line, before the run
    assert "24 images audited, 1 skipped" in stdout and "accuracy" in stdout
    assert "corrupt.jpg" in stderr


def test_audit_refuses_unknown_folders_and_another_model(capsys, dataset, tmp_path):
    (dataset / "data" / "hexagon").mkdir(exist_ok=True)
    try:
        code, stdout, stderr = run(capsys, "audit", str(dataset / "data"), *_model_args(dataset), "-o", str(tmp_path))
    finally:
        (dataset / "data" / "hexagon").rmdir()
    assert code == 2 and stderr.count("\n") == 1 and "'hexagon'" in stderr and "--map" in stderr
    out = tmp_path / "out"
    code, _, stderr = run(
        capsys, "audit", str(dataset / "data"), *_model_args(dataset), "-o", str(out), "-q", "--no-report"
    )
    assert code == 0, stderr
    code, stdout, _ = run(capsys, "audit", str(dataset / "data"), *_model_args(dataset), "-o", str(out), "--json")
    assert code == 0  # same run: resumed
    code, stdout, _ = run(
        capsys, "audit", str(dataset / "data"), *_model_args(dataset), "-o", str(out), "--method", "cam", "--json"
    )
    error = json.loads(stdout)
    assert code == 2 and error["kind"] == "InputError" and "another method" in error["error"]
