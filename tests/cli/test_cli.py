"""The command line, run in-process through its entry point."""

import json

import numpy as np
import pytest
from PIL import Image

from cnnscope.cli import main


def run(capsys, *args):
    with pytest.raises(SystemExit) as info:
        main(list(args))
    captured = capsys.readouterr()
    return info.value.code, captured.out, captured.err


@pytest.fixture(scope="module")
def cat_file(tmp_path_factory):
    from cnnscope.samples import sample_image

    path = tmp_path_factory.mktemp("imgs") / "chelsea.jpg"
    Image.fromarray(sample_image("chelsea")).save(path, quality=95)
    return path


def test_predict_json(capsys, cat_file):
    code, out, _ = run(capsys, "predict", str(cat_file), "--json")
    assert code == 0
    result = json.loads(out)["results"][0]
    assert result["image"] == "chelsea" and result["predictions"][0]["class_index"] == 285
    assert len(result["predictions"]) == 5


def test_explain_json_names_class_layer_files_and_peak(capsys, cat_file, tmp_path):
    code, out, err = run(
        capsys, "explain", str(cat_file), "--method", "gradcam,cam", "-k", "1", "-o", str(tmp_path), "--json"
    )
    assert code == 0, err
    summary = json.loads(out)
    entries = summary["images"][0]["explanations"]
    assert [e["method"] for e in entries] == ["gradcam", "cam"]
    for entry in entries:
        assert entry["class_index"] == 285 and entry["class_name"] == "Egyptian cat"
        assert entry["layer"] == "_swish@1" and 0.5 < entry["probability"] < 1
        x, y = entry["peak"]
        assert 0 <= x < 451 and 0 <= y < 300  # original-image pixels
        with Image.open(entry["file"]) as picture:
            assert picture.size == (451, 300)
    report = (tmp_path / "report.html").read_text()
    assert report.count("data:image/png;base64,") == 3 and "Egyptian cat" in report and "http" not in report


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["explain", "missing.jpg"], "'missing.jpg': no such file"),
        (["explain", "{cat}", "--method", "gradcm"], "did you mean 'gradcam'"),
        (["explain", "{cat}", "--layer", "_bloks.15"], "did you mean '_blocks.15'"),
        (["explain", "{cat}", "--target", "egyptian cats"], "did you mean 'egyptian cat'"),
        (["explain", "{cat}", "--method", "cam", "--layer", "_blocks.15"], "Use gradcam"),
        (["predict", "{cat}", "--model", "resnet"], "unknown model 'resnet'"),
        (["explain", "{cat}", "--target", "1", "--top-k", "2"], "either --target or --top-k"),
    ],
)
def test_input_errors_are_one_line_with_exit_status_2(capsys, cat_file, tmp_path, args, fragment):
    args = [a.replace("{cat}", str(cat_file)) for a in args] + (["-o", str(tmp_path)] if args[0] == "explain" else [])
    code, _, err = run(capsys, *args)
    assert code == 2
    assert err.startswith("cnnscope: error: ") and err.count("\n") == 1 and fragment in err
    assert "Traceback" not in err


