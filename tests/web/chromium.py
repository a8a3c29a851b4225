"""Debian's Chromium for the browser tests (Playwright drives it headless, off the network): where it is, its
flags, and the skip mark when it is missing."""

from __future__ import annotations

import shutil

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
NEEDS_CHROMIUM = pytest.mark.skipif(
    not shutil.which("chromium"), reason="Debian's chromium is not installed (make test installs it)"
)
