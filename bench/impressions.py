"""Class impressions against plain activation maximization on the default model (issue #18's done-when),
run by hand; prints one table from one run.

For goldfish, pizza, golden retriever, balloon and school bus, with the same steps and seed: each
impression's probability for its class (goal: >= 0.9), the number of salient regions of its Grad-CAM at
half its peak and the main region's share of the Grad-CAM mass, beside plain ``maximize`` of the same
class and seed (goal: a larger share on at least 4 of the 5); and a fused goldfish+pizza image's top-5
(goal: both classes in it). ``--out`` also writes the plate and the images.

    .venv/bin/python bench/impressions.py --steps 64
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import cnnscope
from cnnscope.features.impressions import class_impressions

CLASSES = [1, 963, 207, 417, 779]  # goldfish, pizza, golden retriever, balloon, school bus
FUSED = "goldfish+pizza"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=None, help="image side (default: the model's input, 224)")
    parser.add_argument("--out", type=Path, default=None, help="folder for the plate and the images")
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON too")
    args = parser.parse_args()

    model = cnnscope.load_model()
    started = time.perf_counter()
    result = class_impressions(
        model, CLASSES, fuse=[FUSED], steps=args.steps, seed=args.seed, size=args.size, quiet=True
    )
    seconds = time.perf_counter() - started
    rows = []
    print(f"class impressions vs plain maximize: {args.steps} steps, seed {args.seed}, {seconds:.0f} s in all")
    header = f"{'p':>6} {'regions':>7} {'main share':>10}"
    print(f"{'class':<18} {header}   plain:{header}")
    for row, name in enumerate(result.names):
        entry = {
            "class": name,
            "probability": result.probabilities[row],
            "regions": result.regions[row],
            "largest_share": result.largest_share[row],
            "baseline_probability": result.baseline_probabilities[row],
            "baseline_regions": result.baseline_regions[row],
            "baseline_share": result.baseline_share[row],
        }
        rows.append(entry)
        print(
            f"{name[:18]:<18} {entry['probability']:6.3f} {entry['regions']:7d} {entry['largest_share']:10.3f}   "
            f"      {entry['baseline_probability']:6.3f} {entry['baseline_regions']:7d} {entry['baseline_share']:10.3f}"
        )
    top5 = result.predictions[len(CLASSES)]
    fused_hits = [c for c in result.fused[0] if c in [p.index for p in top5]]
    above = sum(r["probability"] >= 0.9 for r in rows)
    larger = sum(r["largest_share"] > r["baseline_share"] for r in rows)
    print(f"fused {FUSED}: top-5 " + ", ".join(f"{p.name} {p.probability:.1%}" for p in top5))
    print(f"p >= 0.9: {above}/5 (goal 5/5)")
    print(f"main share larger than plain maximize: {larger}/5 (goal >= 4/5)")
    print(f"fused classes in the top-5: {len(fused_hits)}/{len(result.fused[0])} (goal all)")
    print(f"iterations per second: impressions {result.stats['iterations_per_second']:.3f}")
    if args.out is not None:
        from cnnscope.render.figure import figure_png
        from cnnscope.render.overlay import png_bytes

        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "impressions.png").write_bytes(figure_png(result.figure()))
        for row, picture in enumerate(result.images):
            (args.out / f"impression_{row}.png").write_bytes(png_bytes(picture))
        print(f"plate: {args.out / 'impressions.png'}")
    if args.json:
        fused_top5 = [p.index for p in top5]
        print(json.dumps({"steps": args.steps, "seed": args.seed, "classes": rows, "fused_top5": fused_top5}))


if __name__ == "__main__":
    main()
