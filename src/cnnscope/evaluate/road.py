"""ROAD: RemOve And Debias (Rong et al. 2022, "A Consistent and Efficient Evaluation Strategy for
Attribution Methods").

Removing pixels by painting them black or grey leaks the removed region's shape to the model (it
classifies the hole, not what is left), which is why deletion curves rank some random maps above real
ones. ROAD fills the removed pixels by *noisy linear imputation*: each removed pixel takes the weighted
mean of its eight neighbours (weight 1/6 for the four direct ones, 1/12 for the diagonals, as in the
paper), solved for all removed pixels at once, plus a little Gaussian noise, so the fill carries no shape.

The linear system is the graph Laplacian of the removed pixels with the kept ones as boundary values: it
is symmetric positive definite, and solved here by preconditioned conjugate gradients on batches of a few
images at once (separable shifted adds per iteration), not one sparse solve per image. Two
preconditioners, chosen per hole by its shape:

- holes with large removed blocks (a CAM's most relevant half, say) take a multigrid V-cycle (damped Jacobi
  smoothing, the residual summed over 2x2 blocks onto the grid of half the resolution where whole blocks are
  removed, the correction brought back bilinearly), started from a smooth push-pull fill, which brings the
  smooth part of the error down in a few iterations however large the hole is;
- scattered holes (a noisy gradient map's top pixels) take Jacobi, started from the solution of the grid of
  half the resolution (nested iteration): most of their pixels have kept neighbours, and a V-cycle there
  would cost more than it saves.

The batches are sized to stay in the CPU's cache (:data:`CHUNK_BYTES`), and holes that repeat for the same
image (a constant map removes the same pixels first and last) are solved once.

- most relevant first (MoRF): remove the top ``f`` of the map; a faithful map makes the score fall fast
  (lower mean score is better);
- least relevant first (LeRF): remove the bottom ``f``; the score should stay (higher is better).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError

#: Fractions of pixels removed (the paper uses 10% to 90%).
FRACTIONS = (0.1, 0.3, 0.5, 0.7, 0.9)
#: Noise added to imputed pixels, as a fraction of each image's value range.
NOISE = 0.01


def _neighbours(x: torch.Tensor) -> torch.Tensor:
    """The weighted sum of each pixel's in-image neighbours (zero outside the image). The stencil is
    ``([1, 2, 1] x [1, 2, 1] - 4 centre) / 12``, so it is taken as two separable passes of shifted adds in
    place: four slice adds where the eight-neighbour sum needs eight, and no padded copy."""
    rows = x * 2
    rows[..., 1:].add_(x[..., :-1])
    rows[..., :-1].add_(x[..., 1:])
    out = rows * 2
    out[..., 1:, :].add_(rows[..., :-1, :])
    out[..., :-1, :].add_(rows[..., 1:, :])
    return out.sub_(x, alpha=4).mul_(1 / 12)


def _unmasked_laplacian(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``weight * x - neighbours(x)``: the system's operator before it is restricted to the removed pixels."""
    return _neighbours(x).neg_().addcmul_(weight, x)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N,): the dot product of each image's values (one vector product per image: no temporary of the
    images' size, and faster than a batched matrix product of (1, n) by (n, 1) on a CPU)."""
    if a.shape[0] == 0:
        return a.new_zeros(0)
    return torch.stack([x.reshape(-1) @ y.reshape(-1) for x, y in zip(a, b, strict=True)])


def _block_sums(x: torch.Tensor) -> torch.Tensor:
    """The sum of each 2x2 block (the last row or column alone where the size is odd): the coarse grid's
    values."""
    height, width = x.shape[-2:]
    if height % 2 or width % 2:
        x = F.pad(x, (0, width % 2, 0, height % 2))
    rows = x[..., 0::2, :] + x[..., 1::2, :]
    return rows[..., 0::2] + rows[..., 1::2]


