"""``cnnscope impressions``: the JSON keys of issue #18 and the files they name."""

import json

import pytest
from PIL import Image

from .test_cli import run


@pytest.mark.slow  # the default model, two runs (impressions and plain maximize), plates
def test_impressions_json_has_the_contract_keys_and_the_files_exist(capsys, tmp_path):
    code, out, err = run(
        capsys,
        "impressions",
        "--class",
        "goldfish",
        "--class",
        "963",
        "--fuse",
        "goldfish+tench",
        "--steps",
        "1",
        "--size",
        "32",
        "--seed",
        "1",
        "--snapshot",
        "1",
        "-o",
        str(tmp_path),
        "--json",
        "-q",
    )
    assert code == 0, err
    summary = json.loads(out)
    assert {"images", "fused"} <= set(summary)
    assert [entry["class"] for entry in summary["images"]] == ["goldfish", "pizza"]
    assert [entry["class_index"] for entry in summary["images"]] == [1, 963]
    for entry in summary["images"]:
        assert {"class", "path", "probability", "regions", "largest_share", "baseline", "top5"} <= set(entry)
        assert {"path", "probability", "regions", "largest_share"} <= set(entry["baseline"])
        assert 0.0 <= entry["probability"] <= 1.0 and 0.0 <= entry["largest_share"] <= 1.0
        assert isinstance(entry["regions"], int) and len(entry["top5"]) == 5
        for path in (entry["path"], entry["baseline"]["path"]):
            with Image.open(path) as picture:
                assert picture.format == "PNG" and picture.size == (32, 32)
    (fused,) = summary["fused"]
    assert {"classes", "path", "top5"} <= set(fused)
    assert fused["classes"] == ["goldfish", "tench"] and fused["class_indices"] == [1, 0]
    assert [set(p) for p in fused["top5"]] == [{"class_index", "class_name", "probability"}] * 5
    with Image.open(fused["path"]) as picture:
        assert picture.size == (32, 32)
    assert (tmp_path / "impressions.png").exists() and len(summary["snapshots"]) == 1
    assert summary["steps"] == 1 and summary["seed"] == 1


def test_impressions_without_classes_or_with_a_lone_fuse_says_what_to_do(capsys, tmp_path):
    code, _, err = run(capsys, "impressions", "-o", str(tmp_path))
    assert code != 0 and "--class" in err and "Traceback" not in err
    code, _, err = run(capsys, "impressions", "--fuse", "goldfish", "--steps", "1", "-o", str(tmp_path))
    assert code != 0 and "two or more" in err and "Traceback" not in err
