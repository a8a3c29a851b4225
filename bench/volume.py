"""3-D Grad-CAM and occlusion on a volume, as ratios measured in one run (run by hand: `python bench/volume.py`).

- Grad-CAM on a 64^3 volume against its floor: one forward pass keeping the target layer's output and one
  backward pass from the class logit to that layer (torch.autograd.grad). Goal (issue 21): <= 1.1x.
- Memory of Grad-CAM on a 128^3 volume against the forward pass's activations (every layer output of one
  forward, summed): the growth of the peak resident memory of a fresh process while Grad-CAM runs, over those
  bytes. Goal: < 2x.
- 3-D occlusion batched (cnnscope's default passes) against the same occlusion one perturbed volume per pass
  (how MONAI's OcclusionSensitivity runs). MONAI itself is not installed here; the issue's goal is >= 5x
  MONAI, whose per-volume loop this second figure stands in for.

The model is a small 3-D CNN (four Conv3d stages with stride 2, batch norm, ReLU, global pooling, a linear
head): random weights, eval mode; the timings do not depend on what it has learned.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch
from torch import nn

from _timing import interleaved


def volume_cnn(channels: int = 1, width: int = 16, classes: int = 4) -> nn.Module:
    layers: list[nn.Module] = []
    c_in = channels
    for stage in range(4):
        c_out = width * 2**stage
        layers += [nn.Conv3d(c_in, c_out, 3, stride=2, padding=1), nn.BatchNorm3d(c_out), nn.ReLU()]
        layers += [nn.Conv3d(c_out, c_out, 3, padding=1), nn.BatchNorm3d(c_out), nn.ReLU()]
        c_in = c_out
    torch.manual_seed(0)
    return nn.Sequential(*layers, nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(c_in, classes)).eval()


def model_for(size: int):
    import cnnscope
    from cnnscope.models import Preprocess

    return cnnscope.load_model(volume_cnn(), preprocess=Preprocess(size=(size,) * 3, mean=(0.0,), std=(1.0,)))


LAYER = "22"  # the last stage's ReLU: the default Grad-CAM layer


def speed(size: int, repeat: int) -> dict:
    from cnnscope.methods import GradCAM

    model = model_for(size)
    module = model.module
    layer = dict(module.named_modules())[LAYER]
    volume = torch.rand(1, 1, size, size, size, generator=torch.Generator().manual_seed(0))
    gradcam = GradCAM(model, layer=LAYER)
    assert gradcam.layer.key == LAYER

    def floor() -> None:
        kept: list[torch.Tensor] = []
        handle = layer.register_forward_hook(lambda _m, _i, output: kept.append(output))
        try:
            with torch.enable_grad():
                logits = module(volume)
                torch.autograd.grad(logits[:, 0].sum(), kept[-1])
        finally:
            handle.remove()

    times = interleaved({"floor": floor, "gradcam": lambda: gradcam(volume, 0)}, repeat)
    return {
        "size": size,
        **{k: round(v, 4) for k, v in times.items()},
        "ratio": round(times["gradcam"] / times["floor"], 3),
    }


def occlusion(size: int, window: int, stride: int, repeat: int) -> dict:
    import cnnscope

    model = model_for(size)
    volume = torch.rand(1, 1, size, size, size, generator=torch.Generator().manual_seed(0))
    common = {"window": window, "stride": stride, "score": "logit", "fill": "zero", "quiet": True}
    times = interleaved(
        {
            "batched": lambda: cnnscope.explain(model, volume, method="occlusion", target=0, **common),
            "one_per_pass": lambda: cnnscope.explain(
                model, volume, method="occlusion", target=0, inputs_per_pass=1, **common
            ),
        },
        repeat,
        warmup=1,
    )
    return {
        "size": size,
        "window": window,
        "stride": stride,
        **{k: round(v, 3) for k, v in times.items()},
        "speedup": round(times["one_per_pass"] / times["batched"], 2),
    }


MEMORY_CHILD = r"""
import json, resource, sys, torch
sys.path.insert(0, "bench")
from volume import model_for, LAYER
size = int(sys.argv[1])
model = model_for(size)
module = model.module
volume = torch.rand(1, 1, size, size, size, generator=torch.Generator().manual_seed(0))
total = [0]
handles = [m.register_forward_hook(lambda _m, _i, o: total.__setitem__(0, total[0] + o.numel() * o.element_size()))
           for m in module.modules() if not list(m.children())]
with torch.no_grad():
    module(volume)
for h in handles:
    h.remove()
from cnnscope.methods import GradCAM
gradcam = GradCAM(model, layer=LAYER)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
gradcam(volume, 0)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"activations": total[0], "growth": after - before}))
"""


def memory(size: int) -> dict:
    """Grad-CAM's peak-memory growth in a fresh process, after a no-grad forward already touched the volume's
    buffers (so the figure is what Grad-CAM keeps alive: activations for the backward pass and its gradients)."""
    out = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(size)], capture_output=True, text=True, check=True)
    found = json.loads(out.stdout.strip().splitlines()[-1])
    return {
        "size": size,
        "activations_mib": round(found["activations"] / 2**20, 1),
        "gradcam_growth_mib": round(found["growth"] / 2**20, 1),
        "ratio": round(found["growth"] / found["activations"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--memory-size", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results = {
        "gradcam_vs_floor": speed(args.size, args.repeat),
        "memory_vs_activations": memory(args.memory_size),
        "occlusion_batched_vs_one_per_pass": occlusion(32, 8, 8, max(1, args.repeat // 2)),
    }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
