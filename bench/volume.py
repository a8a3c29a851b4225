"""3-D Grad-CAM and occlusion on a volume, as ratios measured in one run (run by hand: `python bench/volume.py`).

- Grad-CAM on a 64^3 volume against its floor: one forward pass keeping the target layer's output and one
  backward pass from the class logit to that layer (torch.autograd.grad). Goal (issue 21): <= 1.1x.
- Memory of Grad-CAM on a 128^3 volume against the forward pass's activations (every layer output of one
  forward, summed): the growth of the peak resident memory of a fresh process while Grad-CAM runs, over those
  bytes. Goal: < 2x.
- 3-D occlusion batched (cnnscope's default passes) against the same occlusion one perturbed volume per pass, and
  incremental occlusion (the default: only what the patch changes in the first layers, Krypton's exact inference,
  ``cnnscope.methods.incremental``) against the plain batched one (``incremental=False``), with the largest
  difference of their maps relative to the map's scale; on 32^3 (an 8^3 window, stride 8) and on the MONAI
  comparison's 64^3 (window 16, stride 8).
- With ``--video`` (the zoo environment): torchvision's r3d_18 at random weights on a 4x64x64 clip, one forward +
  backward and Grad-CAM on its default layer (the issue: about 2 s on 2 cores).
- With ``--monai`` (MONAI installed: ``.venv-zoo/bin/pip install -r requirements/bench-monai.txt``, then
  ``.venv-zoo/bin/python bench/volume.py --monai``): MONAI's ``OcclusionSensitivity`` against cnnscope's 3-D
  occlusion on the same model, 64^3 volume, window and stride (MONAI takes an ``overlap`` fraction: overlap =
  1 - stride / window gives the same patch positions; a constant fill of 0 and no activation, as cnnscope's
  ``fill="zero", score="logit"``), at MONAI's default ``n_batch`` of 16 and at one volume per pass; and MONAI's
  ``GradCAM`` against cnnscope's on the same layer. cnnscope's occlusion is timed incremental (its default) and
  plain (``incremental=False``). Each also prints how far the two maps agree: occlusion as
  ``base logit - MONAI's map`` (MONAI maps the occluded score, cnnscope its drop), Grad-CAM as the correlation
  of cnnscope's normalized map with ``1 - MONAI's`` (MONAI's default normalizer maps the maximum to 0).
  Goal (issue 21): cnnscope's occlusion >= 5x faster than MONAI's.

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
    module = nn.Sequential(*layers, nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(c_in, classes))
    # batch-norm statistics from a few random volumes (cumulative average), so activations keep their scale through
    # the eight stages: with the initial statistics the logits barely move when a patch is occluded, and the maps
    # compared with MONAI's would be flat
    for norm in module.modules():
        if isinstance(norm, nn.BatchNorm3d):
            norm.momentum = None
    with torch.no_grad():
        module.train()(torch.rand(4, channels, 32, 32, 32, generator=torch.Generator().manual_seed(1)))
    return module.eval()


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


def occlusion(size: int, window: int, stride: int, repeat: int, one_per_pass: bool = True) -> dict:
    import cnnscope

    model = model_for(size)
    volume = torch.rand(1, 1, size, size, size, generator=torch.Generator().manual_seed(0))
    common = {"window": window, "stride": stride, "score": "logit", "fill": "zero", "quiet": True}

    def run(**more) -> cnnscope.Explanation:
        return cnnscope.explain(model, volume, method="occlusion", target=0, **common, **more)

    candidates = {"incremental": run, "batched": lambda: run(incremental=False)}
    if one_per_pass:
        candidates["one_per_pass"] = lambda: run(incremental=False, inputs_per_pass=1)
    times = interleaved(candidates, repeat, warmup=1)
    incremental, plain = run(), run(incremental=False)
    assert incremental.stats["incremental"] == [True] and plain.stats["incremental"] == [False]
    scale = float(plain.raw.abs().max())
    return {
        "size": size,
        "window": window,
        "stride": stride,
        **{k: round(v, 3) for k, v in times.items()},
        **({"speedup": round(times["one_per_pass"] / times["batched"], 2)} if one_per_pass else {}),
        "incremental_speedup_vs_batched": round(times["batched"] / times["incremental"], 2),
        "incremental_max_difference_over_scale": float(
            f"{float((incremental.raw - plain.raw).abs().max()) / scale:.2e}"
        ),
    }


def monai_comparison(size: int, window: int, stride: int, repeat: int, single: bool = True) -> dict:
    """MONAI's OcclusionSensitivity and GradCAM against cnnscope's, on the same model and volume, in one run."""
    import copy

    import cnnscope
    from cnnscope.methods import GradCAM

    try:
        import monai
        from monai.visualize import GradCAM as MonaiGradCAM
        from monai.visualize import OcclusionSensitivity
    except ImportError:
        return {"skipped": "MONAI is not installed: .venv-zoo/bin/pip install -r requirements/bench-monai.txt"}
    model = model_for(size)
    volume = torch.rand(1, 1, size, size, size, generator=torch.Generator().manual_seed(0))
    theirs = copy.deepcopy(model.module)  # MONAI's hooks stay on the module it is given: a copy of its own
    overlap = 1.0 - stride / window
    occlusion_options = {"mask_size": window, "verbose": False, "mode": 0.0, "overlap": overlap, "activate": False}
    monai_batched = OcclusionSensitivity(theirs, n_batch=16, **occlusion_options)
    monai_single = OcclusionSensitivity(theirs, n_batch=1, **occlusion_options)
    ours_options = {"window": window, "stride": stride, "score": "logit", "fill": "zero", "quiet": True}

    def ours(incremental: bool = True) -> cnnscope.Explanation:
        return cnnscope.explain(model, volume, method="occlusion", target=0, incremental=incremental, **ours_options)

    candidates = {
        "cnnscope": ours,
        "cnnscope_plain": lambda: ours(incremental=False),
        "monai_n_batch_16": lambda: monai_batched(volume),
    }
    if single:
        candidates["monai_n_batch_1"] = lambda: monai_single(volume)
    times = interleaved(candidates, repeat, warmup=1)
    with torch.no_grad():
        base = float(model.module(volume)[0, 0])
        their_map = monai_batched(volume)[0][0, 0]
    their_map = their_map.as_tensor() if hasattr(their_map, "as_tensor") else their_map  # a MetaTensor
    explanation = ours()
    assert explanation.stats["incremental"] == [True]
    our_map = explanation.maps[0, 0]
    plain_map = ours(incremental=False).maps[0, 0]
    occlusion = {
        "monai": monai.__version__,
        "size": size,
        "window": window,
        "stride": stride,
        "passes": explanation.stats.get("forwards"),
        **{k: round(v, 3) for k, v in times.items()},
        "speedup_vs_monai_n_batch_16": round(times["monai_n_batch_16"] / times["cnnscope"], 2),
        **({"speedup_vs_monai_n_batch_1": round(times["monai_n_batch_1"] / times["cnnscope"], 2)} if single else {}),
        "plain_speedup_vs_monai_n_batch_16": round(times["monai_n_batch_16"] / times["cnnscope_plain"], 2),
        **(
            {"plain_speedup_vs_monai_n_batch_1": round(times["monai_n_batch_1"] / times["cnnscope_plain"], 2)}
            if single
            else {}
        ),
        "incremental_speedup_vs_plain": round(times["cnnscope_plain"] / times["cnnscope"], 2),
        "max_abs_difference_of_drop": round(float((our_map - (base - their_map)).abs().max()), 6),
        "max_abs_difference_incremental_vs_plain": float(f"{float((our_map - plain_map).abs().max()):.2e}"),
        "drop_scale": round(float(our_map.abs().max()), 6),
    }

    monai_cam = MonaiGradCAM(theirs, target_layers=LAYER)
    gradcam = GradCAM(model, layer=LAYER)
    cam_times = interleaved(
        {"cnnscope": lambda: gradcam(volume, 0), "monai": lambda: monai_cam(volume, class_idx=0)}, repeat
    )
    ours_normalized = gradcam(volume, 0).normalized()[0, 0].flatten().double()
    theirs_flipped = (1.0 - monai_cam(volume, class_idx=0)[0, 0]).flatten().double()
    correlation = float(torch.corrcoef(torch.stack([ours_normalized, theirs_flipped]))[0, 1])
    return {
        "occlusion": occlusion,
        "gradcam": {
            "size": size,
            **{k: round(v, 4) for k, v in cam_times.items()},
            "speedup_vs_monai": round(cam_times["monai"] / cam_times["cnnscope"], 2),
            "correlation_with_1_minus_monai": round(correlation, 6),
        },
    }


def video_model(name: str, clip: tuple[int, int, int], repeat: int) -> dict:
    """A torchvision video classifier by name at random seeded weights (the zoo environment): seconds of one
    forward + backward of the input (the issue's "about 2 s on 2 cores" for r3d_18 at 4x64x64) and of Grad-CAM on
    its default layer, and their ratio."""
    import cnnscope
    from cnnscope.methods import GradCAM
    from cnnscope.models import Preprocess

    torch.manual_seed(0)
    loaded = cnnscope.load_model(f"torchvision:{name}", weights=False)
    model = cnnscope.load_model(
        loaded, preprocess=Preprocess(size=clip, mean=loaded.preprocess.mean, std=loaded.preprocess.std)
    )
    batch = torch.randn(1, 3, *clip, generator=torch.Generator().manual_seed(0))
    gradcam = GradCAM(model)

    def forward_backward() -> None:
        with torch.enable_grad():
            inputs = batch.clone().requires_grad_(True)
            torch.autograd.grad(model.module(inputs)[0, 0], inputs)

    times = interleaved({"forward_backward": forward_backward, "gradcam": lambda: gradcam(batch, 0)}, repeat)
    return {
        "model": name,
        "clip": list(clip),
        "layer": gradcam.layer.key,
        **{k: round(v, 4) for k, v in times.items()},
        "ratio": round(times["gradcam"] / times["forward_backward"], 3),
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
    parser.add_argument("--monai", action="store_true", help="only the comparison with MONAI (installed)")
    parser.add_argument("--occlusion", action="store_true", help="only the occlusion rows (no MONAI needed)")
    parser.add_argument(
        "--window", type=int, default=16, help="occlusion window of the MONAI comparison (and 64^3 row)"
    )
    parser.add_argument("--stride", type=int, default=8, help="occlusion stride of the MONAI comparison (and 64^3 row)")
    parser.add_argument("--no-single", action="store_true", help="leave out MONAI at one volume per pass (slow)")
    parser.add_argument("--video", action="store_true", help="only torchvision's r3d_18 at 4x64x64 (zoo env)")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.video:
        print(json.dumps({"video": video_model("r3d_18", (4, 64, 64), args.repeat)}, indent=2))
        return
    if args.occlusion:
        repeat = max(1, args.repeat // 2)
        results = {
            "occlusion_batched_vs_one_per_pass": occlusion(32, 8, 8, repeat),
            "occlusion_incremental_64": occlusion(args.size, args.window, args.stride, repeat, one_per_pass=False),
        }
        print(json.dumps(results, indent=2))
        return
    if args.monai:
        repeat = max(1, args.repeat // 2)
        results = {"monai": monai_comparison(args.size, args.window, args.stride, repeat, single=not args.no_single)}
        print(json.dumps(results, indent=2))
        return
    results = {
        "gradcam_vs_floor": speed(args.size, args.repeat),
        "memory_vs_activations": memory(args.memory_size),
        "occlusion_batched_vs_one_per_pass": occlusion(32, 8, 8, max(1, args.repeat // 2)),
        "occlusion_incremental_64": occlusion(args.size, args.window, args.stride, 1, one_per_pass=False),
    }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
