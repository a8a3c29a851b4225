"""Incremental inference for occlusion: only the part of each layer that a patch changes is recomputed.

Nakandala et al. 2019, "Incremental and Approximate Inference for Faster Occlusion-based Deep CNN
Explanations" (Krypton), the exact part. An occluded input differs from the image only inside the window, so
the output of a *local* layer (a convolution, an eval-mode batch norm, an element-wise activation, a pooling
window) differs from the image's own only inside a box that grows by the layer's kernel and shrinks by its
stride. For the leading run of local layers of a model, the image's activations are computed once; then, for a
batch of window positions, each layer computes only its changed box: the image's activation is cropped around
the box with the kernel's halo (from a copy padded as the layer pads, so the borders are exact), the previous
layer's changed box is pasted in, and the layer runs without padding on the crops of every position at once.
Boxes have one size per layer (a position near a border has its box moved inwards), so the crops batch. Once a
box would cover more than :data:`FULL_FRACTION` of its layer's output, or a non-local module comes, the rest of
the network gets full tensors: the image's activation with each position's box pasted in.

It applies to a model whose module is an ``nn.Sequential`` (nested ones are followed), or whose forward
``torch.fx`` can trace (VGG, a ResNet's stem, most 3-D CNNs), starting with convolutions (any stride, dilation,
groups; zero padding, also ``"same"``), max and average pooling (no ``ceil_mode``), eval-mode batch norm with
running statistics, element-wise activations and dropout (eval);
the module types must be exactly these (a subclass may change ``forward``) and carry no hooks. Anything else
(a TorchScript module, another padding mode, a residual block first, a forward fx cannot trace, a traced model
with a hook on any module, whose hooks the traced graph would skip) gives ``None`` from :func:`plan_for`, and
the caller runs its plain batched forward: the same maps, to float rounding. A traced model runs the rest of its
graph, after the chain, with ``torch.fx.Interpreter`` (the same calls as its forward).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as module_globals

from ..models import Model

#: A layer whose changed box would cover more than this share of its output is run on full tensors instead
#: (from there on): cropping then saves little and the crops' copies cost more.
FULL_FRACTION = 0.5

#: The plan is used only when its crops skip at least this share of the model's multiply-adds (convolutions and
#: linear layers): below it (a ResNet's stem alone, 6% of resnet18's) the crops and pastes cost about what they save.
MIN_SAVED = 0.25

#: Modules that act on each element (or each channel's elements) alone, once in eval mode.
POINTWISE: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Softplus,
    nn.Softsign,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
CONVS = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
MAX_POOLS = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3}
AVG_POOLS = {nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3}
CONV_FUNCTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
MAX_POOL_FUNCTIONS = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
AVG_POOL_FUNCTIONS = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


@dataclass
class Window:
    """A sliding-window layer described per spatial axis: effective kernel (dilation included), stride, the
    padding before and after, and the value the padding holds (0, or -inf for max pooling). ``run`` applies the
    layer without padding to a batch of crops."""

    module: nn.Module
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    before: tuple[int, ...]
    after: tuple[int, ...]
    pad_value: float

    def run(self, crops: torch.Tensor) -> torch.Tensor:
        module, dims = self.module, crops.ndim - 2
        if type(module) in CONVS:
            return CONV_FUNCTIONS[dims](
                crops, module.weight, module.bias, module.stride, 0, module.dilation, module.groups
            )
        if type(module) in MAX_POOLS:
            return MAX_POOL_FUNCTIONS[dims](crops, module.kernel_size, module.stride, 0, module.dilation)
        kernel, stride = module.kernel_size, module.stride or module.kernel_size
        return AVG_POOL_FUNCTIONS[dims](crops, kernel, stride, 0, False, True, *_divisor(module, dims))

    def outputs(self, size: int, axis: int) -> int:
        """The output length along ``axis`` of an input of length ``size``."""
        return (size + self.before[axis] + self.after[axis] - self.kernel[axis]) // self.stride[axis] + 1


def _divisor(module: nn.Module, dims: int) -> tuple:
    """avg_pool1d takes no divisor_override; the 2-D and 3-D functions do."""
    return () if dims == 1 else (module.divisor_override,)


def _per_axis(value: int | tuple[int, ...], dims: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (int(value),) * dims


def window_of(module: nn.Module, dims: int) -> Window | None:
    """The :class:`Window` of a convolution or pooling module acting on ``dims`` spatial axes, or None when it
    is not one that crops reproduce exactly."""
    kind = type(module)
    if kind in CONVS:
        if CONVS[kind] != dims or module.padding_mode != "zeros":
            return None
        kernel = _per_axis(module.kernel_size, dims)
        dilation = _per_axis(module.dilation, dims)
        stride = _per_axis(module.stride, dims)
        effective = tuple(d * (k - 1) + 1 for k, d in zip(kernel, dilation, strict=True))
        if module.padding == "valid":
            before = after = (0,) * dims
        elif module.padding == "same":
            before = tuple((e - 1) // 2 for e in effective)
            after = tuple(e - 1 - b for e, b in zip(effective, before, strict=True))
        else:
            before = after = _per_axis(module.padding, dims)
        return Window(module, effective, stride, before, after, 0.0)
    if kind in MAX_POOLS:
        if MAX_POOLS[kind] != dims or module.ceil_mode or module.return_indices:
            return None
        kernel = _per_axis(module.kernel_size, dims)
        dilation = _per_axis(module.dilation, dims)
        effective = tuple(d * (k - 1) + 1 for k, d in zip(kernel, dilation, strict=True))
        padding = _per_axis(module.padding, dims)
        stride = _per_axis(module.stride or module.kernel_size, dims)
        return Window(module, effective, stride, padding, padding, -math.inf)
    if kind in AVG_POOLS:
        padding = _per_axis(module.padding, dims)
        # without count_include_pad the divisor shrinks at the borders: not what a zero-padded crop computes
        if AVG_POOLS[kind] != dims or module.ceil_mode or (any(padding) and not module.count_include_pad):
            return None
        kernel = _per_axis(module.kernel_size, dims)
        stride = _per_axis(module.stride or module.kernel_size, dims)
        return Window(module, kernel, stride, padding, padding, 0.0)
    return None


def is_pointwise(module: nn.Module) -> bool:
    """An element-wise module, or a batch norm that uses its running statistics (eval mode)."""
    kind = type(module)
    if kind in NORMS:
        return not module.training and module.running_mean is not None and module.running_var is not None
    if kind in POINTWISE:
        return "Dropout" not in kind.__name__ or not module.training  # dropout is the identity in eval mode only
    return False


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _is_plain_sequential(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def flatten(module: nn.Module) -> list[nn.Module] | None:
    """The modules a plain ``nn.Sequential`` runs, in order, nested plain Sequentials opened, or None when
    ``module`` is not one. Running the list in order is ``module(x)``; a container is opened only while it has no
    hooks (they would be skipped)."""
    if not _is_plain_sequential(module) or isinstance(module, torch.jit.ScriptModule) or _hooked(module):
        return None
    leaves: list[nn.Module] = []
    for child in module:
        inner = flatten(child) if _is_plain_sequential(child) else None
        leaves += inner if inner is not None else [child]
    return leaves


@dataclass
class Step:
    """One layer of the incremental run: a pointwise module (``window`` None) applied to the changed box, or a
    sliding-window layer with the box size of its output (``box``) and of its crops (``crop``)."""

    module: nn.Module
    window: Window | None
    box: tuple[int, ...]
    crop: tuple[int, ...] = ()
    size: tuple[int, ...] = ()  # the layer's output size (a window layer)


@dataclass
class Plan:
    """How one model runs a window of one size on inputs of one size: ``steps`` on boxes, then ``rest`` on full
    tensors. :meth:`prepare` computes one image's activations, which the crops are cut from."""

    model: Model
    steps: list[Step]
    rest: list[nn.Module]
    window: tuple[int, ...]
    #: for a traced model: the rest of its graph from the last step's output (``rest`` is then empty)
    finish: Callable[[torch.Tensor], Any] | None = None

    def prepare(self, image: torch.Tensor) -> Prepared:
        """The image's own activations: each window layer's input, padded as the layer pads it, and the output
        of the last incremental step, from which the full tensors of the rest are made."""
        padded: list[torch.Tensor | None] = []
        with torch.inference_mode():
            # two copies of the image (an in-place first module must not write into the caller's): a CPU runs a
            # one-row 3-D convolution on its slow reference path, two rows on oneDNN's (3x faster here)
            x = torch.cat([image, image])
            for step in self.steps:
                if step.window is None:
                    padded.append(None)
                    x = step.module(x)
                    continue
                pads = [
                    p
                    for b, a in zip(reversed(step.window.before), reversed(step.window.after), strict=True)
                    for p in (b, a)
                ]
                padded.append(F.pad(x, pads, value=step.window.pad_value) if any(pads) else x)
                x = step.window.run(padded[-1])
            return Prepared(self, [None if p is None else p[:1].clone() for p in padded], x[:1].clone())


