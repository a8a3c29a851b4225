"""Building the zoo's architectures once per session, with random weights (seeded) and small inputs where the
architecture allows (64x64: 2x2 maps at the last stage of a CNN, 4x4 patches for a ViT)."""

from __future__ import annotations

import functools

import torch

import cnnscope
from cnnscope.models import Model, Preprocess

SMALL = 64

#: The default target layer of each architecture at its own input size (also a table in README.md).
DEFAULT_LAYERS = {
    "torchvision:resnet50": "layer4",
    "torchvision:vgg16": "avgpool",
    "torchvision:densenet121": "features",
    "torchvision:mobilenet_v3_large": "features",
    "torchvision:efficientnet_b0": "features",
    "torchvision:convnext_tiny": "features",
    "torchvision:regnet_y_400mf": "trunk_output",
    "torchvision:vit_b_16": "encoder.layers.encoder_layer_11.ln_1",
    "torchvision:swin_t": "permute",
    "torchvision:maxvit_t": "blocks.3",
    "timm:resnet18": "layer4",
    "timm:convnext_nano": "norm_pre",
    "timm:efficientnet_b0": "bn2",
    "timm:vit_small_patch16_224": "blocks.11.norm1",
    "timm:deit_small_distilled_patch16_224": "blocks.11.norm1",
}

#: What the methods are checked on: every architecture of the issue but maxvit_t (one forward and backward
#: of two 224x224 images takes about 40 s on 2 cores; its default layer is checked at full size).
METHOD_ARCHS = [name for name in DEFAULT_LAYERS if name != "torchvision:maxvit_t"]

#: One architecture per family, for the costlier methods (Grad-CAM++, IG, occlusion): a ResNet, an SE MobileNet,
#: a ConvNeXt, a Swin, a ViT (class token) and a distilled DeiT (two extra tokens).
REPRESENTATIVE = [
    "torchvision:resnet50",
    "torchvision:mobilenet_v3_large",
    "timm:convnext_nano",
    "torchvision:swin_t",
    "torchvision:vit_b_16",
    "timm:deit_small_distilled_patch16_224",
]

#: Small enough for Score-CAM and Ablation-CAM (one forward per channel of the layer).
SMALL_ARCHS = ["timm:resnet18", "torchvision:regnet_y_400mf"]

#: Squeeze-excitation gates (Sigmoid / Hardsigmoid) that guided backprop leaves on their plain gradient.
SE_GATES = {
    "torchvision:efficientnet_b0": ("sigmoid", "scale_activation"),
    "torchvision:mobilenet_v3_large": ("hardsigmoid", "scale_activation"),
    "torchvision:regnet_y_400mf": ("sigmoid", "se.scale_activation"),
    "timm:efficientnet_b0": ("sigmoid", "se.gate"),
}


@functools.cache
def full_size(name: str) -> Model:
    """``load_model(name)`` with random weights, at the architecture's own input size."""
    torch.manual_seed(0)
    flag = {"pretrained": False} if name.startswith("timm:") else {"weights": False}
    return cnnscope.load_model(name, **flag)


@functools.cache
def small(name: str) -> Model:
    """The architecture at 64x64 (ViTs rebuilt for 64x64 inputs: 4x4 patches and a class token)."""
    source, _, arch = name.partition(":")
    torch.manual_seed(0)
    if arch in ("vit_b_16",):
        from torchvision import models

        module = models.get_model(arch, weights=None, image_size=SMALL).eval()
        # torchvision builds the head all zeros, which makes every class map zero: give it seeded random weights
        # (the zero head itself is the default-layer case of test_zoo_models.py)
        torch.nn.init.normal_(module.heads.head.weight, std=0.02)
        return Model(module, preprocess=Preprocess((SMALL, SMALL)), name=name)
    if source == "timm" and ("vit" in arch or "deit" in arch):
        import timm

        module = timm.create_model(arch, pretrained=False, img_size=SMALL).eval()
        base = full_size(name)
        pre = Preprocess((SMALL, SMALL), base.preprocess.mean, base.preprocess.std)
        return Model(module, preprocess=pre, name=name)
    base = full_size(name)
    return cnnscope.load_model(base, preprocess=Preprocess((SMALL, SMALL), base.preprocess.mean, base.preprocess.std))


def images(model: Model, count: int = 2, seed: int = 0) -> torch.Tensor:
    """Preprocessed random photos (seeded)."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.rand(count, 3, *model.preprocess.size, generator=generator)
    return model.preprocess.normalize(pixels)
