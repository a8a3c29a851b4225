"""Server hardening through the ASGI app itself: Host and Origin checks (DNS rebinding, CSRF), request
bodies refused or cut at the size limit and kept in memory, uploads decoded on the model thread once
admitted."""

import asyncio
import io
import json
import tempfile
import threading

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient

import cnnscope.web.app as web_app
from cnnscope.web import create_app

UPLOAD_LIMIT = 2 * 2**20


@pytest.fixture(scope="module")
def app():
    return create_app(max_upload_bytes=UPLOAD_LIMIT, max_pixels=5_000_000)


@pytest.fixture(scope="module")
def client(app):
    # TestClient's requests come in on the address "testserver" (scope["server"]), which the guard answers
    return TestClient(app, raise_server_exceptions=False)


@pytest.fixture(scope="module")
def open_client():
    app = create_app(
        allowed_hosts=["cnnscope.lan", "box.lan:9000"],
        allowed_origins=["https://tool.example", "http://localhost:5173"],
    )
    return TestClient(app, raise_server_exceptions=False)


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


# --- Host header (DNS rebinding) ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "host",
    ["evil.example", "evil.example:8000", "127.0.0.1.evil.example", "localhost.evil.example:8000", "[::1", "a:b:c"],
)
def test_a_host_that_is_not_this_server_gets_400(client, host):
    for path in ("/", "/api/models", "/openapi.json"):
        response = client.get(path, headers={"host": host})
        assert response.status_code == 400, (path, response.text)
        assert "does not answer to the host" in response.json()["error"]
    posted = client.post("/api/predict", data={"sample": "chelsea"}, headers={"host": host})
    assert posted.status_code == 400


@pytest.mark.parametrize("host", ["127.0.0.1:8000", "localhost", "LOCALHOST:1234", "localhost.", "[::1]:8000"])
def test_loopback_names_and_the_servers_own_address_are_answered(client, host):
    assert client.get("/api/models", headers={"host": host}).status_code == 200
    assert client.get("/api/models").status_code == 200  # Host: testserver, the address it came in on


def test_allow_host_adds_names(client, open_client):
    assert open_client.get("/api/models", headers={"host": "cnnscope.lan:8000"}).status_code == 200
    assert open_client.get("/api/models", headers={"host": "box.lan:9000"}).status_code == 200
    assert open_client.get("/api/models", headers={"host": "box.lan:9001"}).status_code == 400
    assert client.get("/api/models", headers={"host": "cnnscope.lan"}).status_code == 400  # not by default


# --- Origin and Sec-Fetch-Site on POST (CSRF) -----------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {"origin": "http://evil.example"},
        {"origin": "http://testserver.evil.example"},
        {"origin": "https://testserver"},  # another scheme is another origin
        {"origin": "http://testserver:8080"},
        {"origin": "null"},  # a sandboxed frame or a file: page
        {"sec-fetch-site": "cross-site"},
        {"sec-fetch-site": "same-site"},
        {"origin": "http://evil.example", "sec-fetch-site": "same-origin"},
    ],
)
def test_a_cross_origin_post_gets_403(client, headers):
    for path in ("/api/predict", "/api/explain"):
        response = client.post(path, data={"sample": "chelsea"}, headers=headers)
        assert response.status_code == 403, (path, response.text)
        assert "refused" in response.json()["error"]


@pytest.mark.parametrize(
    "headers",
    [
        {},  # curl, scripts
        {"origin": "http://testserver"},
        {"origin": "http://testserver:80"},
        {"origin": "http://localhost:8000", "host": "localhost:8000", "sec-fetch-site": "same-origin"},
        {"origin": "http://[::1]:8000", "host": "[::1]:8000"},
        {"sec-fetch-site": "same-origin"},
        {"sec-fetch-site": "none"},
    ],
)
def test_same_origin_and_origin_less_posts_work(client, headers):
    response = client.post("/api/predict", data={"sample": "chelsea", "top_k": "1"}, headers=headers)
    assert response.status_code == 200, response.text


