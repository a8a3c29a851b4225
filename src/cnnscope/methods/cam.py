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
import torch.nn.functional as F
from torch import nn

from ..errors import MethodError
from ..hooks import capture
from ..models.labels import short_name
from ..targets import NO_TARGET
from ..tokens import channel_axis, layer_adapter
from .base import MAX_NOTES, Computed, Method, auto_images_per_pass, register_method

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
        self.check_head(self.to_map(activations), logits)
        if self.layout != "channels-first":
            maps, backwards, extra_forwards = self._adapted_maps(activations, logits, targets, batch)
        else:
            maps, backwards, extra_forwards = self._weighted_maps(activations, logits, targets, batch)
        notes = self._empty_map_notes(maps, targets)
        return Computed(
            raw=maps,
            logits=logits.detach(),
            targets=targets,
            forwards=record.forwards + extra_forwards,
            backwards=backwards,
            notes=notes,
        )

    def check_head(self, activations: torch.Tensor, logits: torch.Tensor) -> None:
        """A hook for methods that only apply to some heads (CAM)."""

    def _weighted_maps(
        self, activations: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, batch: torch.Tensor
    ) -> tuple[torch.Tensor, int, int]:
        """(maps (B, K, h, w), backward passes, extra forward passes)."""
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
            pieces.append(self._combine(self.channel_weights(detached, gradients, part), detached, part))
        return (pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)), backwards, 0

    def _adapted_maps(self, activations, logits, targets, images):
        """A transformer layer (B, T, D) or a channels-last one (B, h, w, C): gradients w.r.t. the layer's own
        output, then activations and gradients both put in (B, C, h, w) form. Gradient-free methods run on
        the (B, C, h, w) view directly (Ablation-CAM, which changes the layer's output, overrides this)."""
        if not self.needs_gradients:
            return self._weighted_maps(self.to_map(activations.detach()), logits, targets, images)
        gradients = target_gradients(logits, activations, targets, retain_graph=False)
        if self.config.get("counterfactual"):
            gradients = -gradients
        detached = self.to_map(activations.detach())
        weights = self.channel_weights(detached, self.to_map(gradients), targets)
        return self._combine(weights, detached, targets), targets.shape[1], 0

    def _combine(self, weights: torch.Tensor, detached: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """sum_c weights * A (channel or element-wise weights), the ReLU, and zeros where there is no target."""
        if weights.ndim == 3:  # (B, k, C) @ (B, C, h*w): one batched matrix product
            maps = torch.bmm(weights, detached.flatten(2)).view(*weights.shape[:2], *detached.shape[2:])
        else:
            maps = (weights * detached.unsqueeze(1)).sum(dim=2)
        if self.config.get("relu", True):
            maps = torch.relu(maps)
        return torch.where((targets >= 0)[:, :, None, None], maps, torch.zeros_like(maps))

    def explain_layers(
        self,
        images: object,
        layers,
        target: object = "top1",
        *,
        threshold: float = 0.5,
        names: list[str] | None = None,
        images_per_pass: int | None = None,
    ) -> dict:
        """Explain ``images`` at several layers: {layer name: Explanation}.

        Gradient methods take one forward pass and one backward pass per target for all the layers
        together (the backward pass returns every layer's gradient); the others run once per layer."""
        refs = [self.model.layer(layer) for layer in layers]
        adapters = {}
        for ref in refs:
            adapter = layer_adapter(ref.output_shape, self.model.preprocess.size)
            if adapter is None:
                raise MethodError(
                    f"{self.name} needs layers with map or patch-token outputs; {ref.key!r} outputs {ref.output_shape}"
                )
            adapters[ref.key] = adapter[0]
        if not refs:
            raise MethodError("give at least one layer")

        def compute_many(batch, resolve):
            if self.needs_gradients:
                return self._compute_layers(refs, batch, resolve, adapters)
            return {ref.key: type(self)(self.model, layer=ref, **self.config).compute(batch, resolve) for ref in refs}

        return self._run(images, target, threshold, names, images_per_pass, compute_many)

    def _compute_layers(self, refs, batch, resolve, adapters) -> dict:
        with capture(self.model.module, refs) as record, torch.inference_mode(False), torch.enable_grad():
            logits = self.model.module(batch)
        activations = [record[ref.key] for ref in refs]
        targets = resolve(logits)
        k_total = targets.shape[1]
        per_layer = layer_target_gradients(logits, activations, targets)
        results = {}
        for ref, acts, grads in zip(refs, activations, per_layer, strict=True):
            gradients = adapters[ref.key](grads)
            if self.config.get("counterfactual"):
                gradients = -gradients
            detached = adapters[ref.key](acts.detach())
            maps = self._combine(self.channel_weights(detached, gradients, targets), detached, targets)
            results[ref.key] = Computed(
                raw=maps,
                logits=logits.detach(),
                targets=targets,
                forwards=record.forwards,
                backwards=k_total,
                notes=self._empty_map_notes(maps, targets, ref.key),
            )
        return results

    def _empty_map_notes(
        self, maps: torch.Tensor, targets: torch.Tensor, layer_key: str | None = None
    ) -> list[tuple[int, str]]:
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
                    f"the {self.name} map of '{label}' is empty: at layer {layer_key or self.layer.key} the weighted "
                    "channels lower its score everywhere (every region argues against it); "
                    "counterfactual=True (--counterfactual) maps the regions that lower it",
                )
            )
        if len(found) > MAX_NOTES:
            notes.append((found[MAX_NOTES][0], f"... and {len(found) - MAX_NOTES} more empty {self.name} maps"))
        return notes


