"""The zoo tests (marked ``zoo``): real torchvision and timm architectures, with random weights, seeded.

They run in .venv-zoo (``make test-zoo``), whose torch has a torchvision beside it; in .venv each module skips
at import (``pytest.importorskip``), so ``make test`` collects them as skipped and runs nothing twice."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "tests/zoo/" in item.nodeid.replace("\\", "/"):
            item.add_marker(pytest.mark.zoo)
