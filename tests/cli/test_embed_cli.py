"""``cnnscope embed``: images in, JSON keys, an audit folder reused (same picture, no images read), errors."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from cnnscope.data import SmallCNN, make_shapes

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
    data = make_shapes(24, size=32, seed=5)
    for index, (image, label) in enumerate(zip(data.images, data.labels, strict=True)):
        folder = root / "data" / data.classes[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"img{index:02d}.png")
    module = SmallCNN(4, width=4, blocks=2, generator=torch.Generator().manual_seed(0)).eval()
    torch.save(module, root / "model.pt")
    (root / "labels.txt").write_text("\n".join(CLASSES) + "\n")
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