def find_linear_head(model, layer) -> tuple[nn.Linear | None, str]:
    """The last ``nn.Linear`` that runs, if it reads ``layer``'s channels; else None and why not."""
    adapter = layer_adapter(layer.output_shape, model.preprocess.size)
    layout = adapter[1] if adapter is not None else "channels-first"
    channels = layer.output_shape[channel_axis(layout, len(layer.output_shape))]
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


def layer_target_gradients(
    logits: torch.Tensor, activations: list[torch.Tensor], targets: torch.Tensor, *, retain_graph: bool = False
) -> list[torch.Tensor]:
    """:func:`target_gradients` for several layers from one backward call: one (B, K, ...) tensor per layer."""
    k = targets.shape[1]
    # The targets' logits (B, K), masked where there is no target. Differentiating these rather than all
    # logits with a one-hot grad_outputs gives the same gradients with a lower peak (36 MiB less on the
    # default model for one image, bench/gradcam.py).
    picked = logits.gather(1, targets.clamp_min(0)) * (targets >= 0).to(logits.dtype)
    if k == 1:
        grads = torch.autograd.grad(picked.sum(), activations, retain_graph=retain_graph)
        return [grad.unsqueeze(1) for grad in grads]
    selectors = torch.eye(k, dtype=logits.dtype, device=logits.device)[:, None, :].expand(k, *picked.shape)
    grads = torch.autograd.grad(
        picked, activations, grad_outputs=selectors, retain_graph=retain_graph, is_grads_batched=True
    )
    return [grad.transpose(0, 1) for grad in grads]


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
    return layer_target_gradients(logits, [activations], targets, retain_graph=retain_graph)[0]


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


def _constant_field(gradients: torch.Tensor) -> bool:
    """Closed-form gradients are expanded views, constant over space (stride 0)."""
    return gradients.stride(-1) == 0 and gradients.stride(-2) == 0


@register_method("gradcam++")
class GradCAMPlusPlus(CAMBase):
    """Grad-CAM++ (Chattopadhay et al. 2018), with the paper's closed form for the pixel weights
    (exponential score, so higher derivatives are powers of the first):

        a[c, i, j] = g^2 / (2 g^2 + sum_{a,b} A[c, a, b] * g^3),   weight[c] = sum_{i,j} a[c, i, j] * ReLU(g)

    where g = d y / d A[c, i, j] (0 where g = 0). Same formula as pytorch-grad-cam's ``GradCAMPlusPlus``."""

    summary = "Grad-CAM++: pixel-weighted positive gradients (Chattopadhay et al. 2018)"

    def channel_weights(self, activations, gradients, targets):
        area = 1
        if _constant_field(gradients):
            area = gradients.shape[-1] * gradients.shape[-2]
            gradients = gradients[..., :1, :1]
        squared = gradients.pow(2)
        totals = activations.sum(dim=(-2, -1), keepdim=True).unsqueeze(1)  # (B, 1, C, 1, 1)
        denominator = 2 * squared + totals * squared * gradients
        alpha = torch.where(gradients != 0, squared / torch.where(denominator != 0, denominator, 1.0), 0.0)
        return (alpha * torch.relu(gradients)).sum(dim=(-2, -1)) * area


