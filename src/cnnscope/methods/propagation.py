"""Propagation methods: LRP, DeepLIFT and excitation backprop, carried by one TorchFunctionMode.

Each method changes what flows backward through some calls of the forward pass, and nothing else: the
forward pass computes what the model computes, the model's modules are never replaced, hooked only for
names (``rules=``) and only inside the call. Like the backprop modifiers (:mod:`.modifiers`) the mode sees
every call, whether from a module or a functional call, in place or not, and a module called twice is two
calls. It follows which tensors derive from the input (parameters, buffers and constants do not), so that:

- a convolution / linear call on such a tensor gets the layer's rule (its weights are the call's own);
- a BatchNorm call whose input is the output of such a call is merged into it (LRP; the arithmetic of
  :mod:`cnnscope.models.folding`, done on the fly on the call's weights, without copying the model);
- ``a + b`` of two input-derived tensors (a residual add) splits the relevance in proportion to a and b, and a
  concatenation passes each part its share, without rewriting the model;
- average pooling and means use the z-rule (Zennit's ``Norm``); max pooling, reshapes and indexing pass the
  relevance on as the gradient does (conserving);
- activations pass the relevance through (LRP), keep the gradient (excitation backprop, as TorchRay) or
  take the rescale multipliers (DeepLIFT);
- ``gate * signal`` products (squeeze-excitation, a sigmoid gate) give all relevance to the signal.

Calls the rules do not cover (layer norm, attention matmuls, a softmax for DeepLIFT) keep their plain gradient and are
named in a warning, so the map is never silently something else.

The backward pass carries relevance itself (LRP, excitation backprop), as Zennit and TorchRay do, or
DeepLIFT's multipliers, as Captum does.
"""

from __future__ import annotations

import dataclasses
import gc
import warnings
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import CnnscopeWarning, MethodError
from ..options import Options, anything, choice, flag, number
from ..progress import check_cancelled
from .base import Computed, register_method
from .gradient import REDUCE, SEED, GradientMethod, gaussian_blur
from .modifiers import ACTIVATIONS, CLAMPS, NONNEGATIVE, PIECEWISE_LINEAR, UNMODIFIED

Tensor = torch.Tensor

CONVOLUTIONS = {torch.conv1d, torch.conv2d, torch.conv3d, torch.conv_transpose1d, torch.conv_transpose2d}
CONVOLUTIONS |= {torch.conv_transpose3d}
DENSE = {F.linear}
AVERAGES = {F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d}
AVERAGES |= {F.adaptive_avg_pool3d, torch.mean, Tensor.mean}
SUMS = {torch.add, Tensor.add, Tensor.add_, Tensor.__add__, Tensor.__radd__, Tensor.__iadd__}
DIFFERENCES = {torch.sub, Tensor.sub, Tensor.sub_, Tensor.__sub__, Tensor.__isub__, Tensor.__rsub__}
PRODUCTS = {torch.mul, Tensor.mul, Tensor.mul_, Tensor.__mul__, Tensor.__rmul__, Tensor.__imul__}
QUOTIENTS = {torch.div, Tensor.div, Tensor.div_, Tensor.__truediv__, Tensor.__itruediv__}
MAXPOOLS = {F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d}
MAXPOOLS |= {F.adaptive_max_pool3d}
BATCHNORM = {F.batch_norm}
GATES = {torch.sigmoid, F.sigmoid, Tensor.sigmoid, Tensor.sigmoid_, F.hardsigmoid, torch.tanh, F.tanh, Tensor.tanh}
GATES |= {F.softmax, torch.softmax, Tensor.softmax}
SOFTMAXES = {F.softmax, torch.softmax, Tensor.softmax, F.log_softmax, torch.log_softmax, Tensor.log_softmax}
#: Out-of-place versions of in-place unary calls the rules replace.
OUT_OF_PLACE = {Tensor.sigmoid_: torch.sigmoid, Tensor.tanh_: torch.tanh}
#: Calls that mix input-derived values nonlinearly and that no rule here covers: they keep their gradient and
#: are named in a warning.
UNCOVERED = {
    F.softmax: "softmax",
    torch.softmax: "softmax",
    Tensor.softmax: "softmax",
    F.log_softmax: "log_softmax",
    F.layer_norm: "layer_norm",
    F.group_norm: "group_norm",
    F.instance_norm: "instance_norm",
    torch.matmul: "matmul",
    Tensor.matmul: "matmul",
    Tensor.__matmul__: "matmul",
    torch.bmm: "bmm",
    torch.einsum: "einsum",
    F.scaled_dot_product_attention: "scaled_dot_product_attention",
    torch.exp: "exp",
    Tensor.exp: "exp",
    torch.pow: "pow",
    Tensor.pow: "pow",
    Tensor.__pow__: "pow",
    torch.sqrt: "sqrt",
    torch.rsqrt: "rsqrt",
    F.normalize: "normalize",
}

#: Rules a weighted layer (convolution or linear) can take, by name (Zennit's definitions).
RULES = ("epsilon", "zero", "zplus", "alpha1-beta0", "alpha2-beta1", "gamma", "flat", "wsquare", "zbox", "pass")

#: Composites: (rule of the first weighted layer, of later convolutions, of later linear layers), as Zennit's
#: composites of the same names (``epsilon`` uses the epsilon rule everywhere, as Captum's LRP default).
COMPOSITES = {
    "epsilon-plus-flat": ("flat", "zplus", "epsilon"),
    "epsilon-plus": ("zplus", "zplus", "epsilon"),
    "epsilon-gamma-box": ("zbox", "gamma", "epsilon"),
    "epsilon-alpha2-beta1-flat": ("flat", "alpha2-beta1", "epsilon"),
    "epsilon-alpha2-beta1": ("alpha2-beta1", "alpha2-beta1", "epsilon"),
    "epsilon": ("epsilon", "epsilon", "epsilon"),
}


def stabilize(z: Tensor, epsilon: float) -> Tensor:
    """z + epsilon * sign(z), with sign(+0) = +1 (Zennit's stabilizer), in z's dtype: one new tensor. (A -0 takes
    -epsilon; every rule gives a unit whose value is 0 no relevance, so what it is divided by does not matter.)"""
    return torch.copysign(z.new_tensor(epsilon), z).add_(z)


def _inverse(z: Tensor, epsilon: float) -> Tensor:
    """1 / stabilize(z, epsilon)."""
    return stabilize(z, epsilon).reciprocal_()


#: Calls whose bias is one value per output channel, the first axis of their weight.
OUT_FIRST = {torch.conv1d, torch.conv2d, torch.conv3d, F.linear}


def _shifted(call, x: Tensor, weight: Tensor, bias: Tensor | None, shift: float) -> Tensor:
    """z(x; weight, bias) + shift, the shift added as part of the bias (no pass of its own) where it can be."""
    if call.func in OUT_FIRST:
        bias = weight.new_full((weight.shape[0],), shift) if bias is None else bias + shift
        return call.apply(x, weight, bias)
    return call.apply(x, weight, bias).add_(shift)


def _tensors(obj, found: list) -> list:
    """The tensors in a call's arguments or result (in lists, tuples and dicts, at any depth), in order."""
    if isinstance(obj, Tensor):
        found.append(obj)
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            _tensors(item, found)
    elif isinstance(obj, dict):
        for item in obj.values():
            _tensors(item, found)
    return found


_IN_PLACE: dict = {}


def _in_place(func) -> bool:
    """Whether ``func`` writes into its first argument (``add_``, ``__iadd__``, ``__setitem__``)."""
    known = _IN_PLACE.get(func)
    if known is None:
        name = getattr(func, "__name__", "")
        known = _IN_PLACE[func] = (
            name == "__setitem__"
            or (name.startswith("__i") and name.endswith("__"))
            or (name.endswith("_") and not name.endswith("__"))
        )
    return known


def _vjp(fn: Callable, inputs: list[Tensor], seed: Tensor) -> tuple[Tensor, ...]:
    """The gradients of fn(*inputs) w.r.t. ``inputs`` contracted with ``seed``, and fn's output."""
    with torch.enable_grad():
        leaves = [x.detach().requires_grad_(True) for x in inputs]
        out = fn(*leaves)
        grads = torch.autograd.grad(out, leaves, seed, allow_unused=True)
    return tuple(torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads, strict=True))


