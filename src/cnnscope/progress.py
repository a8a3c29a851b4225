"""A progress line on stderr for anything slower than a second, an early stop that keeps results, and a
cancellation that abandons them.

Cancellation: code that runs a method on behalf of someone who may leave (the web server's model thread)
wraps the call in ``with cancellable(event):``; once ``event`` is set, the next ``Progress.should_stop()``
(every perturbation method calls it after each pass) or ``check_cancelled()`` (for other loops) raises
:class:`Cancelled`. The token lives in a context variable, so it only reaches the code that runs inside
the ``with`` block, on that thread.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_cancel_token: ContextVar[threading.Event | None] = ContextVar("cnnscope_cancel_token", default=None)


class Cancelled(Exception):
    """The work was cancelled from outside (its requester left); no result is returned."""


@contextmanager
def cancellable(event: threading.Event) -> Iterator[threading.Event]:
    """Within the block (on this thread, in this context), ``check_cancelled()`` and
    ``Progress.should_stop()`` raise :class:`Cancelled` once ``event`` is set."""
    token = _cancel_token.set(event)
    try:
        yield event
    finally:
        _cancel_token.reset(token)


def is_cancelled() -> bool:
    """True when the enclosing ``cancellable`` block's event is set (False outside any)."""
    event = _cancel_token.get()
    return event is not None and event.is_set()


def check_cancelled() -> None:
    """Raise :class:`Cancelled` if the enclosing ``cancellable`` block's event is set: call it at a pass
    boundary of any long loop (a no-op outside ``cancellable``)."""
    if is_cancelled():
        raise Cancelled("the work was cancelled (its requester went away)")


class Progress:
    """``update(n)`` as work is done; nothing is drawn before ``delay`` seconds or when ``quiet``.
    ``should_stop()`` turns true once ``max_seconds`` have passed (None: never), and raises
    :class:`Cancelled` when the work was cancelled (see ``cancellable``)."""

    def __init__(
        self, total: int, label: str, *, quiet: bool = False, delay: float = 1.0, max_seconds: float | None = None
    ) -> None:
        self.total, self.label, self.quiet, self.delay = max(1, total), label, quiet, delay
        self.max_seconds = max_seconds
        self.done = 0
        self.started = time.perf_counter()
        self.drawn = False
        self.visible = not quiet and sys.stderr.isatty()  # a log file gets no carriage-return spam
        self.cancel_event = _cancel_token.get()  # the token where the work started, wherever it is checked

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
        event = self.cancel_event or _cancel_token.get()
        if event is not None and event.is_set():
            self.close()
            raise Cancelled(f"{self.label} was cancelled after {self.done}/{self.total} (its requester went away)")
        return self.max_seconds is not None and time.perf_counter() - self.started >= self.max_seconds

    def close(self) -> None:
        if self.drawn:
            sys.stderr.write("\n")
            sys.stderr.flush()
            self.drawn = False
