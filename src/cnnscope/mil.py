"""Attention-based multiple-instance learning (Ilse et al. 2018): a localisation map from image labels.

An image is a bag of patches. A small CNN encodes each patch into h_k; attention weights
a_k = softmax_k(w^T tanh(V h_k)) pool them into one vector sum_k a_k h_k, which a linear layer
classifies. Trained only from image-level labels, the attention weights say which patches carried the
decision: upsampled to the image, they are the map (the histopathology view of "where is the tumour").
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import InputError


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B, P, 3, patch, patch), P = (H / patch) * (W / patch), row by row."""
    b, c, h, w = images.shape
    if h % patch or w % patch:
        raise InputError(f"the image size {h}x{w} must be a multiple of the patch size {patch}")
    tiles = images.unfold(2, patch, patch).unfold(3, patch, patch)  # (B, C, rows, cols, p, p)
    return tiles.permute(0, 2, 3, 1, 4, 5).reshape(b, -1, c, patch, patch)


class AttentionMIL(nn.Module):
    """Patch encoder + attention pooling + linear classifier. ``forward`` returns (logits, attention)."""

    def __init__(self, classes: int, patch: int = 16, features: int = 32, hidden: int = 24) -> None:
        super().__init__()
        self.patch = patch
        self.encoder = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, features, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.attention_v = nn.Linear(features, hidden)
        self.attention_w = nn.Linear(hidden, 1)
        self.classifier = nn.Linear(features, classes)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        patches = patchify((images - 0.5) / 0.25, self.patch)
        b, p = patches.shape[:2]
        h = self.encoder(patches.flatten(0, 1)).view(b, p, -1)
        attention = torch.softmax(self.attention_w(torch.tanh(self.attention_v(h))).squeeze(-1), dim=1)
        pooled = (attention.unsqueeze(-1) * h).sum(dim=1)
        return self.classifier(pooled), attention

    def attention_map(self, images: torch.Tensor) -> torch.Tensor:
        """(B, H, W) attention weights, each patch's weight spread over its pixels (nearest)."""
        with torch.no_grad():
            _, attention = self(images)
        rows, cols = images.shape[2] // self.patch, images.shape[3] // self.patch
        grid = attention.view(-1, 1, rows, cols)
        return F.interpolate(grid, size=images.shape[-2:], mode="nearest")[:, 0]


@dataclass
class TrainingHistory:
    losses: list[float] = field(default_factory=list)
    accuracies: list[float] = field(default_factory=list)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0


def train_attention_mil(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    classes: int,
    patch: int = 16,
    epochs: int = 15,
    batch_size: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
) -> tuple[AttentionMIL, TrainingHistory]:
    """Train from image-level labels only (Adam, cross-entropy), seeded so a run repeats on CPU."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = AttentionMIL(classes, patch=patch)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    inputs, targets = to_tensor(images), torch.as_tensor(labels, dtype=torch.long)
    history = TrainingHistory()
    for _ in range(epochs):
        order = torch.randperm(len(targets), generator=generator)
        total, correct = 0.0, 0
        model.train()
        for start in range(0, len(order), batch_size):
            chosen = order[start : start + batch_size]
            logits, _ = model(inputs[chosen])
            loss = F.cross_entropy(logits, targets[chosen])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(chosen)
            correct += int((logits.argmax(1) == targets[chosen]).sum())
        history.losses.append(total / len(targets))
        history.accuracies.append(correct / len(targets))
    model.eval()
    return model, history
