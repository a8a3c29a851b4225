"""Ray engine against the local engine, as ratios measured in one run (run by hand:
`python bench/ray_engine.py`; not named bench/ray.py, which would shadow the ray package).

Goal (issue #15): on this 2-core machine the Ray engine's throughput within 0.7x of the local engine's (its
overhead, measured), and a table of throughput against the number of actors.

The work: the audit step (Grad-CAM of the true and the predicted class, statistics, features, thumbnails)
on ``--images`` synthetic shapes of ``--size`` pixels held in memory, with a small CNN, shards of
``--shard-size`` images. Each engine writes its own store; the local engine runs first and last (its best
is taken) so the machine's drift hits both. The Ray figures exclude starting Ray itself (printed apart: a
cluster is started once, not per audit) but include everything of the run: building the actor pool, each
actor unpickling the model, shipping shards back and writing them.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--shard-size", type=int, default=256)
    parser.add_argument("--actors", default="1,2,4", help="actor counts for the table")
    args = parser.parse_args()

    import ray

    from cnnscope import Preprocess, load_model
    from cnnscope.audit import audit
    from cnnscope.data import SmallCNN, make_shapes

    cores = os.cpu_count() or 1
    load = os.getloadavg()[0]
    print(f"machine: {cores} cores, load average {load:.1f} at the start; torch threads {torch.get_num_threads()}")
    shapes = make_shapes(args.images, size=args.size, seed=0)
    data = (shapes.images, shapes.labels)
    module = SmallCNN(len(shapes.classes), width=16, blocks=3, generator=torch.Generator().manual_seed(0)).eval()
    preprocess = Preprocess(size=(args.size, args.size), mean=(0, 0, 0), std=(1, 1, 1))
    model = load_model(module, labels=list(shapes.classes), preprocess=preprocess)
    root = Path(tempfile.mkdtemp(prefix="cnnscope-bench-ray-"))

    def run(name: str, **engine) -> float:
        start = time.perf_counter()
        result = audit(
            model, data, out=root / name, shard_size=args.shard_size, quiet=True, report=False, resume=False, **engine
        )
        seconds = time.perf_counter() - start
        assert result.complete and result.images == args.images
        return args.images / seconds

    local = [run("local-1")]
    start = time.perf_counter()
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False, object_store_memory=256 * 1024 * 1024)
    startup = time.perf_counter() - start
    rows = []
    for actors in [int(a) for a in args.actors.split(",")]:
        rows.append((actors, run(f"ray-{actors}", engine="ray", actors=actors)))
    ray.shutdown()
    local.append(run("local-2"))
    best_local = max(local)
    print(f"{args.images} images of {args.size} px, shards of {args.shard_size}; starting a local Ray: {startup:.1f} s")
    print(f"local engine: {best_local:.1f} images/s (runs: {', '.join(f'{x:.1f}' for x in local)})")
    print("| engine | actors | images/s | vs local |")
    print("|---|---|---|---|")
    print(f"| local | - | {best_local:.1f} | 1.00 |")
    for actors, rate in rows:
        print(f"| ray | {actors} | {rate:.1f} | {rate / best_local:.2f} |")
    best = max(rows, key=lambda row: row[1])
    verdict = "met" if best[1] / best_local >= 0.7 else "NOT met"
    print(f"goal: ray within 0.7x of local; best {best[1] / best_local:.2f} with {best[0]} actors: {verdict}")


if __name__ == "__main__":
    main()
