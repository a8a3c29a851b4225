"""Class activation maps: a weighted sum of a layer's channels, with one override per method.

    map[b, k] = ReLU( sum_c  weight[b, k, c] * A[b, c] )

where A is the layer's activation and :meth:`CAMBase.weights` is the one thing a variant defines:

    weights(activations, gradients, targets, run) -> (B, K, C) channel weights, or (B, K, C, h, w)
                                                     element-wise weights

``activations`` are the layer's (B, C, h, w) view (transformer tokens on their grid, channels-last
maps moved), ``gradients`` the (B, K, C, h, w) gradients of each target's score (None for variants
with ``needs_gradients = False``), ``targets`` the (B, K) class indices and ``run`` a :class:`LayerRun`
with what a gradient-free variant needs besides (the inputs, the outputs, the layer's own output,
and forward passes that count themselves). The base does the rest once for every variant: the
forward pass and the gradients (for all K targets of a batch from one forward pass, batched with
``is_grads_batched``, so the parameters get no ``.grad`` and in-place ReLUs are fine), the
counterfactual sign, the combination, the ReLU, zeros for padded targets and the notes on empty maps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import MethodError
from ..hooks import LayerRef, capture
from ..models import Model
from ..models.labels import short_name
from ..options import Options, choice, flag, integer, number
from ..progress import check_cancelled
from .base import INPUTS_PER_PASS, MAX_NOTES, Computed, Method, auto_images_per_pass, register_method
from .gradient import REDUCE, picked_scores

#: Memory for one chunk of per-target gradients; more targets than fit are done in several chunks.
#: 32 MiB measured fastest on the default model (all 1,000 classes: 1000 > 128 > 32 > 8 per chunk).
GRADIENT_BUDGET_BYTES = 32 * 2**20
#: From this many targets on, a verified GAP + linear tail gives the gradients in closed form.
ANALYTIC_MIN_TARGETS = 3

RELU = flag(True, "clip negative map values (the paper's ReLU); false keeps the signed sum")
COUNTERFACTUAL = flag(False, "negate the gradients: the regions whose removal would raise the score")
#: The two smoothing options every CAM method takes, with pytorch-grad-cam's meaning (see :class:`CAMBase`).
SMOOTHING = Options(
    aug_smooth=flag(
        False,
        "average the map over horizontal flips and brightness changes (model input x0.9, x1, x1.1), "
        "each map flipped back first: 6 passes (pytorch-grad-cam's aug_smooth)",
    ),
    eigen_smooth=flag(
        False,
        "the first principal component of the weighted activations instead of their sum, its sign agreeing "
        "with the sum (pytorch-grad-cam's eigen_smooth)",
    ),
)
#: aug_smooth's augmentations, as pytorch-grad-cam's default test-time augmentation: (flip, brightness factor).
AUGMENTATIONS = tuple((flip, factor) for flip in (False, True) for factor in (0.9, 1.0, 1.1))


@dataclass
class LayerRun:
    """What a CAM variant may use besides activations and gradients, for one pass of images.

    ``images`` are the model inputs, ``logits`` the model's outputs for them, ``output`` the layer's
    output in its own layout (detached). :meth:`scores` and :meth:`scores_with_layer_output` run the
    model without gradients and count the forward passes in ``forwards``."""

    model: Model
    layer: LayerRef
    images: torch.Tensor
    logits: torch.Tensor
    output: torch.Tensor
    forwards: int = 0
    #: (B, K, C, h, w) Hessian-vector products H A of each target's score (ShapleyCAM), or None
    hessian_products: torch.Tensor | None = None

    def scores(self, inputs: torch.Tensor) -> torch.Tensor:
        """The model's raw outputs for ``inputs`` (one forward pass, no gradients)."""
        check_cancelled()
        with torch.inference_mode():
            out = self.model(inputs)
        self.forwards += 1
        return out

    def scores_with_layer_output(self, image: torch.Tensor, replacement: torch.Tensor) -> torch.Tensor:
        """Outputs with the layer's output replaced by each of ``replacement``'s n rows (in the layer's own
        layout): the part before the layer runs once on the one ``image`` when the model allows it, else on
        n copies of it."""
        layer, count = self.layer, replacement.shape[0]
        calls = [0]

        def replace(module, args, output):
            index = calls[0]
            calls[0] += 1
            return replacement if index == layer.call else None

        for inputs in (image, image.expand(count, *image.shape[1:])):
            calls[0] = 0
            handle = layer.module.register_forward_hook(replace)
            try:
                out = self.scores(inputs)
                if out.shape[0] == count:
                    return out
            except RuntimeError:
                pass
            finally:
                handle.remove()
        raise MethodError(f"cannot replace the output of layer {layer.key!r} in this model's forward")


