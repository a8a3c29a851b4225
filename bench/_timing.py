"""Shared by the bench scripts: the fastest of several runs after one warm-up."""

from __future__ import annotations

import time


def best_of(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)
