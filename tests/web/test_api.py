"""The JSON API through FastAPI's TestClient."""

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient

from cnnscope.web import create_app
from cnnscope.web.limits import AdmissionLimit, Busy


@pytest.fixture(scope="module")
def client():
    return TestClient(create_app(max_upload_bytes=2 * 2**20, max_pixels=5_000_000), raise_server_exceptions=False)


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_lists_come_from_the_registries(client):
    methods = {m["name"]: m for m in client.get("/api/methods").json()}
    assert {"gradcam", "scorecam", "occlusion", "lime"} <= set(methods)
    steps = methods["integrated-gradients"]["options"]["steps"]
    assert steps["default"] == 50 and steps["type"] == "int" and steps["high"] == 4096 and steps["help"]
    assert methods["lime"]["file_options"] == ["feature_mask"] and not methods["lime"]["options"]["feature_mask"]["web"]
    models = client.get("/api/models").json()
    assert models["default"] == "efficientnet_lite0" and "chelsea" in models["samples"]
    labels = client.get("/api/labels").json()["labels"]
    assert labels[285] == "Egyptian cat" and len(labels) == 1000
    assert client.get("/api/samples/coffee").headers["content-type"] == "image/png"


def test_options_are_checked_strictly_with_a_400_naming_the_range(client):
    cases = [
        ({"steps": "abc"}, "integrated-gradients", "option steps of integrated-gradients takes a whole number >= 1"),
        ({"steps_per_pass": -1}, "integrated-gradients", "integrated-gradients has no option 'steps_per_pass'"),
        ({"inputs_per_pass": -1}, "integrated-gradients", "option inputs_per_pass of integrated-gradients"),
        ({"counterfactual": "false"}, "gradcam", None),
        ({"relu": "no"}, "gradcam", "option relu of gradcam takes true or false; got 'no'"),
        ({"segments": -1}, "lime", "option segments of lime"),
        ({"samples": 0}, "lime", "option samples of lime takes a whole number >= 2"),
        ({"segmentation_options": {"bogus": 1}, "samples": 4}, "lime", "segmentation_options for slic"),
        ({"masks": 10_000_000}, "rise", "option masks of rise takes a whole number >= 1 and <= 100000"),
    ]
    for options, method, message in cases:
        response = client.post(
            "/api/explain", data={"sample": "chelsea", "method": method, "options": json.dumps(options)}
        )
        if message is None:
            assert response.status_code == 200, response.json()
        else:
            assert response.status_code == 400, (options, response.json())
            assert message in response.json()["error"], response.json()


def test_work_and_targets_are_bounded(client):
    too_much = client.post(
        "/api/explain", data={"sample": "chelsea", "method": "rise", "options": json.dumps({"masks": 50_000})}
    )
    assert too_much.status_code == 400 and "the server's limit is 20,000 (--max-work)" in too_much.json()["error"]
    many = ",".join(str(i) for i in range(6000))
    response = client.post("/api/explain", data={"sample": "chelsea", "target": many})
    assert response.status_code == 400 and "6000 targets in one request; the limit is 50" in response.json()["error"]
    response = client.post("/api/explain", data={"sample": "chelsea", "target": "top100"})
    assert response.status_code == 400


def test_predict_a_sample_and_an_upload(client):
    body = client.post("/api/predict", data={"sample": "chelsea"}).json()
    assert body["predictions"][0]["class_index"] == 285 and len(body["predictions"]) == 5
    from cnnscope.samples import sample_image

    upload = client.post("/api/predict", files={"image": ("whatever.txt", png(sample_image("coffee")), "text/plain")})
    assert upload.json()["predictions"][0]["class_index"] == 967  # content sniffed, name ignored


