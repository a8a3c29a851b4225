"""extremal-perturbation's cost on the default model, as ratios measured in one run (run by hand:
`.venv/bin/python bench/extremal.py`; `.venv-zoo/bin/python bench/extremal.py` adds TorchRay where it is installed
there: `.venv-zoo/bin/pip install torchray`).

- One step of the mask optimisation against the floor, one forward + one backward pass to the input pixels of the
  same image (torch.autograd.grad of the target logit); a map costs `steps` of them (800 by default, TorchRay's)
  plus a setup (the blur pyramid, the mask's indices), both measured from runs of two lengths.
- Two images x two targets in one call (one parameter tensor of four masks; by default in passes of one mask at
  224 x 224, see PASS_BYTES) and in one pass (inputs_per_pass=4), against four calls of one mask each.
- TorchRay's `extremal_perturbation` (one image and one target per call, same step, sigma, blur and reward) per
  step beside ours, on a copy of the model (TorchRay turns the parameters' requires_grad off and leaves it so).
- `--stability`: one 800-step run on chelsea, its masks after 100 ... 800 steps against the 800-step mask (IoU of
  the top-10% pixels and the mask's mean), the measurement behind the default of 800 steps.
"""

from __future__ import annotations

import argparse
import copy
import json
import warnings

import torch

import cnnscope
from _timing import interleaved, timed
from cnnscope.methods.extremal import optimise_masks, perturbation_pyramid, smooth_mask
from cnnscope.samples import sample_image


def floor(model, batch, target: int):
    def run():
        inputs = batch.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            torch.autograd.grad(model(inputs)[:, target].sum(), inputs)

    return run


def ours(model, batch, target, steps: int, **options):
    method = cnnscope.get_method("extremal-perturbation")(model, steps=steps, quiet=True, **options)
    return lambda: method(batch, target)


def torchray_run(model, batch, target: int, steps: int):
    """TorchRay's extremal_perturbation on a copy of the module, or the one-line reason it does not run."""
    try:
        from torchray.attribution.extremal_perturbation import contrastive_reward, extremal_perturbation
    except ImportError as error:
        return None, f"not installed ({error.name}); .venv-zoo/bin/pip install torchray, then run with .venv-zoo"
    module = copy.deepcopy(model.module).eval()

    def run():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            extremal_perturbation(module, batch, target, areas=[0.1], max_iter=steps, reward_func=contrastive_reward)

    return run, None


def stability(model, batch, target: int) -> dict:
    """Masks after 100, 200, 300, 400, 600 and 800 steps of one run against the 800-step mask."""
    method = cnnscope.get_method("extremal-perturbation")(model)
    spatial = tuple(batch.shape[2:])
    step, sigma, max_blur = method.settings(spatial)
    pyramid = perturbation_pyramid(batch, 8, "blur", max_blur)
    snapshots = {}

    def keep(done, masks):
        if done in (100, 200, 300, 400, 600, 800):
            snapshots[done] = masks[0].clone()

    with torch.no_grad():
        optimise_masks(
            model,
            pyramid,
            torch.zeros(1, dtype=torch.long),
            torch.tensor([target]),
            [0.1],
            smooth_mask(spatial, step, sigma, str(batch.device)),
            steps=800,
            learning_rate=0.01,
            variant="preserve",
            contrastive=True,
            jitter=True,
            rows_per_pass=1,
            on_step=keep,
        )
    final = snapshots[800]
    count = int(0.1 * final.numel())

    def top(mask):
        chosen = torch.zeros(mask.numel(), dtype=torch.bool)
        chosen[mask.flatten().topk(count).indices] = True
        return chosen

    rows = {}
    for done, mask in snapshots.items():
        overlap = float((top(mask) & top(final)).sum() / (top(mask) | top(final)).sum())
        rows[done] = {"iou_top10_vs_800": round(overlap, 3), "mask_mean": round(float(mask.mean()), 4)}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="steps of the timed runs (and twice as many)")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--stability", action="store_true", help="also the 800-step stability run (slow)")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = cnnscope.load_model()
    batch = model.preprocess([sample_image("chelsea")])
    pair = model.preprocess([sample_image("chelsea"), sample_image("coffee")])
    short, long = args.steps, 2 * args.steps
    candidates = {
        "floor (forward + backward)": floor(model, batch, 285),
        f"ours, {short} steps": ours(model, batch, 285, short),
        f"ours, {long} steps": ours(model, batch, 285, long),
        f"ours, 2 images x 2 targets, {short} steps": ours(model, pair, [[285, 281], [967, 504]], short),
        f"ours, 2 images x 2 targets in one pass, {short} steps": ours(
            model, pair, [[285, 281], [967, 504]], short, inputs_per_pass=4
        ),
    }
    theirs, reason = torchray_run(model, batch, 285, short)
    if theirs is not None:
        candidates[f"torchray, {short} steps"] = theirs
        long_theirs, _ = torchray_run(model, batch, 285, long)
        candidates[f"torchray, {long} steps"] = long_theirs
    seconds = interleaved(candidates, repeat=args.repeat, warmup=1)
    base = seconds["floor (forward + backward)"]
    per_step = (seconds[f"ours, {long} steps"] - seconds[f"ours, {short} steps"]) / (long - short)
    setup = max(0.0, seconds[f"ours, {short} steps"] - short * per_step)
    report = {
        "seconds": {name: round(value, 4) for name, value in seconds.items()},
        "one step / (forward + backward)": round(per_step / base, 2),
        "setup / (forward + backward)": round(setup / base, 2),
        "one map at 800 steps / (forward + backward)": round((setup + 800 * per_step) / base, 1),
        "4 masks in one call / 4 x one mask": round(
            seconds[f"ours, 2 images x 2 targets, {short} steps"] / (4 * seconds[f"ours, {short} steps"]), 2
        ),
        "4 masks in one pass (inputs_per_pass=4) / 4 x one mask": round(
            seconds[f"ours, 2 images x 2 targets in one pass, {short} steps"] / (4 * seconds[f"ours, {short} steps"]),
            2,
        ),
    }
    if theirs is not None:
        their_step = (seconds[f"torchray, {long} steps"] - seconds[f"torchray, {short} steps"]) / (long - short)
        report["torchray one step / (forward + backward)"] = round(their_step / base, 2)
        report["ours / torchray, per step"] = round(per_step / their_step, 2)
    else:
        report["torchray"] = reason
    if args.stability:
        _, rows = timed(lambda: stability(model, batch, 285))
        report["stability (chelsea, area 0.1)"] = rows
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
