"""Shared by the bench scripts: one timed run, and the fastest of several runs after one warm-up."""

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


def timed(run):
    """(seconds, result) of one call of ``run``."""
    start = time.perf_counter()
    result = run()
    return time.perf_counter() - start, result
