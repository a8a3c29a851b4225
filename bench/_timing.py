"""Shared by the bench scripts: one timed run, the fastest of several runs after one warm-up, and the
fastest of each of several candidates run round-robin."""

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


def interleaved(candidates: dict, repeat: int, warmup: int = 2) -> dict[str, float]:
    """Fastest seconds of each candidate, run round-robin (order rotating each round), so that drift in
    the machine's speed and the allocator's state hits every candidate alike. The minimum, not the
    median: the work is deterministic and the noise here (another core's load, page reclaim) only adds;
    medians moved by +-10% between runs on these machines, minima by about 2%."""
    names = list(candidates)
    for _ in range(warmup):
        for name in names:
            candidates[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeat):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            candidates[name]()
            times[name].append(time.perf_counter() - start)
    return {name: min(values) for name, values in times.items()}
