"""The default layer of a transformer comes from its structure (issue 13): the last block's tokens, as wide as
the head's features, whether or not the head's weights are zero (a freshly built torchvision vit_b_16), and
never a layer inside the attention (timm's ``attn.qkv``, q, k and v side by side)."""

from __future__ import annotations

import torch
from torch import nn

import cnnscope
from cnnscope.models import Model
from cnnscope.testing import TinyViT, tiny_vit
from cnnscope.testing.models import IDENTITY_PREPROCESS


class Attention(nn.Module):
    """timm's layout: one Linear makes q, k and v (3 x dim wide), another projects the heads back."""

    def __init__(self, dim: int, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attended = torch.softmax(q @ k.transpose(-2, -1) / (d // self.heads) ** 0.5, dim=-1) @ v
        return self.proj(attended.transpose(1, 2).reshape(n, t, d))


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TimmStyleViT(nn.Module):
    """Class and distillation tokens, two heads averaged (DeiT distilled), timm's module names."""

    def __init__(self, dim: int = 16, depth: int = 2, classes: int = 3, distilled: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.extra = 2 if distilled else 1
        self.patch_embed = nn.Conv2d(3, dim, 4, stride=4)
        self.tokens = nn.Parameter(torch.randn(1, self.extra, dim) * 0.1)
        self.pos = nn.Parameter(torch.randn(1, self.extra + 64, dim) * 0.1)
        self.blocks = nn.Sequential(*(Block(dim) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)
        self.head_dist = nn.Linear(dim, classes) if distilled else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.tokens.expand(x.shape[0], -1, -1), tokens], dim=1) + self.pos
        tokens = self.norm(self.blocks(tokens))
        if self.head_dist is None:
            return self.head(tokens[:, 0])
        return (self.head(tokens[:, 0]) + self.head_dist(tokens[:, 1])) / 2


def _model(module: nn.Module) -> Model:
    return Model(module.eval(), labels=["a", "b", "c"], preprocess=IDENTITY_PREPROCESS, name="vit")


def test_a_zero_head_gets_the_same_default_layer_as_a_trained_one():
    trained = tiny_vit()
    fresh = TinyViT().eval()
    with torch.no_grad():
        fresh.head.weight.zero_()
        fresh.head.bias.zero_()
    zero = _model(fresh)
    assert trained.default_layer().key == "blocks.1.norm1"
    assert zero.default_layer().key == "blocks.1.norm1"  # before issue 13: "no layer of patch tokens reaches..."
    assert not fresh.head.weight.any()  # the probe changed nothing


def test_eigencam_without_a_layer_runs_on_a_zero_head():
    fresh = TinyViT().eval()
    with torch.no_grad():
        fresh.head.weight.zero_()
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    explanation = cnnscope.get_method("eigencam")(_model(fresh))(images, 0)
    assert explanation.layer == "blocks.1.norm1"
    assert explanation.raw.shape[-2:] == (8, 8)
    assert torch.isfinite(explanation.raw).all() and explanation.raw.abs().sum() > 0


def test_the_default_is_the_last_blocks_tokens_not_the_qkv_projection():
    model = _model(TimmStyleViT())
    ref = model.default_layer()
    assert ref.key == "blocks.1.norm1"  # before issue 13: blocks.1.attn.qkv, (N, 66, 48)
    assert ref.output_shape == (1, 66, 16)
    assert ref.layout.kind == "tokens" and ref.layout.grid == (2, 8, 8)  # class and distillation tokens dropped


def test_the_default_of_a_distilled_vit_with_zero_heads_and_its_gradcam():
    module = TimmStyleViT()
    with torch.no_grad():
        module.head.weight.zero_()
        module.head_dist.weight.zero_()
    model = _model(module)
    assert model.default_layer().key == "blocks.1.norm1"
    trained = _model(TimmStyleViT(distilled=False))
    assert trained.default_layer().key == "blocks.1.norm1"
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    explanation = cnnscope.get_method("gradcam")(trained)(images, 1)
    assert explanation.raw.shape[-2:] == (8, 8)
