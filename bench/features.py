"""Activation maximization throughput: 8 classes optimized in one batch vs the same 8 one at a time, on the
default model, from one run (run by hand: `make bench`). Interleaved runs, best of --repeat for each.

Throughput = images x steps per second of optimization (setup and the final scoring excluded, as reported
in ``Visualization.stats``). Also printed: one forward + backward to the input of the BatchNorm-folded
copy that maximize runs, alone and in batches (the floor that limits any batching gain on this
machine), and the CPU time per image of the cheapest batch:
batch-1 wall time / (that CPU time / cores) estimates the most any batching scheme could gain here, with
both cores perfectly busy. All of it is measured interleaved, best of --repeat; the machine's own drift
between minutes is 5-40% here, so the ratios carry about that much noise.

Goal (issue #5): batched >= 3x the throughput of one at a time.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import torch

import cnnscope
from cnnscope.features import maximize
from cnnscope.models.folding import fold_batchnorm

CLASSES = [1, 963, 207, 417, 779, 285, 948, 980]  # goldfish pizza retriever balloon bus cat apple volcano


def floor(model, count: int, size: int, steps: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds) per image of one forward + backward to the input (frozen weights,
    channels-last), the best of ``steps`` runs."""
    module = model.module.eval()
    flags = [p.requires_grad for p in module.parameters()]
    for p in module.parameters():
        p.requires_grad_(False)
    try:
        wall, cpu = float("inf"), float("inf")
        for _ in range(steps + 1):
            x = torch.rand(count, 3, size, size).contiguous(memory_format=torch.channels_last).requires_grad_(True)
            start, start_cpu = time.perf_counter(), time.process_time()
            torch.autograd.grad(module(x)[:, 1].sum(), x)
            wall = min(wall, time.perf_counter() - start)
            cpu = min(cpu, time.process_time() - start_cpu)
    finally:
        for p, flag in zip(module.parameters(), flags, strict=True):
            p.requires_grad_(flag)
    return wall / count, cpu / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--sizes", default="224,128", help="image sides to measure")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    model = cnnscope.load_model()
    working, _ = fold_batchnorm(model)  # what maximize runs (fold_bn=True): the floors are taken on it
    rows = []
    for size in [int(s) for s in args.sizes.split(",")]:
        batched, single = 0.0, 0.0
        floors: dict[str, tuple[float, float]] = {}
        maximize(model, CLASSES[:2], steps=2, size=size, quiet=True)  # warm-up
        for _ in range(args.repeat):  # everything interleaved, so a slow minute does not favour one side
            run = maximize(model, CLASSES, steps=args.steps, size=size, quiet=True)
            batched = max(batched, run.stats["iterations_per_second"] * len(CLASSES))
            seconds = 0.0
            for cls in CLASSES:
                alone = maximize(model, [cls], steps=args.steps, size=size, quiet=True)
                seconds += 1.0 / alone.stats["iterations_per_second"]
            single = max(single, len(CLASSES) / seconds)
            per_pass = run.stats["images_per_pass"]
            for key, count in (("one", 1), ("pass", per_pass), ("eight", 8)):
                wall, cpu = floor(working, count, size, args.steps)
                best = floors.get(key, (float("inf"), float("inf")))
                floors[key] = (min(best[0], wall), min(best[1], cpu))
        (one, _), (passes, passes_cpu), (eight, eight_cpu) = floors["one"], floors["pass"], floors["eight"]
        cores = torch.get_num_threads()
        rows.append(
            {
                "size": size,
                "batched_images_per_s": round(batched, 2),
                "one_at_a_time_images_per_s": round(single, 2),
                "ratio": round(batched / single, 2),
                "floor_ms_per_image_batch1": round(one * 1000, 1),
                "images_per_pass": per_pass,
                "floor_ms_per_image_pass": round(passes * 1000, 1),
                "floor_ms_per_image_batch8": round(eight * 1000, 1),
                "floor_ratio": round(one / min(passes, eight), 2),
                "cpu_bound_ratio": round(one / (min(passes_cpu, eight_cpu) / cores), 2),
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"activation maximization, 8 classes, {args.steps} steps, best of {args.repeat} (goal: ratio >= 3)")
    for row in rows:
        print(
            f"  {row['size']}x{row['size']}: batched {row['batched_images_per_s']:6.2f} img-steps/s, one at a time "
            f"{row['one_at_a_time_images_per_s']:6.2f}  ratio {row['ratio']:.2f}x\n"
            f"    fwd+bwd floor: {row['floor_ms_per_image_batch1']} ms/img alone, "
            f"{row['floor_ms_per_image_pass']} in {row['images_per_pass']}s, {row['floor_ms_per_image_batch8']} in 8s: "
            f"{row['floor_ratio']:.2f}x; most batching could gain (CPU time): {row['cpu_bound_ratio']:.2f}x"
        )


if __name__ == "__main__":
    main()
