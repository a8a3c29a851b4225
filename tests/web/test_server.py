"""The app behind a real uvicorn server on 127.0.0.1: a client that disconnects cancels its work, a body
over the limit is answered 413 from its Content-Length alone, and `cnnscope serve` passes its host and
origin options through."""

import http.client
import json
import socket
import threading
import time
from urllib.parse import urlencode

import pytest

uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")


@pytest.fixture(scope="module")
def server():
    """One request at a time and none waiting: a second request while one runs gets 503 at once."""
    from cnnscope.web import create_app

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = uvicorn.Config(
        create_app(running=1, waiting=0, max_work=10**6), host="127.0.0.1", port=port, log_level="warning"
    )
    instance = uvicorn.Server(config)
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not instance.started and time.time() < deadline:
        time.sleep(0.05)
    assert instance.started
    yield port
    instance.should_exit = True
    thread.join(timeout=10)


def predict(port: int) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        body = urlencode({"sample": "chelsea", "top_k": "1"})
        connection.request("POST", "/api/predict", body, {"content-type": "application/x-www-form-urlencoded"})
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def until(port: int, status: int, seconds: float) -> tuple[bool, float]:
    """Send predictions until one answers ``status`` (at most ``seconds``); whether it did, and when."""
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        if predict(port) == status:
            return True, time.perf_counter() - started
        time.sleep(0.1)
    return False, time.perf_counter() - started


def test_a_client_that_disconnects_frees_the_model_thread(server):
    assert predict(server) == 200
    # a RISE of 100,000 masks runs for minutes (max_seconds bounds it at 60 s should cancellation fail; the
    # server's work budget is raised for it)
    body = urlencode(
        {"sample": "chelsea", "method": "rise", "options": json.dumps({"masks": 100_000, "max_seconds": 60})}
    )
    request = (
        f"POST /api/explain HTTP/1.1\r\nHost: 127.0.0.1:{server}\r\n"
        "Content-Type: application/x-www-form-urlencoded\r\n"
        f"Content-Length: {len(body)}\r\n\r\n{body}"
    ).encode()
    leaving = socket.create_connection(("127.0.0.1", server), timeout=10)
    try:
        leaving.sendall(request)
        busy, _ = until(server, 503, 15)
        assert busy, "the RISE request never occupied the model thread"
        time.sleep(0.5)
    finally:
        leaving.close()  # the client goes away without waiting for the answer
    free, after = until(server, 200, 15)
    assert free, "the model thread was still busy 15 s after the client left"
    assert after < 8


def test_a_content_length_over_the_limit_is_answered_413_without_reading_the_body(server):
    with socket.create_connection(("127.0.0.1", server), timeout=10) as connection:
        connection.sendall(
            (
                f"POST /api/explain HTTP/1.1\r\nHost: 127.0.0.1:{server}\r\n"
                "Content-Type: multipart/form-data; boundary=xx\r\n"
                f"Content-Length: {500 * 2**20}\r\n\r\n"
            ).encode()
            + b"--xx\r\n"
        )
        started = time.perf_counter()
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = connection.recv(65536)
            if not chunk:
                break
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert time.perf_counter() - started < 5


def run_cli(*args: str) -> int:
    from cnnscope.cli import main

    with pytest.raises(SystemExit) as info:
        main(list(args))
    return info.value.code


@pytest.fixture
def serve_calls(monkeypatch):
    """`cnnscope serve` with create_app and uvicorn.run replaced: what they were called with."""
    import cnnscope.web

    seen = {}
    real_create_app = cnnscope.web.create_app

    def fake_create_app(model, **kwargs):
        seen.update(kwargs, model=model)
        if kwargs.get("allowed_origins") == ["tool.example"]:  # the real one refuses it
            return real_create_app(model, **kwargs)
        return "app"

    monkeypatch.setattr(cnnscope.web, "create_app", fake_create_app)
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: seen.update(app=app, run=kwargs))
    return seen


def test_serve_passes_allowed_hosts_and_origins(serve_calls):
    code = run_cli(
        "serve",
        "--host",
        "myhost.lan",
        "--port",
        "8123",
        "--allow-host",
        "cnnscope.example",
        "--allow-host",
        "box.lan:9000",
        "--allow-origin",
        "https://tool.example",
    )
    assert code == 0
    assert set(serve_calls["allowed_hosts"]) == {"cnnscope.example", "box.lan:9000", "myhost.lan"}
    assert list(serve_calls["allowed_origins"]) == ["https://tool.example"] and serve_calls["max_work"] == 20_000
    assert serve_calls["app"] == "app" and serve_calls["run"]["host"] == "myhost.lan"
    assert serve_calls["run"]["port"] == 8123
    serve_calls.clear()
    assert run_cli("serve") == 0
    assert list(serve_calls["allowed_origins"]) == [] and set(serve_calls["allowed_hosts"]) <= {"127.0.0.1"}


def test_serve_refuses_a_malformed_allowed_origin(serve_calls, capsys):
    assert run_cli("serve", "--allow-origin", "tool.example") == 2
    assert "allowed origin 'tool.example'" in capsys.readouterr().err
    assert "run" not in serve_calls