def _doubled_along(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``x`` at twice its resolution along ``dim`` (-1 or -2), linearly: each value gives 3/4 of the two
    values at its place and 1/4 of its neighbour's (its own at the edges)."""
    size = x.shape[dim]
    shape = list(x.shape)
    shape[dim] = 2 * size
    out = x.new_empty(shape)
    pairs = out.unflatten(dim, (size, 2))
    for side in (0, 1):
        part = pairs.select(dim, side)
        torch.mul(x, 0.75, out=part)
        if size > 1:
            inner = (1, 0) if side == 0 else (0, 1)  # (where in part, where in x) the neighbour's share goes
            part.narrow(dim, inner[0], size - 1).add_(x.narrow(dim, inner[1], size - 1), alpha=0.25)
        edge = 0 if side == 0 else size - 1
        part.narrow(dim, edge, 1).add_(x.narrow(dim, edge, 1), alpha=0.25)
    return out


def _doubled(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``x`` brought up to a grid of twice its resolution bilinearly (cell-centred, edges repeated: the same
    as ``F.interpolate(scale_factor=2, mode="bilinear")``, in a third of its time on a CPU), cut to ``size``."""
    out = _doubled_along(_doubled_along(x, -1), -2)
    if tuple(out.shape[-2:]) != tuple(size):
        out = out[..., : size[0], : size[1]]
    return out


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
#: whole. Measured on the 130 holes of the 13 maps of ``bench/evaluate.py`` on two sample photos at 224 px:
#: from 0.2 to 0.5 the time is the same within 10% (0: 10% slower, Jacobi for all: 3x), and at 0.2 the fill
#: is the closest to the exact solve (Jacobi's error grows with the share of blocks removed whole).
MULTIGRID_SHARE = 0.2

#: Bytes of one image's values per solver batch: a batch of a few 224 px images keeps the solver's dozen
#: working tensors in the cache, where one of 130 images went to memory (and had its fresh buffers
#: page-faulted) on every element-wise pass: 5x slower on the 2-core machine.
CHUNK_BYTES = 3 * 2**20

_Level = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _level(mask: torch.Tensor) -> _Level:
    """One grid: its removed pixels, the in-image neighbour weight per pixel, and the damped Jacobi step
    (0.8 / weight on removed pixels, 0 elsewhere)."""
    weight = _neighbours(torch.ones_like(mask[:1]))
    return mask, weight, mask * (0.8 / weight)


def _levels(mask: torch.Tensor) -> list[_Level]:
    """The V-cycle's grids, finest first; a coarser grid removes the 2x2 blocks removed whole on the finer
    one, down to 2 pixels or no hole."""
    levels = []
    while True:
        levels.append(_level(mask))
        if min(mask.shape[-2:]) < 4:
            return levels
        mask = (F.avg_pool2d(mask, 2, ceil_mode=True) == 1).to(mask.dtype)
        if not bool(mask.any()):
            return levels


def _v_cycle(residual: torch.Tensor, levels: list[_Level]) -> torch.Tensor:
    """An approximate solution of the masked system for ``residual``: one damped Jacobi sweep (0.8) from
    zero, the rest of the residual summed over 2x2 blocks and solved (recursively) on the next grid, the
    correction interpolated back, and one more sweep. Linear in ``residual``. (The rest needs no restriction
    to the removed pixels: the coarse grid reads only blocks removed whole, and the last sweep's step is
    zero elsewhere.)"""
    (mask, weight, damped), coarser = levels[0], levels[1:]
    x = residual * damped
    if coarser:
        rest = _unmasked_laplacian(x, weight).neg_().add_(residual)
        coarse = _v_cycle(_block_sums(rest).mul_(coarser[0][0]), coarser)
        x.addcmul_(mask, _doubled(coarse, mask.shape[-2:]))
    return x.addcmul_(_unmasked_laplacian(x, weight).neg_().add_(residual), damped)


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
    levels = _levels(hole) if multigrid else [_level(hole)]
    weight = levels[0][1]  # (1, 1, H, W) in-image neighbour weight per pixel
    jacobi = None if multigrid else levels[0][2] / 0.8  # 1 / weight on removed pixels

    def precondition(residual: torch.Tensor) -> torch.Tensor:
        return _v_cycle(residual, levels) if multigrid else residual * jacobi

    rhs = _neighbours(kept).mul_(hole)
    solution = hole * start
    result = solution.clone()
    active = torch.arange(kept.shape[0], device=kept.device)
    residual = _unmasked_laplacian(solution, weight).mul_(hole).neg_().add_(rhs)
    preconditioned = precondition(residual)
    direction = preconditioned.clone()
    rho = _dot(residual, preconditioned)
    norm = rhs.flatten(1).norm(dim=1).clamp_min(1e-30)
    for _ in range(max_iterations + 1):
        done = residual.flatten(1).norm(dim=1) / norm <= tolerance
        if bool(done.any()):
            result[active[done]] = solution[done]
            keep = ~done
            if not bool(keep.any()):
                return result
            levels = [(mask[keep], grid_weight, damped[keep]) for mask, grid_weight, damped in levels]
            jacobi = None if multigrid else jacobi[keep]
            hole = hole[keep]
            active, solution, residual = active[keep], solution[keep], residual[keep]
            direction, preconditioned, rho, norm = direction[keep], preconditioned[keep], rho[keep], norm[keep]
        applied = _unmasked_laplacian(direction, weight).mul_(hole)
        step = (rho / _dot(direction, applied).clamp_min(1e-30)).view(-1, 1, 1, 1)
        solution.addcmul_(step, direction)
        residual.addcmul_(step, applied, value=-1)
        following = precondition(residual)
        rho_next = _dot(residual, following)
        beta = (rho_next - _dot(residual, preconditioned)) / rho.clamp_min(1e-30)
        direction.mul_(beta.view(-1, 1, 1, 1)).add_(following)
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
    """The removed pixels' values, each hole by the preconditioner that suits its shape (module docstring),
    in batches of a few images (:data:`CHUNK_BYTES`); each image's answer does not depend on its batch."""
    multigrid = block_share(hole) >= MULTIGRID_SHARE
    if min(hole.shape[-2:]) < 16:
        multigrid[:] = False
    per_batch = max(1, CHUNK_BYTES // (kept[0].numel() * kept.element_size()))
    result = torch.empty_like(kept)
    for use_multigrid in (True, False):
        chosen = torch.nonzero(multigrid == use_multigrid).flatten()
        for part in chosen.split(per_batch) if chosen.numel() else ():
            part_kept, part_hole = kept[part], hole[part]
            if use_multigrid:
                start = _push_pull(part_kept, 1 - part_hole)
                result[part] = _conjugate_gradients(
                    part_kept, part_hole, start, tolerance, max_iterations, multigrid=True
                )
            else:
                result[part] = _nested(part_kept, part_hole, tolerance, max_iterations)
    return result


def _same_image(images: torch.Tensor) -> bool:
    """Whether every image of the batch is the same (ROAD's frames of one image: its holes are then
    the only thing that tells two systems apart)."""
    return images.shape[0] > 1 and (images.stride(0) == 0 or torch.equal(images, images[:1].expand_as(images)))


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
    (N, 1, H, W) or (N, H, W) bool. Each image keeps at least one pixel. Returns a new tensor.

    ``tolerance`` is the solver's relative residual: at 1e-4 the fill is within about 0.003 of the value
    range of the exact solve at 224 px (0.3 of the added noise), see ``bench/evaluate.py --road``."""
    if images.ndim != 4:
        raise InputError(f"impute takes (N, C, H, W) images, got shape {tuple(images.shape)}")
    if removed.ndim == 3:
        removed = removed.unsqueeze(1)
    if removed.shape[0] != images.shape[0] or removed.shape[-2:] != images.shape[-2:]:
        raise InputError(f"the removal mask {tuple(removed.shape)} does not match the images {tuple(images.shape)}")
    if bool(removed.flatten(1).all(dim=1).any()):
        raise InputError("an image cannot have every pixel removed: there is nothing to impute from")
    x = images.detach().to(torch.float32)
    if _same_image(x):  # solve each distinct hole once
        distinct, which = torch.unique(removed.flatten(1), dim=0, return_inverse=True)
        hole = distinct.view(-1, *removed.shape[1:]).to(torch.float32)
        kept = x[: hole.shape[0]] * (1 - hole)
        solution = _solve(kept, hole, tolerance, max_iterations)
        hole, kept, solution = hole[which], x * (1 - hole[which]), solution[which]
    else:
        hole = removed.to(torch.float32)
        kept = x * (1 - hole)
        solution = _solve(kept, hole, tolerance, max_iterations)
    filled = kept.add_(solution)
    if noise > 0:
        spread = (x.flatten(1).amax(dim=1) - x.flatten(1).amin(dim=1)).view(-1, 1, 1, 1)
        jitter = torch.randn(x.shape, generator=generator)
        filled.addcmul_(hole, jitter.to(x.device).mul_(spread).mul_(noise))
    return filled.to(images.dtype)


def exact_imputation(image: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """The noise-free imputation of the ``removed`` pixels of a (C, H, W) image by one scipy sparse solve: the
    definition, the approach of ROAD's reference code, slow; :func:`impute`'s solver is checked against it."""
    import scipy.sparse as sparse
    import scipy.sparse.linalg as linalg

    height, width = removed.shape
    index = -np.ones((height, width), dtype=np.int64)
    ys, xs = np.nonzero(removed)
    index[ys, xs] = np.arange(len(ys))
    rows, cols, values = [], [], []
    rhs = np.zeros((len(ys), image.shape[0]))
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if not (dy or dx):
                continue
            weight = 1 / 12 if dy and dx else 1 / 6
            yy, xx = ys + dy, xs + dx
            inside = (yy >= 0) & (yy < height) & (xx >= 0) & (xx < width)
            n = np.nonzero(inside)[0]
            rows.append(n), cols.append(n), values.append(np.full(len(n), weight))  # diagonal share
            neighbour = index[yy[inside], xx[inside]]
            unknown = neighbour >= 0
            rows.append(n[unknown]), cols.append(neighbour[unknown]), values.append(np.full(unknown.sum(), -weight))
            known = ~unknown
            np.add.at(rhs, n[known], weight * image[:, yy[inside][known], xx[inside][known]].T)
    matrix = sparse.csc_matrix(
        (np.concatenate(values), (np.concatenate(rows), np.concatenate(cols))), shape=(len(ys), len(ys))
    )
    out = image.copy()
    out[:, ys, xs] = linalg.spsolve(matrix, rhs).T
    return out


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
