"""Occlusion, LIME and RISE on the default model, from one run (run by hand: `make bench`).

Occlusion with a 32-pixel window and stride 16 scores 170 images (169 occluded + the original), as in
issue #4; Captum's Occlusion runs in the same process at its best perturbations_per_eval (16 there).
Each time is also given as a ratio to (images scored x one forward pass of one image).

Goals (issue #4): occlusion <= 2.3 s (Captum measured 3.03 s on these machines); LIME <= 4 s with the same
top superpixels as a full 1,000-sample run (--lime-reference 6000 also compares both with a long run).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import warnings

import torch

import cnnscope
from _timing import best_of, timed
from cnnscope.samples import SAMPLES, sample_image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--rise-masks", type=int, default=4000)
    parser.add_argument(
        "--lime-reference", type=int, default=0, help="also compare with a run of this many samples (e.g. 6000)"
    )
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    model = cnnscope.load_model()
    module = model.module.eval()
    one = model.preprocess([sample_image("chelsea")])

    def forward() -> None:
        with torch.inference_mode():
            module(one)

    single = best_of(forward, 10)
    occlusion = cnnscope.get_method("occlusion")(model, window=32, stride=16, quiet=True)
    ours = best_of(lambda: occlusion(one, 285), args.repeat)
    print(f"one forward (1 image): {single * 1e3:.1f} ms")
    print(f"occlusion, 170 images: {ours:.2f} s = {ours / (170 * single):.2f}x 170 forwards")
    try:
        from captum.attr import Occlusion

        captum = Occlusion(module)
        for per_eval in (8, 16, 32):
            seconds = best_of(
                lambda p=per_eval: captum.attribute(
                    one,
                    sliding_window_shapes=(3, 32, 32),
                    strides=(3, 16, 16),
                    target=285,
                    baselines=0,
                    perturbations_per_eval=p,
                ),
                args.repeat,
            )
            print(f"captum occlusion, perturbations_per_eval={per_eval}: {seconds:.2f} s (ours {ours / seconds:.2f}x)")
    except ImportError:
        print("captum: not installed")
    lime_bench(model, single, args.lime_reference)
    rise = cnnscope.get_method("rise")(model, masks=args.rise_masks, quiet=True)
    seconds = best_of(lambda: rise(one, 285), 1)
    print(
        f"rise, {args.rise_masks} masks: {seconds:.2f} s = {seconds / (args.rise_masks * single):.2f}x "
        f"{args.rise_masks} forwards"
    )


def lime_package(model) -> None:
    """The lime package on the same model and photo, 1,000 samples at its default batch size (10)."""
    try:
        from lime import lime_image
    except ImportError:
        print("the lime package: not installed (pip install lime; it measured 20.4 s per image here)")
        return
    import numpy as np
    from PIL import Image

    module = model.module.eval()
    mean = torch.tensor(model.preprocess.mean).view(1, 3, 1, 1)
    std = torch.tensor(model.preprocess.std).view(1, 3, 1, 1)

    def classify(images) -> np.ndarray:
        batch = torch.from_numpy(np.asarray(images, dtype=np.float32)).permute(0, 3, 1, 2)
        with torch.inference_mode():
            return torch.softmax(module((batch - mean) / std), dim=1).numpy()

    height, width = model.preprocess.size
    photo = Image.fromarray(sample_image("chelsea")).resize((width, height), Image.Resampling.BILINEAR)
    pixels = np.asarray(photo).astype(np.float64) / 255.0
    explainer = lime_image.LimeImageExplainer(random_state=0)
    with contextlib.redirect_stderr(io.StringIO()):  # the package's progress bar
        seconds, _ = timed(
            lambda: explainer.explain_instance(pixels, classify, top_labels=1, num_samples=1000, random_seed=0)
        )
    print(f"the lime package on chelsea, 1000 samples (batch size 10): {seconds:.2f} s")


def lime_bench(model, single: float, reference_samples: int) -> None:
    """LIME's full run (1,000 samples, fp32, paired sampling: the defaults), the same with independent samples
    as the lime package draws them, and our fast setting (600 paired samples in bf16: a prefix of the full
    run's samples), on the four sample photos: time and the top-5 superpixels of the top class."""
    lime_method = cnnscope.get_method("lime")
    full = lime_method(model, samples=1000, quiet=True)
    independent = lime_method(model, samples=1000, sampling="independent", quiet=True)
    fast = lime_method(model, samples=600, precision="bf16", quiet=True)
    fast(model.preprocess([sample_image("coffee")]), "top1")  # warm-up
    total = 5 * len(SAMPLES)
    shared, shared_independent, fast_hits, full_hits, fast_times = 0, 0, 0, 0, []
    for name in SAMPLES:
        image = model.preprocess([sample_image(name)])
        full_seconds, full_result = timed(lambda i=image: full(i, "top1"))
        _, independent_result = timed(lambda i=image: independent(i, "top1"))
        fast_seconds, fast_result = timed(lambda i=image: fast(i, "top1"))
        fast_times.append(fast_seconds)
        full_top = set(full_result.stats["top_positive"][0][0])
        fast_top = set(fast_result.stats["top_positive"][0][0])
        independent_top = set(independent_result.stats["top_positive"][0][0])
        shared += len(full_top & fast_top)
        shared_independent += len(independent_top & fast_top)
        line = (
            f"lime on {name}: full (1000, fp32) {full_seconds:.2f} s ({full_seconds / (1000 * single):.2f}x "
            f"1000 forwards); fast (600, bf16) {fast_seconds:.2f} s; top-5 shared with the full run "
            f"{len(full_top & fast_top)}/5, with 1000 independent samples {len(independent_top & fast_top)}/5"
        )
        if reference_samples:
            reference = lime_method(model, samples=reference_samples, seed=100, precision="bf16", quiet=True)
            truth = set(reference(image, "top1").stats["top_positive"][0][0])
            fast_hits += len(truth & fast_top)
            full_hits += len(truth & full_top)
            line += f"; vs {reference_samples} samples: fast {len(truth & fast_top)}/5, full {len(truth & full_top)}/5"
        print(line)
    print(
        f"lime fast setting: {min(fast_times):.2f}-{max(fast_times):.2f} s per image; top-5 shared with the full "
        f"run {shared}/{total}, with independent sampling {shared_independent}/{total}"
    )
    lime_package(model)
    if reference_samples:
        print(
            f"lime top-5 shared with {reference_samples}-sample runs: "
            f"fast {fast_hits}/{total}, full {full_hits}/{total}"
        )


if __name__ == "__main__":
    main()
