"""What runs inside a model: a traced table of module calls, layer lookup and the default layer.

One forward pass on a blank input, with a hook on every submodule, records each call in the order
the calls start: the module's dotted name, its type, the shape of its output, its parameter count.
Layer lookup, the default target layer and the ``cnnscope layers`` table all read that trace.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .._registry import did_you_mean
from ..errors import LayerNotFoundError, MethodError, ModelError
from ..hooks import LayerRef
from ..state import preserved


@dataclass(frozen=True)
class LayerCall:
    """One row of the summary: a call of a module during one forward pass."""

    order: int  # position among all calls, by start time
    name: str
    type: str
    call: int  # 0-based index among this module's calls
    calls: int  # how many times this module runs per forward
    output_shape: tuple[int, ...]  # () when the output is not a tensor
    params: int  # parameters of the module and its children (counted on the first call only)
    depth: int  # nesting depth of the dotted name
    finished: int  # position by end time (a container ends after its children)
    tensor_output: bool = True  # False when the module returns a tuple or another container

    @property
    def key(self) -> str:
        return f"{self.name}@{self.call}" if self.calls > 1 else self.name

    @property
    def is_spatial(self) -> bool:
        shape = self.output_shape  # (N, C, h, w) maps, or (N, C, d, h, w) volumes with at least one dim > 1
        if len(shape) == 5:
            return max(shape[2:]) > 1
        return len(shape) == 4 and shape[2] > 1 and shape[3] > 1


def _first_tensor(output: object) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, torch.Tensor):
                return item
    return None


def trace_calls(
    module: nn.Module, example: torch.Tensor, select: Callable[[object], torch.Tensor] | None = None
) -> tuple[list[LayerCall], tuple[int, ...]]:
    """Run ``module`` once on ``example`` (no grad, eval mode, state preserved) and record every call;
    also return the shape of the model's output (``select`` picks the scores from a tuple, dict or
    object output; default: the first tensor)."""
    names = {id(sub): name for name, sub in module.named_modules() if name}
    starts: list[tuple[str, nn.Module]] = []
    ends: dict[tuple[str, int], tuple[int, tuple[int, ...], bool]] = {}
    counts: dict[str, int] = {}
    end_counter = [0]

    def pre_hook(sub: nn.Module, args: object) -> None:
        name = names[id(sub)]
        starts.append((name, sub))

    def post_hook(sub: nn.Module, args: object, output: object) -> None:
        name = names[id(sub)]
        index = counts.get(name, 0)
        counts[name] = index + 1
        tensor = _first_tensor(output)
        ends[(name, index)] = (
            end_counter[0],
            tuple(tensor.shape) if tensor is not None else (),
            isinstance(output, torch.Tensor),
        )
        end_counter[0] += 1

    handles = []
    scripted = isinstance(module, torch.jit.ScriptModule)
    try:
        for name, sub in [] if scripted else module.named_modules():
            if name and not isinstance(sub, torch.jit.ScriptModule):  # a TorchScript submodule cannot be hooked
                handles.append(sub.register_forward_pre_hook(pre_hook))
                handles.append(sub.register_forward_hook(post_hook))
        with preserved(module, warn_if_training=False), torch.no_grad():
            raw = module(example)
            output = select(raw) if select is not None else _first_tensor(raw)
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(
            f"the model failed on a blank {tuple(example.shape)} input: {type(exc).__name__}: {exc}; "
            "check the preprocess size and that the model takes one image batch"
        ) from exc
    finally:
        for handle in handles:
            handle.remove()

    seen: dict[str, int] = {}
    rows = []
    for order, (name, sub) in enumerate(starts):
        index = seen.get(name, 0)
        seen[name] = index + 1
        finished, shape, is_tensor = ends.get((name, index), (-1, (), False))
        rows.append(
            LayerCall(
                order=order,
                name=name,
                type=type(sub).__name__,
                call=index,
                calls=counts.get(name, 0),
                output_shape=shape,
                params=sum(p.numel() for p in sub.parameters()) if index == 0 else 0,
                depth=name.count("."),
                finished=finished,
                tensor_output=is_tensor,
            )
        )
    return rows, tuple(output.shape) if output is not None else ()


SCRIPTED_LAYERS = (
    "this is a TorchScript model, whose layers cannot be hooked; layer methods (Grad-CAM, CAM) need the "
    "model as Python code: load its state_dict with arch=... instead"
)


def scripted_submodule_message(module: nn.Module, name: str | None = None) -> str:
    """Why a layer method cannot look inside a TorchScript submodule of an eager model, and what works."""
    scripted = [n for n, sub in module.named_modules() if n and isinstance(sub, torch.jit.ScriptModule)]
    outer = [n for n in scripted if not any(n.startswith(f"{other}.") for other in scripted)]
    where = f"layer {name!r} belongs to" if name else "this model runs"
    return (
        f"{where} the TorchScript submodule {outer[0]!r}, whose layers cannot be hooked, so layer methods (Grad-CAM, "
        "CAM, ...) cannot see inside it; pass a layer outside it (cnnscope layers lists them), or give the model as "
        "an eager nn.Module or an ONNX export, which gets every method (saliency, IG, SmoothGrad, occlusion and "
        "RISE work as it is)"
    )


def parse_layer_spec(spec: str) -> tuple[str, int | None]:
    """'_swish@1' -> ('_swish', 1); 'layer4' -> ('layer4', None)."""
    name, sep, call = spec.rpartition("@")
    if sep and name:
        try:
            return name, int(call)
        except ValueError:
            pass
    return spec, None


def find_layer(module: nn.Module, calls: list[LayerCall], spec: str | nn.Module | LayerRef) -> LayerRef:
    """Resolve a layer given by dotted name (``'layer4.1'``), ``'name@call'``, module object or LayerRef.

    A module called several times per forward defaults to its last call (the one nearest the
    output); ``'@0'`` picks the first, negative indices count from the end.
    """
    if isinstance(spec, LayerRef):
        return spec
    if isinstance(module, torch.jit.ScriptModule):
        raise ModelError(SCRIPTED_LAYERS)
    if getattr(module, "cnnscope_black_box", None):  # an ONNX Runtime session: no layers to hook
        raise MethodError(module.cnnscope_black_box)
    if isinstance(spec, nn.Module):
        for name, sub in module.named_modules():
            if sub is spec and name:
                return find_layer(module, calls, name)
        raise LayerNotFoundError(
            f"the {type(spec).__name__} given as layer is not a submodule of this model; "
            "pass one of the model's own modules or its dotted name"
        )
    if not isinstance(spec, str) or not spec:
        raise LayerNotFoundError(f"layer must be a dotted module name, got {spec!r}")
    name, call = parse_layer_spec(spec.strip())
    named = dict(module.named_modules())
    if isinstance(named.get(name), torch.jit.ScriptModule):
        raise ModelError(scripted_submodule_message(module, name))
    if name not in named or not name:
        hint = did_you_mean(name, [n for n in named if n])
        raise LayerNotFoundError(f"layer {name!r} not found{hint} (cnnscope layers, or Model.layers(), lists them)")
    rows = [row for row in calls if row.name == name]
    if not rows:
        raise LayerNotFoundError(
            f"layer {name!r} exists but never runs in the model's forward pass; choose a layer that runs"
        )
    total = len(rows)
    chosen = total - 1 if call is None else call
    if chosen < 0:
        chosen += total
    if not 0 <= chosen < total:
        raise LayerNotFoundError(
            f"layer {name!r} runs {total} time(s) per forward; call @{call} is out of range (use @0 to @{total - 1})"
        )
    row = rows[chosen]
    return LayerRef(name=name, module=named[name], call=chosen, calls=total, output_shape=row.output_shape)


def default_layer_name(calls: list[LayerCall]) -> str:
    """The last call (by end time) whose output is a spatial (N, C, H, W) map: the layer before the
    head's pooling. For a ResNet that is ``layer4``; for EfficientNet-Lite the head's activation."""
    spatial = [row for row in calls if row.is_spatial]
    if not spatial:
        raise ModelError(
            "no layer of this model outputs a spatial (N, C, H, W) map with H, W > 1; "
            "pass layer=... explicitly (cnnscope layers lists them)"
        )
    last = max(spatial, key=lambda row: row.finished)
    return last.key


def format_table(calls: list[LayerCall]) -> str:
    """A Keras-style summary: name, type, output shape, parameters; totals at the bottom."""
    header = ("layer", "type", "output shape", "params")
    rows = [
        (
            "  " * row.depth + row.key,
            row.type,
            "x".join(str(d) for d in row.output_shape[1:]) if row.output_shape else "-",
            f"{row.params:,}" if row.call == 0 else "(shared)",
        )
        for row in calls
    ]
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) for i in range(4)] if rows else [5, 4, 12, 6]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += [
        "  ".join(
            (cell.rjust(w) if i == 3 else cell.ljust(w)) for i, (cell, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    ]
    return "\n".join(lines)


def token_default_layer(model) -> LayerRef:
    """The default layer of a transformer (a :class:`~cnnscope.models.Model` whose patch tokens come after
    its last spatial map): the last layer of patch tokens, as wide as the features the head reads, whose
    patch tokens reach those features. In a ViT with a class token that is the last block's input norm
    (``blocks.11.norm1``, ``encoder.layers.encoder_layer_11.ln_1``): everything after the last attention
    only feeds patch tokens that the head ignores, and layers inside a block (``attn.qkv``: q, k and v side
    by side; ``mlp.fc1``) have another width. Leading class, distillation and register tokens are dropped
    by the layer's layout.

    Reachability comes from the structure, not from the head's weights: one probe forward records the head's
    input (the features the last layer with the output's shape reads) and a fixed random direction of it is
    back-propagated, so a freshly built model whose head is all zeros gets the same layer as a trained one."""
    from ..hooks import capture
    from ..tokens import token_grid

    if getattr(model.module, "cnnscope_black_box", None):  # an ONNX Runtime session: no layers to hook
        raise MethodError(model.module.cnnscope_black_box)
    size = model.preprocess.size
    calls = model.calls()
    rows = [
        row
        for row in calls
        if row.tensor_output and len(row.output_shape) == 3 and token_grid(row.output_shape[1], size)
    ]
    if not rows:
        raise ModelError(
            "no layer of this model outputs a spatial (N, C, H, W) map or a (N, tokens, D) sequence of patch "
            "tokens; pass layer=... explicitly (cnnscope layers lists them)"
        )
    output_shape = model._output_shape
    named = dict(model.module.named_modules())
    heads = [
        row
        for row in calls
        if row.tensor_output and row.output_shape[1:] == output_shape[1:] and not list(named[row.name].children())
    ]
    head_inputs: list[torch.Tensor] = []

    def record_input(module: nn.Module, args: tuple) -> None:
        if args and isinstance(args[0], torch.Tensor) and args[0].requires_grad:
            head_inputs.append(args[0])

    refs = [model.layer(row.key) for row in rows]
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(1, model.preprocess.channels, *size, generator=generator).to(model.device)
    handles = [named[row.name].register_forward_pre_hook(record_input) for row in {r.name: r for r in heads}.values()]
    try:
        with (
            preserved(model.module, warn_if_training=False),
            capture(model.module, refs) as record,
            torch.enable_grad(),
        ):
            logits = model(probe)
            present = [ref for ref in refs if ref.key in record.activations]
            # The head's inputs (two for a distilled DeiT), else the scores themselves for a model without one.
            targets = head_inputs or [logits]
            directions = [torch.randn(t.shape, generator=generator).to(t) for t in targets]
            grads = torch.autograd.grad(
                targets, [record[ref.key] for ref in present], grad_outputs=directions, allow_unused=True
            )
    finally:
        for handle in handles:
            handle.remove()
    widths = {int(t.shape[-1]) for t in head_inputs}
    order = {row.key: row.finished for row in rows}
    reaching = [
        ref
        for ref, grad in zip(present, grads, strict=True)
        if grad is not None and float(grad[:, token_grid(ref.output_shape[1], size)[0] :].abs().max()) > 0
    ]
    if not reaching:
        raise ModelError("no layer of patch tokens reaches this model's output; pass layer=... explicitly")
    as_wide = [ref for ref in reaching if ref.output_shape[-1] in widths]
    return max(as_wide or reaching, key=lambda ref: order[ref.key])
