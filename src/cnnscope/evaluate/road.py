"""ROAD: RemOve And Debias (Rong et al. 2022, "A Consistent and Efficient Evaluation Strategy for
Attribution Methods").

Removing pixels by painting them black or grey leaks the removed region's shape to the model (it
classifies the hole, not what is left), which is why deletion curves rank some random maps above real
ones. ROAD fills the removed pixels by *noisy linear imputation*: each removed pixel takes the weighted
mean of its eight neighbours (weight 1/6 for the four direct ones, 1/12 for the diagonals, as in the
paper), solved for all removed pixels at once, plus a little Gaussian noise, so the fill carries no shape.

The linear system is the graph Laplacian of the removed pixels with the kept ones as boundary values: it
is symmetric positive definite, and solved here by preconditioned conjugate gradients on whole batches of
images at once (shifted adds per iteration), not one sparse solve per image. Two preconditioners, chosen per
hole by its shape:

- holes with large removed blocks (a CAM's most relevant half, say) take a multigrid V-cycle (damped Jacobi
  smoothing, the residual summed over 2x2 blocks onto the grid of half the resolution where whole blocks are
  removed, the correction brought back bilinearly), which brings the smooth part of the error down in a few
  iterations however large the hole is;
- scattered holes (a noisy gradient map's top pixels) take Jacobi, started from the solution of the grid of
  half the resolution (nested iteration): most of their pixels have kept neighbours, and a V-cycle there
  would cost more than it saves.

- most relevant first (MoRF): remove the top ``f`` of the map; a faithful map makes the score fall fast
  (lower mean score is better);
- least relevant first (LeRF): remove the bottom ``f``; the score should stay (higher is better).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..errors import InputError

#: Fractions of pixels removed (the paper uses 10% to 90%).
FRACTIONS = (0.1, 0.3, 0.5, 0.7, 0.9)
#: Noise added to imputed pixels, as a fraction of each image's value range.
NOISE = 0.01

_DIRECT, _DIAGONAL = 1 / 6, 1 / 12


def _neighbours(x: torch.Tensor) -> torch.Tensor:
    """The weighted sum of each pixel's in-image neighbours (zero outside the image): shifted adds, which
    are faster on a CPU than a depthwise 3x3 convolution."""
    height, width = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1))
    rows = padded[..., :, 1 : width + 1]
    direct = rows[..., :height, :] + rows[..., 2:, :]
    direct = direct + padded[..., 1 : height + 1, :width] + padded[..., 1 : height + 1, 2:]
    diagonal = padded[..., :height, :width] + padded[..., :height, 2:] + padded[..., 2:, :width] + padded[..., 2:, 2:]
    return _DIRECT * direct + _DIAGONAL * diagonal


def _push_pull(values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A smooth guess for the gaps (``weight`` 0): kept values averaged over ever coarser grids, each level's
    gaps filled from the level below, then brought back up."""
    height, width = values.shape[-2:]
    if min(height, width) <= 2 or bool((weight.flatten(1).amin(dim=1) > 0).all()):
        total = weight.sum(dim=(2, 3), keepdim=True).clamp_min(1e-12)
        mean = (values * weight).sum(dim=(2, 3), keepdim=True) / total
        return torch.where(weight > 0, values, mean.expand_as(values))
    coarse_weight = F.avg_pool2d(weight, 2, ceil_mode=True)
    coarse = F.avg_pool2d(values * weight, 2, ceil_mode=True) / coarse_weight.clamp_min(1e-12)
    below = _push_pull(coarse, (coarse_weight > 0).to(weight.dtype))
    up = F.interpolate(below, size=(height, width), mode="bilinear", align_corners=False)
    return torch.where(weight > 0, values, up)


#: A hole takes the multigrid preconditioner when at least this share of its pixels lie in 2x2 blocks removed
#: whole (measured on CAM-like and gradient-like maps at 64 to 224 px: below it, Jacobi is the cheaper).
MULTIGRID_SHARE = 0.5


