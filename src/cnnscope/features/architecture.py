"""The model's data flow as a short list of boxes: the module tree in call order, with output shapes,
repeated blocks collapsed ("MBConvBlock x3"), so a 200-layer network fits on one page.

Built from the traced calls (``Model.calls()``), not from torch.fx: a trace works for any model that
runs, including ones with data-dependent control flow that symbolic tracing rejects. What it cannot
show are branches inside a block (a residual addition lives inside the block's box).

Steps: take the outermost called modules in call order; open containers (``nn.Sequential``) and any
module shallower than ``depth``; then collapse consecutive repeats of the same pattern of (type,
output shape), patterns of 1 to 8 modules, choosing the split with the fewest boxes.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..models import Model, load_model
from ..models.layers import LayerCall

MAX_PATTERN = 8


@dataclass(frozen=True)
class Node:
    """One box: a module call, or a run of repeated calls."""

    first: str  # key of the first call in the box
    last: str  # key of the last call ("" for a single call)
    kind: str  # the type, or "Conv2d > BatchNorm2d > ReLU" for a repeated pattern
    repeat: int  # how many times the pattern repeats (1 for a single call)
    output_shape: tuple[int, ...]  # per image (batch dimension dropped)
    params: int

    @property
    def title(self) -> str:
        name = self.first if not self.last else f"{self.first} .. {self.last}"
        return name

    @property
    def label(self) -> str:
        return self.kind if self.repeat == 1 else f"{self.kind}  x{self.repeat}"


@dataclass
class Diagram:
    """Nodes in data-flow order, plus the input and output shapes."""

    model: str
    input_shape: tuple[int, ...]
    nodes: list[Node]
    total_params: int
    layers: int  # module calls in the trace

    def svg(self) -> str:
        from ..render.diagram import diagram_svg

        return diagram_svg(self)

    def png(self) -> bytes:
        from ..render.diagram import diagram_png

        return diagram_png(self)

    def _repr_svg_(self) -> str:
        return self.svg()

    def save(self, path: str) -> None:
        """SVG or PNG by the file's suffix."""
        if str(path).lower().endswith(".svg"):
            with open(path, "w", encoding="utf-8") as handle:
                handle.write(self.svg())
        else:
            with open(path, "wb") as handle:
                handle.write(self.png())


def _parent_called(name: str, called: set[str]) -> str | None:
    """The nearest ancestor of ``name`` that is itself called, if any."""
    parts = name.split(".")
    for end in range(len(parts) - 1, 0, -1):
        ancestor = ".".join(parts[:end])
        if ancestor in called:
            return ancestor
    return None


def _select(calls: list[LayerCall], modules: dict[str, nn.Module], depth: int) -> list[LayerCall]:
    """The calls to draw, in call order: outermost ones, with containers opened."""
    called = {call.name for call in calls}
    children: dict[str | None, list[LayerCall]] = {}
    for call in calls:
        children.setdefault(_parent_called(call.name, called), []).append(call)

    def expand(call: LayerCall) -> list[LayerCall]:
        inner = children.get(call.name, [])
        module = modules.get(call.name)
        # a module with parameters of its own computes something itself (a convolution with a padding
        # child): opening it would hide that computation, so only pure containers open
        own = module is not None and any(p is not None for p in module._parameters.values())
        opened = isinstance(module, nn.Sequential) or call.depth < depth
        if inner and opened and not own and call.call == 0:
            return [row for child in inner for row in expand(child)]
        return [call]

    return [row for call in children.get(None, []) for row in expand(call)]


def _signature(call: LayerCall) -> tuple:
    return (call.type, call.output_shape[1:])


def _collapse(rows: list[LayerCall]) -> list[Node]:
    """Fewest boxes: each box is one call or a pattern of up to MAX_PATTERN calls repeated; dynamic
    programming over the start position (a greedy pass would let a stage's strided first convolution
    pair with the block after it and misalign every repeat that follows)."""
    signatures = [_signature(row) for row in rows]
    count = len(rows)
    best: list[tuple[int, int, int]] = [(0, 0, 0)] * (count + 1)  # (boxes, length, repeat) from i on
    for index in range(count - 1, -1, -1):
        choice = (1 + best[index + 1][0], 1, 1)
        for length in range(1, MAX_PATTERN + 1):
            pattern = signatures[index : index + length]
            if len(pattern) < length:
                break
            repeat = 1
            while signatures[index + repeat * length : index + (repeat + 1) * length] == pattern:
                repeat += 1
                candidate = (1 + best[index + repeat * length][0], length, repeat)
                if candidate[0] < choice[0] or (candidate[0] == choice[0] and length * repeat > choice[1] * choice[2]):
                    choice = candidate
        best[index] = choice
    nodes: list[Node] = []
    index = 0
    while index < count:
        _, length, repeat = best[index]
        span = rows[index : index + length * repeat]
        nodes.append(
            Node(
                first=span[0].key,
                last=span[-1].key if len(span) > 1 else "",
                kind=" > ".join(row.type for row in span[:length]),
                repeat=repeat,
                output_shape=tuple(span[-1].output_shape[1:]),
                params=sum(row.params for row in span),
            )
        )
        index += len(span)
    return nodes


def architecture(model: Model | str | nn.Module, *, depth: int = 0, collapse: bool = True) -> Diagram:
    """The diagram of ``model``. ``depth``: also open every module nested less than this deep (0: only
    ``nn.Sequential`` containers; 1: also the top-level modules; 2: also their children...), except
    modules with parameters of their own; ``collapse=False`` draws every call."""
    model = load_model(model)
    calls = model.calls()
    modules = dict(model.module.named_modules())
    rows = _select(calls, modules, depth)
    nodes = (
        _collapse(rows)
        if collapse
        else [Node(row.key, "", row.type, 1, tuple(row.output_shape[1:]), row.params) for row in rows]
    )
    total = sum(p.numel() for p in model.module.parameters())
    return Diagram(
        model=model.name,
        input_shape=(3, *model.preprocess.size),
        nodes=nodes,
        total_params=total,
        layers=len(calls),
    )
