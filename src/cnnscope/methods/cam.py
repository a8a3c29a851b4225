"""Class activation maps: a weighted sum of a layer's channels, with one override per method.

    map[b, k] = ReLU( sum_c  weight[b, k, c] * A[b, c] )

where A is the layer's activation and ``channel_weights(A, dA)`` is the one thing a variant
changes. The gradients dA of every target come from ``torch.autograd.grad`` on the captured
activation, for all K targets of a batch from one forward pass (batched with
``is_grads_batched``), so the model's parameters get no ``.grad`` and in-place ReLUs are fine.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ..errors import MethodError
from ..hooks import capture
from ..models.labels import short_name
from ..targets import NO_TARGET
from .base import MAX_NOTES, Computed, Method, register_method

#: Memory for one chunk of per-target gradients; more targets than fit are done in several chunks.
#: 32 MiB measured fastest on the default model (all 1,000 classes: 1000 > 128 > 32 > 8 per chunk).
GRADIENT_BUDGET_BYTES = 32 * 2**20
#: From this many targets on, a verified GAP + linear tail gives the gradients in closed form.
ANALYTIC_MIN_TARGETS = 3


class CAMBase(Method):
    """The shared machinery; subclasses implement :meth:`channel_weights`."""

    uses_layer: ClassVar[bool] = True
    needs_gradients: ClassVar[bool] = True
    options: ClassVar[dict[str, object]] = {"relu": True, "counterfactual": False}

    def channel_weights(
        self, activations: torch.Tensor, gradients: torch.Tensor | None, targets: torch.Tensor
    ) -> torch.Tensor:
        """(B, C, h, w) activations and (B, k, C, h, w) gradients -> (B, k, C) channel weights
        (or (B, k, C, h, w) for element-wise weights)."""
        raise NotImplementedError

    def is_signed(self) -> bool:
        return not self.config.get("relu", True)

    def compute(self, batch: torch.Tensor, resolve) -> Computed:
        layer = self.layer
        assert layer is not None
        with (
            capture(self.model.module, [layer]) as record,
            torch.inference_mode(False),
            torch.set_grad_enabled(self.needs_gradients),
        ):
            logits = self.model.module(batch)
            activations = record[layer.key]
        targets = resolve(logits)
        self.check_head(activations, logits)
        maps, backwards = self._weighted_maps(activations, logits, targets)
        notes = self._empty_map_notes(maps, targets)
        return Computed(
            raw=maps,
            logits=logits.detach(),
            targets=targets,
            forwards=record.forwards,
            backwards=backwards,
            notes=notes,
        )

    def check_head(self, activations: torch.Tensor, logits: torch.Tensor) -> None:
        """A hook for methods that only apply to some heads (CAM)."""

    def _weighted_maps(
        self, activations: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, int]:
        batch, k_total = targets.shape
        per_target = activations[0].numel() * activations.element_size() * batch
        chunk = max(1, min(k_total, GRADIENT_BUDGET_BYTES // max(1, per_target)))
        detached = activations.detach()
        pieces, backwards = [], 0
        analytic = None
        if self.needs_gradients and k_total >= ANALYTIC_MIN_TARGETS:
            analytic = linear_tail_gradients(self.model, self.layer, activations, logits, targets)
            if analytic is not None:
                backwards, chunk = 1, k_total  # the one backward pass that verified the closed form
                if self.config.get("counterfactual"):
                    analytic = analytic[..., :1, :1].neg().expand_as(analytic)  # stays a zero-copy view
        for start in range(0, k_total, chunk):
            part = targets[:, start : start + chunk]
            gradients = None
            if analytic is not None:
                gradients = analytic[:, start : start + chunk]
            elif self.needs_gradients:
                last = start + chunk >= k_total
                gradients = target_gradients(logits, activations, part, retain_graph=not last)
                backwards += part.shape[1]
                if self.config.get("counterfactual"):
                    gradients = -gradients
            weights = self.channel_weights(detached, gradients, part)
            if weights.ndim == 3:  # (B, k, C) @ (B, C, h*w): one batched matrix product
                maps = torch.bmm(weights, detached.flatten(2)).view(*weights.shape[:2], *detached.shape[2:])
            else:
                maps = (weights * detached.unsqueeze(1)).sum(dim=2)
            if self.config.get("relu", True):
                maps = torch.relu(maps)
            pieces.append(torch.where((part >= 0)[:, :, None, None], maps, torch.zeros_like(maps)))
        return (pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)), backwards

    def _empty_map_notes(self, maps: torch.Tensor, targets: torch.Tensor) -> list[tuple[int, str]]:
        if not (self.needs_gradients and self.config.get("relu", True)) or self.config.get("counterfactual"):
            return []
        empty = (maps.flatten(2).amax(dim=2) <= 0) & (targets >= 0)
        found = torch.nonzero(empty).tolist()
        notes = []
        for i, k in found[:MAX_NOTES]:
            label = short_name(self.model.labels[int(targets[i, k])])
            notes.append(
                (
                    i,
                    f"the {self.name} map of '{label}' is empty: at layer {self.layer.key} the weighted "
                    "channels lower its score everywhere (every region argues against it); "
                    "counterfactual=True (--counterfactual) maps the regions that lower it",
                )
            )
        if len(found) > MAX_NOTES:
            notes.append((found[MAX_NOTES][0], f"... and {len(found) - MAX_NOTES} more empty {self.name} maps"))
        return notes


def find_linear_head(model, layer) -> tuple[nn.Linear | None, str]:
    """The last ``nn.Linear`` that runs, if it reads ``layer``'s channels; else None and why not."""
    channels = layer.output_shape[1]
    named = dict(model.module.named_modules())
    linears = [row for row in model.calls() if isinstance(named.get(row.name), nn.Linear)]
    if not linears:
        return None, "this model has no nn.Linear layer"
    head = named[max(linears, key=lambda row: row.finished).name]
    if head.in_features != channels:
        return None, (
            f"the last linear layer takes {head.in_features} features, not the {channels} channels of layer "
            f"{layer.key!r}"
        )
    return head, ""