class CAMBase(Method):
    """The shared machinery; a variant implements :meth:`weights` (see the module docstring).

    Class attributes a variant may set: ``needs_gradients`` (False: ``gradients`` is None and no
    backward pass runs), ``centred`` (True: the weights multiply the activations minus their spatial
    mean per channel, as a principal-component projection does).

    Two options every variant takes (pytorch-grad-cam's): ``eigen_smooth`` replaces the sum over channels of
    the weighted activations w[c] A[c] by their first principal component (the (h*w, C) matrix centred per
    channel, projected on its first right singular vector), its sign chosen so that it correlates positively
    with the sum; ``aug_smooth`` averages the maps of six versions of the input (as is, flipped left-right,
    each times 0.9, 1 and 1.1: pytorch-grad-cam multiplies the model input too), each flipped back first.
    The targets are resolved once, on the image as given. Unlike pytorch-grad-cam, which scales each
    augmented map to [0, 1] before averaging, the raw maps are averaged, so ``raw`` keeps its scale."""

    uses_layer: ClassVar[bool] = True
    needs_gradients: ClassVar[bool] = True
    centred: ClassVar[bool] = False
    #: True where the map is already the first principal component of the weighted activations (Eigen-CAM,
    #: Eigen-Grad-CAM), so that ``eigen_smooth`` leaves it as it is
    principal_component: ClassVar[bool] = False
    #: whether the variant may run the model once per channel of the layer (for the work estimate)
    passes_per_channel: ClassVar[bool] = False
    options: ClassVar[Options] = Options(relu=RELU, counterfactual=COUNTERFACTUAL) | SMOOTHING

    def weights(
        self, activations: torch.Tensor, gradients: torch.Tensor | None, targets: torch.Tensor, run: LayerRun
    ) -> torch.Tensor:
        """(B, C, h, w) activations, (B, K, C, h, w) gradients or None, (B, K) targets -> (B, K, C) channel
        weights, or (B, K, C, h, w) element-wise weights."""
        raise NotImplementedError

    def is_signed(self) -> bool:
        return not self.config.get("relu", True)

    def estimated_work(self, targets: int = 1) -> int:
        # gradient-free variants that run the model once per channel (Score-CAM, Ablation-CAM off a linear
        # tail) cost up to one pass per channel of the layer
        passes = len(AUGMENTATIONS) if self.config.get("aug_smooth") else 1
        if not self.passes_per_channel:
            return passes * (1 + (targets if self.needs_gradients else 0))
        layout = self.layer.layout
        return passes * (1 + self.layer.output_shape[layout.channel_axis(len(self.layer.output_shape))])

    def check_head(self, activations: torch.Tensor, logits: torch.Tensor) -> None:
        """For variants that only apply to some heads (CAM): raise ``MethodError`` saying why."""

    def compute(self, batch: torch.Tensor, resolve) -> Computed:
        key = self.layer.key
        return self._smoothed(batch, resolve, lambda b, r: {key: self._compute(b, r)})[key]

    def _compute(self, batch: torch.Tensor, resolve) -> Computed:
        """The maps of one pass of ``batch`` (before ``aug_smooth``); variants with their own score override this."""
        return self._compute_layers([self.layer], batch, resolve)[self.layer.key]

    def _smoothed(self, batch: torch.Tensor, resolve, compute_many) -> dict[str, Computed]:
        """``compute_many(batch, resolve)`` -> {layer: Computed}, averaged over ``AUGMENTATIONS`` (``aug_smooth``)."""
        if not self.config.get("aug_smooth"):
            return compute_many(batch, resolve)
        return augmentation_average(batch, resolve, compute_many, self._empty_map_notes)

    def _compute_layers(self, refs: list[LayerRef], batch: torch.Tensor, resolve) -> dict[str, Computed]:
        """One forward pass for all ``refs``; gradient variants also share one backward call per chunk of
        targets (the backward pass returns every layer's gradient)."""
        with (
            capture(self.model.module, refs) as record,
            torch.inference_mode(False),
            torch.set_grad_enabled(self.needs_gradients),
        ):
            logits = self.model(batch)
            outputs = [record[ref.key] for ref in refs]
        targets = resolve(logits)
        views = [ref.layout.to_map(output.detach()) for ref, output in zip(refs, outputs, strict=True)]
        for view in views:
            self.check_head(view, logits)
        runs = [
            LayerRun(self.model, ref, batch, logits.detach(), output.detach())
            for ref, output in zip(refs, outputs, strict=True)
        ]
        maps, backwards = self._maps(refs, outputs, views, logits, targets, runs)
        return {
            ref.key: Computed(
                raw=layer_maps,
                logits=logits.detach(),
                targets=targets,
                forwards=record.forwards + run.forwards,
                backwards=backwards,
                notes=self._empty_map_notes(layer_maps, targets, ref.key),
            )
            for ref, layer_maps, run in zip(refs, maps, runs, strict=True)
        }

    def _maps(self, refs, outputs, views, logits, targets, runs) -> tuple[list[torch.Tensor], int]:
        """Per layer the (B, K, h, w) maps, and the backward passes, targets taken in chunks that keep the
        gradients within ``GRADIENT_BUDGET_BYTES``."""
        k_total = targets.shape[1]
        if not self.needs_gradients:
            return [
                self._combine(self.weights(v, None, targets, r), v, targets) for v, r in zip(views, runs, strict=True)
            ], 0
        per_target = sum(view.numel() * view.element_size() for view in views)
        chunk = max(1, min(k_total, GRADIENT_BUDGET_BYTES // max(1, per_target)))
        analytic = None
        if len(refs) == 1 and refs[0].layout.is_map and outputs[0].ndim == 4 and k_total >= ANALYTIC_MIN_TARGETS:
            analytic = linear_tail_gradients(self.model, refs[0], outputs[0], logits, targets)
        backwards = 1 if analytic is not None else 0  # the one backward pass that verified the closed form
        if analytic is not None:
            chunk = k_total
        pieces: list[list[torch.Tensor]] = [[] for _ in refs]
        for start in range(0, k_total, chunk):
            part = targets[:, start : start + chunk]
            if analytic is not None:
                gradients = [analytic[:, start : start + chunk]]
            else:
                last = start + chunk >= k_total
                if not all(output.requires_grad for output in outputs):
                    raise MethodError(
                        "the layer's activation is not connected to the output by autograd; "
                        "is the model's forward wrapped in torch.no_grad()?"
                    )
                raw = layer_target_gradients(logits, outputs, part, retain_graph=not last)
                gradients = [ref.layout.to_map(grad) for ref, grad in zip(refs, raw, strict=True)]
                backwards += part.shape[1]
            for index, (view, grads, run) in enumerate(zip(views, gradients, runs, strict=True)):
                if self.config.get("counterfactual"):
                    grads = _negated(grads)
                pieces[index].append(self._combine(self.weights(view, grads, part, run), view, part))
        return [p[0] if len(p) == 1 else torch.cat(p, dim=1) for p in pieces], backwards

    def _combine(self, weights: torch.Tensor, view: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """sum_c weights * A (channel or element-wise weights; A centred for ``centred`` variants), the ReLU,
        and zeros where there is no target."""
        if self.centred:
            view = view - view.flatten(2).mean(dim=-1).view(*view.shape[:2], *([1] * (view.ndim - 2)))
        weights = weights.to(view.dtype)
        if self.config.get("eigen_smooth") and not self.principal_component:
            if weights.ndim == 3:
                weights = weights.view(*weights.shape, *([1] * (view.ndim - 2)))
            maps = first_component(weights * view.unsqueeze(1))
        elif weights.ndim == 3:  # (B, k, C) @ (B, C, h*w): one batched matrix product
            maps = torch.bmm(weights, view.flatten(2)).view(*weights.shape[:2], *view.shape[2:])
        else:
            maps = (weights * view.unsqueeze(1)).sum(dim=2)
        if self.config.get("relu", True):
            maps = torch.relu(maps)
        present = (targets >= 0).view(*targets.shape, *([1] * (maps.ndim - 2)))  # 2-D maps or 3-D volumes
        return torch.where(present, maps, torch.zeros_like(maps))

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
        """Explain ``images`` at several layers from one forward pass: {layer name: Explanation}.

        Gradient variants take one backward call per chunk of targets for all the layers together."""
        refs = [self.model.layer(layer) for layer in layers]
        if not refs:
            raise MethodError("give at least one layer")
        for ref in refs:
            if ref.layout is None:
                raise MethodError(
                    f"{self.name} needs layers with map or patch-token outputs; {ref.key!r} outputs {ref.output_shape}"
                )

        if type(self)._compute is CAMBase._compute:

            def plain(batch, resolve):
                return self._compute_layers(refs, batch, resolve)

        else:  # a variant with a score of its own (FinerCAM, ShapleyCAM): one of it per layer
            per_layer = [type(self)(self.model, layer=ref, **self.config) for ref in refs]

            def plain(batch, resolve):
                return {ref.key: method._compute(batch, resolve) for ref, method in zip(refs, per_layer, strict=True)}

        def compute_many(batch, resolve):
            return self._smoothed(batch, resolve, plain)

        return self._run(images, target, threshold, names, images_per_pass, compute_many)

    def _empty_map_notes(self, maps: torch.Tensor, targets: torch.Tensor, layer_key: str) -> list[tuple[int, str]]:
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
                    f"the {self.name} map of '{label}' is empty: at layer {layer_key} the weighted "
                    "channels lower its score everywhere (every region argues against it); "
                    "counterfactual=True (--counterfactual) maps the regions that lower it",
                )
            )
        if len(found) > MAX_NOTES:
            notes.append((found[MAX_NOTES][0], f"... and {len(found) - MAX_NOTES} more empty {self.name} maps"))
        return notes


def first_component(weighted: torch.Tensor) -> torch.Tensor:
    """(B, K, C, *spatial) weighted activations -> (B, K, *spatial): per (image, target) the (positions, C) matrix
    centred per channel, projected on its first right singular vector; the sign is chosen so that the projection
    correlates positively with the sum over channels (a singular vector's sign is arbitrary)."""
    matrix = weighted.flatten(3).transpose(2, 3).double()  # (B, K, positions, C)
    centred = matrix - matrix.mean(dim=2, keepdim=True)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    projection = (centred @ vh[..., 0, :].unsqueeze(-1)).squeeze(-1)  # (B, K, positions)
    summed = matrix.sum(dim=3)
    agreement = ((projection - projection.mean(-1, True)) * (summed - summed.mean(-1, True))).sum(-1)
    sign = torch.where(agreement < 0, -1.0, 1.0).to(projection.dtype).unsqueeze(-1)
    return (projection * sign).to(weighted.dtype).view(*weighted.shape[:2], *weighted.shape[3:])


def augmentation_average(batch: torch.Tensor, resolve, compute_many, notes_of) -> dict[str, Computed]:
    """pytorch-grad-cam's ``aug_smooth``: ``compute_many(inputs, resolve)`` -> {key: Computed} on the batch as
    given (which resolves the targets) and on its five other versions in ``AUGMENTATIONS`` (for the same
    targets), each map flipped back, then the raw maps averaged; ``notes_of(maps, targets, key)`` gives the
    notes of the averaged maps. Reports the first pass's logits and every pass's forwards and backwards."""
    results = compute_many(batch, resolve)
    targets = next(iter(results.values())).targets
    totals = {key: part.raw.clone() for key, part in results.items()}
    for flip, factor in AUGMENTATIONS:
        if not flip and factor == 1.0:
            continue
        augmented = batch * factor
        if flip:
            augmented = augmented.flip(-1)
        for key, part in compute_many(augmented, lambda _logits: targets).items():
            totals[key] += part.raw.flip(-1) if flip else part.raw
            results[key].forwards += part.forwards
            results[key].backwards += part.backwards
    for key, part in results.items():
        part.raw = totals[key] / len(AUGMENTATIONS)
        part.notes = notes_of(part.raw, targets, key)
    return results


def _negated(gradients: torch.Tensor) -> torch.Tensor:
    """-gradients; the closed-form gradients stay a zero-copy expanded view (stride 0 over space)."""
    if _constant_field(gradients):
        return gradients[..., :1, :1].neg().expand_as(gradients)
    return -gradients


def find_linear_head(model, layer) -> tuple[nn.Linear | None, str]:
    """The last ``nn.Linear`` that runs, if it reads ``layer``'s channels; else None and why not."""
    layout = layer.layout
    axis = layout.channel_axis(len(layer.output_shape)) if layout is not None else 1
    channels = layer.output_shape[axis]
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
        pooled = activations.detach().flatten(2).mean(dim=2)  # over every spatial dim (2-D maps, 3-D volumes)
        predicted = torch.nn.functional.linear(pooled, head.weight, head.bias)
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
    """Mean over the spatial dims of (B, K, C, *spatial) gradients (two for maps, three for volumes); free for
    the closed-form gradients (expanded, stride 0)."""
    if gradients.ndim == 5 and gradients.stride(-1) == 0 and gradients.stride(-2) == 0:
        return gradients[..., 0, 0]
    return gradients.flatten(3).mean(dim=3)


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

    def weights(self, activations, gradients, targets, run):
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
    options: ClassVar[Options] = CAMBase.options.without("counterfactual") | Options(
        relu=flag(False, "clip negative map values; the paper keeps the sign")
    )

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

    def check_head(self, activations, logits):
        ok, error = is_gap_linear(self.head, activations, logits)
        if not ok:
            raise MethodError(
                f"CAM needs the logits to be a linear layer applied to the global average of layer "
                f"{self.layer.key!r} (Zhou et al. 2016); on this model they are not (max difference {error:.3g}). "
                "Use gradcam, which works on any head, or pass the layer that feeds the pooling"
            )

    def weights(self, activations, gradients, targets, run):
        return self.head.weight.detach()[targets.clamp_min(0)]  # (B, K, C)


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

    def weights(self, activations, gradients, targets, run):
        area = 1
        if _constant_field(gradients):
            area = gradients.shape[-1] * gradients.shape[-2]
            gradients = gradients[..., :1, :1]
        squared = gradients.pow(2)
        space = tuple(range(2, activations.ndim))  # the spatial dims: 2 for maps, 3 for volumes
        totals = activations.sum(dim=space, keepdim=True).unsqueeze(1)  # (B, 1, C, 1, 1)
        denominator = 2 * squared + totals * squared * gradients
        alpha = torch.where(gradients != 0, squared / torch.where(denominator != 0, denominator, 1.0), 0.0)
        return (alpha * torch.relu(gradients)).flatten(3).sum(dim=3) * area


@register_method("xgradcam")
class XGradCAM(CAMBase):
    """XGrad-CAM (Fu et al. 2020): weight[c] = sum_{i,j} (A[c, i, j] / sum_{a,b} A[c, a, b]) * g[c, i, j]."""

    summary = "axiom-based Grad-CAM: activation-weighted gradients (Fu et al. 2020)"

    def weights(self, activations, gradients, targets, run):
        totals = activations.sum(dim=tuple(range(2, activations.ndim)), keepdim=True)
        share = (activations / torch.where(totals != 0, totals, 1.0)).unsqueeze(1)
        return (share * gradients).flatten(3).sum(dim=3)


@register_method("hirescam")
class HiResCAM(CAMBase):
    """HiResCAM (Draelos & Carin 2020): map = ReLU(sum_c g[c] * A[c]) element-wise, without averaging
    the gradients over space, so the map shows exactly where the score's gradient meets activation.
    On a GAP + linear head it equals Grad-CAM."""

    summary = "element-wise gradient x activation at a layer (Draelos & Carin 2020)"

    def weights(self, activations, gradients, targets, run):
        return gradients


@register_method("layercam")
class LayerCAM(CAMBase):
    """Layer-CAM (Jiang et al. 2021): map = ReLU(sum_c ReLU(g[c]) * A[c]) element-wise; works at earlier
    layers, where positive gradients are local."""

    summary = "element-wise positive gradient x activation (Jiang et al. 2021)"

    def weights(self, activations, gradients, targets, run):
        return torch.relu(gradients)


@register_method("eigencam")
class EigenCAM(CAMBase):
    """Eigen-CAM (Muhammad & Yeasin 2020): the projection of the layer's activations on their first
    principal component. The (h*w, C) activation matrix is centred per channel, and the map is its
    product with the first right singular vector. Class-agnostic: every target of an image gets the
    same map. The singular vector's sign is arbitrary; it is chosen so that the map correlates
    positively with the activation energy sum_c A[c]^2 per position (pytorch-grad-cam leaves it to
    chance). The energy, not the plain sum, because after a LayerNorm the sum over channels is nearly
    constant and its correlation's sign is rounding noise (it differed between two CPUs here).
    ``eigen_smooth`` leaves it as it is: it is already the first principal component (as in pytorch-grad-cam)."""

    summary = "first principal component of a layer's activations, class-agnostic (Muhammad & Yeasin 2020)"
    needs_gradients = False
    centred = True
    class_specific = False
    principal_component = True
    options: ClassVar[Options] = CAMBase.options.without("counterfactual")

    def weights(self, activations, gradients, targets, run):
        matrix = activations.flatten(2).transpose(1, 2).double()  # (B, hw, C)
        centred = matrix - matrix.mean(dim=1, keepdim=True)
        _, _, vh = torch.linalg.svd(centred, full_matrices=False)
        component = vh[:, 0, :]  # (B, C)
        projection = centred @ component.unsqueeze(-1)  # (B, hw, 1)
        energy = matrix.pow(2).sum(dim=2, keepdim=True)  # (B, hw, 1): how strongly each position is active
        sign = torch.sign(((projection - projection.mean(1, True)) * (energy - energy.mean(1, True))).sum(1))
        component = component * torch.where(sign == 0, 1.0, sign)
        return component.unsqueeze(1).expand(-1, targets.shape[1], -1)


def _normalized_masks(activations: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Each channel upsampled to the input (bilinear, corners aligned, as pytorch-grad-cam) and scaled
    to [0, 1]; constant channels give all-zero masks."""
    mode = "bilinear" if len(size) == 2 else "trilinear"  # volumes: trilinear
    upsampled = F.interpolate(activations, size=size, mode=mode, align_corners=True)
    extent = (*upsampled.shape[:2], *([1] * len(size)))
    low = upsampled.flatten(2).amin(dim=2).view(extent)
    high = upsampled.flatten(2).amax(dim=2).view(extent)
    return (upsampled - low) / (high - low + 1e-8)


@register_method("scorecam")
class ScoreCAM(CAMBase):
    """Score-CAM (Wang et al. 2020), as pytorch-grad-cam computes it: each channel, upsampled and
    scaled to [0, 1], masks the input; the target's logit on each masked input, softmaxed over the
    channels, weighs the channels: map = ReLU(sum_c softmax_c(y(x * M_c)) A[c]).

    No gradients. The masked images run under ``inference_mode`` in passes of ``inputs_per_pass``;
    channels that are constant over space all give the same all-zero mask, so their one shared score is
    computed once (on the default model that skips 20-60% of the 1,280 forwards, with the same output).
    """

    summary = "channels as input masks, weighted by the masked score (Wang et al. 2020)"
    needs_gradients = False
    passes_per_channel = True
    options: ClassVar[Options] = CAMBase.options.without("counterfactual") | Options(inputs_per_pass=INPUTS_PER_PASS)

    def weights(self, activations, gradients, targets, run):
        batch, channels = activations.shape[:2]
        per_pass = int(self.config["inputs_per_pass"] or auto_images_per_pass(self.model))
        weights = torch.zeros((batch, targets.shape[1], channels), dtype=torch.float32, device=activations.device)
        images = run.images
        for b in range(batch):
            masks = _normalized_masks(activations[b : b + 1].transpose(0, 1), tuple(images.shape[2:]))  # (C,1,*size)
            flat = activations[b].flatten(1)
            varying = (flat.amax(1) != flat.amin(1)).nonzero().flatten()
            constant = (flat.amax(1) == flat.amin(1)).nonzero().flatten()
            scores = torch.empty((channels, targets.shape[1]), dtype=torch.float32, device=activations.device)
            order = varying.tolist() + ([int(constant[0])] if len(constant) else [])
            safe = targets[b].clamp_min(0)
            for start in range(0, len(order), per_pass):
                chosen = torch.tensor(order[start : start + per_pass], device=activations.device)
                scores[chosen] = run.scores(images[b : b + 1] * masks[chosen])[:, safe].float()
            if len(constant):
                scores[constant] = scores[int(constant[0])].clone()
            weights[b] = torch.softmax(scores, dim=0).T
        return weights


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
    passes_per_channel = True
    options: ClassVar[Options] = CAMBase.options.without("counterfactual") | Options(
        inputs_per_pass=integer(256, "ablated copies of the layer per forward pass", low=1, high=4096)
    )

    def weights(self, activations, gradients, targets, run):
        safe = targets.clamp_min(0)
        original = run.logits.gather(1, safe)  # (B, K)
        head, _ = find_linear_head(self.model, run.layer)
        if head is not None and is_gap_linear(head, activations, run.logits)[0]:
            drop = head.weight.detach()[safe] * activations.flatten(2).mean(dim=2).unsqueeze(1)  # (B, K, C): y - y_c
        else:
            drop = self._ablated_drops(run, original, safe)
        denominator = torch.where(original.abs() > 1e-12, original, torch.full_like(original, 1e-12))
        return drop / denominator.unsqueeze(-1)

    def _ablated_drops(self, run: LayerRun, original: torch.Tensor, safe: torch.Tensor) -> torch.Tensor:
        """(B, K, C) score drops, each channel zeroed in the layer's own layout."""
        per_pass = int(self.config["inputs_per_pass"])
        raw = run.output
        channel_dim = run.layer.layout.channel_axis(raw.ndim)
        first = raw.movedim(channel_dim, 1)  # (B, C, ...)
        batch, channels = first.shape[:2]
        drops = torch.zeros((batch, safe.shape[1], channels), device=raw.device)
        for b in range(batch):
            active = (first[b].flatten(1).abs().amax(1) > 0).nonzero().flatten()
            for start in range(0, len(active), per_pass):
                chosen = active[start : start + per_pass]
                ablated = first[b : b + 1].repeat(len(chosen), *([1] * (first.ndim - 1)))
                ablated[torch.arange(len(chosen)), chosen] = 0
                replacement = ablated.movedim(1, channel_dim).contiguous()
                out = run.scores_with_layer_output(run.images[b : b + 1], replacement)
                drops[b, :, chosen] = original[b].unsqueeze(1) - out[:, safe[b]].T.float()
        return drops


@register_method("guided-gradcam")
class GuidedGradCAM(Method):
    """Guided Grad-CAM (Selvaraju et al. 2017): guided backpropagation times the Grad-CAM map upsampled
    to the input, per colour channel, then reduced over channels like the gradient methods (``reduce``).

    Two forward passes: Grad-CAM needs the plain gradient at the layer, guided backpropagation the
    modified one. Captum's ``GuidedGradCam`` is the same product (with its default nearest-neighbour
    upsampling; ``upsample="nearest"`` reproduces it); Captum's guided part only modifies ``nn.ReLU``."""

    summary = "guided backpropagation x Grad-CAM (Selvaraju et al. 2017)"
    uses_layer: ClassVar[bool] = True
    options: ClassVar[Options] = Options(
        reduce=REDUCE,
        upsample=choice("bilinear", ("bilinear", "nearest"), "how the Grad-CAM map is upsampled to the input"),
    )

    def __init__(self, model="efficientnet_lite0", *, layer=None, **options) -> None:
        super().__init__(model, layer=layer, **options)
        from .gradient import GuidedBackprop

        self.gradcam = GradCAM(self.model, layer=self.layer)
        self.guided = GuidedBackprop(self.model, reduce=self.config["reduce"])

    def is_signed(self) -> bool:
        return self.config["reduce"] == "sum"

    def compute(self, batch, resolve):
        from .gradient import reduce_channels

        cam = self.gradcam.compute(batch, resolve)
        guided = self.guided.attributions(batch, lambda _logits: cam.targets)
        mode = self.config["upsample"]
        size = tuple(batch.shape[2:])  # (H, W), or (D, H, W) of a volume or clip
        if mode == "bilinear" and len(size) == 3:
            mode = "trilinear"  # the same linear upsampling over three axes
        upsampled = F.interpolate(
            cam.raw, size=size, mode=mode, **({"align_corners": False} if mode != "nearest" else {})
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


@register_method("gradcam-elementwise")
class GradCAMElementWise(CAMBase):
    """Grad-CAM element-wise (pytorch-grad-cam's ``GradCAMElementWise``): map = ReLU(sum_c ReLU(g[c] * A[c])),
    the positive parts of gradient x activation summed over channels; element-wise weights g where g A > 0."""

    summary = "sum over channels of ReLU(gradient x activation) (pytorch-grad-cam's element-wise Grad-CAM)"

    def weights(self, activations, gradients, targets, run):
        return gradients * (gradients * activations.unsqueeze(1) > 0)


@register_method("eigengradcam")
class EigenGradCAM(CAMBase):
    """Eigen-Grad-CAM (pytorch-grad-cam's ``EigenGradCAM``): the (h*w, C) matrix of gradient x activation,
    centred per channel, projected on its first right singular vector, per target. The singular vector's sign
    is fixed so that the map correlates positively with sum_c g A (HiResCAM's map; pytorch-grad-cam leaves it
    to chance). The override returns the projected map itself, not channel weights. It is HiResCAM with
    ``eigen_smooth``; ``eigen_smooth`` leaves it as it is (as in pytorch-grad-cam)."""

    summary = "first principal component of gradient x activation (pytorch-grad-cam's Eigen-Grad-CAM)"
    principal_component = True

    def weights(self, activations, gradients, targets, run):
        return first_component(gradients * activations.unsqueeze(1))

    def _combine(self, weights, view, targets):
        maps = weights.to(view.dtype)  # the maps themselves (see weights)
        if self.config.get("relu", True):
            maps = torch.relu(maps)
        present = (targets >= 0).view(*targets.shape, *([1] * (maps.ndim - 2)))
        return torch.where(present, maps, torch.zeros_like(maps))


@register_method("finercam")
class FinerCAM(CAMBase):
    """Finer-CAM (Zhang et al. 2025; pytorch-grad-cam's ``FinerCAM`` over Grad-CAM): Grad-CAM of the score

        S = sum_j p_j (y_c - alpha y_j) / sum_j p_j

    over the ``compared`` classes j whose logits are closest to the target's (fixed from the image's logits),
    p = softmax of the logits (differentiated, as pytorch-grad-cam does): the target's evidence minus
    ``alpha`` times that of the classes most like it, so the map shows what tells them apart."""

    summary = "Grad-CAM of the target minus its most similar classes (Finer-CAM, Zhang et al. 2025)"
    options: ClassVar[Options] = CAMBase.options | Options(
        alpha=number(1.0, "how much of the similar classes' evidence is subtracted", low=0, high=100),
        compared=integer(3, "how many of the most similar classes are compared", low=1, high=100),
    )

    def weights(self, activations, gradients, targets, run):
        return spatial_mean(gradients)

    def _compute(self, batch, resolve):
        with capture(self.model.module, [self.layer]) as record, torch.inference_mode(False), torch.enable_grad():
            logits = self.model(batch)
            output = record[self.layer.key]
        targets = resolve(logits.detach())
        safe = targets.clamp_min(0)
        count = min(int(self.config["compared"]), logits.shape[1] - 1)
        distance = (logits.detach().unsqueeze(1) - logits.detach().gather(1, safe).unsqueeze(2)).abs()
        distance = distance.scatter(2, safe.unsqueeze(2), float("inf"))
        compared = distance.argsort(dim=2, stable=True)[..., :count]  # (B, K, n)
        flat = compared.flatten(1)
        others = logits.gather(1, flat).view_as(compared)
        weights = torch.softmax(logits, dim=1).gather(1, flat).view_as(compared)
        main = logits.gather(1, safe).unsqueeze(2)
        alpha = float(self.config["alpha"])
        scores = (weights * (main - alpha * others)).sum(dim=2) / (weights.sum(dim=2) + 1e-9)  # (B, K)
        scores = scores * (targets >= 0).to(scores.dtype)
        grads = [
            torch.autograd.grad(scores[:, k].sum(), output, retain_graph=k < targets.shape[1] - 1)[0]
            for k in range(targets.shape[1])
        ]
        gradients = self.layer.layout.to_map(torch.stack(grads, dim=1).flatten(0, 1)).unflatten(0, targets.shape)
        if self.config.get("counterfactual"):
            gradients = -gradients
        view = self.layer.layout.to_map(output.detach())
        run = LayerRun(self.model, self.layer, batch, logits.detach(), output.detach())
        maps = self._combine(self.weights(view, gradients, targets, run), view, targets)
        return Computed(
            raw=maps,
            logits=logits.detach(),
            targets=targets,
            forwards=record.forwards,
            backwards=targets.shape[1],
            notes=self._empty_map_notes(maps, targets, self.layer.key),
        )


SCORES = ("logit", "rest")


@register_method("shapleycam")
class ShapleyCAM(CAMBase):
    """ShapleyCAM (Cai et al. 2024, "CAMs as Shapley value-based explainers"; pytorch-grad-cam's ``ShapleyCAM``):
    a second-order estimate of each channel's Shapley value gives the weights

        weight[c] = mean_{i,j} (g - 1/2 H A)[c, i, j],   map = ReLU(sum_c weight[c] A[c])

    with g the gradient of the score w.r.t. the layer's activation A and H A the Hessian of the score w.r.t. A
    times A (a Hessian-vector product: the gradient of g . A with A held fixed, as pytorch-grad-cam computes it).
    ``score="logit"`` explains the target's logit: after a layer followed only by ReLUs, pooling and linear
    layers H A is 0 and the map is Grad-CAM's. ``score="rest"`` explains the paper's ReST score, the logit
    minus the cross-entropy, y_c - (logsumexp(y) - y_c) (pytorch-grad-cam's ``ClassifierOutputReST``), whose
    Hessian is not 0. Costs one forward pass and two backward passes per target."""

    summary = "Grad-CAM weights from gradient - 1/2 Hessian-vector product (ShapleyCAM, Cai et al. 2024)"
    options: ClassVar[Options] = CAMBase.options | Options(
        score=choice(
            "logit",
            SCORES,
            "what is explained: the target's logit, or the paper's ReST score (logit minus cross-entropy)",
        )
    )

    def estimated_work(self, targets: int = 1) -> int:
        return (len(AUGMENTATIONS) if self.config.get("aug_smooth") else 1) * (1 + 2 * targets)

    def weights(self, activations, gradients, targets, run):
        if run.hessian_products is None:
            raise MethodError("shapleycam needs the Hessian-vector products of its own compute step")
        return spatial_mean(gradients - 0.5 * run.hessian_products)

    def _compute(self, batch, resolve):
        with capture(self.model.module, [self.layer]) as record, torch.inference_mode(False), torch.enable_grad():
            logits = self.model(batch)
            output = record[self.layer.key]
        if not output.requires_grad:
            raise MethodError(
                "the layer's activation is not connected to the output by autograd; "
                "is the model's forward wrapped in torch.no_grad()?"
            )
        targets = resolve(logits.detach())
        safe = targets.clamp_min(0)
        with torch.inference_mode(False), torch.enable_grad():
            scores = logits.gather(1, safe)
            if self.config["score"] == "rest":
                scores = 2 * scores - torch.logsumexp(logits, dim=1, keepdim=True)
            scores = scores * (targets >= 0).to(scores.dtype)
            if self.config.get("counterfactual"):
                scores = -scores
            grads, products = [], []
            for k in range(targets.shape[1]):
                last = k == targets.shape[1] - 1
                (grad,) = torch.autograd.grad(scores[:, k].sum(), output, create_graph=True)
                product = None
                if grad.requires_grad:  # else the score is linear in the activation: H A = 0
                    (product,) = torch.autograd.grad(
                        grad, output, grad_outputs=output.detach(), retain_graph=not last, allow_unused=True
                    )
                grads.append(grad.detach())
                products.append(torch.zeros_like(output) if product is None else product.detach())
        layout = self.layer.layout

        def per_target(tensors: list[torch.Tensor]) -> torch.Tensor:
            return layout.to_map(torch.stack(tensors, dim=1).flatten(0, 1)).unflatten(0, targets.shape)

        view = layout.to_map(output.detach())
        run = LayerRun(
            self.model, self.layer, batch, logits.detach(), output.detach(), hessian_products=per_target(products)
        )
        maps = self._combine(self.weights(view, per_target(grads), targets, run), view, targets)
        return Computed(
            raw=maps,
            logits=logits.detach(),
            targets=targets,
            forwards=record.forwards,
            backwards=2 * targets.shape[1],
            notes=self._empty_map_notes(maps, targets, self.layer.key),
        )


#: The calls whose bias FullGrad takes: convolutions (their ``bias`` argument) and batch norms (the implicit bias
#: beta - mean * gamma / sqrt(var + eps)); linear layers' biases only enter the completeness sum (no map).
BIASED_CONVOLUTIONS = {torch.conv1d, torch.conv2d, torch.conv3d, torch.conv_transpose1d, torch.conv_transpose2d}
BIASED_CONVOLUTIONS |= {torch.conv_transpose3d}
SCALINGS = ("layer", "channel")


def _call_argument(args: tuple, kwargs: dict, index: int, name: str, default=None):
    return args[index] if len(args) > index else kwargs.get(name, default)


def _batch_norm_bias(args: tuple, kwargs: dict, inputs: torch.Tensor) -> torch.Tensor:
    """The implicit bias of an ``F.batch_norm`` call, per channel: beta - mean * gamma / sqrt(var + eps), with the
    statistics the call uses (running ones in eval mode, else the batch's)."""
    mean = _call_argument(args, kwargs, 1, "running_mean")
    var = _call_argument(args, kwargs, 2, "running_var")
    gamma = _call_argument(args, kwargs, 3, "weight")
    beta = _call_argument(args, kwargs, 4, "bias")
    training = bool(_call_argument(args, kwargs, 5, "training", False))
    eps = float(_call_argument(args, kwargs, 7, "eps", 1e-5))
    if training or mean is None or var is None:
        dims = [d for d in range(inputs.ndim) if d != 1]
        mean = inputs.detach().mean(dim=dims)
        var = inputs.detach().var(dim=dims, unbiased=False)
    scale = torch.rsqrt(var.detach() + eps)
    if gamma is not None:
        scale = scale * gamma.detach()
    bias = -mean.detach() * scale
    return bias if beta is None else bias + beta.detach()


class _BiasGradientRecorder(TorchFunctionMode):
    """Inside the block, every convolution with a bias, batch norm and linear call on a tensor that carries
    gradients gets a zero tensor added to its output, kept with the call's bias: the gradient w.r.t. that zero is
    the gradient w.r.t. the call's output (before any in-place activation after it), so bias x gradient is the
    call's bias-gradient. Calls are seen whether they come from modules or functional code, and a module called
    twice is two calls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []  # (zero added to the output, (C,) bias)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func not in BIASED_CONVOLUTIONS and func is not F.batch_norm and func is not F.linear:
            return out
        inputs = _call_argument(args, kwargs, 0, "input")
        if not (isinstance(out, torch.Tensor) and isinstance(inputs, torch.Tensor) and inputs.requires_grad):
            return out
        if func is F.batch_norm:
            bias = _batch_norm_bias(args, kwargs, inputs)
        else:
            bias = _call_argument(args, kwargs, 2, "bias")
        if bias is None:
            return out
        zero = torch.zeros_like(out, requires_grad=True)
        self.calls.append((zero, bias.detach()))
        return out + zero


def _scaled(values: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """FullGrad's post-processing of (N, C, *spatial) gradients: |values| shifted and scaled to [0, 1] per item
    (over channels and space: the paper's code) or per channel (pytorch-grad-cam's), constant ones to 0."""
    magnitude = values.abs()
    flat = magnitude.flatten(2) if per_channel else magnitude.flatten(1)
    extent = (*flat.shape[:-1], *([1] * (values.ndim - flat.ndim + 1)))
    low = flat.amin(dim=-1).view(extent)
    span = flat.amax(dim=-1).view(extent) - low
    return torch.where(span > 0, (magnitude - low) / torch.where(span > 0, span, 1.0), 0.0)


@register_method("fullgrad")
class FullGrad(Method):
    """FullGrad (Srinivas & Fleuret 2019): the input gradient plus the bias-gradients of every convolution and
    batch norm,

        map = sum_c psi(|x * dy/dx|)_c + sum_layers sum_c upsample(psi(|b * dy/dz|))_c

    where z is a layer's output, b its bias (BatchNorm's implicit bias beta - mean * gamma / sqrt(var + eps)),
    and psi shifts and scales to [0, 1]. ``scaling="layer"`` is the paper's code (psi over all channels of a
    layer, bilinear upsampling with aligned corners); ``scaling="channel"`` is pytorch-grad-cam's ``FullGrad``
    (psi per channel, half-pixel bilinear upsampling as its ``cv2.resize``). Unlike pytorch-grad-cam, which
    takes only ``nn.Conv2d``/``nn.BatchNorm2d`` modules, every convolution and batch norm call counts
    (functional ones, a module called twice), and raw keeps the sum's scale (no final [0, 1] scaling).

    No target layer: the map is at input resolution. One forward pass, one backward pass per target. On a
    piecewise-linear network the full-gradient decomposition is complete: sum(x * dy/dx) + the sum of every
    bias-gradient (linear layers' too) equals the logit; ``stats["completeness_gap"]`` has the difference
    per image and target (not 0 where a ReLU6 saturates or a smooth activation runs)."""

    summary = "input gradient plus every conv/BatchNorm bias-gradient (FullGrad, Srinivas & Fleuret 2019)"
    options: ClassVar[Options] = Options(
        scaling=choice(
            "layer",
            SCALINGS,
            "how each |bias x gradient| is scaled to [0, 1]: per layer (the paper) or per channel (pytorch-grad-cam)",
        ),
        aug_smooth=SMOOTHING["aug_smooth"],
    )

    def __init__(self, model="efficientnet_lite0", *, layer=None, **options) -> None:
        if layer is not None:
            raise MethodError(
                "fullgrad takes no layer: it sums the input gradient and the bias-gradients of every convolution "
                "and batch norm; leave layer out"
            )
        super().__init__(model, **options)

    def estimated_work(self, targets: int = 1) -> int:
        return (len(AUGMENTATIONS) if self.config["aug_smooth"] else 1) * (1 + targets)

    def compute(self, batch, resolve):
        if not self.config["aug_smooth"]:
            return self._compute(batch, resolve)
        results = augmentation_average(batch, resolve, lambda b, r: {None: self._compute(b, r)}, lambda *_: [])
        computed = results[None]
        computed.extra = {}  # the completeness gaps of six inputs do not describe their average
        return computed

    def _compute(self, batch: torch.Tensor, resolve) -> Computed:
        if any(isinstance(sub, torch.jit.ScriptModule) for sub in self.model.module.modules()):
            raise MethodError(
                "fullgrad cannot see the convolutions inside this model's TorchScript code, so its map would miss "
                "their bias-gradients; give the model as an eager nn.Module or an ONNX export"
            )
        inputs = batch.detach().clone().requires_grad_(True)
        recorder = _BiasGradientRecorder()
        with torch.inference_mode(False), torch.enable_grad():
            with recorder:
                logits = self.model(inputs)
            if not logits.requires_grad:
                raise MethodError(
                    "this model's outputs carry no gradients (a black-box function, or a forward under no_grad); "
                    "use a perturbation method: occlusion or rise"
                )
            targets = resolve(logits.detach())
            zeros = [zero for zero, _ in recorder.calls]
            k_total = targets.shape[1]
            maps, gaps = [], []
            for k in range(k_total):
                score = picked_scores(logits, targets, k)
                grads = torch.autograd.grad(score, [inputs, *zeros], retain_graph=k < k_total - 1, allow_unused=True)
                map_k, total = self._postprocess(inputs.detach(), grads[0], grads[1:], recorder.calls)
                present = (targets[:, k] >= 0).to(map_k.dtype)
                maps.append(map_k * present.view(-1, *([1] * (map_k.ndim - 1))))
                column = targets[:, k : k + 1].clamp_min(0)
                gaps.append(torch.where(targets[:, k] >= 0, total - logits.detach().gather(1, column)[:, 0], 0.0))
        gap = torch.stack(gaps, dim=1)
        return Computed(
            raw=torch.stack(maps, dim=1),
            logits=logits.detach(),
            targets=targets,
            forwards=1,
            backwards=k_total,
            extra={"completeness_gap": [[float(v) for v in row] for row in gap]},
        )

    def _postprocess(self, inputs, input_grad, layer_grads, calls) -> tuple[torch.Tensor, torch.Tensor]:
        """One target's (B, *spatial) map and (B,) full-gradient sum."""
        per_channel = self.config["scaling"] == "channel"
        spatial = tuple(inputs.shape[2:])
        mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(spatial)]
        product = input_grad * inputs
        total = product.flatten(1).sum(dim=1)
        result = _scaled(product, per_channel).sum(dim=1)
        for grad, (_, bias) in zip(layer_grads, calls, strict=True):
            if grad is None:
                continue
            bias_gradient = grad * bias.to(grad.dtype).view(1, -1, *([1] * (grad.ndim - 2)))
            total = total + bias_gradient.flatten(1).sum(dim=1)
            if grad.ndim != inputs.ndim:  # a linear layer, or a 1-D convolution of a picture: no map
                continue
            layer_map = _scaled(bias_gradient, per_channel).sum(dim=1, keepdim=True)
            if tuple(layer_map.shape[2:]) != spatial:
                layer_map = F.interpolate(layer_map, size=spatial, mode=mode, align_corners=not per_channel)
            result = result + layer_map[:, 0]
        return result, total