def test_explain_a_class_outside_the_top5_with_raw_maps(client):
    response = client.post("/api/explain", data={"sample": "chelsea", "method": "gradcam", "target": "tench,285"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert [m["class_index"] for m in body["maps"]] == [0, 285] and body["layer"] == "_swish@1"
    first = body["maps"][1]
    raw = np.frombuffer(base64.b64decode(first["raw_float16"]), dtype="<f2").reshape(first["raw_shape"])
    assert raw.shape == (224, 224) and raw.max() > 0
    heat = Image.open(io.BytesIO(base64.b64decode(first["heatmap_png"])))
    assert heat.size == (224, 224) and "overlay_png" not in first  # the page stretches it over the photo
    blended = client.post("/api/explain", data={"sample": "chelsea", "overlay": "true"}).json()["maps"][0]
    assert Image.open(io.BytesIO(base64.b64decode(blended["overlay_png"]))).size == (451, 300)  # the original
    lean = client.post("/api/explain", data={"sample": "chelsea", "raw": "false"}).json()["maps"][0]
    assert "raw_float16" not in lean and "heatmap_png" in lean
    assert body["top5"][0]["class_index"] == 285


def test_method_options_and_multilabel(client):
    body = client.post(
        "/api/explain", data={"sample": "coffee", "method": "ig", "options": '{"steps": 4}', "multilabel": "true"}
    ).json()
    assert body["method"] == "integrated-gradients" and body["stats"]["forwards"] >= 2
    assert 0 < body["maps"][0]["probability"] < 1
    # a region mask comes as JSON labels: left and right halves of the model input
    halves = [[0] * 112 + [1] * 112 for _ in range(224)]
    options = json.dumps({"feature_mask": halves, "samples": 20})
    body = client.post("/api/explain", data={"sample": "chelsea", "method": "lime", "options": options}).json()
    assert sorted(body["stats"]["top_positive"][0][0]) == [0, 1]


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"sample": "chelsea", "method": "gradcm"}, "did you mean 'gradcam'"),
        ({"sample": "chelsea", "target": "egyptian cats"}, "did you mean 'egyptian cat'"),
        ({"sample": "chelsea", "model": "resnet9000"}, "unknown model 'resnet9000'"),
        ({"sample": "../../etc/passwd"}, "unknown sample"),
        ({"sample": "chelsea", "options": "[1, 2]"}, "options must be a JSON object"),
        ({"sample": "chelsea", "options": '{"stepz": 3}', "method": "ig"}, "did you mean 'steps'"),
        ({"sample": "chelsea", "colormap": "rainbow"}, "unknown colormap"),
        (
            {"sample": "chelsea", "method": "lime", "options": '{"feature_mask": "/etc/hostname"}'},
            "not the name of a file on the server",
        ),
        ({}, "no image"),
    ],
)
def test_bad_requests_are_4xx_json_with_a_message(client, data, fragment):
    response = client.post("/api/explain", data=data)
    assert 400 <= response.status_code < 500
    assert fragment in response.json()["error"] and "Traceback" not in response.text


def test_uploads_that_are_not_images_too_large_or_malformed(client):
    not_image = client.post("/api/predict", files={"image": ("cat.jpg", b"hello, I am text", "image/jpeg")})
    assert not_image.status_code == 400 and "is not an image" in not_image.json()["error"]
    huge = client.post("/api/predict", files={"image": ("big.png", b"\\x89PNG" + b"0" * (3 * 2**20), "image/png")})
    assert huge.status_code == 413 and "over the limit" in huge.json()["error"]
    bomb = client.post(
        "/api/predict", files={"image": ("wide.png", png(np.zeros((10, 600_000 // 10 * 10), np.uint8)), "image/png")}
    )
    assert bomb.status_code in (400, 413)
    malformed = client.post(
        "/api/explain", content=b"--xx\\r\\nnot multipart", headers={"content-type": "multipart/form-data; boundary=xx"}
    )
    assert 400 <= malformed.status_code < 500
    assert "error" in malformed.json()


def test_admission_limit_answers_busy():
    import asyncio

    async def scenario():
        limit = AdmissionLimit(running=1, waiting=1)
        async with limit.slot():
            entered = asyncio.Event()

            async def second():
                async with limit.slot():
                    entered.set()

            task = asyncio.create_task(second())
            await asyncio.sleep(0)
            with pytest.raises(Busy):
                async with limit.slot():
                    pass
        await task
        return entered.is_set()

    assert asyncio.run(scenario())
