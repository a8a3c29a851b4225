"""The command line with careless input: unreadable files among good ones, errors under --json, Ctrl-C."""

import json

import pytest
from PIL import Image

from cnnscope.cli import main
from cnnscope.samples import sample_image


def run(capsys, *args):
    with pytest.raises(SystemExit) as info:
        main(list(args))
    captured = capsys.readouterr()
    return info.value.code, captured.out, captured.err


@pytest.fixture
def folder(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(sample_image("chelsea")).save(images / "cat.png")
    Image.fromarray(sample_image("coffee")).save(images / "cup.png")
    (images / "broken.jpg").write_bytes(b"this is not a jpeg")
    return images


def test_a_folder_with_an_unreadable_file_explains_the_rest(capsys, folder, tmp_path):
    code, out, err = run(capsys, "explain", str(folder), "-o", str(tmp_path / "out"), "--json", "--no-report")
    assert code == 0, err
    summary = json.loads(out)
    assert [image["image"] for image in summary["images"]] == ["cat", "cup"]
    assert len(summary["skipped"]) == 1 and summary["skipped"][0]["path"].endswith("broken.jpg")
    assert "broken.jpg" in summary["skipped"][0]["reason"] and summary["complete"] is True
    assert "cnnscope: skipped" in err and "broken.jpg" in err
    code, out, _ = run(capsys, "predict", str(folder), "--json")
    assert code == 0 and json.loads(out)["skipped"][0]["path"].endswith("broken.jpg")


def test_strict_makes_a_skip_an_error(capsys, folder, tmp_path):
    code, _, err = run(capsys, "explain", str(folder), "-o", str(tmp_path / "out"), "--strict")
    assert code == 2 and err.startswith("cnnscope: error:") and "broken.jpg" in err and err.count("\n") == 1


def test_nothing_readable_is_an_error(capsys, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"nope")
    code, _, err = run(capsys, "predict", str(bad))
    assert code == 2 and err.startswith("cnnscope: error:") and "bad.jpg" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    ("args", "kind"),
    [
        (["explain", "missing.jpg", "--json"], "InputError"),
        (["explain", "{image}", "--method", "nosuch", "--json"], "MethodError"),
        (["explain", "{image}", "--method", "ig", "--option", "steps=abc", "--json"], "MethodError"),
        (["predict", "{image}", "--top-k", "x", "--json"], "UsageError"),
    ],
)
def test_every_error_under_json_is_a_json_object_on_stdout(capsys, folder, args, kind):
    args = [arg.replace("{image}", str(folder / "cat.png")) for arg in args]
    code, out, err = run(capsys, *args)
    assert code == 2, (out, err)
    document = json.loads(out)
    assert document["kind"] == kind and document["error"] and "\n" not in document["error"]


def test_ctrl_c_keeps_what_finished_and_says_it_is_incomplete(capsys, folder, tmp_path, monkeypatch):
    from cnnscope.methods.cam import GradCAM

    calls = {"n": 0}
    original = GradCAM.__call__

    def interrupted_on_the_second_batch(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(GradCAM, "__call__", interrupted_on_the_second_batch)
    out_dir = tmp_path / "out"
    code, out, err = run(capsys, "explain", str(folder), "-o", str(out_dir), "--batch-size", "1", "--json", "-q")
    assert code == 130 and "cnnscope: interrupted" in err
    summary = json.loads(out)
    assert summary["complete"] is False and [image["image"] for image in summary["images"]] == ["cat"]
    assert (out_dir / summary["images"][0]["explanations"][0]["file"].split("/")[-1]).exists()
    assert "INCOMPLETE: interrupted after 1 of 2 images" in (out_dir / "report.html").read_text()
