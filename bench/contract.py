"""The method contract's cost: each method on the default model as a ratio to one forward + backward, with
the perturbation methods at reduced counts so that a run takes about a minute. Run it on two checkouts
(PYTHONPATH=OTHER/src python bench/contract.py) and compare the ratios; a refactor must leave them as they were.
"""

from __future__ import annotations

import argparse
import json
import warnings

import torch

import cnnscope
from _timing import best_of
from cnnscope.samples import sample_image

CASES = {
    "gradcam": {},
    "gradcam++": {},
    "eigencam": {},
    "ablationcam": {},
    "saliency": {},
    "guided-backprop": {},
    "integrated-gradients": {"steps": 50},
    "smoothgrad": {"samples": 25},
    "occlusion": {"window": 32, "stride": 16, "quiet": True},
    "rise": {"masks": 400, "quiet": True},
    "lime": {"samples": 200, "quiet": True},
    "patches": {"quiet": True},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    model = cnnscope.load_model()
    module = model.module.eval()
    one = model.preprocess([sample_image("chelsea")])

    def floor() -> None:
        inputs = one.clone().requires_grad_(True)
        torch.autograd.grad(module(inputs)[0, 285], inputs)

    base = best_of(floor, 4 * args.repeat)
    results = {}
    for name, options in CASES.items():
        method = cnnscope.get_method(name)(model, **options)
        results[name] = best_of(lambda method=method: method(one, 285), args.repeat)
    base = min(base, best_of(floor, 4 * args.repeat))
    print(json.dumps({"floor_ms": round(base * 1e3, 2), **{k: round(v / base, 2) for k, v in results.items()}}))


if __name__ == "__main__":
    main()