def is_gap_linear(head: nn.Linear, activations: torch.Tensor, logits: torch.Tensor) -> tuple[bool, float]:
    """Whether logits == head(mean over space of activations) on this input, and the largest gap."""
    with torch.no_grad():
        predicted = torch.nn.functional.linear(activations.detach().mean(dim=(2, 3)), head.weight, head.bias)
        error = float((predicted - logits.detach()).abs().max())
        scale = 1.0 + float(logits.detach().abs().max())
    return error <= 1e-3 * scale, error


def linear_tail_gradients(
    model, layer, activations: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor | None:
    """Gradients of every target in closed form when the network after ``layer`` is global average
    pooling then a linear layer: d y_c / d A[k, i, j] = W[c, k] / (h * w) at every position.

    Verified on this very input, or None (and the caller uses autograd): the logits must equal
    W @ mean(A) + b, and the autograd gradient of a random combination of the logits must equal
    the closed form's (which also catches an element-wise function between the layer and the
    pooling that is not the identity here). Returns a (B, K, C, h, w) zero-copy expanded view.
    """
    head, _ = find_linear_head(model, layer)
    if head is None or not is_gap_linear(head, activations, logits)[0]:
        return None
    batch, channels, height, width = activations.shape
    generator = torch.Generator(device="cpu").manual_seed(0)
    direction = torch.randn(logits.shape, generator=generator).to(logits)
    (actual,) = torch.autograd.grad((logits * direction).sum(), activations, retain_graph=True)
    weight = head.weight.detach()
    expected = (direction @ weight / (height * width))[:, :, None, None]
    scale = float(expected.abs().max()) or 1.0
    if not torch.allclose(actual, expected.expand_as(actual), rtol=1e-4, atol=1e-5 * scale):
        return None
    per_target = weight[targets.clamp_min(0)] / (height * width)  # (B, K, C)
    per_target = torch.where((targets >= 0)[:, :, None], per_target, torch.zeros_like(per_target))
    return per_target[:, :, :, None, None].expand(batch, targets.shape[1], channels, height, width)


def spatial_mean(gradients: torch.Tensor) -> torch.Tensor:
    """Mean over the last two dims; free for the closed-form gradients (expanded, stride 0)."""
    if gradients.stride(-1) == 0 and gradients.stride(-2) == 0:
        return gradients[..., 0, 0]
    return gradients.mean(dim=(-2, -1))


def target_gradients(
    logits: torch.Tensor, activations: torch.Tensor, targets: torch.Tensor, *, retain_graph: bool
) -> torch.Tensor:
    """d logits[b, targets[b, k]] / d activations for every (b, k): (B, K, *activations.shape[1:]).

    K targets cost one batched backward call (``is_grads_batched``), not K forward passes; the
    parameters' ``.grad`` is never written. Targets of -1 get zero gradients.
    """
    if not activations.requires_grad:
        raise MethodError(
            "the layer's activation is not connected to the output by autograd; "
            "is the model's forward wrapped in torch.no_grad()?"
        )
    k = targets.shape[1]
    # The targets' logits (B, K), masked where there is no target. Differentiating these rather than all
    # logits with a one-hot grad_outputs gives the same gradients with a lower peak (36 MiB less on the
    # default model for one image, bench/gradcam.py).
    picked = logits.gather(1, targets.clamp_min(0)) * (targets >= 0).to(logits.dtype)
    if k == 1:
        (grads,) = torch.autograd.grad(picked.sum(), activations, retain_graph=retain_graph)
        return grads.unsqueeze(1)
    selectors = torch.eye(k, dtype=logits.dtype, device=logits.device)[:, None, :].expand(k, *picked.shape)
    (grads,) = torch.autograd.grad(
        picked, activations, grad_outputs=selectors, retain_graph=retain_graph, is_grads_batched=True
    )
    return grads.transpose(0, 1)


@register_method("gradcam")
class GradCAM(CAMBase):
    """Grad-CAM (Selvaraju et al. 2017): the channel weights are the spatially averaged gradients.

        weight[c] = mean_{i,j} d y_class / d A[c, i, j];   map = ReLU(sum_c weight[c] * A[c])

    ``y_class`` is the logit (before softmax), as in the paper. ``counterfactual=True`` negates the
    gradients (the paper's counterfactual explanation: regions whose removal would raise the
    score). ``relu=False`` keeps the signed sum. Same definition as Captum's ``LayerGradCam``
    (``relu_attributions=True``) and pytorch-grad-cam's ``GradCAM``, except that pytorch-grad-cam
    rescales each map to [0, 1]; here ``raw`` keeps the scale.
    """

    summary = "gradient-weighted class activation map (Selvaraju et al. 2017)"

    def channel_weights(self, activations, gradients, targets):
        return spatial_mean(gradients)


@register_method("cam")
class CAM(CAMBase):
    """CAM (Zhou et al. 2016): for a head of global average pooling then one linear layer,

        map[class] = sum_c W[class, c] * A[c]

    with W the linear layer's weights. No gradients are needed; the map is signed (no ReLU unless
    ``relu=True``). On such a head Grad-CAM equals ReLU(CAM) / (h * w). Raises ``MethodError`` on any
    other head: the check is numerical (the logits must equal W @ mean(A) + b), so it holds however
    the head is written.
    """

    summary = "class activation map for global-average-pool + linear heads (Zhou et al. 2016)"
    needs_gradients = False
    signed = True
    options: ClassVar[dict[str, object]] = {"relu": False}

    def __init__(self, model="efficientnet_lite0", *, layer=None, **options) -> None:
        super().__init__(model, layer=layer, **options)
        self.head = self._find_linear_head()

    def _find_linear_head(self) -> nn.Linear:
        head, reason = find_linear_head(self.model, self.layer)
        if head is None:
            raise MethodError(
                f"CAM needs a head of global average pooling then one linear layer (Zhou et al. 2016), but {reason}. "
                "Use gradcam, which works on any head"
            )
        return head

    def is_signed(self) -> bool:
        return not self.config.get("relu", False)

    def check_head(self, activations, logits):
        ok, error = is_gap_linear(self.head, activations, logits)
        if not ok:
            raise MethodError(
                f"CAM needs the logits to be a linear layer applied to the global average of layer "
                f"{self.layer.key!r} (Zhou et al. 2016); on this model they are not (max difference {error:.3g}). "
                "Use gradcam, which works on any head, or pass the layer that feeds the pooling"
            )

    def channel_weights(self, activations, gradients, targets):
        weight = self.head.weight.detach()
        safe = targets.clamp_min(0)
        picked = weight[safe]  # (B, k, C)
        return torch.where((targets != NO_TARGET)[:, :, None], picked, torch.zeros_like(picked))
