"""SmoothGrad (Smilkov et al. 2017): average a gradient method's maps over noisy copies of the input.

    M_smooth(x) = 1/n sum_i M(x + N(0, sigma^2)),   sigma = noise * (max(x) - min(x))

``aggregate`` says what is averaged, as the peers differ:

- ``maps``: the base method's final maps, each reduced over colour channels first (the paper's average of
  sensitivity maps; with the default ``max-abs`` reduction, an average of per-copy maxima);
- ``mean``: the signed per-channel attributions, reduced once at the end (Captum's ``NoiseTunnel``
  ``smoothgrad``): noise that flips a gradient's sign cancels instead of adding up;
- ``square``: the mean of the squared attributions (SmoothGrad-Squared, Hooker et al. 2019);
- ``variance``: their variance over the copies (VarGrad, Adebayo et al. 2018).

The default (``mean`` at noise 0.1) was chosen from ``bench/evaluate.py --smoothgrad`` (the demo's 64-px
shapes, 60 held-out images, object masks): the paper's ``maps`` at 0.15 put less of its mass on the object
than a centred blob does (0.085 vs 0.099), ``mean`` at 0.1 put 0.132 there, pointed at the object on every
image and deleted as well (AUC 0.287 vs 0.286); ``maps`` kept a better insertion AUC (0.68 vs 0.48). Over
the four metrics ``mean`` at 0.05 ranked best by a hair, 0.1 next; 0.1 stays inside the paper's advice of
10-20% of the range, which matters more on photos than on flat shapes. The README has the whole table.
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

#: What SmoothGrad averages over the noisy copies (see the module docstring).
AGGREGATES = ("maps", "mean", "square", "variance")


def gradient_methods() -> list[str]:
    """The registered methods SmoothGrad can wrap (every gradient method, a user's too)."""
    return [name for name, cls in METHODS.items() if issubclass(cls, GradientMethod)]


@register_method("smoothgrad")
class SmoothGrad(Method):
    """SmoothGrad around any gradient method (``base``: saliency, gradxinput, guided-backprop,
    deconvnet, integrated-gradients). ``noise`` is the standard deviation as a fraction of each
    image's value range (the paper's 10-20%), ``samples`` the number of noisy copies. The maps
    averaged are chosen by ``aggregate`` (see the module); ``channels`` holds the averaged per-channel
    attributions (their mean square or variance for ``square`` and ``variance``)."""

    summary = "average of a gradient method over noisy copies (Smilkov et al. 2017)"
    options: ClassVar[Options] = Options(
        base=choice("saliency", gradient_methods, "the gradient method whose maps are averaged"),
        samples=integer(25, "noisy copies averaged", low=1, high=10_000),
        noise=number(0.1, "noise standard deviation, as a fraction of each image's value range", low=0, high=10),
        aggregate=choice(
            "mean",
            AGGREGATES,
            "what is averaged: maps (the paper: each copy's reduced map), mean (Captum: the signed attributions, "
            "reduced once), square (SmoothGrad-Squared), variance (VarGrad)",
        ),
        seed=SEED,
        reduce=dataclasses.replace(REDUCE, default=None, optional=True, help=REDUCE.help + " (default: the base's)"),
        inputs_per_pass=INPUTS_PER_PASS,
    )

    def __init__(self, model="efficientnet_lite0", *, layer=None, **options) -> None:
        super().__init__(model, layer=layer, **options)
        base_options = {"reduce": self.config["reduce"]} if self.config["reduce"] else {}
        self.base = METHODS.get(str(self.config["base"]))(self.model, **base_options)

    def is_signed(self) -> bool:
        return self.config["aggregate"] in ("maps", "mean") and self.base.is_signed()

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
        aggregate = str(self.config["aggregate"])
        reduce = self.base.config["reduce"]
        maps = total = squares = None
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
            attributions = part.channels.double()
            if total is None:
                shape = (batch.shape[0], *attributions.shape[1:])
                total = torch.zeros(shape, dtype=torch.float64, device=batch.device)
                squares = torch.zeros(shape, dtype=torch.float64, device=batch.device)
            total.index_add_(0, rows, attributions)
            squares.index_add_(0, rows, attributions.square())
            if aggregate == "maps":
                reduced = reduce_channels(part.channels, reduce).double()
                if maps is None:
                    maps = torch.zeros((batch.shape[0], *reduced.shape[1:]), dtype=torch.float64, device=batch.device)
                maps.index_add_(0, rows, reduced)
        mean = total / samples
        if aggregate == "square":
            channels = squares / samples
        elif aggregate == "variance":
            channels = (squares / samples - mean.square()).clamp_min(0)
        else:
            channels = mean
        raw = maps / samples if aggregate == "maps" else reduce_channels(channels.float(), reduce).double()
        return Computed(
            raw=raw.float(),
            logits=logits,
            targets=targets,
            forwards=forwards,
            backwards=backwards,
            channels=channels.float(),
        )