def test_allow_origin_adds_pages_and_reads_stay_open(client, open_client):
    data = {"sample": "chelsea", "top_k": "1"}
    for origin in ("https://tool.example", "http://localhost:5173"):
        assert open_client.post("/api/predict", data=data, headers={"origin": origin}).status_code == 200
    assert (
        open_client.post("/api/predict", data=data, headers={"origin": "https://tool.example:444"}).status_code == 403
    )
    assert client.post("/api/predict", data=data, headers={"origin": "https://tool.example"}).status_code == 403
    # a GET changes nothing: another page may read the lists (its Host must still be this server)
    assert client.get("/api/models", headers={"origin": "http://evil.example"}).status_code == 200


def test_malformed_allowed_hosts_and_origins_are_refused_at_creation():
    with pytest.raises(ValueError, match="allowed host"):
        create_app(allowed_hosts=["http://example.lan"])
    with pytest.raises(ValueError, match="allowed origin"):
        create_app(allowed_origins=["tool.example"])


# --- request bodies: refused from the Content-Length, cut at the limit, kept in memory -------------------


def asgi_post(app, path: str, headers: dict[str, str], chunks) -> tuple[int, dict, int]:
    """POST through the ASGI interface with a body streamed from ``chunks``; returns the status, the JSON
    answer and the number of body bytes the app pulled."""
    pulled = 0
    chunks = iter(chunks)
    pending = next(chunks, None)
    answer: dict = {"status": None, "body": b""}

    async def receive():
        nonlocal pulled, pending
        if pending is None:
            await asyncio.sleep(3600)  # the body is over; the client waits for the answer
        chunk, pending = pending, next(chunks, None)
        pulled += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": pending is not None}

    async def send(message):
        if message["type"] == "http.response.start":
            answer["status"] = message["status"]
        elif message["type"] == "http.response.body":
            answer["body"] += message.get("body", b"")

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"127.0.0.1:8000")] + [(k.encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }

    async def call():
        await asyncio.wait_for(app(scope, receive, send), timeout=60)

    asyncio.run(call())
    return answer["status"], json.loads(answer["body"] or b"{}"), pulled


BOUNDARY = "cnnscopeboundary"
MULTIPART = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}


