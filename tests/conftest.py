from __future__ import annotations

import numpy as np
import pytest
import torch

import cnnscope
from cnnscope.samples import sample_image


@pytest.fixture(scope="session")
def default_model() -> cnnscope.Model:
    return cnnscope.load_model()


@pytest.fixture(scope="session")
def chelsea() -> np.ndarray:
    return sample_image("chelsea")


@pytest.fixture(scope="session")
def coffee() -> np.ndarray:
    return sample_image("coffee")


@pytest.fixture(scope="session")
def default_batch(default_model, chelsea, coffee) -> torch.Tensor:
    return default_model.preprocess([chelsea, coffee])


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a.flatten().double() - a.double().mean()
    b = b.flatten().double() - b.double().mean()
    return float((a @ b) / (a.norm() * b.norm()))