@register_method("xgradcam")
class XGradCAM(CAMBase):
    """XGrad-CAM (Fu et al. 2020): weight[c] = sum_{i,j} (A[c, i, j] / sum_{a,b} A[c, a, b]) * g[c, i, j]."""

    summary = "axiom-based Grad-CAM: activation-weighted gradients (Fu et al. 2020)"

    def channel_weights(self, activations, gradients, targets):
        totals = activations.sum(dim=(-2, -1), keepdim=True)
        share = (activations / torch.where(totals != 0, totals, 1.0)).unsqueeze(1)
        return (share * gradients).sum(dim=(-2, -1))


@register_method("hirescam")
class HiResCAM(CAMBase):
    """HiResCAM (Draelos & Carin 2020): map = ReLU(sum_c g[c] * A[c]) element-wise, without averaging
    the gradients over space, so the map shows exactly where the score's gradient meets activation.
    On a GAP + linear head it equals Grad-CAM."""

    summary = "element-wise gradient x activation at a layer (Draelos & Carin 2020)"

    def channel_weights(self, activations, gradients, targets):
        return gradients


@register_method("layercam")
class LayerCAM(CAMBase):
    """Layer-CAM (Jiang et al. 2021): map = ReLU(sum_c ReLU(g[c]) * A[c]) element-wise; works at earlier
    layers, where positive gradients are local."""

    summary = "element-wise positive gradient x activation (Jiang et al. 2021)"

    def channel_weights(self, activations, gradients, targets):
        return torch.relu(gradients)


@register_method("eigencam")
class EigenCAM(CAMBase):
    """Eigen-CAM (Muhammad & Yeasin 2020): the projection of the layer's activations on their first
    principal component. The (h*w, C) activation matrix is centred per channel, and the map is its
    product with the first right singular vector. Class-agnostic: every target of an image gets the
    same map. The singular vector's sign is arbitrary; it is chosen so that the map correlates
    positively with the summed activations (pytorch-grad-cam leaves it to chance)."""

    summary = "first principal component of a layer's activations, class-agnostic (Muhammad & Yeasin 2020)"
    needs_gradients = False
    class_specific = False
    options: ClassVar[dict[str, object]] = {"relu": True}

    def _weighted_maps(self, activations, logits, targets, images):
        batch, _, height, width = activations.shape
        matrix = activations.detach().flatten(2).transpose(1, 2).double()  # (B, hw, C)
        centred = matrix - matrix.mean(dim=1, keepdim=True)
        _, _, vh = torch.linalg.svd(centred, full_matrices=False)
        projection = centred @ vh[:, 0, :].unsqueeze(-1)  # (B, hw, 1)
        total = matrix.sum(dim=2, keepdim=True)
        sign = torch.sign(((projection - projection.mean(1, True)) * (total - total.mean(1, True))).sum(1, True))
        maps = (projection * torch.where(sign == 0, 1.0, sign)).view(batch, 1, height, width).float()
        if self.config.get("relu", True):
            maps = torch.relu(maps)
        maps = maps.expand(batch, targets.shape[1], height, width)
        return torch.where((targets >= 0)[:, :, None, None], maps, torch.zeros_like(maps)), 0, 0


