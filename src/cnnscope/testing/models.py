"""Tiny models whose explanations can be worked out by hand, for tests of any method."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..models import Model, Preprocess

#: Plain [0, 1] pixels: mean 0, std 1.
IDENTITY_PREPROCESS = Preprocess(size=(32, 32), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def quadrant_masks(height: int, width: int) -> torch.Tensor:
    """(4, 1, H, W) masks of the quadrants in reading order: top-left, top-right, bottom-left,
    bottom-right."""
    masks = torch.zeros(4, 1, height, width)
    h, w = height // 2, width // 2
    masks[0, :, :h, :w] = 1
    masks[1, :, :h, w:] = 1
    masks[2, :, h:, :w] = 1
    masks[3, :, h:, w:] = 1
    return masks


class QuadrantNet(nn.Module):
    """Class q sees only quadrant q of the image.

    The input is masked to each quadrant, a grouped 3x3 convolution (group q reads quadrant q
    only, non-negative weights, no bias) and an in-place ReLU make ``features``; global average
    pooling and a linear layer that reads group q for class q make the head. So a class's evidence
    lies in its quadrant (up to the convolution's one-pixel reach), and the head is GAP + linear,
    where CAM applies and Grad-CAM equals ReLU(CAM) / (h * w).
    """

    def __init__(self, size: int = 32, channels_per_class: int = 3, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("masks", quadrant_masks(size, size), persistent=False)
        self.features = nn.Conv2d(12, 4 * channels_per_class, 3, padding=1, groups=4, bias=False)
        with torch.no_grad():
            self.features.weight.copy_(torch.rand(self.features.weight.shape, generator=generator) + 0.1)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * channels_per_class, 4)
        with torch.no_grad():
            weight = torch.zeros(4, 4 * channels_per_class)
            for q in range(4):
                weight[q, q * channels_per_class : (q + 1) * channels_per_class] = 1.0 / channels_per_class
            self.fc.weight.copy_(weight)
            self.fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        masked = torch.cat([x * self.masks[q] for q in range(4)], dim=1)
        activations = self.relu(self.features(masked))
        return self.fc(torch.flatten(self.pool(activations), 1))


def quadrant_model(size: int = 32, seed: int = 0) -> Model:
    net = QuadrantNet(size=size, seed=seed).eval()
    preprocess = Preprocess(size=(size, size), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    return Model(
        net,
        labels=["top-left", "top-right", "bottom-left", "bottom-right"],
        preprocess=preprocess,
        name="quadrant",
    )


class TinyCNN(nn.Module):
    """conv -> ReLU(inplace) -> conv -> functional relu -> maxpool -> conv -> ReLU6 -> GAP -> linear:
    small, seeded, with every kind of ReLU call a method has to cope with."""

    def __init__(self, classes: int = 5, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1)
        self.act3 = nn.ReLU6()
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, classes)
        with torch.no_grad():
            for param in self.parameters():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.conv1(x))
        x = self.pool(F.relu(self.conv2(x)))
        x = self.act3(self.conv3(x))
        return self.fc(torch.flatten(self.gap(x), 1))


class ProbabilityOutput(nn.Module):
    """A network whose forward ends in a softmax (a model exported "with probabilities")."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(x), dim=1)


def tiny_model(classes: int = 5, seed: int = 0, *, multilabel: bool = False, outputs: str = "logits") -> Model:
    """:class:`TinyCNN` as a :class:`Model`: single-label (softmax over logits), ``multilabel=True``
    (a sigmoid per class) or ``outputs="probabilities"`` (the network itself ends in a softmax)."""
    net = TinyCNN(classes, seed).eval()
    if outputs == "probabilities":
        net = ProbabilityOutput(net).eval()
    return Model(
        net,
        labels=[f"class {i}" for i in range(classes)],
        preprocess=IDENTITY_PREPROCESS,
        name="tiny",
        multilabel=multilabel,
        outputs=outputs,
    )


class TinyViT(nn.Module):
    """A small pre-norm vision transformer: 4x4 patches, a class token, ``depth`` blocks of
    LayerNorm -> self-attention and LayerNorm -> MLP, a final LayerNorm and a head on the class token."""

    def __init__(
        self,
        size: int = 32,
        patch: int = 4,
        dim: int = 16,
        depth: int = 2,
        classes: int = 3,
        extra_tokens: int = 1,
        seed: int = 0,
    ) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.extra = nn.Parameter(torch.randn(1, extra_tokens, dim) * 0.1)
        self.pos = nn.Parameter(torch.randn(1, extra_tokens + (size // patch) ** 2, dim) * 0.1)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {
                    "norm1": nn.LayerNorm(dim),
                    "attn": nn.MultiheadAttention(dim, 2, batch_first=True),
                    "norm2": nn.LayerNorm(dim),
                    "mlp": nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)),
                }
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.extra.expand(x.shape[0], -1, -1), tokens], dim=1) + self.pos
        for block in self.blocks:
            normed = block["norm1"](tokens)
            tokens = tokens + block["attn"](normed, normed, normed, need_weights=False)[0]
            tokens = tokens + block["mlp"](block["norm2"](tokens))
        return self.head(self.norm(tokens)[:, 0])


def tiny_vit(extra_tokens: int = 1, seed: int = 0) -> Model:
    return Model(
        TinyViT(extra_tokens=extra_tokens, seed=seed).eval(),
        labels=["a", "b", "c"],
        preprocess=IDENTITY_PREPROCESS,
        name="tiny-vit",
    )
