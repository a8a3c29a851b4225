"""LRP / DeepLIFT / excitation backprop and KernelSHAP cost on the default model, as ratios measured in one run
(run by hand: `.venv/bin/python bench/propagation.py`).

- Each propagation map against the floor: one forward + one backward pass to the input pixels
  (torch.autograd.grad of the target logit), for the same images and targets, batched (``--images``: the four
  sample photos by default, more as mirrored copies). Goal (issue #22): <= 1.3x.
- Beside each time, the multiply-adds of convolution and linear calls the method runs, as a ratio to the
  floor's (torch.utils.flop_counter, one call each): what a rule costs by its definition, whatever the machine.
- DeepLIFT three times: one method over every call (as over a dataset), a new method per call (as
  ``cnnscope.explain`` and the web page make: both hand out the model's kept values of the shared reference's
  last forward again) and a new method on a model that keeps nothing (the reference's forward runs each time).
- kernel-shap at 1,000 samples against LIME at 1,000 samples (same superpixels). Goal: <= 1x.
- Captum's DeepLift / LRP / GradientShap / KernelShap beside ours where they apply. Captum's DeepLift needs
  every activation to be its own nn.Module (on the default model one ReLU6 module is called in every block: it
  runs, and its map is not DeepLIFT's) and its LRP a rule for every module (it raises on the model's ZeroPad2d,
  and the script says so).
"""

from __future__ import annotations

import argparse
import json
import warnings

import torch
from torch.utils.flop_counter import FlopCounterMode

import cnnscope
from _timing import interleaved, timed
from cnnscope.samples import SAMPLES, sample_image


def floor(model, batch, targets):
    def run():
        inputs = batch.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            logits = model(inputs)
            for k in range(targets.shape[1]):
                score = logits.gather(1, targets[:, k : k + 1]).sum()
                torch.autograd.grad(score, inputs, retain_graph=k < targets.shape[1] - 1)

    return run


def cold_deeplift(model, batch, targets):
    """DeepLIFT by a new method on a model that keeps nothing: the reference's forward runs (and is kept)."""
    model.kept.clear()
    return cnnscope.get_method("deeplift")(model)(batch, targets)


def flops(run) -> int | None:
    """Floating-point operations of the convolution and matrix calls of one run of ``run`` (None where the
    counter cannot follow it: Captum's DeepLift hooks its backward in a way the counter's own hooks refuse)."""
    counter = FlopCounterMode(display=False)
    try:
        with counter:
            run()
    except RuntimeError:
        return None
    return counter.get_total_flops()


def captum_runs(model, batch, targets):
    """Captum's methods on the same images, or the one-line reason they do not run."""
    try:
        from captum import attr
    except ImportError:
        return {}, {"captum": "not installed"}
    module = model.module.eval()
    first = targets[:, 0]
    candidates = {
        "captum DeepLift": lambda: attr.DeepLift(module).attribute(batch, baselines=batch * 0, target=first),
        "captum LRP": lambda: attr.LRP(module).attribute(batch, target=first),
        "captum GradientShap": lambda: attr.GradientShap(module).attribute(
            batch, baselines=torch.zeros(2, *batch.shape[1:]), target=first, n_samples=8
        ),
    }
    runs, failed = {}, {}
    for name, run in candidates.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                run()
            runs[name] = run
        except Exception as error:  # a peer's refusal is a result here
            failed[name] = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
    return runs, failed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--no-captum", action="store_true", help="leave Captum's methods out")
    parser.add_argument("--images", type=int, default=4, help="images in the batch (the samples, then mirrored)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    model = cnnscope.load_model()
    photos = [sample_image(name) for name in SAMPLES]
    photos += [photo[:, ::-1].copy() for photo in photos]
    batch = model.preprocess([photos[i % len(photos)] for i in range(args.images)])
    report: dict = {"images": args.images}
    with torch.no_grad():
        targets = model(batch).topk(2, dim=1).indices
    for label, k in (("top-1", 1), ("top-2", 2)):
        chosen = targets[:, :k]
        deeplift = cnnscope.get_method("deeplift")(model)
        methods = {
            "floor (forward + backward)": floor(model, batch, chosen),
            "lrp": lambda c=chosen: cnnscope.get_method("lrp")(model)(batch, c),
            "lrp epsilon": lambda c=chosen: cnnscope.get_method("lrp")(model, composite="epsilon")(batch, c),
            "deeplift": lambda c=chosen, d=deeplift: d(batch, c),
            "deeplift, new method": lambda c=chosen: cnnscope.get_method("deeplift")(model)(batch, c),
            "deeplift, nothing kept": lambda c=chosen: cold_deeplift(model, batch, c),
            "excitation-backprop": lambda c=chosen: cnnscope.get_method("excitation-backprop")(model)(batch, c),
        }
        if k == 1 and not args.no_captum:
            runs, failed = captum_runs(model, batch, chosen)
            methods.update(runs)
            report["captum failed"] = failed
        seconds = interleaved(methods, args.repeat, warmup=1)
        base = seconds["floor (forward + backward)"]
        work = {name: flops(run) for name, run in methods.items()}
        report[label] = {
            name: {
                "time": round(value / base, 2),
                "flops": None if work[name] is None else round(work[name] / work["floor (forward + backward)"], 2),
            }
            for name, value in seconds.items()
        }
        report[label]["floor seconds"] = round(base, 3)
        if not args.json:
            print(label, json.dumps(report[label]), flush=True)
    single = batch[:1]
    shap = cnnscope.get_method("kernel-shap")(model, samples=args.samples, quiet=True)
    lime = cnnscope.get_method("lime")(model, samples=args.samples, quiet=True)
    shap_seconds, _ = timed(lambda: shap(single))
    lime_seconds, _ = timed(lambda: lime(single))
    report["kernel-shap / lime at samples"] = {
        "samples": args.samples,
        "ratio": round(shap_seconds / lime_seconds, 2),
        "kernel-shap seconds": round(shap_seconds, 2),
        "lime seconds": round(lime_seconds, 2),
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    for section, rows in report.items():
        print(section)
        for name, value in rows.items() if isinstance(rows, dict) else []:
            print(f"  {name:32s} {value}")


if __name__ == "__main__":
    main()
