"""Admission control: at most ``running`` explanations at once and ``waiting`` in line; past that, 503."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager


class Busy(Exception):
    """Raised when the line is full; the client should retry later."""


class AdmissionLimit:
    def __init__(self, running: int = 1, waiting: int = 4) -> None:
        if running < 1 or waiting < 0:
            raise ValueError("running must be >= 1 and waiting >= 0")
        self.running, self.waiting = running, waiting
        self._semaphore: asyncio.Semaphore | None = None
        self._admitted = 0

    @asynccontextmanager
    async def slot(self):
        if self._semaphore is None:
            self._semaphore = asyncio.Semaphore(self.running)
        if self._admitted >= self.running + self.waiting:
            raise Busy()
        self._admitted += 1
        try:
            async with self._semaphore:
                yield
        finally:
            self._admitted -= 1