def test_not_an_image(capsys, tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("hello")
    code, _, err = run(capsys, "predict", str(path))
    assert code == 2 and "is not an image" in err


def test_debug_shows_the_traceback(cat_file):
    from cnnscope.errors import InputError

    with pytest.raises(InputError):
        main(["--debug", "predict", "missing.jpg"])


def test_layers_and_labels_and_methods(capsys):
    code, out, _ = run(capsys, "layers", "--json")
    assert code == 0 and json.loads(out)["default_layer"] == "_swish@1"
    code, out, _ = run(capsys, "labels", "espresso")
    assert code == 0 and "967  espresso" in out
    code, out, _ = run(capsys, "methods", "--json")
    assert {m["name"] for m in json.loads(out)} >= {"cam", "gradcam"}


def test_folders_and_duplicate_names(capsys, tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        Image.fromarray(np.full((40, 40, 3), 90, dtype=np.uint8)).save(tmp_path / folder / "same.png")
    code, out, err = run(
        capsys, "explain", str(tmp_path / "a"), str(tmp_path / "b"), "-o", str(tmp_path / "o"), "--json", "-q"
    )
    assert code == 0, err
    files = [e["file"] for image in json.loads(out)["images"] for e in image["explanations"]]
    assert len(set(files)) == 2


@pytest.mark.slow
def test_demo_writes_overlays_and_report(capsys, tmp_path):
    code, out, err = run(capsys, "demo", "-o", str(tmp_path), "--json")
    assert code == 0, err
    summary = json.loads(out)
    tops = {image["image"]: image["top5"][0]["class_index"] for image in summary["images"]}
    assert tops["chelsea"] == 285 and tops["coffee"] == 967
    assert len(list(tmp_path.glob("*.png"))) == 8 and (tmp_path / "report.html").exists()


@pytest.mark.filterwarnings("ignore::cnnscope.CnnscopeWarning")
def test_compare_methods_grid_and_json(capsys, cat_file, tmp_path):
    code, out, err = run(
        capsys,
        "compare",
        str(cat_file),
        "--methods",
        "gradcam,saliency,ig",
        "-k",
        "2",
        "--option",
        "steps=4",
        "-o",
        str(tmp_path),
        "--json",
        "-q",
    )
    assert code == 0, err
    summary = json.loads(out)
    assert [row["method"] for row in summary["rows"]] == ["gradcam", "saliency", "integrated-gradients"]
    for row in summary["rows"]:
        assert row["seconds"] > 0 and row["maps"][0]["class_index"] == 285
        assert all(0 <= m["peak"][0] < 451 and 0 <= m["peak"][1] < 300 for m in row["maps"])
    with Image.open(summary["file"]) as grid:
        assert grid.size[0] > 400 and grid.size[1] > 400


@pytest.mark.filterwarnings("ignore::cnnscope.CnnscopeWarning")
def test_compare_layers(capsys, cat_file, tmp_path):
    code, out, err = run(
        capsys,
        "compare",
        str(cat_file),
        "--methods",
        "gradcam",
        "--layers",
        "_blocks.10,_swish@1",
        "-k",
        "1",
        "-o",
        str(tmp_path),
        "--json",
    )
    assert code == 0, err
    rows = json.loads(out)["rows"]
    assert [row["layer"] for row in rows] == ["_blocks.10", "_swish@1"] and rows[0]["forwards"] == 1
    code, _, err = run(
        capsys, "compare", str(cat_file), "--methods", "saliency", "--layers", "_blocks.10", "-o", str(tmp_path)
    )
    assert code == 2 and "does not work on layers" in err


def test_explain_passes_method_options(capsys, cat_file, tmp_path):
    code, _, err = run(
        capsys,
        "explain",
        str(cat_file),
        "--method",
        "integrated-gradients",
        "--option",
        "steps=3",
        "--option",
        "baseline=blur",
        "-o",
        str(tmp_path),
        "--json",
        "-q",
    )
    assert code == 0, err
    code, _, err = run(capsys, "explain", str(cat_file), "--option", "steps", "-o", str(tmp_path))
    assert code == 2 and "is not KEY=VALUE" in err
    code, _, err = run(capsys, "explain", str(cat_file), "--option", "stepz=3", "--method", "ig", "-o", str(tmp_path))
    assert code == 2 and "option 'stepz' belongs to none of ig; did you mean 'steps'" in err


def test_faithfulness_command(capsys, cat_file, tmp_path):
    code, out, err = run(capsys, "faithfulness", str(cat_file), "--steps", "6", "-o", str(tmp_path), "--json", "-q")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["class_index"] == 285 and 0 <= summary["deletion_auc"] <= 1 and 0 <= summary["insertion_auc"] <= 1
    assert summary["remove_top"]["fraction"] == 0.1 and len(summary["keep_top"]["crop_top5"]) == 5
    # random-map baselines beside the curves, and whether the map beats them
    assert set(summary["baselines"]) == {"random", "random_smooth"}
    for baseline in summary["baselines"].values():
        assert 0 <= baseline["deletion_auc"] <= 1 and 0 <= baseline["insertion_auc"] <= 1
    assert summary["beats_random"]["insertion"] == all(
        summary["insertion_auc"] > b["insertion_auc"] for b in summary["baselines"].values()
    )
    with Image.open(summary["file"]) as curves:
        assert curves.size[0] > 300
    code, _, err = run(capsys, "faithfulness", str(cat_file), "--fill", "pink", "-o", str(tmp_path))
    assert code == 2 and "unknown fill 'pink'" in err
