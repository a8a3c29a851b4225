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
from .base import Computed, Method, register_method

#: Memory for one chunk of per-target gradients; more targets than fit are done in several chunks.
GRADIENT_BUDGET_BYTES = 256 * 2**20


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
        for start in range(0, k_total, chunk):
            part = targets[:, start : start + chunk]
            gradients = None
            if self.needs_gradients:
                last = start + chunk >= k_total
                gradients = target_gradients(logits, activations, part, retain_graph=not last)
                backwards += part.shape[1]
                if self.config.get("counterfactual"):
                    gradients = -gradients
            weights = self.channel_weights(detached, gradients, part)
            if weights.ndim == 3:
                maps = torch.einsum("bkc,bchw->bkhw", weights, detached)
            else:
                maps = (weights * detached.unsqueeze(1)).sum(dim=2)
            if self.config.get("relu", True):
                maps = torch.relu(maps)
            pieces.append(torch.where((part >= 0)[:, :, None, None], maps, torch.zeros_like(maps)))
        return torch.cat(pieces, dim=1), backwards

    def _empty_map_notes(self, maps: torch.Tensor, targets: torch.Tensor) -> list[str]:
        if not (self.needs_gradients and self.config.get("relu", True)) or self.config.get("counterfactual"):
            return []
        notes = []
        for i, k in zip(*torch.nonzero(targets >= 0, as_tuple=True), strict=True):
            if float(maps[i, k].max()) <= 0.0:
                label = short_name(self.model.labels[int(targets[i, k])])
                notes.append(
                    (
                        int(i),
                        f"the {self.name} map of '{label}' is empty: at layer {self.layer.key} "
                        "the weighted channels lower its score everywhere (every region argues against it); "
                        "counterfactual=True (--counterfactual) maps the regions that lower it",
                    )
                )
        return notes


def target_gradients(
    logits: torch.Tensor, activations: torch.Tensor, targets: torch.Tensor, *, retain_graph: bool
) -> torch.Tensor:
    """d logits[b, targets[b, k]] / d activations for every (b, k): (B, K, *activations.shape[1:]).

    K targets cost one batched backward call (``is_grads_batched``), not K forward passes; the
    parameters' ``.grad`` is never written. Targets of -1 get zero gradients.
    """
    batch, k = targets.shape
    one_hot = torch.zeros((k, *logits.shape), dtype=logits.dtype, device=logits.device)
    valid = targets >= 0
    rows = torch.arange(batch, device=logits.device).expand(k, batch)
    one_hot[
        torch.arange(k, device=logits.device)[:, None].expand(k, batch)[valid.T],
        rows[valid.T],
        targets.T[valid.T],
    ] = 1.0
    if not activations.requires_grad:
        raise MethodError(
            "the layer's activation is not connected to the output by autograd; "
            "is the model's forward wrapped in torch.no_grad()?"
        )
    if k == 1:
        (grads,) = torch.autograd.grad(logits, activations, grad_outputs=one_hot[0], retain_graph=retain_graph)
        return grads.unsqueeze(1)
    (grads,) = torch.autograd.grad(
        logits, activations, grad_outputs=one_hot, retain_graph=retain_graph, is_grads_batched=True
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
        return gradients.mean(dim=(-2, -1))


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
        channels = self.layer.output_shape[1]
        named = dict(self.model.module.named_modules())
        linears = [row for row in self.model.calls() if isinstance(named.get(row.name), nn.Linear)]
        if not linears:
            raise MethodError(
                "CAM needs a head of global average pooling then one linear layer (Zhou et al. 2016); this "
                "model has no nn.Linear layer. Use gradcam, which works on any head"
            )
        head = named[max(linears, key=lambda row: row.finished).name]
        if head.in_features != channels:
            raise MethodError(
                f"CAM needs the last linear layer to read the {channels} channels of layer {self.layer.key!r}, "
                f"but it takes {head.in_features} features (the head is not global-average-pool + linear on "
                "this layer). Use gradcam, which works on any head"
            )
        return head

    def is_signed(self) -> bool:
        return not self.config.get("relu", False)

    def check_head(self, activations, logits):
        with torch.no_grad():
            pooled = activations.detach().mean(dim=(2, 3))
            predicted = torch.nn.functional.linear(pooled, self.head.weight, self.head.bias)
            error = float((predicted - logits.detach()).abs().max())
            scale = 1.0 + float(logits.detach().abs().max())
        if error > 1e-3 * scale:
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
