"""Contract checks that any method (ours or a user's) can be put through.

Each ``check_*`` raises ``AssertionError`` with a sentence saying what went wrong. They are run
over every registered method by cnnscope's own test suite, and are public so that a user who
registers a method can run them too.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules import module as module_globals

from ..explanation import Explanation
from ..models import Model

HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
)
GLOBAL_HOOK_DICTS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
)


@dataclass
class Snapshot:
    """Everything of a model that an explanation must leave as it was."""

    hooks: dict[str, int]
    training: dict[str, bool]
    requires_grad: dict[str, bool]
    grads: dict[str, torch.Tensor | None]
    params: dict[str, torch.Tensor]
    module_ids: dict[str, int]

    @classmethod
    def take(cls, module: nn.Module) -> Snapshot:
        hooks = {}
        for name, sub in module.named_modules():
            for attr in HOOK_DICTS:
                hooks[f"{name or '<root>'}.{attr}"] = len(getattr(sub, attr, {}) or {})
        for attr in GLOBAL_HOOK_DICTS:
            hooks[f"<global>.{attr}"] = len(getattr(module_globals, attr, {}) or {})
        named = dict(module.named_parameters())
        return cls(
            hooks=hooks,
            training={name: sub.training for name, sub in module.named_modules()},
            requires_grad={name: p.requires_grad for name, p in named.items()},
            grads={name: (None if p.grad is None else p.grad.detach().clone()) for name, p in named.items()},
            params={name: p.detach().clone() for name, p in named.items()},
            module_ids={name: id(sub) for name, sub in module.named_modules()},
        )

    def differences(self, other: Snapshot) -> list[str]:
        problems = []
        for field_name in ("hooks", "training", "requires_grad", "module_ids"):
            mine, theirs = getattr(self, field_name), getattr(other, field_name)
            changed = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            if changed:
                problems.append(f"{field_name} changed for {', '.join(changed[:5])}")
        for name, grad in self.grads.items():
            after = other.grads.get(name)
            if (grad is None) != (after is None) or (grad is not None and not torch.equal(grad, after)):
                problems.append(f".grad of parameter {name} changed")
                break
        for name, value in self.params.items():
            if not torch.equal(value, other.params[name]):
                problems.append(f"parameter {name} changed")
                break
        return problems


def check_untouched(run: Callable[[], object], model: Model, inputs: torch.Tensor | None = None) -> object:
    """Run ``run()`` and assert the model's hooks, modes, flags, grads, parameters and the input
    tensor (values and version counter) are exactly as before. Returns what ``run`` returned."""
    before = Snapshot.take(model.module)
    copy = inputs.clone() if inputs is not None else None
    version = inputs._version if inputs is not None else None
    result = run()
    problems = before.differences(Snapshot.take(model.module))
    if inputs is not None and (inputs._version != version or not torch.equal(inputs, copy)):
        problems.append("the input tensor was modified in place")
    assert not problems, "; ".join(problems)
    return result


def check_cleanup_on_error(method: Callable[[torch.Tensor], object], model: Model, inputs: torch.Tensor) -> None:
    """Make the model's forward raise half-way and assert that nothing was left behind."""
    before = Snapshot.take(model.module)

    class Boom(RuntimeError):
        pass

    def explode(module, args, output):
        raise Boom("injected failure")

    last = [sub for name, sub in model.module.named_modules() if name][-1]
    handle = last.register_forward_hook(explode)
    try:
        try:
            method(inputs)
        except Boom:
            pass
        else:
            raise AssertionError("the injected failure inside the forward pass did not propagate")
    finally:
        handle.remove()
    problems = before.differences(Snapshot.take(model.module))
    assert not problems, "after an exception inside the forward: " + "; ".join(problems)


