"""SmoothGrad (Smilkov et al. 2017): average a gradient method's maps over noisy copies of the input.

    M_smooth(x) = 1/n sum_i M(x + N(0, sigma^2)),   sigma = noise * (max(x) - min(x))

Targets are chosen once on the clean image, so every noisy copy explains the same class. The noisy
copies are explained in passes of several copies at a time; the noise comes from a
``torch.Generator`` seeded per image, so a seed repeats a run exactly and an image gets the same noise
alone or in a batch.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from .._registry import METHODS
from ..options import Options, choice, integer, number
from ..progress import check_cancelled
from .base import INPUTS_PER_PASS, Computed, Method, auto_images_per_pass, register_method
from .gradient import REDUCE, SEED, GradientMethod, reduce_channels


def gradient_methods() -> list[str]:
    """The registered methods SmoothGrad can wrap (every gradient method, a user's too)."""
    return [name for name, cls in METHODS.items() if issubclass(cls, GradientMethod)]


@register_method("smoothgrad")
class SmoothGrad(Method):
    """SmoothGrad around any gradient method (``base``: saliency, gradxinput, guided-backprop,
    deconvnet, integrated-gradients). ``noise`` is the standard deviation as a fraction of each
    image's value range (the paper's 10-20%), ``samples`` the number of noisy copies. The maps
    averaged are the base method's final maps (the paper's definition); ``channels`` holds the
    averaged per-channel attributions."""

    summary = "average of a gradient method over noisy copies (Smilkov et al. 2017)"
    options: ClassVar[Options] = Options(
        base=choice("saliency", gradient_methods, "the gradient method whose maps are averaged"),
        samples=integer(25, "noisy copies averaged", low=1, high=10_000),
        noise=number(0.15, "noise standard deviation, as a fraction of each image's value range", low=0, high=10),
        seed=SEED,
        reduce=dataclasses.replace(REDUCE, default=None, optional=True, help=REDUCE.help + " (default: the base's)"),
        inputs_per_pass=INPUTS_PER_PASS,
    )

    def __init__(self, model="efficientnet_lite0", *, layer=None, **options) -> None:
        super().__init__(model, layer=layer, **options)
        base_options = {"reduce": self.config["reduce"]} if self.config["reduce"] else {}
        self.base = METHODS.get(str(self.config["base"]))(self.model, **base_options)

    def is_signed(self) -> bool:
        return self.base.is_signed()

    def estimated_work(self, targets: int = 1) -> int:
        return 1 + int(self.config["samples"]) * self.base.estimated_work(targets)

    def compute(self, batch: torch.Tensor, resolve) -> Computed:
        samples = int(self.config["samples"])
        with torch.no_grad():
            logits = self.model(batch)
        targets = resolve(logits)
        spread = (batch.flatten(1).amax(dim=1) - batch.flatten(1).amin(dim=1)).view(-1, 1, 1, 1)
        sigma = float(self.config["noise"]) * spread
        per_pass = int(self.config["inputs_per_pass"] or auto_images_per_pass(self.model))
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
            check_cancelled()
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
