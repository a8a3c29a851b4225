"""Class impressions against plain activation maximization on the default model (issue #18's done-when),
run by hand; prints one table per seed, all from one run.

For goldfish, pizza, golden retriever, balloon and school bus (``--classes``), with the same steps and seed:
each impression's probability for its class (goal: >= 0.9), the number of salient regions of its Grad-CAM at
half its peak and the main region's share of the Grad-CAM mass, beside plain ``maximize`` of the same
class and seed (goal: a larger share on at least 4 of the 5); and a fused goldfish+pizza image's top-5
(goal: both classes in it). Two columns more, for reading the share, not part of the goal: ``area``, the
main region's fraction of the image (a flat map that fills the frame has share 1), and ``grid``, the same
share taken on the layer's own grid (7x7 on the default model) instead of the map upsampled to the input.
``--out`` also writes the plate and the images of each seed.

    .venv/bin/python bench/impressions.py --steps 64 --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import cnnscope
from cnnscope.features.impressions import class_impressions, salient_regions
from cnnscope.methods.cam import GradCAM

CLASSES = [1, 963, 207, 417, 779]  # goldfish, pizza, golden retriever, balloon, school bus
FUSED = "goldfish+pizza"


def area_and_grid_share(model, images, classes) -> tuple[list[float], list[float]]:
    """Per image: the main half-peak region's fraction of the input, and the main region's share on the layer's grid."""
    explanation = GradCAM(model)(model.preprocess.normalize(images), [[c] for c in classes])
    areas, grid = [], []
    for row in range(images.shape[0]):
        found = salient_regions(explanation.maps[row, 0])
        areas.append(float((found.labels == found.main).mean()))
        grid.append(salient_regions(explanation.raw[row, 0]).largest_share)
    return areas, grid


def one_seed(model, classes: list[int], steps: int, seed: int, size: int | None, out: Path | None) -> dict:
    started = time.perf_counter()
    result = class_impressions(model, classes, fuse=[FUSED], steps=steps, seed=seed, size=size, quiet=True)
    seconds = time.perf_counter() - started
    areas, grid = area_and_grid_share(model, result.tensor[: len(classes)], classes)
    plain_areas, plain_grid = area_and_grid_share(model, result.baseline.tensor, classes)
    print(f"\nclass impressions vs plain maximize: {steps} steps, seed {seed}, {seconds:.0f} s in all")
    header = f"{'p':>6} {'regions':>7} {'share':>6} {'area':>5} {'grid':>5}"
    print(f"{'class':<18} {header}   plain:{header}")
    rows = []
    for row, name in enumerate(result.names):
        entry = {
            "class": name,
            "probability": result.probabilities[row],
            "regions": result.regions[row],
            "largest_share": result.largest_share[row],
            "area": areas[row],
            "grid_share": grid[row],
            "baseline_probability": result.baseline_probabilities[row],
            "baseline_regions": result.baseline_regions[row],
            "baseline_share": result.baseline_share[row],
            "baseline_area": plain_areas[row],
            "baseline_grid_share": plain_grid[row],
        }
        rows.append(entry)
        print(
            f"{name[:18]:<18} {entry['probability']:6.3f} {entry['regions']:7d} {entry['largest_share']:6.3f} "
            f"{entry['area']:5.2f} {entry['grid_share']:5.3f}         {entry['baseline_probability']:6.3f} "
            f"{entry['baseline_regions']:7d} {entry['baseline_share']:6.3f} {entry['baseline_area']:5.2f} "
            f"{entry['baseline_grid_share']:5.3f}"
        )
    top5 = result.predictions[len(classes)]
    fused_hits = [c for c in result.fused[0] if c in [p.index for p in top5]]
    above = sum(r["probability"] >= 0.9 for r in rows)
    larger = sum(r["largest_share"] > r["baseline_share"] for r in rows)
    larger_grid = sum(r["grid_share"] > r["baseline_grid_share"] for r in rows)
    print(f"fused {FUSED}: top-5 " + ", ".join(f"{p.name} {p.probability:.1%}" for p in top5))
    print(f"p >= 0.9: {above}/{len(rows)} (goal all)")
    print(
        f"main share larger than plain maximize: {larger}/{len(rows)} (goal >= 4/5); on the layer's grid {larger_grid}"
    )
    print(f"fused classes in the top-5: {len(fused_hits)}/{len(result.fused[0])} (goal all)")
    print(f"iterations per second: impressions {result.stats['iterations_per_second']:.3f}")
    if out is not None:
        from cnnscope.render.figure import figure_png
        from cnnscope.render.overlay import png_bytes

        folder = out / f"seed{seed}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "impressions.png").write_bytes(figure_png(result.figure()))
        for row, picture in enumerate(result.images):
            (folder / f"impression_{row}.png").write_bytes(png_bytes(picture))
        print(f"plate: {folder / 'impressions.png'}")
    return {
        "steps": steps,
        "seed": seed,
        "seconds": seconds,
        "options": {k: v for k, v in result.options.items() if k not in ("labels", "transforms")},
        "classes": rows,
        "fused_top5": [p.index for p in top5],
        "above": above,
        "larger": larger,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--classes", type=int, nargs="+", default=CLASSES, help="class indices (default: the five)")
    parser.add_argument("--size", type=int, default=None, help="image side (default: the model's input, 224)")
    parser.add_argument("--out", type=Path, default=None, help="folder for the plates and the images")
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON too")
    args = parser.parse_args()

    model = cnnscope.load_model()
    runs = [one_seed(model, args.classes, args.steps, seed, args.size, args.out) for seed in args.seeds]
    held = [run["larger"] >= 0.8 * len(args.classes) and run["above"] == len(args.classes) for run in runs]
    print(
        f"\ndone-when held on {sum(held)}/{len(runs)} seeds; shares by seed: "
        + "; ".join(
            f"seed {run['seed']}: mean {np.mean([r['largest_share'] for r in run['classes']]):.3f} vs plain "
            f"{np.mean([r['baseline_share'] for r in run['classes']]):.3f}"
            for run in runs
        )
    )
    if args.json:
        print(json.dumps(runs))


if __name__ == "__main__":
    main()
