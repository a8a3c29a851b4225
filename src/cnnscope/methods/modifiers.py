"""Backprop modifiers (keras-vis's ``backprop_modifier``): change how gradients pass through
activation functions, only inside a ``with`` block, without touching the model's modules.

- ``guided`` (Springenberg et al. 2015, guided backpropagation): at every activation y = f(x) the
  gradient passed down is f'(x) * max(0, dL/dy): only positive gradients, only where the unit was
  active (for ReLU, x > 0). For smooth activations (SiLU/Swish, GELU, ...) f'(x) is their derivative.
- ``rectified`` (Zeiler & Fergus 2014, the deconvnet): max(0, dL/dy), ignoring the forward input.

A ``torch.overrides.TorchFunctionMode`` sees every call of the activation functions, whether it comes
from an ``nn.ReLU`` / ``nn.ReLU6`` / ``nn.SiLU`` / ``nn.GELU`` module (in-place or not) or from a
functional ``F.relu`` / ``torch.relu`` / ``x.relu()`` inside a ``forward``. Each call is computed as
usual in the forward pass (out of place) and given the modified backward. Activations that cannot be
seen this way (a custom ``autograd.Function``, ``x * (x > 0)``) are reported in a warning rather
than silently keeping their plain gradient.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import CnnscopeWarning, MethodError

MODIFIERS = ("guided", "rectified")


def _arg(args: tuple, kwargs: dict, index: int, name: str, default):
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


# Each entry: function -> builder(args, kwargs) -> (out-of-place f(x), derivative or None for autograd), the
# derivative taking (x, scale=1.0) and giving scale * f'(x). The clamps' derivatives are their own backward
# kernels applied to a constant: one pass over x.
def _constant(x: torch.Tensor, value: float) -> torch.Tensor:
    return torch.full((), value, dtype=x.dtype, device=x.device).expand_as(x)


def _relu(args, kwargs):
    return torch.relu, lambda x, scale=1.0: torch.ops.aten.threshold_backward(_constant(x, scale), x, 0)


def _clamp_slope(low: float, high: float):
    return lambda x, scale=1.0: torch.ops.aten.hardtanh_backward(_constant(x, scale), x, low, high)


def _hardtanh(args, kwargs):
    low = float(_arg(args, kwargs, 1, "min_val", -1.0))
    high = float(_arg(args, kwargs, 2, "max_val", 1.0))
    return (lambda x: F.hardtanh(x, low, high)), _clamp_slope(low, high)


def _relu6(args, kwargs):
    return (lambda x: F.hardtanh(x, 0.0, 6.0)), _clamp_slope(0.0, 6.0)


def _leaky(args, kwargs):
    slope = float(_arg(args, kwargs, 1, "negative_slope", 0.01))
    return (lambda x: F.leaky_relu(x, slope)), (
        lambda x, scale=1.0: torch.where(x > 0, _constant(x, scale), _constant(x, slope * scale))
    )


def _smooth(function: Callable) -> Callable:
    def build(args, kwargs):
        extra = {k: v for k, v in kwargs.items() if k not in ("input", "inplace")}
        if function is F.gelu and len(args) > 1:
            extra["approximate"] = args[1]
        if function is F.elu and len(args) > 1:
            extra["alpha"] = args[1]
        return (lambda x: function(x, **extra)), None

    return build


ACTIVATIONS: dict[Callable, Callable] = {
    F.relu: _relu,
    torch.relu: _relu,
    torch.relu_: _relu,
    F.relu_: _relu,
    torch.Tensor.relu: _relu,
    torch.Tensor.relu_: _relu,
    F.relu6: _relu6,
    F.hardtanh: _hardtanh,
    F.hardtanh_: _hardtanh,
    F.leaky_relu: _leaky,
    F.leaky_relu_: _leaky,
    F.silu: _smooth(F.silu),
    F.gelu: _smooth(F.gelu),
    F.hardswish: _smooth(F.hardswish),
    F.elu: _smooth(F.elu),
    F.mish: _smooth(F.mish),
}

#: The builders above whose pieces have slopes 0 and 1: where x and x' differ at all, the secant
#: (f(x) - f(x')) / (x - x') is exactly a piece's slope, or a value between them where a kink lies between x
#: and x' (Captum takes f'(x) there when |x - x'| < 1e-10). A leaky ReLU's rounded slope * x is not exact:
#: it keeps the eps rule.
PIECEWISE_LINEAR = {_relu, _relu6, _hardtanh}
#: The builders whose output has no negative value, and the clamps (no negative value from a min_val >= 0)
NONNEGATIVE = {_relu, _relu6}
CLAMPS = {_hardtanh}

#: Activation calls left on their plain gradient (gates and saturating functions have no positive/negative
#: rule in the papers); they are named in a warning, so nobody mistakes the result for a fully guided one.
UNMODIFIED: dict[Callable, str] = {
    torch.sigmoid: "sigmoid",
    F.sigmoid: "sigmoid",
    torch.Tensor.sigmoid: "sigmoid",
    torch.Tensor.sigmoid_: "sigmoid",
    F.hardsigmoid: "hardsigmoid",
    torch.tanh: "tanh",
    F.tanh: "tanh",
    torch.Tensor.tanh: "tanh",
    F.prelu: "prelu",
    F.selu: "selu",
    torch.selu: "selu",
    F.celu: "celu",
    torch.celu: "celu",
    F.softplus: "softplus",
    F.logsigmoid: "logsigmoid",
    F.rrelu: "rrelu",
}

#: Module classes that are activations: if one runs and no call above is seen inside it, we say so.
ACTIVATION_NAME = re.compile(r"(relu|swish|silu|gelu|mish|elu|hardtanh)", re.IGNORECASE)


class _ModifiedActivation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, function, derivative, rule):
        ctx.save_for_backward(x)
        ctx.function, ctx.derivative, ctx.rule = function, derivative, rule
        return function(x)

    @staticmethod
    def backward(ctx, grad_output):
        (x,) = ctx.saved_tensors
        positive = grad_output.clamp_min(0)
        if ctx.rule == "rectified":
            return positive, None, None, None
        if ctx.derivative is not None:
            return positive * ctx.derivative(x), None, None, None
        with torch.enable_grad():
            leaf = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(ctx.function(leaf), leaf, grad_outputs=positive)
        return grad, None, None, None


class BackpropModifier(TorchFunctionMode):
    """The mode itself; use :func:`modified_backprop`."""

    def __init__(self, rule: str) -> None:
        super().__init__()
        self.rule = rule
        self.seen = 0
        self.unmodified: dict[str, int] = {}
        #: where each unmodified call ran: the innermost module running at the time (its dotted name)
        self.unmodified_in: dict[str, list[str]] = {}
        self.running: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        builder = ACTIVATIONS.get(func)
        tracked = bool(args) and isinstance(args[0], torch.Tensor) and args[0].requires_grad
        if builder is None or not tracked:
            if tracked and func in UNMODIFIED:
                kind = UNMODIFIED[func]
                self.unmodified[kind] = self.unmodified.get(kind, 0) + 1
                where = self.unmodified_in.setdefault(kind, [])
                if self.running and self.running[-1] not in where:
                    where.append(self.running[-1])
            return func(*args, **kwargs)
        function, derivative = builder(args, kwargs)
        self.seen += 1
        return _ModifiedActivation.apply(args[0], function, derivative, self.rule)


@contextmanager
def modified_backprop(model: nn.Module, rule: str) -> Iterator[BackpropModifier]:
    """Inside the block, activations called by ``model`` (and any other code) backpropagate by ``rule``.

    Warns (``CnnscopeWarning``) about activation modules that ran without a call the mode could
    modify, and when no activation was modified at all (the result would be the plain gradient)."""
    if rule not in MODIFIERS:
        raise MethodError(f"unknown backprop modifier {rule!r}; choose one of {', '.join(MODIFIERS)}")
    mode = BackpropModifier(rule)
    missed: dict[str, str] = {}
    handles = []
    starts: dict[int, int] = {}

    def before(module, args):
        starts[id(module)] = mode.seen

    def after(module, args, output):
        if mode.seen == starts.get(id(module), mode.seen) and isinstance(output, torch.Tensor) and output.requires_grad:
            missed.setdefault(type(module).__name__, names.get(id(module), "?"))

    def enter(module, args):
        mode.running.append(names[id(module)])

    def leave(module, args, output):
        if mode.running and mode.running[-1] == names[id(module)]:
            mode.running.pop()

    names = {id(m): n for n, m in model.named_modules() if n}
    try:
        for name, module in model.named_modules():
            if name and not list(module.children()) and ACTIVATION_NAME.search(type(module).__name__):
                handles.append(module.register_forward_pre_hook(before))
                handles.append(module.register_forward_hook(after))
            if name:  # the running module, to name where a gate (an SE sigmoid) keeps its plain gradient
                handles.append(module.register_forward_pre_hook(enter))
                handles.append(module.register_forward_hook(leave, always_call=True))
        with mode:
            yield mode
    finally:
        for handle in handles:
            handle.remove()
    if missed:
        listed = ", ".join(f"{kind} ('{where}')" for kind, where in missed.items())
        warnings.warn(
            f"{rule} backprop could not modify these activation modules, which keep their plain gradient: {listed} "
            "(a custom autograd.Function or arithmetic, not a torch activation call)",
            CnnscopeWarning,
            stacklevel=3,
        )
    if mode.unmodified:
        listed = ", ".join(f"{name} ({count} call{'s' * (count > 1)})" for name, count in mode.unmodified.items())
        places = [(where, name) for name, wheres in mode.unmodified_in.items() for where in wheres]
        warnings.warn(
            f"{rule} backprop leaves these activation calls on their plain gradient: {listed} "
            f"(gates such as squeeze-excitation sigmoids have no guided rule in the papers){_places(places)}",
            CnnscopeWarning,
            stacklevel=3,
        )
    if mode.seen == 0:
        warnings.warn(
            f"{rule} backprop found no activation call to modify; the result equals the plain gradient",
            CnnscopeWarning,
            stacklevel=3,
        )


def _places(places: list[tuple[str, str]], shown: int = 3) -> str:
    """The modules the calls ran in: "; in 'a' (sigmoid), 'b' (sigmoid), 'c' (sigmoid) and 5 more modules"."""
    if not places:
        return ""
    quoted = ", ".join(f"'{where}' ({name})" for where, name in places[:shown])
    rest = len(places) - shown
    return f"; in {quoted}" + (f" and {rest} more module{'s' * (rest > 1)}" if rest > 0 else "")
