"""A working copy of a model with each BatchNorm folded into the convolution that feeds it.

In eval mode a BatchNorm is an affine map per channel, y = (x - mean) * gamma / sqrt(var + eps) + beta,
so a convolution followed by one equals a single convolution with scaled weights and a shifted bias.
Activation maximization and Deep Dream run the model forward and backward hundreds of times on a copy
folded so: on the default model (2 cores, measured by hand, interleaved) one forward + backward to the
input took 24 -> 19 ms alone and 20 -> 13 ms per image in passes of 5; maximize's steps ran 1.31-1.39x
faster for 8 classes in one batch and 1.15-1.33x one class at a time, Deep Dream 1.47x.

The user's model is never changed: the folds are made on a deep copy, and the copy is used only when
its logits and the output of every folded BatchNorm equal the original's on a probe input. A pair is
left alone when the convolution's own output is read (``keep``), when either module runs more than
once per forward, or when the BatchNorm has no running statistics (it then normalizes each batch).
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterable

import torch
from torch import nn

from ..hooks import LayerRef
from .model import Model


def fold_batchnorm(model: Model, keep: Iterable[LayerRef] = ()) -> tuple[Model, int]:
    """(a copy of ``model`` with its BatchNorms folded, how many were folded), or ``(model, 0)`` when
    nothing can be folded or the folded copy would not compute the same thing.

    ``keep``: layers whose own outputs the caller reads; a convolution among them keeps its output.
    Call it with the model in the mode it will run in (eval: the running statistics are folded)."""
    module = model.module
    if isinstance(module, torch.jit.ScriptModule) or not any(
        isinstance(layer, nn.BatchNorm2d) and layer.running_mean is not None for layer in module.modules()
    ):
        return model, 0
    kept = {ref.name for ref in keep}
    probe = torch.rand(1, model.preprocess.channels, *model.preprocess.size, generator=torch.Generator().manual_seed(0))
    probe = model.preprocess.normalize(probe).to(model.device)
    try:
        pairs, expected, logits = _foldable_pairs(module, probe, kept)
    except Exception:  # a model that cannot run this probe (another dtype, a fixed input): run it as it is
        return model, 0
    if not pairs:
        return model, 0
    try:
        folded = copy.deepcopy(module)
    except Exception:  # a module that cannot be copied: run the original
        return model, 0
    names = dict(folded.named_modules())
    for conv_name, norm_name in pairs:
        _fold(names[conv_name], names[norm_name])
        parent, _, attribute = norm_name.rpartition(".")
        setattr(names[parent] if parent else folded, attribute, nn.Identity())
    if not _same_outputs(folded, probe, [norm for _, norm in pairs], expected, logits):
        return model, 0
    working = Model(
        folded,
        labels=model.labels,
        preprocess=model.preprocess,
        multilabel=model.multilabel,
        name=model.name,
        outputs=model.outputs,
    )
    return working, len(pairs)


def _foldable_pairs(module: nn.Module, probe: torch.Tensor, kept: set[str]):
    """[(conv name, batchnorm name)] fed directly one into the other, each called once; the outputs of
    those batchnorms and the logits on ``probe``."""
    calls: list[tuple[str, nn.Module, torch.Tensor, torch.Tensor]] = []
    counts: dict[str, int] = {}

    def record(name):
        def hook(layer, inputs, output):
            counts[name] = counts.get(name, 0) + 1
            calls.append((name, layer, inputs[0] if inputs else None, output))

        return hook

    watched = [(n, m) for n, m in module.named_modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
    handles = [m.register_forward_hook(record(n)) for n, m in watched]
    try:
        with torch.no_grad():
            logits = module(probe)
    finally:
        for handle in handles:
            handle.remove()
    pairs, outputs = [], {}
    for (conv_name, conv, _, conv_out), (norm_name, norm, norm_in, norm_out) in itertools.pairwise(calls):
        if (
            isinstance(conv, nn.Conv2d)
            and isinstance(norm, nn.BatchNorm2d)
            and norm_in is conv_out
            and conv_name not in kept
            and counts[conv_name] == counts[norm_name] == 1
            and norm.running_mean is not None
            and not norm.training
            and norm.num_features == conv.out_channels
        ):
            pairs.append((conv_name, norm_name))
            outputs[norm_name] = norm_out
    return pairs, outputs, logits


def _fold(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> None:
    """conv <- norm(conv(.)), in place on the copy."""
    with torch.no_grad():
        scale = torch.rsqrt(norm.running_var.double() + norm.eps)
        if norm.weight is not None:
            scale = scale * norm.weight.double()
        shift = -norm.running_mean.double() * scale
        if norm.bias is not None:
            shift = shift + norm.bias.double()
        bias = conv.bias.double() * scale + shift if conv.bias is not None else shift
        weight = conv.weight.double() * scale.view(-1, *([1] * (conv.weight.ndim - 1)))
        conv.weight = nn.Parameter(weight.to(conv.weight.dtype), requires_grad=False)
        conv.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=False)


def _same_outputs(folded: nn.Module, probe, norms: list[str], expected: dict, logits: torch.Tensor) -> bool:
    """Whether the folded copy gives the original's logits and batchnorm outputs on ``probe``."""
    seen: dict[str, torch.Tensor] = {}
    names = dict(folded.named_modules())
    handles = [
        names[name].register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o)) for name in norms
    ]
    try:
        with torch.no_grad():
            out = folded(probe)
    except Exception:
        return False
    finally:
        for handle in handles:
            handle.remove()
    pairs = [(out, logits)] + [(seen.get(name), expected[name]) for name in norms]
    for got, want in pairs:
        if got is None or got.shape != want.shape:
            return False
        if float((got - want).abs().max()) > 1e-4 * (1.0 + float(want.abs().max())):
            return False
    return True
