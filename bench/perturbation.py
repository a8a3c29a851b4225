"""Occlusion and RISE on the default model, from one run (run by hand: `make bench`).

Occlusion with a 32-pixel window and stride 16 scores 170 images (169 occluded + the original), as in
issue #4; Captum's Occlusion runs in the same process at its best perturbations_per_eval (16 there).
Each time is also given as a ratio to (images scored x one forward pass of one image).

Goals (issue #4): occlusion <= 2.3 s (Captum measured 3.03 s on these machines).
"""

from __future__ import annotations

import argparse
import warnings

import torch

import cnnscope
from _timing import best_of
from cnnscope.samples import sample_image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--rise-masks", type=int, default=4000)
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
    lime = cnnscope.get_method("lime")(model, samples=1000, quiet=True)
    seconds = best_of(lambda: lime(one, 285), 1)
    print(
        f"lime, 1000 samples: {seconds:.2f} s = {seconds / (1000 * single):.2f}x 1000 forwards "
        "(the lime package: 20.4 s measured on these machines, not installed here)"
    )
    rise = cnnscope.get_method("rise")(model, masks=args.rise_masks, quiet=True)
    seconds = best_of(lambda: rise(one, 285), 1)
    print(
        f"rise, {args.rise_masks} masks: {seconds:.2f} s = {seconds / (args.rise_masks * single):.2f}x "
        f"{args.rise_masks} forwards"
    )


if __name__ == "__main__":
    main()
