"""SmoothGrad (Smilkov et al. 2017): average a gradient method's maps over noisy copies of the input.

    M_smooth(x) = 1/n sum_i M(x + N(0, sigma^2)),   sigma = noise * (max(x) - min(x))

Targets are chosen once on the clean image, so every noisy copy explains the same class. The noisy
copies are explained in passes of several copies at a time; the noise comes from a
``torch.Generator`` seeded per image, so a seed repeats a run exactly and an image gets the same noise
alone or in a batch.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from .._registry import METHODS
from ..errors import MethodError
from .base import Computed, Method, auto_images_per_pass, register_method
from .gradient import GradientMethod, reduce_channels


@register_method("smoothgrad")
class SmoothGrad(Method):
    """SmoothGrad around any gradient method (``base``: saliency, gradxinput, guided-backprop,
    deconvnet, integrated-gradients). ``noise`` is the standard deviation as a fraction of each
    image's value range (the paper's 10-20%), ``samples`` the number of noisy copies. The maps
    averaged are the base method's final maps (the paper's definition); ``channels`` holds the
    averaged per-channel attributions."""

    summary = "average of a gradient method over noisy copies (Smilkov et al. 2017)"
    options: ClassVar[dict[str, object]] = {
        "base": "saliency",
        "samples": 25,
        "noise": 0.15,
        "seed": 0,
        "reduce": None,
        "copies_per_pass": None,
    }

    def __init__(self, model="efficientnet_lite0", *, layer=None, **options) -> None:
        super().__init__(model, layer=layer, **options)
        base_cls = METHODS.get(str(self.config["base"]))
        if not issubclass(base_cls, GradientMethod):
            raise MethodError(f"smoothgrad wraps gradient methods; {self.config['base']!r} is not one")
        base_options = {"reduce": self.config["reduce"]} if self.config["reduce"] else {}
        self.base = base_cls(self.model, **base_options)
        if int(self.config["samples"]) < 1 or float(self.config["noise"]) < 0:
            raise MethodError("smoothgrad needs samples >= 1 and noise >= 0")

    def is_signed(self) -> bool:
        return self.base.is_signed()

    def compute(self, batch: torch.Tensor, resolve) -> Computed:
        samples = int(self.config["samples"])
        with torch.no_grad():
            logits = self.model.module(batch)
        targets = resolve(logits)
        spread = (batch.flatten(1).amax(dim=1) - batch.flatten(1).amin(dim=1)).view(-1, 1, 1, 1)
        sigma = float(self.config["noise"]) * spread
        per_pass = int(self.config["copies_per_pass"] or auto_images_per_pass(self.model))
        maps = channels = None
        forwards, backwards = 1, 0
        # every image draws its noise from its own generator seeded with ``seed``: an image gets the same
        # noisy copies whether it is explained alone or in a batch
        copies = []
        for i in range(batch.shape[0]):
            generator = torch.Generator().manual_seed(int(self.config["seed"]))
            for _ in range(samples):
                noise = torch.randn(batch[i : i + 1].shape, generator=generator).to(batch)
                copies.append((i, batch[i : i + 1] + sigma[i] * noise))
        for start in range(0, len(copies), per_pass):
            chunk = copies[start : start + per_pass]
            rows = torch.tensor([i for i, _ in chunk], device=batch.device)
            noisy = torch.cat([x for _, x in chunk])
            part = self.base.attributions(noisy, lambda _logits, r=rows: targets[r])
            forwards, backwards = forwards + part.forwards, backwards + part.backwards
            reduced = reduce_channels(part.channels, self.base.config["reduce"])
            if maps is None:
                maps = torch.zeros((batch.shape[0], *reduced.shape[1:]), dtype=torch.float64, device=batch.device)
                channels = torch.zeros(
                    (batch.shape[0], *part.channels.shape[1:]), dtype=torch.float64, device=batch.device
                )
            maps.index_add_(0, rows, reduced.double())
            channels.index_add_(0, rows, part.channels.double())
        return Computed(
            raw=(maps / samples).float(),
            logits=logits,
            targets=targets,
            forwards=forwards,
            backwards=backwards,
            channels=(channels / samples).float(),
        )
