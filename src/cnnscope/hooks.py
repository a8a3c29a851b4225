"""Recording layer outputs during a forward pass, only inside a ``with`` block.

``capture(module, layers)`` registers one forward hook per chosen module and removes every hook in
``finally``. A layer is a module *and a call*: a module object called several times per forward
(the default model's shared activation ``_swish``) is captured at the call the :class:`LayerRef`
names. Downstream layers receive a copy of the captured tensor, so in-place operations after the
layer (``nn.ReLU(inplace=True)``) cannot alter what was recorded; when grad mode is on, the recorded
tensor requires grad, so ``torch.autograd.grad(scores, activation)`` works even on a frozen model,
without touching the model's parameters.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .errors import ModelError
from .tokens import Layout


@dataclass(frozen=True)
class LayerRef:
    """One call of one module: ``name`` is the dotted module path, ``call`` the 0-based call index
    within one forward pass and ``calls`` how many times the module runs per forward."""

    name: str
    module: nn.Module = field(compare=False, repr=False)
    call: int = 0
    calls: int = 1
    output_shape: tuple[int, ...] = ()
    #: how the output holds its channels (set by ``Model.layer``, which knows the input size); None for
    #: outputs that are not maps
    layout: Layout | None = field(default=None, compare=False)

    @property
    def key(self) -> str:
        """The name users type: ``'layer4'``, or ``'_swish@1'`` for a module called several times."""
        return f"{self.name}@{self.call}" if self.calls > 1 else self.name


class StopForward(Exception):
    """Raised by a ``capture(..., stop=True)`` hook once every layer of the pass is recorded: the rest of
    the model does not run. :func:`forward_until` catches it."""


class Capture:
    """The recorded activations of one ``capture`` block, keyed by ``LayerRef.key``."""

    def __init__(self, layers: Sequence[LayerRef], stop: bool = False) -> None:
        self.layers = list(layers)
        self.activations: dict[str, torch.Tensor] = {}
        self.forwards = 0
        self._paused = False
        self._counts: dict[int, int] = {}
        self._stop = stop
        self._pending: set[str] = set()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Forwards run inside this block record nothing (a method's own extra forwards)."""
        previous, self._paused = self._paused, True
        try:
            yield
        finally:
            self._paused = previous

    def __getitem__(self, key: str) -> torch.Tensor:
        try:
            return self.activations[key]
        except KeyError:
            raise ModelError(
                f"layer {key!r} did not run during the forward pass; is it used by the model's forward?"
            ) from None

    def _on_forward_start(self, module: nn.Module, args: object) -> None:
        if not self._paused:
            self._counts.clear()
            self.forwards += 1
            self._pending = {ref.key for ref in self.layers}

    def _make_hook(self, refs: list[LayerRef]):
        def hook(module: nn.Module, args: object, output: object) -> object:
            if self._paused:
                return None
            index = self._counts.get(id(module), 0)
            self._counts[id(module)] = index + 1
            wanted = [ref for ref in refs if ref.call == index]
            if not wanted:
                return None
            if not isinstance(output, torch.Tensor):
                raise ModelError(
                    f"layer {wanted[0].key!r} returns a {type(output).__name__}, not a tensor; "
                    "choose one of its submodules (cnnscope layers lists them)"
                )
            recorded = output
            if torch.is_grad_enabled() and not recorded.requires_grad and recorded.is_floating_point():
                recorded = recorded.detach().requires_grad_(True)
            for ref in wanted:
                self.activations[ref.key] = recorded
                self._pending.discard(ref.key)
            if self._stop and not self._pending:
                raise StopForward
            return recorded.clone()

        return hook


@contextmanager
def capture(model: nn.Module, layers: Sequence[LayerRef], *, stop: bool = False) -> Iterator[Capture]:
    """Record the outputs of ``layers`` during every forward of ``model`` inside the block.

    ``stop=True``: end each forward as soon as all ``layers`` are recorded (run it with
    :func:`forward_until`); the layers after them, the head included, are not computed."""
    record = Capture(layers, stop=stop)
    handles: list[RemovableHandle] = []
    by_module: dict[int, list[LayerRef]] = {}
    modules: dict[int, nn.Module] = {}
    for ref in layers:
        by_module.setdefault(id(ref.module), []).append(ref)
        modules[id(ref.module)] = ref.module
    try:
        handles.append(model.register_forward_pre_hook(record._on_forward_start))
        for key, refs in by_module.items():
            handles.append(modules[key].register_forward_hook(record._make_hook(refs)))
        yield record
    finally:
        for handle in handles:
            handle.remove()


def forward_until(model: nn.Module, batch: torch.Tensor) -> torch.Tensor | None:
    """``model(batch)`` inside a ``capture(..., stop=True)`` block: the logits, or None when the pass
    stopped after its last captured layer."""
    try:
        return model(batch)
    except StopForward:
        return None
