"""Guided backprop names the modules whose gates (squeeze-excitation Sigmoid / Hardsigmoid) keep their plain
gradient (issue 13; on real EfficientNet/MobileNetV3/RegNetY in tests/zoo/test_zoo_methods.py)."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import cnnscope


def hooks(net: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in net.modules())


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, gate: nn.Module | None) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, channels, 1)
        self.gate = gate  # None: a functional x.sigmoid() inside this forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        squeezed = self.reduce(x.mean(dim=(2, 3), keepdim=True))
        return x * (self.gate(squeezed) if self.gate is not None else squeezed.sigmoid())


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.blocks = nn.Sequential(
            SqueezeExcite(4, nn.Sigmoid()), SqueezeExcite(4, nn.Hardsigmoid()), SqueezeExcite(4, None)
        )
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(self.stem(x)).mean(dim=(2, 3)))


def test_the_warning_names_each_gate_module():
    net = Net().eval()
    model = cnnscope.load_model(net, preprocess=cnnscope.Preprocess((16, 16), mean=(0, 0, 0), std=(1, 1, 1)))
    with pytest.warns(cnnscope.CnnscopeWarning) as caught:
        cnnscope.get_method("guided-backprop")(model)(torch.rand(2, 3, 16, 16), 0)
    note = next(str(w.message) for w in caught if "plain gradient" in str(w.message))
    assert "sigmoid (2 calls), hardsigmoid (1 call)" in note
    assert re.findall(r"'([^']+)' \((\w+)\)", note) == [
        ("blocks.0.gate", "sigmoid"),
        ("blocks.2", "sigmoid"),  # the functional call: the module whose forward made it
        ("blocks.1.gate", "hardsigmoid"),
    ]
    assert hooks(net) == 0  # every module hook of the modifier is gone
