"""The newer CAM variants beside pytorch-grad-cam's, as ratios measured in one run (run by hand in the zoo
environment, which has torchvision and pytorch-grad-cam: `.venv-zoo/bin/python bench/cam_peer.py`).

torchvision's resnet50 at random seeded weights, one 224-pixel image, one thread; each pair is timed
round-robin (bench/_timing.interleaved: fastest of ``--repeat`` after warm-ups), ours against theirs on the
same layer (layer4) and target. FullGrad runs with ``scaling="channel"``, pytorch-grad-cam's post-processing,
and ShapleyCAM on the ReST score, as pytorch-grad-cam's example does. The maps themselves are compared in
tests/zoo/test_gradcam_peer.py (r >= 0.999); this script only times them. Below 1: cnnscope is faster.
"""

from __future__ import annotations

import argparse
import copy
import warnings

import torch

from _timing import interleaved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    try:
        import pytorch_grad_cam as pgc
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputReST, ClassifierOutputTarget
        from torchvision import models
    except ImportError as error:
        raise SystemExit(f"run this in the zoo environment (make test-zoo builds it): {error}") from None

    import cnnscope
    from cnnscope.models import Model, Preprocess

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    module = models.resnet50(weights=None).eval()
    model = Model(module, preprocess=Preprocess((224, 224)))
    image = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        target = int(module(image).argmax())

    def theirs(cls, **kwargs):
        copied = copy.deepcopy(module)  # pytorch-grad-cam keeps hooks on the model it is given
        return cls(copied, [copied.layer4] if kwargs.get("layer", True) else [])

    fullgrad, finer = theirs(pgc.FullGrad, layer=False), theirs(pgc.FinerCAM)
    shapley, gradcam = theirs(pgc.ShapleyCAM), theirs(pgc.GradCAM)
    ours = cnnscope.get_method
    pairs = {
        "fullgrad": (
            lambda: ours("fullgrad")(model, scaling="channel")(image, [target]),
            lambda: fullgrad(image.clone(), [ClassifierOutputTarget(target)]),
        ),
        "finercam": (
            lambda: ours("finercam")(model, layer="layer4")(image, "top1"),
            lambda: finer(image.clone(), None),
        ),
        "shapleycam (ReST)": (
            lambda: ours("shapleycam")(model, layer="layer4", score="rest")(image, [target]),
            lambda: shapley(image.clone(), [ClassifierOutputReST(target)]),
        ),
        "gradcam aug_smooth": (
            lambda: ours("gradcam")(model, layer="layer4", aug_smooth=True)(image, [target]),
            lambda: gradcam(image.clone(), [ClassifierOutputTarget(target)], aug_smooth=True),
        ),
        "gradcam eigen_smooth": (
            lambda: ours("gradcam")(model, layer="layer4", eigen_smooth=True)(image, [target]),
            lambda: gradcam(image.clone(), [ClassifierOutputTarget(target)], eigen_smooth=True),
        ),
    }
    print("| method | cnnscope s | pytorch-grad-cam s | ratio |")
    print("|---|---|---|---|")
    for name, (mine, peer) in pairs.items():
        times = interleaved({"ours": mine, "theirs": peer}, args.repeat, warmup=1)
        print(f"| {name} | {times['ours']:.3f} | {times['theirs']:.3f} | {times['ours'] / times['theirs']:.2f} |")


if __name__ == "__main__":
    main()
