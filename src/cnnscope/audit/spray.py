"""SpRAy (Lapuschkin et al. 2019, "Unmasking Clever Hans predictors and assessing what machines really
learn"): spectral clustering of one class's explanation maps, the number of clusters read from the eigengap.

The maps (positive part, normalized to sum 1) are averaged down to ``side`` x ``side`` and compared by
Euclidean distance. The affinity is a symmetric k-nearest-neighbour graph weighted with a locally scaled
Gaussian (Zelnik-Manor and Perona 2004: ``exp(-d_ij^2 / (s_i s_j))``, ``s_i`` the distance to the i-th
map's ``scale_neighbour``-th neighbour), so groups of different spread are found alike. The eigenvalues of
the normalized Laplacian ``I - D^-1/2 W D^-1/2`` are near 0 once per well-separated group; the number of
clusters is the ``k`` with the largest gap ``lambda_{k+1} - lambda_k`` (k from 1 to ``max_clusters``),
and scikit-learn's ``SpectralClustering`` on the same affinity assigns the maps.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from ..errors import InputError

#: Fewer maps than this are not clustered (one cluster).
MIN_MAPS = 12


@dataclass(frozen=True)
class Spray:
    """The clusters of one class: ``labels`` (one cluster index per map, 0 the largest cluster), the
    eigenvalues read for the eigengap, and the gap that chose ``count``."""

    labels: np.ndarray
    count: int
    eigenvalues: np.ndarray
    gap: float


def require_sklearn():
    try:
        import sklearn.cluster
    except ImportError:
        raise InputError("the audit needs pyarrow and scikit-learn: pip install 'cnnscope[audit]'") from None
    return sklearn.cluster


def downsample(maps: np.ndarray, side: int) -> np.ndarray:
    """(N, s, s) -> (N, side, side) by averaging blocks (s a multiple of side), renormalized to sum 1."""
    count, size = maps.shape[0], maps.shape[-1]
    if size % side:
        raise InputError(f"maps of side {size} cannot be averaged down to {side}")
    block = size // side
    small = maps.reshape(count, side, block, side, block).mean(axis=(2, 4))
    total = small.sum(axis=(1, 2), keepdims=True)
    return np.where(total > 0, small / np.where(total > 0, total, 1), 1.0 / (side * side))


def affinity(vectors: np.ndarray, neighbours: int, scale_neighbour: int = 7) -> np.ndarray:
    """The symmetric kNN affinity with local scaling (see the module docstring)."""
    count = vectors.shape[0]
    squared = (vectors**2).sum(axis=1)
    distances = np.sqrt(np.maximum(squared[:, None] + squared[None, :] - 2 * vectors @ vectors.T, 0.0))
    order = np.argsort(distances, axis=1)
    scale_at = min(scale_neighbour, count - 1)
    scales = distances[np.arange(count), order[:, scale_at]]
    scales = np.where(scales > 0, scales, max(float(scales.max()), 1e-12))
    weights = np.exp(-(distances**2) / (scales[:, None] * scales[None, :]))
    keep = np.zeros_like(weights, dtype=bool)
    rows = np.repeat(np.arange(count), neighbours)
    keep[rows, order[:, 1 : neighbours + 1].reshape(-1)] = True
    keep |= keep.T
    weights = np.where(keep, weights, 0.0)
    weights = (weights + weights.T) / 2  # exactly symmetric (the distances may differ in the last bit)
    np.fill_diagonal(weights, 0.0)
    return weights


def eigengap(weights: np.ndarray, max_clusters: int) -> tuple[int, np.ndarray, float]:
    """(number of clusters, the smallest eigenvalues of the normalized Laplacian, the chosen gap)."""
    degree = weights.sum(axis=1)
    inverse_root = np.where(degree > 0, 1.0 / np.sqrt(np.where(degree > 0, degree, 1.0)), 0.0)
    laplacian = np.eye(len(weights)) - inverse_root[:, None] * weights * inverse_root[None, :]
    values = np.linalg.eigvalsh(laplacian)[: max_clusters + 1]
    gaps = np.diff(values)
    count = int(np.argmax(gaps)) + 1
    return count, values, float(gaps[count - 1])


def spray(
    maps: np.ndarray, *, side: int = 8, max_clusters: int = 6, neighbours: int | None = None, seed: int = 0
) -> Spray:
    """Cluster (N, s, s) maps (already normalized to sum 1, or not: they are renormalized after averaging).

    ``neighbours`` defaults to about the square root of N (at least 5). With fewer than ``MIN_MAPS`` maps
    everything is one cluster."""
    count = maps.shape[0]
    if count < MIN_MAPS:
        return Spray(np.zeros(count, dtype=int), 1, np.zeros(0), 0.0)
    vectors = downsample(np.clip(maps, 0, None), side).reshape(count, -1)
    k = neighbours or max(5, round(np.sqrt(count)))
    k = min(k, count - 1)
    weights = affinity(vectors, k)
    clusters, values, gap = eigengap(weights, min(max_clusters, count - 2))
    if clusters == 1:
        return Spray(np.zeros(count, dtype=int), 1, values, gap)
    cluster = require_sklearn()
    model = cluster.SpectralClustering(
        n_clusters=clusters, affinity="precomputed", random_state=seed, assign_labels="cluster_qr"
    )
    with warnings.catch_warnings():
        # a graph in several components is what well-separated strategies look like: not a problem here
        warnings.filterwarnings("ignore", message="Graph is not fully connected", category=UserWarning)
        labels = model.fit_predict(weights)
    # number the clusters by size, largest first (ties by first member), so cluster 0 is the main strategy
    sizes = np.bincount(labels, minlength=clusters)
    order = sorted(range(clusters), key=lambda c: (-sizes[c], int(np.argmax(labels == c))))
    renumber = np.empty(clusters, dtype=int)
    renumber[order] = np.arange(clusters)
    labels = renumber[labels]
    return Spray(labels, len(np.unique(labels)), values, gap)
