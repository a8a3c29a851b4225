"""Embedding speed, as ratios measured in one run (run by hand: `python bench/embed.py`).

Goal (issue #15): 100,000 stored feature vectors embedded in under 2 minutes on 2 cores with UMAP or
PCA + t-SNE, and the ratio to scikit-learn's plain t-SNE (no PCA first, Barnes-Hut, its defaults) on 10,000.

The features are synthetic, shaped like a network's penultimate features: ``--classes`` Gaussian clusters in
``--dims`` dimensions (non-negative, as after a ReLU), two pairs of them overlapping, so the neighbourhood
purity has something to find. Every projection is seeded, as cnnscope's are. Printed: seconds of each step,
points per second, the ratio of cnnscope's 100,000-point embedding to plain t-SNE on 10,000 (below 1: the
10x larger job is faster), and the purity of the overlapping classes against the others.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np


def features(count: int, dims: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=3.0, size=(classes, dims))
    centres[1] = centres[0] + rng.normal(scale=0.3, size=dims)  # classes 0 and 1 overlap
    centres[3] = centres[2] + rng.normal(scale=0.3, size=dims)  # so do 2 and 3
    labels = rng.integers(0, classes, size=count)
    values = centres[labels] + rng.normal(size=(count, dims))
    return np.maximum(values, 0).astype(np.float32), labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--points", type=int, default=100_000)
    parser.add_argument("--tsne-points", type=int, default=10_000)
    parser.add_argument("--dims", type=int, default=512)
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--method", default="umap", choices=["umap", "tsne"], help="cnnscope's projection")
    args = parser.parse_args()

    from sklearn.manifold import TSNE

    from cnnscope.audit.embedding import neighbourhood_purity, project

    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the start")
    print("(wall seconds count the other processes' load; CPU seconds are this process's own, all threads)")
    big, big_labels = features(args.points, args.dims, args.classes)
    small, _ = features(args.tsne_points, args.dims, args.classes, seed=1)

    start, cpu = time.perf_counter(), time.process_time()
    points = project(big, args.method, seed=0)
    ours, ours_cpu = time.perf_counter() - start, time.process_time() - cpu
    start, cpu = time.perf_counter(), time.process_time()
    purity, _, _ = neighbourhood_purity(big, big_labels, k=10)
    purity_seconds, purity_cpu = time.perf_counter() - start, time.process_time() - cpu
    print(
        f"cnnscope {args.method} (PCA to 50 first) of {args.points:,} x {args.dims}: {ours:.1f} s wall, "
        f"{ours_cpu:.1f} s CPU ({args.points / ours:,.0f} points/s); goal under 120 s: "
        f"{'met' if ours < 120 else 'NOT met'}"
    )
    print(f"neighbourhood purity (k=10) of {args.points:,}: {purity_seconds:.1f} s wall, {purity_cpu:.1f} s CPU")
    overlapping = np.mean([purity[c] for c in (0, 1, 2, 3)])
    others = np.mean([purity[c] for c in purity if c > 3])
    print(f"  purity of the four overlapping classes {overlapping:.2f}, of the others {others:.2f}")
    assert points.shape == (args.points, 2)

    start, cpu = time.perf_counter(), time.process_time()
    TSNE(n_components=2, random_state=0).fit_transform(small)
    plain, plain_cpu = time.perf_counter() - start, time.process_time() - cpu
    print(f"scikit-learn plain t-SNE of {args.tsne_points:,} x {args.dims}: {plain:.1f} s wall, {plain_cpu:.1f} s CPU")
    per_point = plain / args.tsne_points * args.points / ours
    print(
        f"ratio: cnnscope {args.method} on {args.points:,} / plain t-SNE on {args.tsne_points:,} = {ours / plain:.2f} "
        f"({args.points / args.tsne_points:.0f}x the points); per point {per_point:.1f}x faster; "
        f"in CPU seconds {ours_cpu / plain_cpu:.2f}"
    )


if __name__ == "__main__":
    main()
