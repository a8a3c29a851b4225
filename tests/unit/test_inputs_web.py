"""The web page explains pictures: a 3-D model (volumes, clips) or an uploaded scan or video gets a one-line 400
pointing at the command line (issue 21)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient

from cnnscope.web import create_app
from tests.unit.test_inputs_volumes import CubeNet

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_3d_model_on_the_web_page_is_a_one_line_400(tmp_path):
    torch.jit.script(CubeNet().eval()).save(str(tmp_path / "cube.pt"))
    client = TestClient(create_app(str(tmp_path / "cube.pt")), raise_server_exceptions=False)
    picture = png(np.zeros((32, 32), dtype=np.uint8))
    for route in ("/api/explain", "/api/predict"):
        response = client.post(route, files={"image": ("slice.png", picture, "image/png")})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert "takes 3-D inputs" in error and "command line" in error and "\n" not in error


@pytest.mark.parametrize("filename", ["scan.nii.gz", "scan.nii", "clip.mp4", "clip.AVI"])
def test_a_scan_or_video_upload_is_a_one_line_400(filename):
    client = TestClient(create_app(), raise_server_exceptions=False)
    response = client.post("/api/explain", files={"image": (filename, b"\x00" * 64, "application/octet-stream")})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert filename in error and "pictures only" in error and "command line" in error and "\n" not in error
