"""A progress line on stderr for anything slower than a second, and an early stop that keeps results."""

from __future__ import annotations

import sys
import time


class Progress:
    """``update(n)`` as work is done; nothing is drawn before ``delay`` seconds or when ``quiet``.
    ``should_stop()`` turns true once ``max_seconds`` have passed (None: never)."""

    def __init__(
        self, total: int, label: str, *, quiet: bool = False, delay: float = 1.0, max_seconds: float | None = None
    ) -> None:
        self.total, self.label, self.quiet, self.delay = max(1, total), label, quiet, delay
        self.max_seconds = max_seconds
        self.done = 0
        self.started = time.perf_counter()
        self.drawn = False
        self.visible = not quiet and sys.stderr.isatty()  # a log file gets no carriage-return spam

    def update(self, count: int = 1) -> None:
        self.done += count
        elapsed = time.perf_counter() - self.started
        if self.visible and elapsed >= self.delay:
            rate = self.done / elapsed if elapsed > 0 else 0.0
            left = (self.total - self.done) / rate if rate > 0 else 0.0
            sys.stderr.write(f"\r{self.label}: {self.done}/{self.total} ({rate:.0f}/s, {left:.0f} s left)   ")
            sys.stderr.flush()
            self.drawn = True

    def should_stop(self) -> bool:
        return self.max_seconds is not None and time.perf_counter() - self.started >= self.max_seconds

    def close(self) -> None:
        if self.drawn:
            sys.stderr.write("\n")
            sys.stderr.flush()