class _Scaled(torch.autograd.Function):
    """Forward: ``out`` (worked out already from x); backward: the gradient times ``multiplier``."""

    @staticmethod
    def forward(ctx, x, made, multiplier):
        ctx.multiplier = multiplier
        return made[0]  # handed in inside a tuple, so not an input returned as it is (a view a model could not
        # write into in place)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.multiplier, None, None


class _Pass(torch.autograd.Function):
    """Forward: ``compute(x)`` (out of place, the shape of x); backward: what flows back, unchanged. Saves
    nothing: the relevance of an activation, a BatchNorm merged into the layer before it or an output softmax."""

    @staticmethod
    def forward(ctx, compute, x):
        with torch.no_grad():
            return compute(x)

    @staticmethod
    def backward(ctx, grad):
        return None, grad


class _Rule(torch.autograd.Function):
    """Forward: ``compute(*inputs)`` as usual (out of place); backward: ``backward(saved, grad)``."""

    @staticmethod
    def forward(ctx, compute, backward, *inputs):
        ctx.backward = backward
        with torch.no_grad():
            out = compute(*inputs)
        ctx.save_for_backward(*inputs, out if getattr(backward, "uses_output", True) else None)
        return out

    @staticmethod
    def backward(ctx, grad):
        *inputs, out = ctx.saved_tensors
        grads = ctx.backward(inputs, out, grad)
        return (None, None, *grads)


