"""``cnnscope embed``: images in, JSON keys, an audit folder reused (same picture, no images read), errors."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from .test_audit_cli import _model_args, write_shapes_dataset
from .test_cli import run

CLASSES = ("circle", "square", "triangle", "cross")
KEYS = {
    "method",
    "seed",
    "points",
    "k",
    "purity",
    "chance",
    "classes",
    "overlapping",
    "seconds",
    "features",
    "store",
    "computed",
    "engine",
    "out",
    "html",
    "png",
    "table",
}


def _dataset(root):
    write_shapes_dataset(root)
    return _model_args(root)


@pytest.mark.slow
def test_embed_images_then_reuse_the_store(capsys, tmp_path):
    model_args = _dataset(tmp_path)
    out = tmp_path / "embed"
    code, stdout, stderr = run(capsys, "embed", str(tmp_path / "data"), *model_args, "-o", str(out), "--json", "-q")
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert set(summary) == KEYS
    assert summary["points"] == 24 and summary["computed"] and summary["method"] == "tsne"
    assert [entry["name"] for entry in sorted(summary["classes"], key=lambda e: e["index"])] == list(CLASSES)
    for entry in summary["classes"]:
        assert 0.0 <= entry["purity"] <= 1.0 and set(entry) == {
            "index",
            "name",
            "images",
            "purity",
            "accuracy",
            "nearest_other",
        }
    assert all({"classes", "overlap", "a_to_b", "b_to_a", "indices"} == set(pair) for pair in summary["overlapping"])
    assert (out / "embedding.html").is_file() and (out / "embedding.png").is_file()

    # the store it wrote is an audit folder: embedding it again reads no image and gives the same picture
    again = tmp_path / "again"
    code, stdout, stderr = run(capsys, "embed", str(out / "store"), "-o", str(again), "--json")
    assert code == 0, stderr
    reused = json.loads(stdout)
    assert not reused["computed"] and reused["purity"] == summary["purity"]
    first, second = pq.read_table(out / "embedding.parquet"), pq.read_table(again / "embedding.parquet")
    assert first.column("x").to_pylist() == second.column("x").to_pylist()

    code, stdout, _ = run(capsys, "embed", str(out / "store"), "-o", str(again), "--method", "pca")
    assert code == 0 and "neighbourhood purity" in stdout and "html:" in stdout


def test_embed_errors_are_one_line(capsys, tmp_path):
    model_args = _dataset(tmp_path)
    code, _, stderr = run(capsys, "embed", str(tmp_path / "data"), *model_args, "--method", "mds", "-o", str(tmp_path))
    assert code != 0 and "unknown embedding method 'mds'" in stderr and "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1
    code, _, stderr = run(capsys, "embed", str(tmp_path / "data"), *model_args, "--address", "ray://x:1")
    assert code != 0 and "--address is the address of a Ray cluster: use it with --engine ray" in stderr
