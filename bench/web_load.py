"""Load check of `cnnscope serve` (run by hand, not in CI): 8 concurrent clients send 200 explain
requests to a server process on 127.0.0.1; prints errors, the server's memory before and after, and the
median latency as a ratio to the same library call made directly (goal: <= 1.3x, no errors, memory flat).
The server lets 8 wait so that the clients queue on the model's lock, not on 503s. Requests are the page's
(keep-alive connections, no raw maps).
"""

from __future__ import annotations

import io
import socket
import statistics
import subprocess
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import httpx
from PIL import Image

import cnnscope
from cnnscope.samples import sample_image

REQUESTS, CLIENTS, ROUNDS = 200, 8, 3


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
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
    server = subprocess.Popen(
        [sys.executable, "-m", "cnnscope.cli", "serve", "--port", str(port), "--waiting", str(CLIENTS)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{port}/api/models", timeout=1)
            break
        except httpx.HTTPError:
            time.sleep(0.2)
    url = f"http://127.0.0.1:{port}/api/explain"

    local = threading.local()  # one keep-alive connection per client thread, as a browser keeps

    def one(_: int) -> tuple[int, float]:
        if not hasattr(local, "client"):
            local.client = httpx.Client(timeout=120)
        started = time.perf_counter()
        response = local.client.post(
            url, files={"image": ("c.png", payload, "image/png")}, data={"method": "gradcam", "raw": "false"}
        )
        return response.status_code, time.perf_counter() - started

    for _ in range(3):
        one(0)
    before = rss_mib(server.pid)
    with ThreadPoolExecutor(CLIENTS) as pool:
        results = list(pool.map(one, range(REQUESTS)))
    after = rss_mib(server.pid)
    # the same library work the endpoint does: decode the upload, explain, encode the response's maps
    from cnnscope.web.app import response_body

    model = cnnscope.load_model()
    method = cnnscope.get_method("gradcam")(model)

    def direct_call() -> float:
        started = time.perf_counter()
        image = cnnscope.load_image(payload)
        response_body(method(image, "top1", names=["c"]), "c", model.name, None, 0.5, False, raw=False)
        return time.perf_counter() - started

    def bare_call() -> float:
        started = time.perf_counter()
        method(payload, "top1")
        return time.perf_counter() - started

    # blocks of 30 served and 30 direct calls, alternating, with a pause between blocks so that one side's
    # idle OpenMP threads have stopped spinning before the other side runs (two teams slow each other);
    # the fastest block's median counts for each side (machine noise between minutes is larger than 10%)
    rounds = []
    for _ in range(ROUNDS):
        time.sleep(0.5)
        served = statistics.median(one(0)[1] for _ in range(30))
        time.sleep(0.5)
        direct = statistics.median(direct_call() for _ in range(30))
        rounds.append((served, direct))
    bare = statistics.median(bare_call() for _ in range(30))
    errors = sum(1 for status, _ in results if status != 200)
    print(f"{REQUESTS} requests from {CLIENTS} clients: {errors} errors")
    print(f"server memory: {before:.0f} MiB before, {after:.0f} MiB after the {REQUESTS} requests")
    alone, library = min(r[0] for r in rounds), min(r[1] for r in rounds)
    each = ", ".join(f"{served / direct:.2f}x" for served, direct in rounds)
    print(
        f"median latency of one request alone: {alone * 1e3:.1f} ms; the same library work called directly "
        f"(decode, explain, encode the maps) {library * 1e3:.1f} ms: {alone / library:.2f}x (rounds: {each}); "
        f"the explain call alone {bare * 1e3:.1f} ms"
    )
    print(f"median latency under load (8 queued on one model): {statistics.median(t for _, t in results) * 1e3:.1f} ms")
    server.terminate()
    server.wait(timeout=10)


if __name__ == "__main__":
    main()
