"""Load check of `cnnscope serve` (run by hand, not in CI): 8 concurrent clients send 200 explain
requests to a server on 127.0.0.1; prints errors, the server's memory before and after, and the
median latency as a ratio to the same library call made directly (goal: <= 1.3x, no errors, memory flat).
The server admits 8 at a time here so that the clients queue on the model's lock, not on 503s.
"""

from __future__ import annotations

import io
import socket
import statistics
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import httpx
import uvicorn
from PIL import Image

import cnnscope
from cnnscope.samples import sample_image
from cnnscope.web import create_app

REQUESTS, CLIENTS = 200, 8


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    warnings.simplefilter("ignore")
    buffer = io.BytesIO()
    Image.fromarray(sample_image("chelsea")).save(buffer, format="PNG")
    payload = buffer.getvalue()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(create_app(running=1, waiting=CLIENTS), host="127.0.0.1", port=port, log_level="warning")
    )
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}/api/explain"

    def one(_: int) -> tuple[int, float]:
        started = time.perf_counter()
        response = httpx.post(
            url, files={"image": ("c.png", payload, "image/png")}, data={"method": "gradcam"}, timeout=120
        )
        return response.status_code, time.perf_counter() - started

    for _ in range(3):
        one(0)
    before = rss_mib()
    sequential = [one(0)[1] for _ in range(10)]
    with ThreadPoolExecutor(CLIENTS) as pool:
        results = list(pool.map(one, range(REQUESTS)))
    after = rss_mib()
    model = cnnscope.load_model()
    method = cnnscope.get_method("gradcam")(model)
    image = sample_image("chelsea")
    direct = []
    for _ in range(10):
        started = time.perf_counter()
        method(image, "top1")
        direct.append(time.perf_counter() - started)
    errors = sum(1 for status, _ in results if status != 200)
    print(f"{REQUESTS} requests from {CLIENTS} clients: {errors} errors")
    print(f"process memory (server in-process): {before:.0f} MiB before, {after:.0f} MiB after")
    print(
        f"median latency of one request alone: {statistics.median(sequential) * 1e3:.1f} ms, "
        f"direct library call {statistics.median(direct) * 1e3:.1f} ms: "
        f"{statistics.median(sequential) / statistics.median(direct):.2f}x"
    )
    print(f"median latency under load (8 queued on one model): {statistics.median(t for _, t in results) * 1e3:.1f} ms")
    server.should_exit = True


if __name__ == "__main__":
    main()