def check_nothing_kept(method: Callable[[torch.Tensor], object], model: Model, inputs: torch.Tensor) -> None:
    """No tensor that the model's layers output during the call is alive once the call's result is dropped.
    A method that keeps one (a cache holding a tensor of the autograd graph, whose nodes refer back to the
    cache: a cycle Python's garbage collector cannot see through) keeps every activation of every call, and
    a dataset's worth of calls runs out of memory."""
    kept: list[weakref.ref] = []

    def keep(module, args, output):
        for value in output if isinstance(output, (tuple, list)) else (output,):
            if isinstance(value, torch.Tensor):
                kept.append(weakref.ref(value))

    leaves = [sub for name, sub in model.module.named_modules() if name and not any(sub.children())]
    handles = [sub.register_forward_hook(keep) for sub in leaves or [model.module]]
    try:
        result = method(inputs)
    finally:
        for handle in handles:
            handle.remove()
    del result
    gc.collect()
    alive = sum(ref() is not None for ref in kept)
    assert alive == 0, (
        f"{alive} of the {len(kept)} tensors the model's layers output during the call are still alive after it "
        "(a reference cycle through the autograd graph, or a cache that holds them)"
    )


def check_batched_equals_single(
    method: Callable[[torch.Tensor], Explanation],
    inputs: torch.Tensor,
    *,
    rtol: float = 1e-4,
    atol: float = 1e-6,
) -> None:
    """The maps of a batch equal the maps of each image explained alone (the targets a batch pads with
    -1 for images with fewer targets are left out of the comparison)."""
    together = method(inputs)
    for index in range(inputs.shape[0]):
        alone = method(inputs[index : index + 1])
        width = int((alone.targets[0] >= 0).sum())
        batched_targets = together.targets[index]
        assert torch.equal(batched_targets[:width], alone.targets[0, :width]) and bool(
            (batched_targets[width:] < 0).all()
        ), f"image {index}: targets differ in a batch"
        scale = float(alone.raw.abs().max()) or 1.0
        torch.testing.assert_close(
            together.raw[index, :width],
            alone.raw[0, :width],
            rtol=rtol,
            atol=atol * scale,
            msg=lambda m, i=index: f"image {i}: batched map differs from the single one: {m}",
        )


def check_deterministic(method: Callable[[torch.Tensor], Explanation], inputs: torch.Tensor) -> None:
    """Two runs give the same maps, bit for bit."""
    first, second = method(inputs), method(inputs)
    assert torch.equal(first.raw, second.raw), "two runs with the same input gave different maps"


def check_scores(explanation: Explanation, model: Model, inputs: torch.Tensor, target: object, threshold: float = 0.5):
    """The explanation reports the model's own outputs: its probabilities are the model's (softmax,
    multi-label sigmoid, or the outputs of a model that outputs probabilities), its targets those that
    the model's own outputs resolve to, and its top-5 the model's. Outputs are computed image by image."""
    from ..state import preserved
    from ..targets import resolve_targets

    with preserved(model.module, warn_if_training=False), torch.no_grad():
        outputs = torch.cat([model(inputs[i : i + 1]) for i in range(inputs.shape[0])]).float()
    expected = model.probabilities(outputs)
    torch.testing.assert_close(
        explanation.probabilities,
        expected.cpu(),
        rtol=1e-4,
        atol=1e-5,
        msg=lambda m: f"the reported probabilities are not the model's own: {m}",
    )
    targets = resolve_targets(
        target,
        outputs,
        model.labels,
        multilabel=model.multilabel,
        threshold=threshold,
        probabilities=model.probabilities,
    )
    assert torch.equal(explanation.targets, targets.cpu()), (
        f"the resolved targets {explanation.targets.tolist()} are not the model's own {targets.tolist()}"
    )
    ranked = expected.topk(min(5, expected.shape[1]), dim=1).indices.tolist()
    reported = [[p.index for p in row] for row in explanation.top]
    assert reported == ranked, f"the reported top-5 {reported} is not the model's {ranked}"


def check_method(
    method_cls, model: Model, inputs: torch.Tensor, *, target: object = "top2", threshold: float = 0.5, **options
) -> None:
    """All of the above for one method class on one model."""
    explainer = method_cls(model, **options)

    def run(batch: torch.Tensor) -> Explanation:
        return explainer(batch, target, threshold=threshold)

    explanation = check_untouched(lambda: run(inputs), model, inputs)
    assert isinstance(explanation, Explanation)
    assert explanation.raw.shape[:2] == explanation.targets.shape
    assert torch.isfinite(explanation.raw).all(), "the maps contain NaN or infinity"
    check_scores(explanation, model, inputs, target, threshold)
    check_cleanup_on_error(run, model, inputs)
    check_nothing_kept(run, model, inputs)
    check_batched_equals_single(run, inputs)
    check_deterministic(run, inputs)
