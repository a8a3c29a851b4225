"""Image parameterizations for activation maximization: what the optimizer actually changes.

Both return images in [0, 1] RGB of shape (N, 3, H, W) through a sigmoid, so every step is a valid
image. ``fourier`` (Olah et al. 2017, "Feature Visualization"; the lucid/lucent approach) optimizes
a spectrum whose frequencies are scaled by 1/f, and colours in a decorrelated basis: equal steps
then change low frequencies and natural colour directions as much as high ones, which removes most
of the high-frequency noise that pixel-space ascent (Simonyan et al. 2013) produces. ``pixel``
optimizes the pixels directly (pair it with total variation or blur to get readable images).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from ..errors import InputError

#: Square root of the colour covariance of ImageNet photos (lucid's published figures: rows are R, G, B
#: in terms of three decorrelated components). Multiplying decorrelated noise by it gives natural colours.
COLOR_CORRELATION_SQRT = torch.tensor([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]])


def _colour_matrix(decorrelate: bool) -> torch.Tensor:
    if not decorrelate:
        return torch.eye(3)
    return COLOR_CORRELATION_SQRT / COLOR_CORRELATION_SQRT.norm(dim=0).max()


class ImageParam(ABC):
    """A batch of images as one trainable tensor (``values``, what the optimizer changes); ``image()``
    gives the (N, 3, H, W) RGB batch in [0, 1] through the colour basis and a sigmoid."""

    name = "param"

    def __init__(self, count: int, size: tuple[int, int], *, decorrelate: bool, device: torch.device | str) -> None:
        if count < 1:
            raise InputError(f"need at least one image to optimize, got {count}")
        if len(size) != 2 or min(size) < 8:
            raise InputError(f"image size must be (height, width) with both >= 8, got {tuple(size)}")
        self.count, self.size = count, (int(size[0]), int(size[1]))
        self.device = device
        self.colours = _colour_matrix(decorrelate).to(device)

    def _start(self, shape: tuple[int, ...], generator: torch.Generator, std: float) -> torch.Tensor:
        """The trainable tensor, Gaussian of ``std``: drawn on the CPU generator, so a seed gives the same
        start on any device."""
        return (torch.randn(shape, generator=generator) * std).to(self.device).requires_grad_(True)

    def _to_rgb(self, planes: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(torch.einsum("ij,njhw->nihw", self.colours, planes))

    def parameters(self) -> list[torch.Tensor]:
        """The tensors the optimizer changes."""
        return [self.values]

    @abstractmethod
    def image(self) -> torch.Tensor:
        """The (N, 3, H, W) RGB batch in [0, 1] the parameters stand for."""


class PixelParam(ImageParam):
    """Pixels before a sigmoid, optionally in the decorrelated colour basis."""

    name = "pixel"

    def __init__(
        self,
        count: int,
        size: tuple[int, int],
        *,
        generator: torch.Generator,
        std: float = 0.01,
        decorrelate: bool = True,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__(count, size, decorrelate=decorrelate, device=device)
        self.values = self._start((count, 3, *self.size), generator, std)

    def image(self) -> torch.Tensor:
        return self._to_rgb(self.values)


class FourierParam(ImageParam):
    """A real 2-D spectrum per colour component, frequencies scaled by ``1 / f ** decay``.

    image = sigmoid(colours @ irfft2(spectrum * scale)); the spectrum starts as Gaussian noise of ``std``.
    """

    name = "fourier"

    def __init__(
        self,
        count: int,
        size: tuple[int, int],
        *,
        generator: torch.Generator,
        std: float = 0.01,
        decay: float = 1.0,
        decorrelate: bool = True,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__(count, size, decorrelate=decorrelate, device=device)
        height, width = self.size
        fy = torch.fft.fftfreq(height)[:, None]
        fx = torch.fft.rfftfreq(width)[None, :]
        frequency = torch.sqrt(fx * fx + fy * fy)
        # the 1/f scale, the zero frequency counted as the lowest non-zero one (with the orthonormal
        # inverse FFT this equals lucid's scale * sqrt(h * w) with the default 1/(h * w) inverse)
        self.scale = (1.0 / frequency.clamp(min=1.0 / max(height, width)) ** decay).to(device)
        self.values = self._start((count, 3, height, width // 2 + 1, 2), generator, std)

    def image(self) -> torch.Tensor:
        spectrum = torch.view_as_complex(self.values) * self.scale
        return self._to_rgb(torch.fft.irfft2(spectrum, s=self.size, norm="ortho") / 4.0)


PARAMETERIZATIONS = {"fourier": FourierParam, "pixel": PixelParam}


def make_param(
    kind: str,
    count: int,
    size: tuple[int, int],
    generator: torch.Generator,
    *,
    decorrelate: bool = True,
    device: torch.device | str = "cpu",
) -> ImageParam:
    """``kind`` is ``"fourier"`` or ``"pixel"``."""
    try:
        cls = PARAMETERIZATIONS[kind]
    except KeyError:
        raise InputError(f"unknown parameterization {kind!r}; choose 'fourier' or 'pixel'") from None
    return cls(count, size, generator=generator, decorrelate=decorrelate, device=device)