def file_part_head(name: str = "image", filename: str = "big.png") -> bytes:
    return (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()


def field(name: str, value: str) -> bytes:
    return f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()


def megabytes(count: int, size: int = 2**20):
    for _ in range(count):
        yield b"\x00" * size


def test_a_content_length_over_the_limit_gets_413_before_any_byte_is_read(app):
    declared = 500 * 2**20
    status, body, pulled = asgi_post(
        app, "/api/predict", {**MULTIPART, "content-length": str(declared)}, [file_part_head(), *megabytes(20)]
    )
    assert status == 413 and "over the limit" in body["error"]
    assert pulled == 0  # nothing of the body was read, so nothing was buffered or written


def test_a_body_without_length_stops_being_read_at_the_limit(app):
    # chunked: no Content-Length; the file part grows past the upload limit
    status, body, pulled = asgi_post(app, "/api/explain", MULTIPART, [file_part_head(), *megabytes(40, 2**18)])
    assert status == 413 and "the upload is over the limit of 2 MiB" in body["error"]
    assert pulled <= UPLOAD_LIMIT + 2**19
    # many text fields, each under its own limit, together past the body limit
    fields = (field(f"f{i}", "x" * (2**20 - 2**10)) for i in range(40))
    status, body, pulled = asgi_post(app, "/api/explain", MULTIPART, fields)
    assert status == 413 and "the request is over the limit" in body["error"]
    assert pulled <= UPLOAD_LIMIT + 2 * 2**20
    # one text field past its own limit (urlencoded this time)
    urlencoded = {"content-type": "application/x-www-form-urlencoded"}
    status, body, pulled = asgi_post(app, "/api/explain", urlencoded, [b"options=", *megabytes(8, 2**18)])
    assert status == 413 and "over the limit of 1 MiB" in body["error"]
    assert pulled <= 2**20 + 2**19


def test_uploads_are_parsed_in_memory_never_spooled_to_disk(client, monkeypatch):
    import starlette.formparsers

    opened = []

    def refuse(name):
        def temporary(*args, **kwargs):
            opened.append(name)
            raise AssertionError(f"tempfile.{name} was called while parsing a form")

        return temporary

    for name in ("SpooledTemporaryFile", "TemporaryFile", "NamedTemporaryFile", "mkstemp", "mkdtemp"):
        monkeypatch.setattr(tempfile, name, refuse(name))
    monkeypatch.setattr(starlette.formparsers, "SpooledTemporaryFile", refuse("SpooledTemporaryFile"))
    noise = np.random.default_rng(0).integers(0, 256, (640, 800, 3), dtype=np.uint8)
    payload = png(noise)
    assert 2**20 < len(payload) < UPLOAD_LIMIT  # past Starlette's 1 MiB spool, under the limit
    response = client.post("/api/predict", files={"image": ("noise.png", payload, "image/png")}, data={"top_k": "2"})
    assert response.status_code == 200, response.text
    assert response.json()["size"] == [800, 640] and opened == []
    options = json.dumps({"feature_mask": [[0] * 112 + [1] * 112 for _ in range(224)], "samples": 10})
    explained = client.post(
        "/api/explain",
        files={"image": ("noise.png", payload, "image/png")},
        data={"method": "lime", "options": options, "raw": "false"},
    )
    assert explained.status_code == 200, explained.text
    assert opened == []


def test_multipart_limits_on_counts_and_malformed_bodies(client):
    files = [("image", (f"{i}.png", b"x", "image/png")) for i in range(5)]
    too_many = client.post("/api/predict", files=files)
    assert too_many.status_code == 400 and "too many files" in too_many.json()["error"]
    fields = {f"extra{i}": "1" for i in range(70)}
    assert client.post("/api/predict", data={"sample": "chelsea", **fields}).status_code == 400
    no_boundary = client.post("/api/predict", content=b"x", headers={"content-type": "multipart/form-data"})
    assert no_boundary.status_code == 400 and "boundary" in no_boundary.json()["error"]


# --- decoding: on the model thread, after admission -----------------------------------------------------


def test_uploads_and_samples_are_decoded_on_the_model_thread(client, monkeypatch):
    threads = []
    real_load, real_sample = web_app.load_image, web_app.sample_image

    def load_image(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return real_load(*args, **kwargs)

    def sample_image(name):
        threads.append(threading.current_thread().name)
        return real_sample(name)

    monkeypatch.setattr(web_app, "load_image", load_image)
    monkeypatch.setattr(web_app, "sample_image", sample_image)
    photo = png(np.full((60, 80, 3), 200, np.uint8))
    assert client.post("/api/predict", files={"image": ("a.png", photo, "image/png")}).status_code == 200
    assert client.post("/api/explain", files={"image": ("a.png", photo, "image/png")}).status_code == 200
    assert client.post("/api/explain", data={"sample": "coffee"}).status_code == 200
    assert len(threads) == 3 and all(name.startswith("cnnscope-model") for name in threads), threads


def test_decoding_counts_against_the_admission_limit(monkeypatch):
    app = create_app(running=1, waiting=0)
    entered, release = threading.Event(), threading.Event()
    calls = []
    real_load = web_app.load_image

    def slow_load_image(*args, **kwargs):
        calls.append(threading.current_thread().name)
        if len(calls) == 1:
            entered.set()
            release.wait(10)  # the first upload is still decoding
        return real_load(*args, **kwargs)

    monkeypatch.setattr(web_app, "load_image", slow_load_image)
    photo = png(np.full((60, 80, 3), 90, np.uint8))
    answers = {}
    with TestClient(app, raise_server_exceptions=False) as client:

        def first():
            answers["first"] = client.post("/api/predict", files={"image": ("a.png", photo, "image/png")})

        worker = threading.Thread(target=first)
        worker.start()
        try:
            assert entered.wait(10), "the first upload was never decoded"
            second = client.post("/api/predict", files={"image": ("b.png", photo, "image/png")})
            assert second.status_code == 503 and second.headers["retry-after"]
            assert len(calls) == 1  # the refused upload was never decoded
        finally:
            release.set()
            worker.join(30)
    assert answers["first"].status_code == 200 and len(calls) == 1
