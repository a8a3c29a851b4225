"""Every registered method on the default model, as a ratio to one forward + backward pass, from one run
(run by hand: `make bench`). Peers in the same run where installed: Captum's IntegratedGradients (50 steps)
and NoiseTunnel SmoothGrad (25 samples), torchcam's ScoreCAM. pytorch-grad-cam needs torchvision, which
does not import beside the CPU torch pinned here; its figures (ScoreCAM 21 s, AblationCAM 23 s on these
machines) are quoted in issue #3.

Goals (issue #3): Score-CAM <= 10 s; Ablation-CAM <= 0.5 s; IG and SmoothGrad no slower than Captum's.
"""

from __future__ import annotations

import argparse
import json
import warnings

import torch

import cnnscope
from _timing import best_of
from cnnscope.samples import sample_image

SLOW = {"scorecam"}
OPTIONS = {"integrated-gradients": {"steps": 50}, "smoothgrad": {"samples": 25}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    model = cnnscope.load_model()
    module = model.module.eval()
    one = model.preprocess([sample_image("chelsea")])

    def floor() -> None:
        inputs = one.clone().requires_grad_(True)
        torch.autograd.grad(module(inputs)[0, 285], inputs)

    # the floor is taken at its fastest over many runs, before and after the methods (first runs are slower)
    base = best_of(floor, 4 * args.repeat)
    seconds: dict[str, float] = {}
    for name in cnnscope.list_methods():
        method = cnnscope.get_method(name)(model, **OPTIONS.get(name, {}))
        seconds[name] = best_of(lambda method=method: method(one, 285), 1 if name in SLOW else args.repeat)
    base = min(base, best_of(floor, 4 * args.repeat))
    results: dict[str, float] = {"forward_backward_ms": base * 1e3}
    for name, value in seconds.items():
        results[f"{name}_seconds"] = value
        results[f"{name}_vs_forward_backward"] = value / base
    try:
        from captum.attr import IntegratedGradients, NoiseTunnel, Saliency

        ig = IntegratedGradients(module)
        results["captum_ig50_seconds"] = best_of(lambda: ig.attribute(one, target=285, n_steps=50), args.repeat)
        tunnel = NoiseTunnel(Saliency(module))
        results["captum_smoothgrad25_seconds"] = best_of(
            lambda: tunnel.attribute(
                one, target=285, nt_type="smoothgrad", nt_samples=25, stdevs=0.15 * float(one.max() - one.min())
            ),
            args.repeat,
        )
        results["ours_ig_vs_captum"] = results["integrated-gradients_seconds"] / results["captum_ig50_seconds"]
        results["ours_smoothgrad_vs_captum"] = results["smoothgrad_seconds"] / results["captum_smoothgrad25_seconds"]
    except ImportError:
        print("captum: not installed")
    try:
        from torchcam.methods import ScoreCAM as TorchcamScoreCAM

        def torchcam_scorecam() -> None:
            with TorchcamScoreCAM(module, target_layer="_swish") as extractor, torch.no_grad():
                scores = module(one)
                extractor(class_idx=285, scores=scores)

        results["torchcam_scorecam_seconds"] = best_of(torchcam_scorecam, 1)
    except ImportError:
        print("torchcam: not installed")
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(
        f"every method on efficientnet_lite0, one image, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    for key, value in results.items():
        print(f"  {key:<42} {value:10.3f}")


if __name__ == "__main__":
    main()