def _levels(mask: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The V-cycle's grids, finest first: each grid's removed pixels and in-image neighbour weights; a
    coarser grid removes the 2x2 blocks removed whole on the finer one, down to 8 pixels or no hole."""
    levels = []
    while True:
        levels.append((mask, _neighbours(torch.ones_like(mask[:1]))))
        if min(mask.shape[-2:]) < 8:
            return levels
        mask = (F.avg_pool2d(mask, 2, ceil_mode=True) == 1).to(mask.dtype)
        if not bool(mask.any()):
            return levels


def _v_cycle(residual: torch.Tensor, levels: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """An approximate solution of the masked system for ``residual``: one damped Jacobi sweep (0.8) from
    zero, the rest of the residual summed over 2x2 blocks and solved (recursively) on the next grid, the
    correction interpolated back, and one more sweep. Linear in ``residual``."""
    (mask, weight), coarser = levels[0], levels[1:]
    x = 0.8 * mask * residual / weight
    if coarser:
        rest = residual - mask * (weight * x - _neighbours(x))
        coarse = _v_cycle(4 * F.avg_pool2d(rest, 2, ceil_mode=True) * coarser[0][0], coarser)
        x = x + mask * F.interpolate(coarse, size=mask.shape[-2:], mode="bilinear", align_corners=False)
    return x + 0.8 * mask * (residual - mask * (weight * x - _neighbours(x))) / weight


def _conjugate_gradients(
    kept: torch.Tensor,
    hole: torch.Tensor,
    start: torch.Tensor,
    tolerance: float,
    max_iterations: int,
    *,
    multigrid: bool,
) -> torch.Tensor:
    """The removed pixels' values (zero elsewhere): preconditioned CG on the masked Laplacian, one system per
    image, batched; an image leaves the batch as soon as it has converged. The preconditioner is Jacobi, or
    with ``multigrid`` one V-cycle per iteration; the update is the flexible (Polak-Ribiere) form, since the
    V-cycle is only nearly symmetric (for Jacobi it is the same as the plain form)."""
    levels = _levels(hole) if multigrid else [(hole, _neighbours(torch.ones_like(hole[:1])))]
    weight = levels[0][1]  # (1, 1, H, W) in-image neighbour weight per pixel

    def precondition(residual: torch.Tensor) -> torch.Tensor:
        return _v_cycle(residual, levels) if multigrid else levels[0][0] * residual / weight

    rhs = hole * _neighbours(kept)
    result = hole * start
    active = torch.arange(kept.shape[0], device=kept.device)
    solution = result.clone()
    residual = rhs - hole * (weight * solution - _neighbours(solution))
    preconditioned = precondition(residual)
    direction = preconditioned
    rho = (residual * preconditioned).flatten(1).sum(dim=1)
    norm = rhs.flatten(1).norm(dim=1).clamp_min(1e-30)
    for _ in range(max_iterations + 1):
        done = residual.flatten(1).norm(dim=1) / norm <= tolerance
        if bool(done.any()):
            result[active[done]] = solution[done]
            keep = ~done
            if not bool(keep.any()):
                return result
            levels = [(mask[keep], grid_weight) for mask, grid_weight in levels]
            active, solution, residual = active[keep], solution[keep], residual[keep]
            direction, preconditioned, rho, norm = direction[keep], preconditioned[keep], rho[keep], norm[keep]
        applied = levels[0][0] * (weight * direction - _neighbours(direction))
        step = rho / (direction * applied).flatten(1).sum(dim=1).clamp_min(1e-30)
        solution = solution + step.view(-1, 1, 1, 1) * direction
        residual = residual - step.view(-1, 1, 1, 1) * applied
        following = precondition(residual)
        rho_next = (residual * following).flatten(1).sum(dim=1)
        beta = (residual * (following - preconditioned)).flatten(1).sum(dim=1) / rho.clamp_min(1e-30)
        direction = following + beta.view(-1, 1, 1, 1) * direction
        preconditioned, rho = following, rho_next
    result[active] = solution  # what the iteration limit left
    return result


def _nested(kept: torch.Tensor, hole: torch.Tensor, tolerance: float, max_iterations: int) -> torch.Tensor:
    """Solve on a grid of half the resolution first (a 2x2 block is removed there when all its pixels are;
    a block keeps the mean of its kept pixels) and start from its solution: the smooth part of the answer,
    which costs CG the most iterations at full resolution, comes cheaply from the coarse grid."""
    height, width = hole.shape[-2:]
    if min(height, width) < 32:
        start = _push_pull(kept, 1 - hole)
    else:
        kept_weight = F.avg_pool2d(1 - hole, 2, ceil_mode=True)
        coarse_hole = (kept_weight == 0).to(hole.dtype)
        coarse_kept = F.avg_pool2d(kept, 2, ceil_mode=True) / kept_weight.clamp_min(1e-12) * (1 - coarse_hole)
        coarse = coarse_kept + _nested(coarse_kept, coarse_hole, tolerance * 10, max_iterations)
        start = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    return _conjugate_gradients(kept, hole, start, tolerance, max_iterations, multigrid=False)


def block_share(hole: torch.Tensor) -> torch.Tensor:
    """(N,): the share of each hole's removed pixels that lie in 2x2 blocks removed whole."""
    blocks = F.interpolate((F.avg_pool2d(hole, 2, ceil_mode=True) == 1).to(hole.dtype), scale_factor=2)
    blocks = blocks[..., : hole.shape[-2], : hole.shape[-1]]
    return (blocks * hole).flatten(1).sum(dim=1) / hole.flatten(1).sum(dim=1).clamp_min(1)


def _solve(kept: torch.Tensor, hole: torch.Tensor, tolerance: float, max_iterations: int) -> torch.Tensor:
    """The removed pixels' values, each hole by the preconditioner that suits its shape (module docstring)."""
    multigrid = block_share(hole) >= MULTIGRID_SHARE
    if min(hole.shape[-2:]) < 16 or not bool(multigrid.any()):
        return _nested(kept, hole, tolerance, max_iterations)
    if bool(multigrid.all()):
        return _conjugate_gradients(kept, hole, torch.zeros_like(kept), tolerance, max_iterations, multigrid=True)
    result = torch.empty_like(kept)
    result[multigrid] = _conjugate_gradients(
        kept[multigrid], hole[multigrid], torch.zeros_like(kept[multigrid]), tolerance, max_iterations, multigrid=True
    )
    result[~multigrid] = _nested(kept[~multigrid], hole[~multigrid], tolerance, max_iterations)
    return result


def impute(
    images: torch.Tensor,
    removed: torch.Tensor,
    *,
    noise: float = NOISE,
    generator: torch.Generator | None = None,
    tolerance: float = 1e-4,
    max_iterations: int = 2000,
) -> torch.Tensor:
    """Noisy linear imputation of the ``removed`` pixels of ``images`` (N, C, H, W); ``removed`` is
    (N, 1, H, W) or (N, H, W) bool. Each image keeps at least one pixel. Returns a new tensor."""
    if images.ndim != 4:
        raise InputError(f"impute takes (N, C, H, W) images, got shape {tuple(images.shape)}")
    if removed.ndim == 3:
        removed = removed.unsqueeze(1)
    if removed.shape[0] != images.shape[0] or removed.shape[-2:] != images.shape[-2:]:
        raise InputError(f"the removal mask {tuple(removed.shape)} does not match the images {tuple(images.shape)}")
    hole = removed.to(torch.float32)
    if bool((hole.flatten(1).amin(dim=1) > 0).any()):
        raise InputError("an image cannot have every pixel removed: there is nothing to impute from")
    x = images.detach().to(torch.float32)
    kept = x * (1 - hole)
    solution = _solve(kept, hole, tolerance, max_iterations)
    filled = kept + solution
    if noise > 0:
        spread = (x.flatten(1).amax(dim=1) - x.flatten(1).amin(dim=1)).view(-1, 1, 1, 1)
        jitter = torch.randn(x.shape, generator=generator)
        filled = filled + hole * noise * spread * jitter.to(x.device)
    return filled.to(images.dtype)


def removal_masks(saliency: torch.Tensor, fractions: Sequence[float], *, most_relevant: bool) -> torch.Tensor:
    """(M, F, 1, H, W) bool: for each map of ``saliency`` (M, H, W) and fraction, the pixels removed (its
    top ``f`` for most-relevant-first, its bottom ``f`` otherwise; ties broken by position)."""
    count, height, width = saliency.shape
    total = height * width
    order = torch.argsort(saliency.reshape(count, -1), dim=1, descending=most_relevant, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(total, device=order.device).expand(count, -1))
    masks = [(ranks < round(f * total)).view(count, 1, height, width) for f in fractions]
    return torch.stack(masks, dim=1)


def check_fractions(fractions: Sequence[float]) -> tuple[float, ...]:
    """The fractions as floats; an empty sequence turns ROAD off (it is the costliest metric on large images)."""
    values = tuple(float(f) for f in fractions)
    if any(not 0 < f < 1 for f in values):
        raise InputError(f"ROAD fractions lie strictly between 0 and 1, got {list(fractions)}")
    return values