@dataclasses.dataclass
class WeightedCall:
    """A convolution or linear call: its function, weights, other arguments and the rule it takes. A
    BatchNorm that reads its output is merged into ``weight`` / ``bias`` before the backward pass runs."""

    func: Callable
    weight: Tensor
    bias: Tensor | None
    rest: tuple
    kwargs: dict
    rule: str
    index: int
    last: bool = False
    #: whether the call's input is known to have no negative value (then no pass over it is needed to find out)
    nonneg: bool = False
    #: z of the rules that divide by the layer's own output (epsilon, zero, gamma, z-box): the call's output from
    #: the forward pass, or the merged BatchNorm's output, so that the backward pass need not compute it again
    output: Tensor | None = None

    cache: dict = dataclasses.field(default_factory=dict)

    def apply(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return self.func(x, weight, bias, *self.rest, **self.kwargs)

    def input_grad(self, x: Tensor, weight: Tensor, seed: Tensor) -> Tensor:
        """d <seed, f(x; weight)> / d x without running f again where the call is a plain convolution or a
        linear layer (their input gradient does not depend on x)."""
        if self.func is F.linear:
            return seed @ weight
        convs = {torch.conv1d: torch.nn.grad.conv1d_input, torch.conv2d: torch.nn.grad.conv2d_input}
        convs[torch.conv3d] = torch.nn.grad.conv3d_input
        if self.func in convs:
            names = ("stride", "padding", "dilation", "groups")
            defaults = (1, 0, 1, 1)
            values = [
                self.rest[i] if i < len(self.rest) else self.kwargs.get(n, d)
                for i, (n, d) in enumerate(zip(names, defaults, strict=True))
            ]
            if not isinstance(values[1], str):
                dims = x.ndim - 2
                stride, padding, dilation = (
                    (v,) * dims if isinstance(v, int) else tuple(v) for v in values[:3]
                )  # the backward of the convolution itself, given x (not an expanded stand-in, which makes
                # CPU depthwise convolutions take a slower path)
                with torch.no_grad():
                    return torch.ops.aten.convolution_backward(
                        seed,
                        x,
                        weight,
                        None,
                        stride,
                        padding,
                        dilation,
                        False,
                        [0] * dims,
                        values[3],
                        (True, False, False),
                    )[0]
        return _vjp(lambda t: self.apply(t, weight, None), [x], seed)[0]

    def merge(self, mean, var, gamma, beta, eps) -> None:
        """w <- w * s, b <- (b - mean) * s + beta with s = gamma / sqrt(var + eps), per output channel (in the
        weights' dtype: one pass over them)."""
        scale = torch.rsqrt(var + eps)
        if gamma is not None:
            scale = scale * gamma
        shift = -mean * scale
        if beta is not None:
            shift = shift + beta
        view = (-1, *([1] * (self.weight.ndim - 1)))  # (out, in / groups, ...): one scale per output channel
        self.bias = self.bias * scale + shift if self.bias is not None else shift
        self.weight = self.weight * scale.view(view)


class PropagationMode(TorchFunctionMode):
    """The rules of ``kind`` ("lrp", "excitation", "deeplift"); use :func:`propagating`."""

    def __init__(
        self,
        kind: str,
        *,
        composite: str = "epsilon-plus-flat",
        rules: dict[str, str] | None = None,
        epsilon: float = 1e-6,
        stabilizer: float = 1e-6,
        gamma: float = 0.25,
        bounds: tuple[Tensor, Tensor] | None = None,
        contrastive: bool = False,
        eps: float = 1e-10,
    ) -> None:
        super().__init__()
        self.kind = kind
        self.first_rule, self.conv_rule, self.dense_rule = COMPOSITES[composite]
        self.rules = dict(rules or {})
        self.epsilon, self.stabilizer, self.gamma = epsilon, stabilizer, gamma
        self.bounds = bounds
        self.contrastive = contrastive
        self.eps = eps
        self.tainted: dict[int, weakref.ref] = {}
        self.gates: dict[int, weakref.ref] = {}
        #: tensors known to have no negative value (a ReLU's output, padded with zeros, pooled, reshaped): the
        #: rules' terms for negative inputs vanish there, without a pass over the tensor to find out
        self.nonneg: dict[int, weakref.ref] = {}
        self.order: dict[int, int] = {}
        self.marked = 0
        self.producers: dict[int, tuple[weakref.ref, WeightedCall]] = {}
        self.weighted: list[WeightedCall] = []
        self.uncovered: dict[str, int] = {}
        self.activations = 0
        self.module_stack: list[str] = []
        self.named_rules_used: set[str] = set()
        #: DeepLIFT's reference, run beside the input call by call (without a graph): the reference's value of
        #: each input-derived tensor, by id (None when there is no reference)
        self.twins: dict[int, tuple[weakref.ref, Tensor]] | None = None
        #: the batch size when one reference row serves every image (each twin then has one row), else None
        self.shared: int | None = None
        #: the reference's values of the calls of an earlier forward with the same one-row reference, model and
        #: input shape (None where that forward never read them), handed out in call order instead of being
        #: worked out again (see ReferenceRun)
        self.replay: list | None = None
        self.position = 0
        #: this forward's reference values, in call order, for a later replay (None: not kept)
        self.recorded: list | None = None
        #: ids of the reference values the forward read (through ``twin`` or a rule's own use): of a recorded
        #: forward, only these are kept
        self.read: set[int] = set()
        #: ids of the model's parameters and buffers (a replay checks their identity and version)
        self.known: set[int] = set()

    # -- which tensors derive from the input
    def mark(self, t: Tensor, table: dict | None = None) -> None:
        if table is None:
            self.tainted[id(t)] = weakref.ref(t)
            self.marked += 1  # which input-derived tensor it is (in the order they were made), for the replay
            self.order[id(t)] = self.marked
        else:
            table[id(t)] = weakref.ref(t)

    def has(self, t: object, table: dict | None = None) -> bool:
        if not isinstance(t, Tensor):
            return False
        ref = (self.tainted if table is None else table).get(id(t))
        return ref is not None and ref() is t

    def tracked(self, obj) -> bool:
        """Whether an argument (or a list / tuple / dict of them) holds an input-derived tensor."""
        if isinstance(obj, Tensor):
            ref = self.tainted.get(id(obj))
            return ref is not None and ref() is obj
        if isinstance(obj, (list, tuple)):
            return any(self.tracked(item) for item in obj)
        if isinstance(obj, dict):
            return any(self.tracked(item) for item in obj.values())
        return False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not (any(self.tracked(a) for a in args) or (kwargs and self.tracked(kwargs))):
            return func(*args, **kwargs)
        before = None
        if self.twins is not None and args and isinstance(args[0], Tensor) and _in_place(func):
            # the reference's copy of a tensor written in place: its value before the write
            before = self.twin(args[0], computing=True) if self.has(args[0]) else args[0].detach().clone()
        result = self.dispatch(func, args, kwargs)
        if self.nonneg and args and _in_place(func) and (result is None or result is args[0]):
            self.nonneg.clear()  # written in place: its views' (and its own) signs are no longer known
        outputs = _tensors(result, [])
        for out in outputs:
            self.mark(out)
        if func in GATES and isinstance(result, Tensor):
            self.mark(result, self.gates)
        first = args[0] if args else kwargs.get("input")
        if (
            func in KEEP_SIGN
            and isinstance(result, Tensor)
            and self.has(first, self.nonneg)
            and _keeps_sign(func, args, kwargs)
        ):
            self.mark(result, self.nonneg)
        if self.twins is not None:
            self.shadow(func, args, kwargs, result, outputs, before)
        return result

    # -- DeepLIFT's reference, beside the input
    def set_twin(self, t: Tensor, twin: Tensor | None) -> None:
        """Pair ``t`` with its reference value (None: a replayed value the recorded forward never read, not kept)."""
        if (
            twin is not None
            and self.shared is not None
            and not (t.ndim >= 1 and t.shape[0] == self.shared and twin.shape == (1, *t.shape[1:]))
        ):
            raise _Unshared  # a tensor whose first axis is not the batch's: the reference runs row by row instead
        key = id(t)
        twins = self.twins

        def forget(ref, key=key):  # the twin lives as long as the tensor it mirrors
            entry = twins.get(key)
            if entry is not None and entry[0] is ref:
                del twins[key]

        twins[key] = (weakref.ref(t, forget), twin)

    def twin(self, t: Tensor, *, computing: bool = False) -> Tensor:
        """t's reference value. ``computing``: read to work out the reference's next values, which a replay
        hands out instead (not a read that keeps the value)."""
        entry = self.twins.get(id(t))
        if entry is None or entry[0]() is not t:
            raise MethodError(
                "deeplift lost track of the reference's value of a tensor in this model's forward; use "
                "integrated-gradients, which needs no rule per call"
            )
        if entry[1] is None:  # a replayed value the recorded forward never read: this forward reads differently
            raise _Unreplayable
        if not computing:
            self.read.add(id(entry[1]))
        return entry[1]

    def consumed(self, *values: Tensor) -> None:
        """Reference values a rule uses itself (not only as the twins of its outputs): kept for a replay."""
        self.read.update(id(value) for value in values)

    def reference_values(self, func, args, kwargs, compute: Callable):
        """``compute()``: the reference's values of one call (a tensor or a list of them), or, when an earlier
        forward is replayed, the values the same call gave there. A call that is not the one recorded at this
        point (another function, other shapes, other constants) stops the replay (:class:`_Unreplayable`)."""
        if self.replay is None and self.recorded is None:
            return compute()
        try:
            key = (func, self.signature(args), self.signature(kwargs))
        except _Unkeepable:  # a large tensor made in the forward: nothing to check a replay against
            if self.replay is not None:
                raise _Unreplayable from None
            self.recorded = None
            return compute()
        if self.replay is not None:
            if self.position < len(self.replay) and self.replay[self.position][0] == key:
                self.position += 1
                return self.replay[self.position - 1][1]
            raise _Unreplayable
        values = compute()
        self.recorded.append((key, values))
        return values

    def signature(self, obj):
        """What a call's reference values depend on besides the reference: the shapes of input-derived
        tensors, the identity and version of other tensors (weights), and the constants."""
        if isinstance(obj, Tensor):
            if self.has(obj):
                return (self.order.get(id(obj)), tuple(obj.shape))
            if id(obj) in self.known:  # the model's own weights and buffers: their identity and version
                return (id(obj), obj._version)
            if obj.numel() <= 64:  # a small tensor made in the forward: its values (its id may be reused)
                return (tuple(obj.shape), obj.dtype, tuple(obj.detach().flatten().tolist()))
            raise _Unkeepable
        if isinstance(obj, (list, tuple)):
            return tuple(self.signature(item) for item in obj)
        if isinstance(obj, dict):
            return tuple((key, self.signature(item)) for key, item in obj.items())
        if obj is None or obj is Ellipsis or isinstance(obj, (bool, int, float, str, slice, *PLAIN)):
            return obj
        if callable(obj):
            return id(obj)
        return (type(obj).__name__, id(obj))

    def substitute(self, obj):
        """The call's arguments with every input-derived tensor replaced by its reference value."""
        if isinstance(obj, Tensor):
            return self.twin(obj, computing=True) if self.has(obj) else obj
        if isinstance(obj, (list, tuple)) and any(self.tracked(item) for item in obj):
            items = [self.substitute(item) for item in obj]
            return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
        if isinstance(obj, dict) and self.tracked(obj):
            return {key: self.substitute(item) for key, item in obj.items()}
        return obj

    def shadow(self, func, args, kwargs, result, outputs, before) -> None:
        """Run the call on the reference's values (no graph) and pair its outputs with the input's. The rules
        that need the reference's values (DeepLIFT's activations, max pools, products) have paired theirs."""
        if before is not None and (result is None or result is args[0]):  # written in place, on both sides
            if self.replay is not None:  # a reference value written in place cannot be handed out again
                raise _Unreplayable
            self.recorded = None
            with torch.no_grad():
                try:
                    func(before, *self.substitute(args[1:]), **self.substitute(kwargs))
                except RuntimeError as error:
                    if self.shared is not None:
                        raise _Unshared from error
                    raise
            self.mark(args[0])
            self.set_twin(args[0], before)
            return
        if not outputs or all(id(out) in self.twins and self.twins[id(out)][0]() is out for out in outputs):
            return
        twin_func = _out_of_place(func) if before is not None else func
        if self.shared is not None and func in RESHAPES:
            args = _one_row(args, self.shared)  # x.view(batch_size, -1) on the one-row reference: view(1, -1)
        with torch.no_grad():
            try:
                twins = self.reference_values(
                    func,
                    args,
                    kwargs,
                    lambda: _tensors(twin_func(*self.substitute(args), **self.substitute(kwargs)), []),
                )
            except RuntimeError as error:  # a one-row reference where the call needs the batch's rows
                if self.shared is not None:
                    raise _Unshared from error
                raise
        if len(twins) != len(outputs):
            raise MethodError(
                f"deeplift could not run {getattr(func, '__name__', func)} on the reference as on the input (it "
                "returned a different number of tensors); use integrated-gradients"
            )
        for out, twin in zip(outputs, twins, strict=True):
            self.set_twin(out, twin)

    def dispatch(self, func, args, kwargs):
        x = args[0] if args else None
        if (func in CONVOLUTIONS or func in DENSE) and self.has(x) and not self.has(_arg(args, kwargs, 1, "weight")):
            return self.weighted_call(func, args, kwargs)
        if func in BATCHNORM and self.has(x):
            return self.batchnorm(func, args, kwargs)
        if func in AVERAGES and self.has(x):
            return self.average(func, args, kwargs)
        if func in SUMS or func in DIFFERENCES:
            return self.sum(func, args, kwargs)
        if func in PRODUCTS:
            return self.product(func, args, kwargs)
        if func in QUOTIENTS and len(args) >= 2 and self.has(args[0]) and not self.has(args[1]):
            return self.scaled(func, args, kwargs)
        if func in MAXPOOLS and self.kind == "deeplift" and not kwargs.get("return_indices") and self.has(x):
            return self.maxpool(func, args, kwargs)
        unary = self.unary(func, args, kwargs)
        if unary is not None:
            return unary
        if func in SOFTMAXES and self.kind != "deeplift" and self.has(x):
            # an output softmax passes the relevance of a probability on to its logit (conserved)
            rest = args[1:]
            return _Pass.apply(lambda t: func(t, *rest, **kwargs), x)
        if func in UNCOVERED:
            self.uncovered[UNCOVERED[func]] = self.uncovered.get(UNCOVERED[func], 0) + 1
        if self.has(x):  # the rules' outputs are saved for their backward: never change them in place
            func = _out_of_place(func)
        return func(*args, **kwargs)

    # -- convolutions and linear layers
    def rule_for(self, func, index: int) -> str:
        for name in reversed(self.module_stack):
            if name in self.rules:
                self.named_rules_used.add(name)
                return self.rules[name]
        if index == 0:
            return self.first_rule
        return self.dense_rule if func in DENSE else self.conv_rule

    def weighted_call(self, func, args, kwargs):
        x = args[0]
        weight = _arg(args, kwargs, 1, "weight")
        bias = _arg(args, kwargs, 2, "bias")
        rest = tuple(args[3:])
        extra = {k: v for k, v in kwargs.items() if k not in ("input", "weight", "bias")}
        call = WeightedCall(
            func, weight.detach(), None if bias is None else bias.detach(), rest, extra, "", len(self.weighted)
        )
        if self.kind == "deeplift" and self.has(bias):  # an input-derived bias (FiLM): its own gradient
            return func(*args, **kwargs)
        call.rule = self.rule_for(func, call.index) if self.kind == "lrp" else "excitation"
        call.nonneg = self.has(x, self.nonneg)
        self.weighted.append(call)

        def compute(inp):
            return call.apply(inp, weight.detach(), None if bias is None else bias.detach())

        def backward(inputs, out, grad):
            if self.kind == "deeplift":  # a linear layer's multiplier is its gradient (to the input only)
                return (call.input_grad(inputs[0], call.weight, grad),)
            if self.kind == "excitation":
                return (self.excitation_relevance(call, inputs[0], grad),)
            return (self.lrp_relevance(call, inputs[0], out, grad),)

        backward.uses_output = self.kind == "lrp"
        out = _Rule.apply(compute, backward, x)
        self.producers[id(out)] = (weakref.ref(out), call, out._version)
        if self.kind == "lrp":
            call.output = out.detach()
        return out

    def excitation_relevance(self, call: WeightedCall, x: Tensor, relevance: Tensor) -> Tensor:
        """TorchRay's rule: x * W+^T (P / (W+ x)), no bias; the classifier of the contrastive form subtracts
        the same with -W (the dual class)."""
        return self.relevance(call, x, relevance, self.excitation_terms)

    def excitation_terms(self, call: WeightedCall, x: Tensor) -> list:
        xp = x.clamp_min(0) if _negative(call, x) else x  # P stays a probability where an input is negative
        terms = []
        weights = [(call.weight.clamp_min(0), 1.0)]
        if self.contrastive and call.index == len(self.weighted) - 1:
            weights.append(((-call.weight).clamp_min(0), -1.0))
        for weight, coefficient in weights:
            terms.append((xp, xp, weight, _shifted(call, xp, weight, None, 1e-20), coefficient, True))
        return terms

    def lrp_relevance(self, call: WeightedCall, x: Tensor, out: Tensor, relevance: Tensor) -> Tensor:
        if call.rule == "pass":
            return relevance if relevance.shape == x.shape else call.input_grad(x, call.weight, relevance)
        return self.relevance(call, x, relevance, self.lrp_terms)

    @staticmethod
    def relevance(call: WeightedCall, x: Tensor, relevance: Tensor, terms_of) -> Tensor:
        """sum over the rule's terms of coefficient * factor * W_t^T (R / denominator_t) (or R * inverse_t): the
        terms do not depend on R, so they are worked out once per call and reused for every target."""
        if "terms" not in call.cache:
            with torch.no_grad():
                call.cache["terms"] = terms_of(call, x.detach())  # no graph: a cache must not hold one
        total = None
        for factor, inp, weight, scale, coefficient, divide in call.cache["terms"]:
            seed = relevance / scale if divide else relevance * scale
            part = call.input_grad(inp, weight, seed)  # a new tensor: scaled in place
            if factor is not None:
                part = part.mul_(factor) if part.shape == factor.shape else part * factor
            if coefficient != 1.0:
                part = part.mul_(coefficient)
            total = part if total is None else total.add_(part)
        return total

    def lrp_terms(self, call: WeightedCall, x: Tensor) -> list:
        """Zennit's rules as terms (factor, input, weight, stabilized denominator, coefficient, True), or with
        the denominator's inverse and False (the gamma rule's, masked by the output's sign). Where the sign of a
        denominator is known (z+ of non-negative parts), its stabilizer is added as a bias, in the same pass."""
        rule, w, b = call.rule, call.weight, call.bias
        stab = self.stabilizer

        def z(inp, weight, bias=None):
            return call.apply(inp, weight, bias)

        own = call.output if call.output is not None else z(x, w, b)  # z(x, w, b) from the forward pass
        if rule in ("epsilon", "zero"):
            return [(x, x, w, stabilize(own, self.epsilon if rule == "epsilon" else 1e-12), 1.0, True)]
        pos, neg = w.clamp_min(0), w.clamp_max(0)
        bpos = None if b is None else b.clamp_min(0)
        bneg = None if b is None else b.clamp_max(0)
        negative = _negative(call, x)  # ReLU outputs have none, and their branches vanish
        xp = x.clamp_min(0) if negative else x
        xn = x - xp if negative else None
        if rule in ("zplus", "alpha1-beta0", "alpha2-beta1"):
            alpha, beta = (2.0, 1.0) if rule == "alpha2-beta1" else (1.0, 0.0)
            up = _shifted(call, xp, pos, bpos, stab)  # >= 0: stabilized by + stab, as Zennit's
            if xn is not None:
                up = up.add_(z(xn, neg))
            terms = [(xp, xp, pos, up, alpha, True)] + ([(xn, xn, neg, up, alpha, True)] if xn is not None else [])
            if beta:
                down = _shifted(call, xp, neg, bneg, -stab)  # <= 0 (where it is 0 its terms are 0 as well)
                if xn is not None:
                    down = down.add_(z(xn, pos))
                terms += [(xp, xp, neg, down, -beta, True)]
                terms += [(xn, xn, pos, down, -beta, True)] if xn is not None else []
            return terms
        if rule == "gamma":
            g = self.gamma
            wp, wn = w + g * pos, w + g * neg
            bp = None if b is None else b + g * bpos
            bn = None if b is None else b + g * bneg
            original = own
            up = (original > 0).to(x.dtype) * _inverse(z(xp, wp, bp) + (z(xn, wn) if xn is not None else 0), stab)
            down = (original < 0).to(x.dtype) * _inverse(z(xp, wn, bn) + (z(xn, wp) if xn is not None else 0), stab)
            terms = [(xp, xp, wp, up, 1.0, False), (xp, xp, wn, down, 1.0, False)]
            if xn is not None:
                terms += [(xn, xn, wn, up, 1.0, False), (xn, xn, wp, down, 1.0, False)]
            return terms
        if rule in ("flat", "wsquare"):
            ones = torch.ones_like(x)
            weight = torch.ones_like(w) if rule == "flat" else w * w
            return [(None, ones, weight, stabilize(z(ones, weight), stab), 1.0, True)]
        if rule == "zbox":
            if self.bounds is None or x.ndim != self.bounds[0].ndim or self.bounds[0].shape[1] != x.shape[1]:
                raise MethodError(
                    "the zbox rule needs a layer that reads the input pixels (it bounds them by the "
                    "preprocessing's range); set it on the first convolution only"
                )
            low, high = (bound.expand_as(x) for bound in self.bounds)
            s = stabilize(own - z(low, pos, bpos) - z(high, neg, bneg), stab)
            return [(x, x, w, s, 1.0, True), (low, low, pos, s, -1.0, True), (high, high, neg, s, -1.0, True)]
        raise MethodError(f"unknown LRP rule {rule!r}; choose one of {', '.join(RULES)}")

    # -- batch norm, averages, sums, products
    def batchnorm(self, func, args, kwargs):
        if self.kind == "excitation":
            return _Pass.apply(lambda inp: func(inp, *[_detached(a) for a in args[1:]], **kwargs), args[0])
        x = args[0]
        params = [_arg(args, kwargs, i, n) for i, n in enumerate(("input", "running_mean", "running_var"))]
        gamma, beta = _arg(args, kwargs, 3, "weight"), _arg(args, kwargs, 4, "bias")
        training = bool(_arg(args, kwargs, 5, "training", False))
        eps = float(_arg(args, kwargs, 7, "eps", 1e-5))
        producer = self.producers.get(id(x))
        if (
            producer is not None
            and producer[0]() is x
            and x._version == producer[2]  # not written in place since the convolution
            and (self.kind != "deeplift" or type(x.grad_fn) is _Rule._backward_cls)
            and not training
            and params[1] is not None
            and producer[1].weight.shape[0] == params[1].shape[0]
            and producer[1].func not in (torch.conv_transpose1d, torch.conv_transpose2d, torch.conv_transpose3d)
        ):
            if self.kind == "deeplift":
                return self.merged_batchnorm(func, args, kwargs, producer[1], (params[1], params[2], gamma, beta, eps))
            producer[1].merge(params[1], params[2], gamma, beta, eps)
        elif self.kind == "deeplift":  # not merged: its own gradient (an eval-mode BatchNorm is affine)
            return func(*args, **kwargs)
        else:
            producer = None
        others = [_detached(a) for a in args[1:]]
        out = _Pass.apply(lambda inp: func(inp, *others, **kwargs), x)  # Zennit / TorchRay: a BatchNorm passes
        # relevance through (after the merge above)
        if producer is not None:  # the merged layer's output: BatchNorm(conv(x)) = conv(x; merged weights)
            producer[1].output = out.detach()
        return out

    def merged_batchnorm(self, func, args, kwargs, call: WeightedCall, statistics: tuple):
        """DeepLIFT through BatchNorm(conv(x)): one backward pass of the convolution with the BatchNorm merged
        into its weights, from the BatchNorm's output straight to the convolution's input (its gradient, in
        one convolution instead of two passes). The convolution's own output keeps its own gradient for any
        other use of it."""
        conv_out = args[0]
        (conv_in, _) = conv_out.grad_fn.saved_tensors  # the _Rule node of the convolution: its input, output
        merged = dataclasses.replace(call, cache={})
        merged.merge(*statistics)
        others = [_detached(a) for a in args[1:]]
        with torch.no_grad():
            value = func(conv_out.detach(), *others, **kwargs)

        def backward(inputs, out, grad):
            return (merged.input_grad(inputs[0], merged.weight, grad),)

        backward.uses_output = False
        return _Rule.apply(lambda inp: value, backward, conv_in)

    def average(self, func, args, kwargs):
        if self.kind == "deeplift":
            return func(*args, **kwargs)
        return self.norm(func, args, kwargs, [0])

    def norm(self, func, args, kwargs, positions: list[int], signs: tuple[int, ...] | None = None):
        """The z-rule on the input-derived arguments at ``positions``: R_i = x_i * d z / d x_i * R / z. With
        ``signs`` (a sum or difference of same-shape tensors) d z / d x_i is that sign, not worked out."""
        stab = self.stabilizer if self.kind == "lrp" else 1e-20
        args = list(args)
        tracked = [args[p] for p in positions]

        def compute(*inputs):
            filled = list(args)
            for p, t in zip(positions, inputs, strict=True):
                filled[p] = t
            return func(*filled, **kwargs)

        positive = self.kind == "excitation"  # P stays a probability: only positive parts share it
        cache: dict = {}

        def backward(inputs, out, grad):
            if "denominator" not in cache:
                with torch.no_grad():
                    if positive:
                        inputs = [x.clamp_min(0) for x in inputs]
                        out = compute(*inputs)
                    inputs = [x.detach() for x in inputs]  # no graph in the cache (it would keep the graph alive)
                    cache["inputs"], cache["denominator"] = inputs, stabilize(out, stab)
            inputs = cache["inputs"]
            seed = grad / cache["denominator"]
            if signs is not None:
                with torch.no_grad():
                    parts = [x * seed for x in inputs]
                    return tuple(part if sign > 0 else part.neg_() for part, sign in zip(parts, signs, strict=True))
            grads = _vjp(compute, list(inputs), seed)
            return tuple(x * g for x, g in zip(inputs, grads, strict=True))

        return _Rule.apply(compute, backward, *tracked)

    def sum(self, func, args, kwargs):
        positions = [i for i, a in enumerate(args[:2]) if self.has(a)]
        if len(positions) < 2 or self.kind == "deeplift" or _arg(args, kwargs, 2, "alpha", 1) != 1:
            if func in (Tensor.add_, Tensor.sub_):
                return (torch.add if func is Tensor.add_ else torch.sub)(*args, **kwargs)
            return func(*args, **kwargs)
        plain = {Tensor.add_: torch.add, Tensor.__iadd__: torch.add, Tensor.sub_: torch.sub, Tensor.__isub__: torch.sub}
        signs = None
        if args[0].shape == args[1].shape and func is not Tensor.__rsub__:
            signs = (1, -1) if func in DIFFERENCES else (1, 1)
        return self.norm(plain.get(func, func), args, kwargs, positions, signs)

    def scaled(self, func, args, kwargs):
        if self.kind != "lrp":
            return func(*args, **kwargs)
        plain = {Tensor.div_: torch.div, Tensor.__itruediv__: torch.div}
        return self.norm(plain.get(func, func), args, kwargs, [0])

    def product(self, func, args, kwargs):
        plain = {Tensor.mul_: torch.mul, Tensor.__imul__: torch.mul}.get(func, func)
        a, b = args[0], args[1] if len(args) > 1 else kwargs.get("other")
        both = self.has(a) and self.has(b)
        if not both:
            if self.kind == "lrp":
                return self.norm(plain, args, kwargs, [0 if self.has(a) else 1])
            return plain(*args, **kwargs)
        if self.kind == "deeplift":  # Delta(ab) = mean(b) Delta a + mean(a) Delta b, exactly
            ta, tb = self.twin(a), self.twin(b)
            with torch.no_grad():
                ma, mb = (a + ta) / 2, (b + tb) / 2

            def backward(inputs, out, grad):
                x, y = inputs
                return (grad * mb).sum_to_size(x.shape), (grad * ma).sum_to_size(y.shape)

            out = _Rule.apply(lambda x, y: plain(x, y), backward, a, b)
            with torch.no_grad():
                self.set_twin(out, self.reference_values(func, args, kwargs, lambda: plain(ta, tb)))
            return out
        # LRP / excitation: the signal takes all relevance, the gate none (Arras et al. 2017)
        gate_a, gate_b = self.has(a, self.gates), self.has(b, self.gates)
        out_shape = torch.broadcast_shapes(a.shape, b.shape)
        if gate_a != gate_b:
            signal_first = gate_b
        elif a.shape != b.shape:
            signal_first = tuple(a.shape) == tuple(out_shape)
        else:
            signal_first = None

        def backward(inputs, out, grad):
            x, y = inputs
            if signal_first is None:
                return (grad / 2).sum_to_size(x.shape), (grad / 2).sum_to_size(y.shape)
            if signal_first:
                return grad.sum_to_size(x.shape), torch.zeros_like(y)
            return torch.zeros_like(x), grad.sum_to_size(y.shape)

        return _Rule.apply(lambda x, y: plain(x, y), backward, a, b)

    # -- activations and max pooling
    def unary(self, func, args, kwargs):
        """Element-wise activations: pass (LRP), the gradient (excitation backprop), rescale (DeepLIFT)."""
        builder = ACTIVATIONS.get(func)
        if builder is not None:
            function, derivative = builder(args, kwargs)
        elif func in UNMODIFIED or func in OUT_OF_PLACE:
            base = OUT_OF_PLACE.get(func, func)
            rest = args[1:]

            def function(t, base=base, rest=rest):
                return base(t, *rest, **{k: v for k, v in kwargs.items() if k != "inplace"})

            derivative = None
        else:
            return None
        x = args[0]
        self.activations += 1
        if self.kind != "deeplift":  # excitation backprop: the activation's own gradient (its plain, out-of-place
            # call); LRP: the relevance passes through
            out = function(x) if self.kind == "excitation" else _Pass.apply(function, x)
            if builder in NONNEGATIVE or (builder in CLAMPS and float(_arg(args, kwargs, 1, "min_val", -1.0)) >= 0):
                self.mark(out, self.nonneg)
            return out
        # DeepLIFT's rescale multiplier (f(x) - f(x')) / (x - x'), the slope f'(x) where x' is within eps of x;
        # it does not depend on what flows back, so it is worked out here, once, from the reference's values
        reference = self.twin(x)
        with torch.no_grad():
            out = function(x)
            piecewise = builder in PIECEWISE_LINEAR and x.dtype in TINY_SAFE
            if piecewise:  # with the reference's slope, scaled by z (below): one row for a shared reference
                twin, slope = self.reference_values(
                    func, args, kwargs, lambda: [function(reference), derivative(reference, TINY)]
                )
                self.consumed(twin, slope)
            else:
                twin = self.reference_values(func, args, kwargs, lambda: function(reference))
                self.consumed(twin)
            delta_in = x - reference
            if piecewise:
                # the secant of a piecewise-linear function is exact wherever x' != x (within eps of x it is the
                # slope of their piece, a kink between them aside); where x' = x it is 0 / 0 and takes the slope
                # there, f'(x) = f'(x'): (f(x) - f(x') + z f'(x')) / (x - x' + z), z far below any difference of
                # two activations, is the secant bit for bit where x' != x and z f'(x') / z = f'(x) where x' = x
                multiplier = (out - twin).add_(slope).div_(delta_in.add_(TINY))
            else:
                multiplier = (out - twin).div_(delta_in)
                close = delta_in.abs_() < self.eps
                if bool(close.any()):
                    if derivative is not None:  # element-wise (cheaper over the whole tensor than indexing)
                        multiplier = torch.where(close, derivative(x.detach()), multiplier)
                    else:
                        slope = _vjp(function, [x], torch.ones_like(x))[0]
                        multiplier = torch.where(close, slope, multiplier)
        result = _Scaled.apply(x, (out,), multiplier)
        self.set_twin(result, twin)
        return result

    def maxpool(self, func, args, kwargs):
        """DeepLIFT through max pooling (Captum's definition): the output difference is split into the part
        reached at the image's maxima and the part at the reference's, each divided by its input difference."""
        eps = self.eps
        rest = args[1:]
        x, reference = args[0], self.twin(args[0])

        def pool(t):
            return func(t, *rest, **kwargs)

        with torch.no_grad():
            twin = self.reference_values(func, args, kwargs, lambda: pool(reference))
        self.consumed(twin)

        def backward(inputs, out, grad):
            (inp,) = inputs
            top = torch.maximum(out, twin)
            full = reference.expand_as(inp)
            contributions = _vjp(pool, [inp], grad * (top - twin))[0] + _vjp(pool, [full], grad * (out - top))[0]
            delta_in = inp - full
            plain = _vjp(pool, [inp], grad)[0]
            safe = torch.where(delta_in.abs() < eps, torch.ones_like(delta_in), delta_in)
            return (torch.where(delta_in.abs() < eps, plain, contributions / safe),)

        result = _Rule.apply(pool, backward, x)
        self.set_twin(result, twin)
        return result


RESHAPES = {Tensor.view, Tensor.reshape, torch.reshape}
#: DeepLIFT's stand-in for 0 in a piecewise-linear activation's secant, and the dtypes where it is a normal
#: number far below any difference of two activations (float16's smallest normal is 6e-5: it takes the 0 / 0 path)
TINY = 1e-30
TINY_SAFE = {torch.float32, torch.float64, torch.bfloat16}
#: Calls whose output has no negative value where their input has none (F.pad with a non-negative value)
KEEP_SIGN = RESHAPES | MAXPOOLS | AVERAGES | {F.pad, torch.flatten, Tensor.flatten, Tensor.contiguous, F.dropout}
KEEP_SIGN |= {Tensor.__getitem__, torch.squeeze, Tensor.squeeze, Tensor.unsqueeze, torch.unsqueeze}


def _detached(a):
    return a.detach() if isinstance(a, Tensor) else a


def _keeps_sign(func, args, kwargs) -> bool:
    """F.pad keeps a non-negative tensor so only with zeros or another non-negative constant."""
    if func is not F.pad:
        return True
    return _arg(args, kwargs, 2, "mode", "constant") == "constant" and (_arg(args, kwargs, 3, "value", None) or 0) >= 0


def _negative(call: WeightedCall, x: Tensor) -> bool:
    """Whether the call's input has a negative value: known from the forward pass, else one reduction."""
    return not call.nonneg and bool(x.amin() < 0)


def _one_row(args: tuple, batch: int) -> tuple:
    """A view / reshape call's arguments with a leading size equal to the batch size made 1."""
    if len(args) < 2:
        return args
    shape = args[1]
    if isinstance(shape, (tuple, list)) and shape and shape[0] == batch:
        return (args[0], (1, *shape[1:]), *args[2:])
    if isinstance(shape, int) and shape == batch:
        return (args[0], 1, *args[2:])
    return args


class _Unshared(Exception):
    """Raised inside DeepLIFT's forward when a one-row reference cannot stand for every image's."""


class _Unreplayable(Exception):
    """Raised inside DeepLIFT's forward when the calls differ from the forward being replayed."""


#: Constants a call's arguments can hold that compare by value
PLAIN = (torch.dtype, torch.device, torch.layout, torch.memory_format)


class _Unkeepable(Exception):
    """A call's argument a replay could not be checked against (a large tensor made in the forward)."""


@dataclasses.dataclass
class ReferenceRun:
    """A one-row reference's values of one forward, kept with the model between calls (``Model.kept``: every
    method on it, a new one per call included, finds them). The reference's forward does not depend on the
    images: with the same reference, model state and input shape the next forward hands them out again instead
    of running every call a second time (about a tenth of a DeepLIFT map on the default model). Only the values
    the forward read are kept; the others are handed out as None. Each call is checked against the one
    recorded (function, shapes, weights' identity and version, constants); a difference reruns the forward
    without it."""

    reference: Tensor
    shape: tuple
    state: tuple
    values: list
    #: weak references to the model's parameters and buffers (an id alone can be a new tensor's, later)
    tensors: tuple = ()

    #: past this many bytes of reference values a forward's are not kept (the default model's take 70 MiB at 224 px)
    LIMIT: ClassVar[int] = 128 * 2**20

    @staticmethod
    def state_of(tensors: tuple) -> tuple:
        return tuple((id(t), t._version) for t in tensors)

    def matches(self, reference: Tensor, shape: tuple, state: tuple, tensors: tuple) -> bool:
        return (
            self.shape == shape
            and self.state == state  # as many tensors, each of the same id and version: and the same tensor?
            and all(ref() is t for ref, t in zip(self.tensors, tensors, strict=True))
            and self.reference.shape == reference.shape
            and self.reference.dtype == reference.dtype
            and self.reference.device == reference.device
            and bool(torch.equal(self.reference, reference))
        )

    @classmethod
    def kept(
        cls, reference: Tensor, shape: tuple, state: tuple, tensors: tuple, values: list, read: set[int]
    ) -> ReferenceRun | None:
        """The run to keep: of each call's values those the forward read (an activation's input and output, a max
        pool's, the logits), None for the rest, which a replay hands out as such (a third of a CNN's values)."""

        def only_read(value):
            if isinstance(value, list):
                return [only_read(item) for item in value]
            return value if id(value) in read else None

        values = [(key, only_read(value)) for key, value in values]
        storages = {}  # by storage: a kept view keeps all of its base alive
        for _, value in values:
            for t in value if isinstance(value, list) else [value]:
                if t is not None:
                    storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        size = sum(storages.values())
        refs = tuple(weakref.ref(t) for t in tensors)
        return cls(reference.clone(), shape, state, values, refs) if size <= cls.LIMIT else None


def _out_of_place(func):
    """The out-of-place twin of an in-place tensor method (``add_`` -> ``add``, ``__iadd__`` -> ``__add__``)."""
    name = getattr(func, "__name__", "")
    if name.startswith("__i") and name.endswith("__"):
        twin = getattr(Tensor, "__" + name[3:], None)
    elif name.endswith("_") and not name.endswith("__") and getattr(Tensor, name, None) is func:
        twin = getattr(Tensor, name[:-1], None)
    else:
        twin = None
    return twin if callable(twin) else func


def _arg(args, kwargs, index: int, name: str, default=None):
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector paused for one call (as it was before, after it): the rules make
    thousands of short-lived objects (closures, weak references), which refcounting frees, but which trigger
    collections that walk every object of the process (about 4% of an LRP call on the default model)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


@contextmanager
def propagating(
    module: nn.Module,
    inputs: Tensor,
    kind: str,
    reference: Tensor | None = None,
    *,
    replay: list | None = None,
    record: bool = False,
    known: set[int] | None = None,
    **settings,
) -> Iterator[PropagationMode]:
    """Inside the block, the calls that ``inputs`` flow through backpropagate by ``kind``'s rules. With
    ``rules`` (layer name -> rule), forward hooks on the model's modules track which module a call is in;
    they are removed on exit, also after an error. With a ``reference`` (DeepLIFT's, the shape of ``inputs``)
    every call also runs on the reference's values, without a graph; ``mode.twin(t)`` is t's reference value."""
    mode = PropagationMode(kind, **settings)
    mode.mark(inputs)
    if reference is not None:
        mode.twins = {}
        if reference.shape[0] == 1 and inputs.shape[0] > 1:
            mode.shared = inputs.shape[0]
            mode.replay = replay
            mode.recorded = [] if record and replay is None else None
            mode.known = known or set()
        mode.set_twin(inputs, reference.detach())
    handles = []
    try:
        if mode.rules:
            names = {name for name, _ in module.named_modules() if name}
            unknown = sorted(set(mode.rules) - names)
            if unknown:
                from .._registry import did_you_mean

                raise MethodError(
                    f"rules name layer {unknown[0]!r}, which this model does not have"
                    f"{did_you_mean(unknown[0], sorted(names))}; cnnscope layers MODEL lists them"
                )

            def enter(name):
                def hook(module, args):
                    mode.module_stack.append(name)

                return hook

            def leave(module, args, output):
                mode.module_stack.pop()

            for name, sub in module.named_modules():
                if name:
                    handles.append(sub.register_forward_pre_hook(enter(name)))
                    handles.append(sub.register_forward_hook(leave, always_call=True))
        with mode:
            yield mode
    finally:
        for handle in handles:
            handle.remove()


def _warn_uncovered(name: str, mode: PropagationMode) -> None:
    if mode.uncovered:
        listed = ", ".join(f"{op} ({count} call{'s' * (count > 1)})" for op, count in mode.uncovered.items())
        warnings.warn(
            f"{name} has no rule for these calls, which keep their plain gradient: {listed}; the map is not a pure "
            f"{name} map on this model",
            CnnscopeWarning,
            stacklevel=4,
        )


BASELINES = ("black", "blur", "noise")


def baseline_for(method, batch: Tensor) -> Tensor:
    """IG's baselines: "black" (zero pixels, normalized), "blur", "noise" (seeded), or a tensor."""
    from .gradient import IntegratedGradients

    return IntegratedGradients.baseline_for(method, batch)


class PropagationMethod(GradientMethod):
    """Base of the propagation methods: one forward pass in the mode, one backward pass per target."""

    kind: ClassVar[str] = "lrp"
    #: the name under which a model keeps DeepLIFT's shared reference's values of its last forward
    KEPT: ClassVar[str] = "deeplift reference run"

    @property
    def _reference_run(self) -> ReferenceRun | bool | None:
        """DeepLIFT's shared reference's values of the model's last forward (a ReferenceRun), None, or False where
        the model's forward changed from one call to the next (nothing is kept any more). Kept with the model, so
        that every method on it (a new one per call, as ``cnnscope.explain`` and the web page make) hands them
        out again; each use is checked against the reference, the weights and the input shape."""
        return self.model.kept.get(self.KEPT)

    @_reference_run.setter
    def _reference_run(self, run: ReferenceRun | bool | None) -> None:
        self.model.kept[self.KEPT] = run

    def is_signed(self) -> bool:
        return self.config["reduce"] == "sum"

    def settings(self, batch: Tensor) -> dict:
        return {}

    def estimated_work(self, targets: int = 1) -> int:
        # the rules' own passes through each layer (the modified weights' outputs, once) on top of the gradient's
        return 2 + 2 * targets

    def seed(self, logits: Tensor, targets: Tensor, k: int) -> Tensor:
        """What flows back from the outputs for each image's k-th target (zero rows where there is none)."""
        column = targets[:, k : k + 1]
        seed = torch.zeros_like(logits).scatter(1, column.clamp_min(0), 1.0)
        return seed * (column >= 0).to(logits.dtype)

    def propagate(self, batch: Tensor, resolve, reference: Tensor | None = None):
        """(per-channel input values (B, K, C, ...), logits, targets, mode, reference logits)."""
        if any(isinstance(sub, torch.jit.ScriptModule) for sub in self.model.module.modules()):
            raise MethodError(
                f"{self.name} cannot reach the layers inside this model's TorchScript code, so its rules would not "
                "apply; give the model as an eager nn.Module, or use saliency, integrated-gradients or occlusion"
            )
        b = batch.shape[0]
        inputs = batch.detach().clone()
        if reference is not None:
            reference = reference.detach().to(inputs).clone()
            if b == 1:  # CPU convolutions of one image round differently from a batch's, and DeepLIFT's rescale
                # amplifies rounding where x is near x': a second row keeps an image's map what it is in a batch
                inputs, reference = torch.cat([inputs, inputs]), torch.cat([reference, reference])
            if bool((reference == reference[:1]).all()):  # one reference for every image (a black baseline):
                reference = reference[:1]  # it runs once, its values broadcast against the batch's
        inputs.requires_grad_(True)
        with torch.inference_mode(False), torch.enable_grad(), _collector_paused():
            settings = self.settings(batch)
            kept = self._reference_run
            tensors = (*self.model.module.parameters(), *self.model.module.buffers())
            state = ReferenceRun.state_of(tensors)
            shared = reference is not None and reference.shape[0] == 1 and inputs.shape[0] > 1 and kept is not False
            matching = shared and kept and kept.matches(reference, tuple(inputs.shape), state, tensors)
            replay = kept.values if matching else None

            def forward(**replaying):
                """The forward in the mode, and the reference's value of its output (read inside, where a replay
                that differs stops: a forward that returns another of the same calls' tensors, say)."""
                with propagating(self.model.module, inputs, self.kind, reference, **replaying, **settings) as mode:
                    outputs = self.model(inputs)
                    twin = mode.twin(outputs) if reference is not None and outputs.requires_grad else None
                return mode, outputs, twin

            try:
                try:
                    mode, outputs, twin = forward(replay=replay, record=shared, known={key for key, _ in state})
                except _Unreplayable:  # the forward's calls differ from the last one's: run it all, keep nothing
                    self._reference_run = False
                    mode, outputs, twin = forward()
            except _Unshared:  # the forward mixes the batch's rows (a reshape by batch size): a reference per row
                reference = reference.expand_as(inputs).clone()
                mode, outputs, twin = forward()
            if not outputs.requires_grad:
                raise MethodError(
                    "this model's outputs carry no gradients (a black-box function, or a forward under no_grad); "
                    "use a perturbation method: occlusion or rise"
                )
            reference_logits = twin.detach().expand_as(outputs)[:b] if reference is not None else None
            if mode.recorded is not None and self._reference_run is not False:
                self._reference_run = ReferenceRun.kept(
                    reference, tuple(inputs.shape), state, tensors, mode.recorded, mode.read
                )
            logits = outputs[:b]
            targets = resolve(logits.detach())
            k_total = targets.shape[1]
            values = []
            for k in range(k_total):
                check_cancelled()
                seed = self.seed(logits.detach(), targets, k)
                if outputs.shape[0] > b:
                    seed = torch.cat([seed, torch.zeros_like(outputs[b:])])
                (grad,) = torch.autograd.grad(outputs, inputs, seed, retain_graph=k < k_total - 1)
                values.append(grad[:b])
        _warn_uncovered(self.name, mode)
        return torch.stack(values, dim=1), logits.detach(), targets, mode, reference_logits

    def attributions(self, batch: Tensor, resolve) -> Computed:
        values, logits, targets, _, _ = self.propagate(batch, resolve)
        return Computed(
            raw=values, logits=logits, targets=targets, forwards=1, backwards=targets.shape[1], channels=values
        )


def _rules_check(value):
    if not isinstance(value, dict):
        raise ValueError("give a mapping from layer names to rules, e.g. {'features.0': 'zbox'}")
    for name, rule in value.items():
        if not isinstance(name, str) or rule not in RULES:
            raise ValueError(f"{name!r}: {rule!r} is not a rule; choose one of {', '.join(RULES)}")
    return dict(value)


@register_method("lrp")
class LRP(PropagationMethod):
    """Layer-wise relevance propagation (Bach et al. 2015; composites as Montavon et al. 2019 and Zennit).

    The target's logit is the relevance at the output; every layer passes its relevance down by its rule
    (R_in = x * W^T (R_out / z) for LRP-0, with the variants below), so the map sums to the logit minus what
    the biases absorb. ``composite`` picks the rules as Zennit's composites of the same names: the first
    weighted layer (in execution order), later convolutions, later linear layers:

    - ``epsilon-plus-flat``: flat, z+, epsilon;  ``epsilon-plus``: z+, z+, epsilon;
    - ``epsilon-gamma-box``: z-box (bounded by the preprocessing's pixel range), gamma (0.25), epsilon;
    - ``epsilon-alpha2-beta1-flat``: flat, alpha2-beta1, epsilon;  ``epsilon-alpha2-beta1``: alpha2-beta1 on
      every convolution, epsilon;  ``epsilon``: epsilon everywhere, pools and sums included (Captum's ``LRP``
      default: with ``epsilon=1e-9`` the maps equal Captum's).

    Activations (and an output softmax) pass relevance through, BatchNorms are merged into the convolution
    before them, residual sums and average pools use the z-rule, concatenations and max pooling pass it on as
    the gradient does.
    ``rules`` sets a rule per layer name (``{"features.0": "zbox"}``; the innermost named module of a call
    wins). Zennit computes the same on models of modules with a canonizer; here functional, in-place and
    reused activations and residual adds need none. Zennit starts from the one-hot output (sum = 1);
    the maps here are the target logit times Zennit's."""

    summary = "layer-wise relevance propagation with Zennit's composites (Bach et al. 2015)"
    kind = "lrp"
    options: ClassVar[Options] = Options(
        reduce=dataclasses.replace(REDUCE, default="sum"),
        composite=choice("epsilon-plus-flat", tuple(COMPOSITES), "which rule each kind of layer takes (Zennit's)"),
        rules=anything(None, "per-layer rules {layer name: rule}, over the composite", check=_rules_check),
        epsilon=number(1e-6, "epsilon of the epsilon rule", low=0, high=1e6),
        gamma=number(0.25, "gamma of the gamma rule", low=0, high=1e6),
    )

    def settings(self, batch):
        preprocess = self.model.preprocess
        spatial = tuple(range(2, batch.ndim))
        low = preprocess.normalize(torch.zeros_like(batch[:1])).amin(dim=spatial, keepdim=True)  # (1, C, 1, 1)
        high = preprocess.normalize(torch.ones_like(batch[:1])).amax(dim=spatial, keepdim=True)
        return {
            "composite": self.config["composite"],
            "rules": self.config["rules"],
            "epsilon": float(self.config["epsilon"]),
            # "epsilon everywhere" (Captum's LRP) stabilizes the pools and sums by the same epsilon
            "stabilizer": float(self.config["epsilon"]) if self.config["composite"] == "epsilon" else 1e-6,
            "gamma": float(self.config["gamma"]),
            "bounds": (low.to(batch), high.to(batch)),
        }

    def seed(self, logits, targets, k):
        return super().seed(logits, targets, k) * logits


@register_method("excitation-backprop")
class ExcitationBackprop(PropagationMethod):
    """Excitation backprop (Zhang et al. 2016), as TorchRay's ``excitation_backprop`` at the input: a
    probability P = one-hot flows down, each convolution / linear / average-pooling layer passing
    P_in = x * W+^T (P_out / (W+ x)) (positive weights, no bias), BatchNorm passing it on, residual sums
    in proportion to their terms, activations and max pooling by their gradient. Where a layer's input has
    negative values (normalized pixels, the linear bottlenecks of MobileNet-style blocks) only its positive
    part x+ takes part, so P stays a non-negative probability that sums to 1 (the paper assumes x >= 0 and
    TorchRay divides by sums of mixed sign there, which amplifies rounding without bound). The map is P summed
    over colour channels (TorchRay's saliency). ``contrastive=True`` is TorchRay's contrastive form with the classifier
    as the contrast layer: the P that reaches the classifier's input through its negated weights (the dual
    class) is subtracted there, and the difference flows on (signed; TorchRay clamps the map at 0)."""

    summary = "excitation backprop, winner-take-all probabilities (Zhang et al. 2016)"
    kind = "excitation"
    options: ClassVar[Options] = Options(
        reduce=dataclasses.replace(REDUCE, default="sum"),
        contrastive=flag(False, "contrastive excitation backprop: minus the dual class at the classifier"),
    )

    def settings(self, batch):
        return {"contrastive": bool(self.config["contrastive"])}


@register_method("deeplift")
class DeepLift(PropagationMethod):
    """DeepLIFT with the rescale rule (Shrikumar et al. 2017), as Captum's ``DeepLift``:

        attribution = (x - x') * m,   m = the chain of multipliers from the output to the input,

    with every nonlinearity's multiplier (f(x) - f(x')) / (x - x') (its derivative where x = x'; Captum takes the
    derivative wherever |x - x'| < 1e-10, which differs for a ReLU or a clamp only where a kink lies between
    them), linear
    layers' own gradients, Captum's rule at max pooling and the exact rule at products of two
    input-derived tensors (multipliers mean(b) and mean(a)), so the map sums to f(x) - f(x'). The
    reference x' is ``baseline``, as Integrated Gradients': ``black``, ``blur``, ``noise`` or a tensor. The
    reference runs beside the image call by call, without a graph (one backward pass of the image alone, the
    multipliers worked out once in the forward pass); activations are found by call, not by module, so
    functional, in-place and reused activations are all rescaled (Captum's needs one ``nn.Module`` per
    activation). The summation gap of every map is in ``stats["completeness_gap"]``."""

    summary = "DeepLIFT rescale rule from a baseline (Shrikumar et al. 2017)"
    kind = "deeplift"
    options: ClassVar[Options] = Options(
        reduce=dataclasses.replace(REDUCE, default="sum"),
        baseline=choice(
            "black", BASELINES, "the reference input (or a tensor in model-input space)", accepts=(torch.Tensor,)
        ),
        blur_sigma=number(10.0, "blur of the 'blur' baseline, in pixels", above=0, high=1000),
        seed=SEED,
    )

    def estimated_work(self, targets: int = 1) -> int:
        return 2 * (1 + targets)

    def baseline_for(self, batch):
        return baseline_for(self, batch)

    def attributions(self, batch, resolve):
        reference = self.baseline_for(batch)
        return deeplift_attributions(self, batch, reference, resolve)


def deeplift_attributions(method: PropagationMethod, batch: Tensor, reference: Tensor, resolve) -> Computed:
    """DeepLIFT (rescale) of ``batch`` against ``reference`` (same shape) as a Computed with the gap."""
    multipliers, logits, targets, _, reference_logits = method.propagate(batch, resolve, reference)
    delta = (batch - reference).detach()
    values = multipliers * delta.unsqueeze(1)
    safe = targets.clamp_min(0)
    gain = logits.gather(1, safe) - reference_logits.gather(1, safe)
    valid = targets >= 0
    gap = torch.where(valid, values.flatten(2).sum(dim=2) - gain, torch.full_like(gain, float("nan")))
    return Computed(
        raw=values,
        logits=logits,
        targets=targets,
        forwards=1,
        backwards=targets.shape[1],
        channels=values,
        extra={"completeness_gap": gap.tolist()},
    )


__all__ = ["LRP", "DeepLift", "ExcitationBackprop", "PropagationMode", "gaussian_blur", "propagating"]
