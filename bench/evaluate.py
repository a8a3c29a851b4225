"""``cnnscope evaluate``: how long 10 methods on 100 images take here, and ROAD's batched imputation against
one sparse solve per image (the way ROAD's own code and Quantus impute; a Quantus user measured about 6 s per
image for ROAD). One run, printed as seconds and ratios.

    .venv/bin/python bench/evaluate.py [--images 100] [--skip-default]
    .venv/bin/python bench/evaluate.py --road      # only ROAD: the solver, and where one photo's ROAD time goes
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from _timing import timed

TEN = "gradcam,gradcam++,xgradcam,layercam,eigencam,saliency,gradxinput,guided-backprop,integrated-gradients,smoothgrad"


def bench_road(side: int, count: int) -> None:
    """ROAD's imputation three ways on the same holes: cnnscope's (a multigrid V-cycle or Jacobi per hole,
    by its shape), Jacobi-preconditioned CG for every hole (the solver before the V-cycle), and one scipy
    sparse solve per image; for CAM-like holes (a 7x7 map upsampled) and gradient-like ones (per pixel)."""
    from cnnscope.evaluate import road

    generator = torch.Generator().manual_seed(0)
    images = torch.nn.functional.avg_pool2d(torch.rand(count, 3, side, side, generator=generator), 5, 1, 2)
    batch = images.repeat_interleave(5, dim=0)
    shapes = {
        "CAM-like": torch.nn.functional.interpolate(
            torch.rand(count, 1, 7, 7, generator=generator), size=(side, side), mode="bilinear"
        ),
        "per-pixel": torch.rand(count, 1, side, side, generator=generator),
    }
    for kind, maps in shapes.items():
        for most_relevant in (True, False):
            holes = road.removal_masks(maps[:, 0], road.FRACTIONS, most_relevant=most_relevant).flatten(0, 1)
            kept = batch * (1 - holes.float())
            ours, got = timed(lambda h=holes: road.impute(batch, h, noise=0.0))
            jacobi, old = timed(lambda k=kept, h=holes: k + road._nested(k, h.float(), 1e-4, 2000))
            pairs = list(zip(batch.double().numpy(), holes[:, 0].numpy(), strict=True))
            reference_seconds, reference = timed(lambda p=pairs: [road.exact_imputation(b, m) for b, m in p])
            error = max(float(np.abs(got[i].numpy() - reference[i]).max()) for i in range(len(batch)))
            old_error = max(float(np.abs(old[i].numpy() - reference[i]).max()) for i in range(len(batch)))
            print(
                f"ROAD imputation, {len(batch)} {kind} {'MoRF' if most_relevant else 'LeRF'} holes at {side} px: "
                f"cnnscope {ours:.2f} s (largest difference to the exact solve {error:.4f}); speed ratio to "
                f"Jacobi-CG alone {jacobi / ours:.2f} (its difference {old_error:.4f}), to scipy spsolve one by one "
                f"{reference_seconds / ours:.2f} (above 1: cnnscope is faster)"
            )


def road_breakdown() -> None:
    """Where ROAD's share of one photo's scoring goes (224 px, EfficientNet-Lite0, the 10 maps and the three
    baselines, 10-step curves): the imputation of its 130 holes, their forwards, and the rest."""
    import cnnscope
    from cnnscope.evaluate import metrics as M
    from cnnscope.evaluate import road
    from cnnscope.evaluate.run import _forward_probabilities, _per_pass, score_maps
    from cnnscope.samples import sample_image

    model = cnnscope.load_model()
    picture = sample_image("chelsea")[:256, :256]
    image = model.preprocess([picture])
    with torch.inference_mode():
        target = int(model(image).argmax())
    maps = [cnnscope.explain(model, picture, method=name, target=target).maps[0, 0].float() for name in TEN.split(",")]
    generator = np.random.default_rng(0)
    size = tuple(image.shape[-2:])
    maps += [
        torch.as_tensor(M.center_map(size), dtype=torch.float32),
        torch.as_tensor(M.random_map(size, generator), dtype=torch.float32),
        torch.as_tensor(M.smooth_random_map(size, generator), dtype=torch.float32),
    ]
    per_pass = _per_pass(model)
    score_maps(model, image, maps, target, steps=10, fractions=(), per_pass=per_pass)  # warm-up
    without, _ = timed(lambda: score_maps(model, image, maps, target, steps=10, fractions=(), per_pass=per_pass))
    with_road, _ = timed(lambda: score_maps(model, image, maps, target, steps=10, per_pass=per_pass))
    stack = torch.stack(maps)
    holes = torch.cat([road.removal_masks(stack, road.FRACTIONS, most_relevant=o).flatten(0, 1) for o in (True, False)])
    imputing, frames = timed(lambda: road.impute(image.expand(len(holes), -1, -1, -1), holes))
    forwards, _ = timed(lambda: _forward_probabilities(model, frames, target, per_pass))
    share = with_road - without
    print(
        f"ROAD on one photo ({len(maps)} maps, {len(holes)} holes, 224 px): scoring {without:.1f} s without ROAD, "
        f"{with_road:.1f} s with it; ROAD's {share:.1f} s: imputation {imputing:.1f} s, the holes' forwards "
        f"{forwards:.1f} s ({per_pass} a pass), the rest {share - imputing - forwards:.1f} s"
    )


def smoothgrad_choices(images: int) -> None:
    """The table SmoothGrad's defaults were chosen from: aggregation x noise on the demo's shapes."""
    from cnnscope.evaluate import evaluate
    from cnnscope.evaluate.demo import demo_model_and_data

    model, held_out, _ = demo_model_and_data(0, test=images)
    print("| aggregate | noise | pointing game | energy in mask | deletion AUC | insertion AUC |")
    print("|---|---|---|---|---|---|")
    for aggregate, noise in (("maps", 0.15), ("maps", 0.05), ("mean", 0.15), ("mean", 0.1), ("mean", 0.05)):
        result = evaluate(
            model, held_out, methods="smoothgrad", options={"aggregate": aggregate, "noise": str(noise)}, sanity=False
        )
        m = result.methods[0]["metrics"]
        print(
            f"| {aggregate} | {noise} | {m['pointing_game']:.3f} | {m['energy_pointing_game']:.3f} | "
            f"{m['deletion_auc']:.3f} | {m['insertion_auc']:.3f} |"
        )
    centre = result.baselines["center"]["metrics"]
    random = result.baselines["random"]["metrics"]
    print(f"| centre map | | {centre['pointing_game']:.3f} | {centre['energy_pointing_game']:.3f} | | |")
    print(f"| random map | | {random['pointing_game']:.3f} | {random['energy_pointing_game']:.3f} | | |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--skip-default", action="store_true")
    parser.add_argument("--smoothgrad", action="store_true", help="only compare SmoothGrad's aggregations and noise")
    parser.add_argument("--road", action="store_true", help="only ROAD's imputation")
    args = parser.parse_args()
    if args.smoothgrad:
        smoothgrad_choices(args.images)
        return
    bench_road(64, 20)
    bench_road(224, 4)
    if args.road:
        road_breakdown()
        return

    from cnnscope.evaluate import evaluate
    from cnnscope.evaluate.demo import demo_model_and_data

    model, held_out, _ = demo_model_and_data(0, test=args.images)
    seconds, result = timed(lambda: evaluate(model, held_out, methods=TEN, sanity=False))
    print(f"evaluate, 10 methods on {result.images} shapes (64 px, small CNN): {seconds:.1f} s")
    if not args.skip_default:
        import cnnscope
        from cnnscope.samples import SAMPLES, sample_image

        default = cnnscope.load_model()
        photos = [sample_image(name) for name in SAMPLES]
        pictures = np.stack([photos[i % len(photos)][:256, :256] for i in range(args.images)])
        with torch.inference_mode():
            labels = [int(default(default.preprocess([p])).argmax()) for p in pictures]
        started = time.perf_counter()
        result = evaluate(default, (pictures, labels), methods=TEN, steps=10)
        seconds = time.perf_counter() - started
        print(
            f"evaluate, 10 methods on {result.images} photos (224 px, EfficientNet-Lite0, 10-step curves): "
            f"{seconds:.1f} s, {seconds / result.images:.2f} s per image"
        )


if __name__ == "__main__":
    main()
