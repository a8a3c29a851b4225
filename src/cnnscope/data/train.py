"""A small CNN and a seeded trainer for the synthetic shapes: a model to explain in demos and tests.

``SmallCNN`` is a few conv (+ batch norm) + ReLU + max-pool blocks, one more conv + ReLU, then global
average pooling and one linear layer, so CAM applies to its last conv map. ``train_small_cnn`` fits it to
a :class:`~cnnscope.data.ShapesDataset` in seconds on a CPU and returns a :class:`cnnscope.Model`.

Determinism: the weights' initialisation and the shuffling come from a ``torch.Generator`` seeded with
``seed``, no dropout or augmentation draws random numbers, and nothing reads or changes the global
random states of torch, numpy or Python's ``random``. Two runs with the same arguments, the same torch
build, the same machine and the same ``torch.get_num_threads()`` give bit-identical weights. The trainer
pins the thread count it computes with (``threads=1`` by default; see ``train_small_cnn``) and restores
the caller's afterwards, so by default the result does not depend on the caller's thread setting either.
Across CPU types or torch versions, float rounding may differ in the last bits.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from ..models import Model, Preprocess
from .shapes import ShapesDataset, _is_int


class SmallCNN(nn.Module):
    """``blocks`` x (3x3 conv + batch norm + ReLU + 2x2 max-pool), then a 3x3 conv + batch norm + ReLU (the
    end of ``features``: the map CAM and Grad-CAM use by default), global average pooling and one linear
    layer (``classifier``): logits = W @ mean over space of the last map + b, the head CAM needs.

    Channels start at ``width`` and double each block. ``batchnorm=False`` leaves the norms out (plain
    conv + ReLU; trains slower and less reliably); in eval mode a norm is a fixed per-channel affine map.

    Takes (N, 3, H, W) floats in [0, 1] (the model centres them itself) with H and W multiples of
    ``2 ** blocks``; for 64x64 input and 3 blocks the last map is 8x8. ``generator`` seeds the
    initialisation (He-uniform conv weights, small uniform linear weights, zero biases, unit norms);
    without one the global torch generator is used, as for any ``nn.Module``.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        width: int = 16,
        blocks: int = 3,
        batchnorm: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if not _is_int(num_classes) or num_classes < 2:
            raise InputError(f"SmallCNN num_classes must be an integer >= 2; got {num_classes!r}")
        if not _is_int(width) or width < 1:
            raise InputError(f"SmallCNN width must be an integer >= 1; got {width!r}")
        if not _is_int(blocks) or not 1 <= blocks <= 5:
            raise InputError(f"SmallCNN blocks must be an integer from 1 to 5; got {blocks!r}")
        layers: list[nn.Module] = []
        channels_in, channels = 3, width
        for _ in range(blocks):
            layers += [*_conv(channels_in, channels, batchnorm), nn.ReLU(), nn.MaxPool2d(2)]
            channels_in, channels = channels, channels * 2
        layers += [*_conv(channels_in, channels_in, batchnorm), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.utils.skip_init(nn.Linear, channels_in, num_classes)
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Initialise every weight from ``generator`` (the global torch generator if None)."""
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                fan_in = module.weight[0].numel()
                gain = math.sqrt(6.0) if isinstance(module, nn.Conv2d) else 1.0  # He-uniform for ReLU convs
                bound = gain / math.sqrt(fan_in)
                module.weight.copy_(torch.rand(module.weight.shape, generator=generator) * (2 * bound) - bound)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.BatchNorm2d):
                module.reset_parameters()  # ones and zeros: no random draw

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.features((images - 0.5) / 0.25)
        return self.classifier(self.pool(features).flatten(1))


def _conv(channels_in: int, channels_out: int, batchnorm: bool) -> list[nn.Module]:
    # skip_init: no draw from the global generator; reset_parameters fills the weights
    conv = nn.utils.skip_init(nn.Conv2d, channels_in, channels_out, 3, padding=1, bias=not batchnorm)
    return [conv, nn.BatchNorm2d(channels_out)] if batchnorm else [conv]


@dataclass
class TrainingHistory:
    """Per-epoch figures of a :func:`train_small_cnn` run.

    ``losses`` and ``accuracies`` are the mean cross-entropy and the accuracy over each epoch's training
    batches (measured while the weights change); ``validation_accuracies`` is the accuracy of the model at
    the end of each epoch on the ``validation`` set (empty without one); ``seconds`` the wall time of each
    epoch (training only).
    """

    losses: list[float] = field(default_factory=list)
    accuracies: list[float] = field(default_factory=list)
    validation_accuracies: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)


def to_input(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 in [0, 1]: how the trainer feeds images to the model,
    and what ``Preprocess(size=(H, W), mean=(0, 0, 0), std=(1, 1, 1))`` computes."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(255.0).contiguous()


@contextmanager
def _threads(count: int | None) -> Iterator[None]:
    """Compute with ``count`` intra-op threads inside, the caller's count again after (also on error)."""
    before = torch.get_num_threads()
    if count is not None and count != before:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def accuracy(model: Model | nn.Module, dataset: ShapesDataset, *, batch_size: int = 256) -> float:
    """The fraction of ``dataset`` that ``model`` (a trained ``SmallCNN`` or its ``Model``) classifies right."""
    module = model.module if isinstance(model, Model) else model
    inputs, targets = to_input(dataset.images), torch.as_tensor(dataset.labels, dtype=torch.long)
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            predicted = torch.cat(
                [module(inputs[i : i + batch_size]).argmax(1) for i in range(0, len(inputs), batch_size)]
            )
    finally:
        module.train(was_training)
    return float((predicted == targets).float().mean())


def train_small_cnn(
    dataset: ShapesDataset,
    *,
    epochs: int = 6,
    seed: int = 0,
    batch_size: int = 32,
    lr: float = 5e-3,
    width: int = 16,
    blocks: int = 3,
    batchnorm: bool = True,
    threads: int | None = 1,
    validation: ShapesDataset | None = None,
    on_epoch: Callable[[Model, int], None] | None = None,
) -> tuple[Model, TrainingHistory]:
    """Train a :class:`SmallCNN` on ``dataset`` (Adam, cross-entropy, shuffled mini-batches, the learning rate
    decaying from ``lr`` to 0 on a cosine over all steps) and return it as a :class:`cnnscope.Model` in eval
    mode, with its per-epoch :class:`TrainingHistory`.

    The model's labels are ``dataset.classes`` and its preprocessing ``Preprocess(size=(H, W), mean=(0, 0, 0),
    std=(1, 1, 1))``: pixels scaled to [0, 1], as the trainer fed them. ``seed`` drives the initialisation
    and the order of the batches; the same arguments give bit-identical weights (see the module's notes).

    Args:
        epochs: passes over the data; more fit better and take proportionally longer.
        batch_size: images per step; lr: Adam's starting learning rate.
        width, blocks, batchnorm: the ``SmallCNN`` architecture (channels of the first block, number of
            pooling blocks, batch norms or not).
        threads: torch intra-op threads used while training, the caller's setting restored afterwards.
            The default 1 makes the weights independent of the machine's core count and is the fastest on
            these small tensors; ``None`` keeps the caller's setting (then equal seeds give equal weights
            only at an equal thread count).
        validation: a held-out set scored after every epoch (``history.validation_accuracies``).
        on_epoch: called as ``on_epoch(model, epoch)`` with the ``Model`` in eval mode, once with ``epoch=0``
            before training and after each epoch with its number (1 to ``epochs``); it may explain the
            model but must not change its weights. It runs under the ``threads`` setting; training resumes
            in train mode afterwards.
    """
    if not isinstance(dataset, ShapesDataset):
        raise InputError(f"train_small_cnn needs a ShapesDataset (from make_shapes); got {type(dataset).__name__}")
    if validation is not None and not isinstance(validation, ShapesDataset):
        raise InputError(f"validation must be a ShapesDataset or None; got {type(validation).__name__}")
    if validation is not None and (
        validation.classes != dataset.classes or validation.images.shape[1:] != dataset.images.shape[1:]
    ):
        raise InputError(
            "validation must have the same classes and image size as dataset; make it with the same options"
        )
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if not _is_int(value) or value < 1:
            raise InputError(f"train_small_cnn {name} must be an integer >= 1; got {value!r}")
    if not _is_int(seed) or seed < 0:
        raise InputError(f"train_small_cnn seed must be an integer >= 0; got {seed!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < math.inf:
        raise InputError(f"train_small_cnn lr must be a number > 0; got {lr!r}")
    if threads is not None and (not _is_int(threads) or threads < 1):
        raise InputError(f"train_small_cnn threads must be an integer >= 1 or None; got {threads!r}")
    generator = torch.Generator().manual_seed(seed)
    module = SmallCNN(len(dataset.classes), width=width, blocks=blocks, batchnorm=batchnorm, generator=generator)
    height, width_px = dataset.images.shape[1:3]
    if height % 2**blocks or width_px % 2**blocks:
        raise InputError(
            f"train_small_cnn blocks={blocks} needs image sides that are multiples of {2**blocks}; "
            f"got {height}x{width_px} (change blocks or make_shapes' size)"
        )
    model = Model(
        module,
        labels=list(dataset.classes),
        preprocess=Preprocess(size=(int(height), int(width_px)), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)),
        name="SmallCNN",
    )
    inputs, targets = to_input(dataset.images), torch.as_tensor(dataset.labels, dtype=torch.long)
    optimizer = torch.optim.Adam(module.parameters(), lr=lr)
    history = TrainingHistory()
    step, total_steps = 0, epochs * math.ceil(len(targets) / batch_size)

    def report(epoch: int) -> None:
        if on_epoch is not None:
            module.eval()
            on_epoch(model, epoch)

    with _threads(threads):
        report(0)
        for epoch in range(1, epochs + 1):
            started = time.perf_counter()
            module.train()
            order = torch.randperm(len(targets), generator=generator)
            total, correct = 0.0, 0
            for start in range(0, len(order), batch_size):
                for group in optimizer.param_groups:  # cosine decay to 0 over all steps: a calm last epoch
                    group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total_steps))
                step += 1
                chosen = order[start : start + batch_size]
                logits = module(inputs[chosen])
                loss = F.cross_entropy(logits, targets[chosen])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * len(chosen)
                correct += int((logits.detach().argmax(1) == targets[chosen]).sum())
            history.seconds.append(time.perf_counter() - started)
            history.losses.append(total / len(targets))
            history.accuracies.append(correct / len(targets))
            if validation is not None:
                history.validation_accuracies.append(accuracy(module, validation))
            report(epoch)
    module.eval()
    return model, history
