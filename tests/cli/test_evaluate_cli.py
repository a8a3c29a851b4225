"""``cnnscope evaluate``: images with masks or boxes, the JSON contract, the report, errors, the demo table."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cnnscope.data import SmallCNN, make_shapes

from .test_cli import run


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Loose shape images, their masks in a mirrored folder, a boxes CSV and a pickled model."""
    root = tmp_path_factory.mktemp("evaluate-cli")
    data = make_shapes(4, size=32, seed=3)
    (root / "images").mkdir()
    (root / "masks").mkdir()
    rows = ["path,x0,y0,x1,y1"]
    for index, (image, mask) in enumerate(zip(data.images, data.masks, strict=True)):
        Image.fromarray(image).save(root / "images" / f"shape{index}.png")
        Image.fromarray((mask * 255).astype(np.uint8)).save(root / "masks" / f"shape{index}.png")
        ys, xs = np.nonzero(mask)
        rows.append(f"images/shape{index}.png,{xs.min()},{ys.min()},{xs.max() + 1},{ys.max() + 1}")
    (root / "boxes.csv").write_text("\n".join(rows) + "\n")
    module = SmallCNN(4, width=4, blocks=2, generator=torch.Generator().manual_seed(0)).eval()
    torch.save(module, root / "model.pt")
    return root


def _model(root):
    return ["--model", str(root / "model.pt"), "--trust-pickle", "--size", "32", "--mean", "0,0,0", "--std", "1,1,1"]


FAST = ["--steps", "4", "--road-fractions", "0.3,0.7", "-q"]


def test_evaluate_json_has_the_contracts_keys_and_writes_a_report(capsys, images, tmp_path):
    code, out, err = run(
        capsys,
        "evaluate",
        str(images / "images"),
        "--masks",
        str(images / "masks"),
        "--methods",
        "gradcam,saliency",
        "--sanity",
        "--sanity-images",
        "2",
        *FAST,
        *_model(images),
        "-o",
        str(tmp_path),
        "--json",
    )
    assert code == 0, err
    data = json.loads(out)
    assert data["images"] == 4 and data["settings"]["with_masks"] == 4
    assert [m["name"] for m in data["methods"]] == ["gradcam", "saliency"]
    for entry in data["methods"]:
        assert {"pointing_game", "energy_pointing_game", "deletion_auc", "insertion_auc"} <= set(entry["metrics"])
        assert entry["metrics"]["pointing_game"] is not None
        stages = entry["sanity"]
        assert stages[0]["stage"] == "classifier" and {"stage", "spearman_abs", "ssim"} <= set(stages[0])
        assert stages[-1]["modules"][0] == "features.0"  # the last stage reaches the input
    assert {"center", "random"} <= set(data["baselines"])
    assert json.loads((tmp_path / "evaluation.json").read_text())["methods"][0]["name"] == "gradcam"
    page = (tmp_path / "report.html").read_text()
    assert "Sanity check: Cascading randomization" in page and "data:image/png;base64," in page


def test_evaluate_reads_boxes_and_prints_a_table(capsys, images, tmp_path):
    code, out, err = run(
        capsys,
        "evaluate",
        *(str(p) for p in sorted((images / "images").iterdir())),
        "--boxes",
        str(images / "boxes.csv"),
        "--methods",
        "gradcam",
        *FAST,
        "--road-fractions",
        "none",
        *_model(images),
        "-o",
        str(tmp_path),
        "--no-report",
    )
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["method", "point", "energy"]
    assert lines[1].startswith("gradcam") and any(line.startswith("(random)") for line in lines)
    assert lines[1].split()[5:7] == ["-", "-"]  # ROAD turned off: its two columns are empty
    assert not (tmp_path / "report.html").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--methods", "gradcm"], "did you mean"),
        (["--masks", "MASKS", "--boxes", "BOXES"], "not both"),
        (["--road-fractions", "0.5,1.5"], "strictly between 0 and 1"),
        (["--shuffled-model", "MODEL"], "add --sanity"),
    ],
)
def test_evaluate_bad_input_is_one_line(capsys, images, tmp_path, args, message):
    args = [
        a.replace("MASKS", str(images / "masks"))
        .replace("BOXES", str(images / "boxes.csv"))
        .replace("MODEL", str(images / "model.pt"))
        for a in args
    ]
    code, _, err = run(capsys, "evaluate", str(images / "images"), *args, *_model(images), "-o", str(tmp_path))
    assert code != 0
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_evaluate_demo_prints_the_readme_table(capsys, tmp_path):
    code, out, err = run(
        capsys,
        "evaluate",
        "--demo",
        "--images",
        "8",
        "--methods",
        "gradcam,saliency",
        "--markdown",
        "-o",
        str(tmp_path),
    )
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0].startswith("| method | pointing game")
    names = [line.split("|")[1].strip() for line in lines[2:]]
    assert names == ["gradcam", "saliency", "*center baseline*", "*random baseline*", "*random_smooth baseline*"]
