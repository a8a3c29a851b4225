"""The command line and the web page with torchvision and timm models by name (random weights: no network)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("torchvision", reason="zoo tests run in .venv-zoo: make test-zoo")
pytest.importorskip("timm", reason="zoo tests run in .venv-zoo: make test-zoo")

from cnnscope.cli import main


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    from cnnscope.samples import sample_image

    path = tmp_path_factory.mktemp("photos") / "chelsea.jpg"
    Image.fromarray(sample_image("chelsea")).save(path, quality=95)
    return path


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "layer"),
    [("torchvision:swin_t", "permute"), ("timm:vit_small_patch16_224", "blocks.11.norm1")],
)
def test_cli_explains_with_a_zoo_model_and_says_the_weights_are_random(capsys, tmp_path, photo, name, layer):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        main(["explain", str(photo), "--model", name, "--no-weights", "--json", "-o", str(out), "--no-report"])
    captured = capsys.readouterr()
    assert info.value.code == 0, captured.err
    assert "runs with random weights" in captured.err
    summary = json.loads(captured.out)
    assert summary["model"] == f"{name} (random weights)"
    entry = summary["images"][0]["explanations"][0]
    assert entry["method"] == "gradcam" and entry["layer"] == layer
    assert (out / entry["file"].split("/")[-1]).exists()
    height, width = np.asarray(Image.open(photo)).shape[:2]
    assert 0 <= entry["peak"][0] < width and 0 <= entry["peak"][1] < height


def test_cli_without_network_says_how_to_get_random_weights(capsys, tmp_path, photo, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-cache"))
    import torch.hub

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(SystemExit) as info:
        main(["explain", str(photo), "--model", "torchvision:swin_t", "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert err.count("\n") == 1 and "--no-weights" in err


def test_web_model_list_offers_torchvision_and_timm_models():
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from cnnscope.web import create_app

    client = TestClient(create_app(), raise_server_exceptions=False)
    listed = client.get("/api/models").json()["models"]
    assert "torchvision:swin_t" in listed and "timm:vit_small_patch16_224" in listed
    assert listed[0] == "efficientnet_lite0" or "efficientnet_lite0" in listed