@dataclass
class Prepared:
    """A plan with one image's activations: ``padded`` (each window layer's padded input; None for a pointwise
    step) and ``last`` (the last step's output)."""

    plan: Plan
    padded: list[torch.Tensor | None]
    last: torch.Tensor

    def outputs(self, fill: torch.Tensor, positions: list[tuple[int, ...]]) -> torch.Tensor:
        """The model's outputs (as ``Model.__call__`` returns them) for the image occluded by ``fill`` (the
        (1, C, *spatial) values the window holds) at each of ``positions`` (the window's first pixel per axis)."""
        plan = self.plan
        window = plan.window
        with torch.inference_mode():
            patch = torch.stack([fill[(0, slice(None), *_box(start, window))] for start in positions])
            starts = [tuple(start) for start in positions]
            for step, padded in zip(plan.steps, self.padded, strict=True):
                if step.window is None:
                    patch = step.module(patch)
                    continue
                patch, starts = _advance(step, padded, patch, starts)
            full = self.last.repeat(len(positions), *([1] * (self.last.ndim - 1)))
            for row, start in enumerate(starts):
                full[(row, slice(None), *_box(start, patch.shape[2:]))] = patch[row]
            for module in plan.rest:
                full = module(full)
            if plan.finish is not None:
                full = plan.finish(full)
        model = plan.model
        return full if isinstance(full, torch.Tensor) and model.output is None else model.select(full)