def _normalized_masks(activations: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Each channel upsampled to the input (bilinear, corners aligned, as pytorch-grad-cam) and scaled
    to [0, 1]; constant channels give all-zero masks."""
    upsampled = F.interpolate(activations, size=size, mode="bilinear", align_corners=True)
    low = upsampled.flatten(2).amin(dim=2)[..., None, None]
    high = upsampled.flatten(2).amax(dim=2)[..., None, None]
    return (upsampled - low) / (high - low + 1e-8)


@register_method("scorecam")
class ScoreCAM(CAMBase):
    """Score-CAM (Wang et al. 2020), as pytorch-grad-cam computes it: each channel, upsampled and
    scaled to [0, 1], masks the input; the target's logit on each masked input, softmaxed over the
    channels, weighs the channels: map = ReLU(sum_c softmax_c(y(x * M_c)) A[c]).

    No gradients. The masked images run under ``inference_mode`` in passes of several images; channels
    that are constant over space all give the same all-zero mask, so their one shared score is computed
    once (on the default model that skips 20-60% of the 1,280 forwards, with the same output).
    """

    summary = "channels as input masks, weighted by the masked score (Wang et al. 2020)"
    needs_gradients = False
    options: ClassVar[dict[str, object]] = {"relu": True, "masks_per_pass": None}

    def _weighted_maps(self, activations, logits, targets, images):
        module = self.model.module
        batch, channels = activations.shape[:2]
        per_pass = int(self.config["masks_per_pass"] or auto_images_per_pass(self.model))
        detached = activations.detach()
        forwards = 0
        weights = torch.zeros((batch, targets.shape[1], channels), dtype=torch.float32, device=activations.device)
        image = images
        with torch.inference_mode():
            for b in range(batch):
                masks = _normalized_masks(detached[b : b + 1].transpose(0, 1), tuple(image.shape[-2:]))  # (C, 1, H, W)
                varying = (detached[b].flatten(1).amax(1) != detached[b].flatten(1).amin(1)).nonzero().flatten()
                constant = (detached[b].flatten(1).amax(1) == detached[b].flatten(1).amin(1)).nonzero().flatten()
                scores = torch.empty((channels, targets.shape[1]), dtype=torch.float32, device=activations.device)
                order = varying.tolist() + ([int(constant[0])] if len(constant) else [])
                safe = targets[b].clamp_min(0)
                for start in range(0, len(order), per_pass):
                    chosen = torch.tensor(order[start : start + per_pass], device=activations.device)
                    out = module(image[b : b + 1] * masks[chosen])
                    forwards += 1
                    scores[chosen] = out[:, safe].float()
                if len(constant):
                    scores[constant] = scores[int(constant[0])].clone()
                weights[b] = torch.softmax(scores, dim=0).T
        maps = torch.einsum("bkc,bchw->bkhw", weights, detached)
        if self.config.get("relu", True):
            maps = torch.relu(maps)
        return torch.where((targets >= 0)[:, :, None, None], maps, torch.zeros_like(maps)), 0, forwards


@register_method("ablationcam")
class AblationCAM(CAMBase):
    """Ablation-CAM (Desai & Ramaswamy 2020): weight[c] = (y - y_c) / y, where y_c is the score with
    channel c of the layer set to zero; map = ReLU(sum_c weight[c] A[c]).

    The layer's output is replaced through a forward hook (the user's layer is never swapped). When
    the network after the layer is global average pooling + linear (checked on the input), the ablated
    scores are exact in closed form, y_c = y - W[c] mean(A[c]); otherwise the network runs once per
    image with the layer's output replaced by a batch of ablated copies, so the part before the layer
    runs once (falling back to whole passes for models whose forward cannot take that). Channels that
    are zero everywhere are not ablated: their weight is 0.

    On transformer tokens (B, T, D) and channels-last maps (B, h, w, C) a channel is zeroed in the
    layer's own layout (every token's feature d, class token included), and the weights multiply the
    layer's (B, C, h, w) view, without a ``reshape_transform``.
    """

    summary = "channel weights from the score drop when each channel is zeroed (Desai & Ramaswamy 2020)"
    needs_gradients = False
    options: ClassVar[dict[str, object]] = {"relu": True, "ablations_per_pass": 256}

    def _adapted_maps(self, activations, logits, targets, images):
        return self._weighted_maps(activations, logits, targets, images)  # it handles the layer's own layout

    def _weighted_maps(self, activations, logits, targets, images):
        raw = activations.detach()
        detached = self.to_map(raw)  # (B, C, h, w)
        safe = targets.clamp_min(0)
        original = logits.detach().gather(1, safe)  # (B, K)
        head, _ = find_linear_head(self.model, self.layer)
        forwards = 0
        if head is not None and is_gap_linear(head, detached, logits)[0]:
            drop = head.weight.detach()[safe] * detached.mean(dim=(2, 3)).unsqueeze(1)  # (B, K, C): y - y_c
        else:
            drop, forwards = self._ablated_drops(raw, original, safe, images)
        denominator = torch.where(original.abs() > 1e-12, original, torch.full_like(original, 1e-12))
        weights = drop / denominator.unsqueeze(-1)
        maps = torch.einsum("bkc,bchw->bkhw", weights.float(), detached)
        if self.config.get("relu", True):
            maps = torch.relu(maps)
        return torch.where((targets >= 0)[:, :, None, None], maps, torch.zeros_like(maps)), 0, forwards

    def _ablated_drops(self, raw, original, safe, images):
        """(B, K, C) score drops, each channel zeroed in the layer's own layout ``raw``."""
        per_pass = int(self.config["ablations_per_pass"])
        channel_dim = channel_axis(self.layout, raw.ndim)
        first = raw.movedim(channel_dim, 1)  # (B, C, ...)
        batch, channels = first.shape[:2]
        drops = torch.zeros((batch, safe.shape[1], channels), device=raw.device)
        forwards = 0
        for b in range(batch):
            active = (first[b].flatten(1).abs().amax(1) > 0).nonzero().flatten()
            for start in range(0, len(active), per_pass):
                chosen = active[start : start + per_pass]
                ablated = first[b : b + 1].repeat(len(chosen), *([1] * (first.ndim - 1)))
                ablated[torch.arange(len(chosen)), chosen] = 0
                replacement = ablated.movedim(1, channel_dim).contiguous()
                out, passes = self._run_with_layer_output(images[b : b + 1], replacement)
                forwards += passes
                drops[b, :, chosen] = original[b].unsqueeze(1) - out[:, safe[b]].T.float()
        return drops, forwards

    def _run_with_layer_output(self, image: torch.Tensor, replacement: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Scores with the layer's output replaced by ``replacement`` (n rows): first with the part
        before the layer run once on the one image, else on n copies of it."""
        layer, count = self.layer, replacement.shape[0]
        calls = [0]

        def replace(module, args, output):
            index = calls[0]
            calls[0] += 1
            return replacement if index == layer.call else None

        for passes, inputs in enumerate((image, image.expand(count, -1, -1, -1)), start=1):
            calls[0] = 0
            handle = layer.module.register_forward_hook(replace)
            try:
                with torch.inference_mode():
                    out = self.model.module(inputs)
                if out.shape[0] == count:
                    return out, passes
            except RuntimeError:
                pass
            finally:
                handle.remove()
        raise MethodError(f"ablationcam cannot replace the output of layer {layer.key!r} in this model's forward")


@register_method("guided-gradcam")
class GuidedGradCAM(Method):
    """Guided Grad-CAM (Selvaraju et al. 2017): guided backpropagation times the Grad-CAM map upsampled
    to the input, per colour channel, then reduced over channels like the gradient methods (``reduce``).

    Two forward passes: Grad-CAM needs the plain gradient at the layer, guided backpropagation the
    modified one. Captum's ``GuidedGradCam`` is the same product (with its default nearest-neighbour
    upsampling; ``upsample="nearest"`` reproduces it); Captum's guided part only modifies ``nn.ReLU``."""

    summary = "guided backpropagation x Grad-CAM (Selvaraju et al. 2017)"
    uses_layer: ClassVar[bool] = True
    options: ClassVar[dict[str, object]] = {"reduce": "max-abs", "upsample": "bilinear"}

    def __init__(self, model="efficientnet_lite0", *, layer=None, **options) -> None:
        super().__init__(model, layer=layer, **options)
        from .gradient import REDUCTIONS, GuidedBackprop

        if self.config["reduce"] not in REDUCTIONS:
            raise MethodError(f"unknown reduce {self.config['reduce']!r}; choose one of {', '.join(REDUCTIONS)}")
        if self.config["upsample"] not in ("bilinear", "nearest"):
            raise MethodError("upsample must be 'bilinear' or 'nearest'")
        self.gradcam = GradCAM(self.model, layer=self.layer)
        self.guided = GuidedBackprop(self.model, reduce=self.config["reduce"])

    def is_signed(self) -> bool:
        return self.config["reduce"] == "sum"

    def compute(self, batch, resolve):
        from .gradient import reduce_channels

        cam = self.gradcam.compute(batch, resolve)
        guided = self.guided.attributions(batch, lambda _logits: cam.targets)
        mode = self.config["upsample"]
        size = tuple(batch.shape[-2:])
        upsampled = F.interpolate(
            cam.raw, size=size, mode=mode, **({"align_corners": False} if mode == "bilinear" else {})
        )
        channels = guided.channels * upsampled.unsqueeze(2)
        return Computed(
            raw=reduce_channels(channels, self.config["reduce"]),
            logits=cam.logits,
            targets=cam.targets,
            forwards=cam.forwards + guided.forwards,
            backwards=cam.backwards + guided.backwards,
            notes=cam.notes,
            channels=channels,
        )