def _box(start: tuple[int, ...], size: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(s, s + n) for s, n in zip(start, size, strict=True))


def _advance(
    step: Step, padded: torch.Tensor, patch: torch.Tensor, starts: list[tuple[int, ...]]
) -> tuple[torch.Tensor, list[tuple[int, ...]]]:
    """One window layer on the changed boxes: (the new boxes' values, their starts in the layer's output)."""
    window, dims = step.window, len(step.box)
    size_in = patch.shape[2:]
    crops, new_starts = [], []
    for start in starts:
        box_start = []
        for axis in range(dims):
            # first output reached by an input in [start, start + size_in): ceil((start + before - kernel + 1) / s)
            first = -(-(start[axis] + window.before[axis] - window.kernel[axis] + 1) // window.stride[axis])
            box_start.append(min(max(first, 0), step.size[axis] - step.box[axis]))
        origin = tuple(o * s for o, s in zip(box_start, window.stride, strict=True))  # in padded coordinates
        crops.append(padded[(0, slice(None), *_box(origin, step.crop))])
        new_starts.append(tuple(box_start))
    crops_tensor = torch.stack(crops)
    for row, (start, box_start) in enumerate(zip(starts, new_starts, strict=True)):
        target, source = [], []
        for axis in range(dims):
            offset = start[axis] + window.before[axis] - box_start[axis] * window.stride[axis]
            low, high = max(offset, 0), min(offset + size_in[axis], step.crop[axis])
            if low >= high:
                break
            target.append(slice(low, high))
            source.append(slice(low - offset, high - offset))
        else:
            crops_tensor[(row, slice(None), *target)] = patch[(row, slice(None), *source)]
    return window.run(crops_tensor), new_starts


def plan_for(model: Model, spatial: tuple[int, ...], window: tuple[int, ...]) -> Plan | None:
    """The incremental plan of ``model`` for a ``window`` sliding over inputs of size ``spatial``, or None when
    the model has no leading chain of local layers that it would speed up (see the module docstring)."""
    module = model.module
    if type(model).__call__ is not Model.__call__:  # a model whose forward is not its module's
        return None
    if isinstance(module, torch.jit.ScriptModule) or module_globals._global_forward_hooks:
        return None
    if module_globals._global_forward_pre_hooks:
        return None
    leaves = flatten(module)
    traced = None
    if leaves is None:
        traced = _traced_chain(module)
        if traced is None:
            return None
        leaves = traced[0]
    dims = len(spatial)
    steps: list[Step] = []
    size, box = tuple(spatial), tuple(window)
    for leaf in leaves:
        if _hooked(leaf) or isinstance(leaf, torch.jit.ScriptModule):
            break
        if is_pointwise(leaf):
            steps.append(Step(leaf, None, box))
            continue
        layer = window_of(leaf, dims)
        if layer is None:
            break
        out = tuple(layer.outputs(n, axis) for axis, n in enumerate(size))
        if min(out) < 1:
            return None
        new_box = tuple(
            min(o, (b + k - 2) // s + 1) for o, b, k, s in zip(out, box, layer.kernel, layer.stride, strict=True)
        )
        if math.prod(new_box) > FULL_FRACTION * math.prod(out):
            break
        crop = tuple((m - 1) * s + k for m, s, k in zip(new_box, layer.stride, layer.kernel, strict=True))
        steps.append(Step(leaf, layer, new_box, crop, out))
        size, box = out, new_box
    if not any(step.window is not None for step in steps) or saved_share(model, steps, spatial) < MIN_SAVED:
        return None
    if traced is None:
        return Plan(model, steps, leaves[len(steps) :], tuple(window))
    _, nodes, graph_module = traced
    return Plan(model, steps, [], tuple(window), _graph_from(graph_module, nodes[: len(steps)]))


def _macs(module: nn.Module, outputs: int) -> int:
    """Multiply-adds of a convolution or linear layer giving ``outputs`` values (0 for other modules)."""
    if type(module) in CONVS:
        return outputs * (module.in_channels // module.groups) * math.prod(_per_axis(module.kernel_size, 1))
    if isinstance(module, nn.Linear):
        return outputs * module.in_features
    return 0


def saved_share(model: Model, steps: list[Step], spatial: tuple[int, ...]) -> float:
    """The share of one forward pass's multiply-adds (convolutions and linear layers, from the model's traced
    calls, scaled to inputs of size ``spatial``) that the steps' crops do not compute."""
    try:
        calls = model.calls()
    except Exception:  # a model whose calls cannot be listed: assume the plan pays
        return 1.0
    traced_size = tuple(model.preprocess.size)  # the calls' shapes are for an input of the preprocessing's size
    total = 0.0
    for call in calls:
        if not call.output_shape or not call.tensor_output:
            continue
        try:
            module = model.module.get_submodule(call.name) if call.name else model.module
        except AttributeError:
            continue
        total += _macs(module, math.prod(call.output_shape[1:]))
    if len(traced_size) == len(spatial):
        total *= math.prod(spatial) / max(1, math.prod(traced_size))
    saved = 0.0
    for step in steps:
        if step.window is not None and type(step.module) in CONVS:
            per_output = _macs(step.module, step.module.out_channels)
            saved += per_output * (math.prod(step.size) - math.prod(step.box))
    return saved / total if total > 0 else 1.0


def _traced_chain(module: nn.Module) -> tuple[list[nn.Module], list[torch.fx.Node], torch.fx.GraphModule] | None:
    """The modules that a traceable forward calls first, one after the other on the input alone (each output used
    by the next call only), their graph nodes and the traced graph; None when fx cannot trace the forward, when
    any module has a hook (the traced graph does not run the hooks of the modules it traces through), or when
    the input goes anywhere else first."""
    if any(_hooked(sub) for sub in module.modules()):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph_module = torch.fx.symbolic_trace(module)
    except Exception:  # a forward fx cannot follow (data-dependent control flow, ...): the plain path
        return None
    inputs = [node for node in graph_module.graph.nodes if node.op == "placeholder"]
    if len(inputs) != 1:
        return None
    leaves: list[nn.Module] = []
    nodes: list[torch.fx.Node] = []
    current = inputs[0]
    while len(current.users) == 1:
        (user,) = current.users
        if user.op != "call_module" or tuple(user.args) != (current,) or user.kwargs:
            break
        leaves.append(graph_module.get_submodule(str(user.target)))
        nodes.append(user)
        current = user
    return leaves, nodes, graph_module


def _graph_from(graph_module: torch.fx.GraphModule, chain: list[torch.fx.Node]) -> Callable[[torch.Tensor], Any]:
    """The traced forward from the output of ``chain``'s last node: an fx Interpreter whose environment already
    holds the chain's nodes (used by nothing after the chain but the last, which holds the full tensors)."""

    def finish(full: torch.Tensor) -> Any:
        env: dict[torch.fx.Node, Any] = {node: None for node in chain[:-1]}
        env[chain[-1]] = full
        return torch.fx.Interpreter(graph_module).run(full, initial_env=env)

    return finish
