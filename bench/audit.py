"""Audit throughput and memory, as ratios measured in one run (run by hand: `python bench/audit.py`).

Goals (issue #14):
- audit throughput (images/s; default model, Grad-CAM of the true and the predicted class, 224x224 images in
  memory) >= 0.8x the floor: plain batched forward + backward to the target layer on the same images,
  already preprocessed (the least any Grad-CAM must compute; one target);
- >= 3x a loop over pytorch-grad-cam (one call per image and class: the true and the predicted one), run in
  a separate virtual environment when one is given (--peer-python or GRADCAM_PYTHON; pytorch-grad-cam needs
  torchvision and OpenCV, which this project's environment does not carry: `python -m venv /tmp/gc &&
  /tmp/gc/bin/pip install -c requirements/constraints-cpu.txt torch==2.13.0 grad-cam`). The torchvision wheel
  that pip picks does not load beside the CPU torch build ("operator torchvision::nms does not exist"), so the
  peer runs with stand-ins for torchvision's names, which pytorch-grad-cam's Grad-CAM path imports but never
  calls. Without a peer environment the loop is over cnnscope's own per-image Grad-CAM calls, labelled so;
- peak memory (RSS) of a whole audit (store, aggregation and report) of 10,000 images within 10% of the
  peak for 1,000 (synthetic images made on the fly, a small CNN, so that 10,000 images take a minute;
  each size runs in its own process).

Every figure is printed with what it was measured against; the ratios are what travels between machines.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import cnnscope
from cnnscope.audit import audit
from cnnscope.methods.base import auto_images_per_pass
from cnnscope.samples import SAMPLES, sample_image

HERE = Path(__file__).resolve().parent


def bench_images(count: int) -> list[np.ndarray]:
    """``count`` 224x224 photos: the bundled samples, cropped and flipped in turn."""
    from PIL import Image

    pictures = []
    for index in range(count):
        photo = sample_image(SAMPLES[index % len(SAMPLES)])
        height, width = photo.shape[:2]
        side = min(height, width) - 8 * (index // len(SAMPLES) % 6)
        top, left = (height - side) // 2, (width - side) // 2 + (index % 3 - 1) * 4
        left = max(0, min(width - side, left))
        crop = photo[top : top + side, left : left + side]
        if index // len(SAMPLES) % 2:
            crop = crop[:, ::-1]
        pictures.append(np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize((224, 224))))
    return pictures


def labels_for(model, pictures) -> list[int]:
    """Half the images labelled with their top-1 class, half with their second: both cases of the audit."""
    labels = []
    for start in range(0, len(pictures), 16):
        for row, predictions in enumerate(model.predict(pictures[start : start + 16], 2)):
            labels.append(predictions[(start + row) % 2].index)
    return labels


def floor_pass(module: torch.nn.Module, layer, batch: torch.Tensor, targets: torch.Tensor) -> None:
    """One pass: forward keeping the layer's output (its ``layer.call``-th call), then autograd.grad of the
    targets' logits to it. Nothing outlives the call (a stale reference changes the allocator's behaviour,
    and the timing of the next pass with it; bench/gradcam.py)."""
    kept: list[torch.Tensor] = []
    calls = [0]

    def keep(_module, _inputs, output):
        if calls[0] == layer.call:
            kept.append(output)
        calls[0] += 1

    handle = layer.module.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            logits = module(batch)
            torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), kept[0])
    finally:
        handle.remove()


def floor_seconds(model, tensor: torch.Tensor, targets: torch.Tensor) -> float:
    """The floor over all images, in the same passes as the method (auto_images_per_pass)."""
    layer = model.default_layer()
    per_pass = auto_images_per_pass(model)
    started = time.perf_counter()
    for start in range(0, tensor.shape[0], per_pass):
        floor_pass(model.module, layer, tensor[start : start + per_pass], targets[start : start + per_pass])
    return time.perf_counter() - started


def audit_seconds(model, pictures, labels, batch_size: int) -> tuple[float, float, dict]:
    """(seconds explaining, seconds for the whole call, summary) of one audit of the images."""
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        result = audit(model, (pictures, labels), out=out, quiet=True, report=False, batch_size=batch_size)
        whole = time.perf_counter() - started
        return result.seconds, whole, result.summary()


def cnnscope_loop_seconds(model, pictures, labels) -> float:
    """One Grad-CAM call per image and class (true, then predicted): the per-image loop, with cnnscope."""
    gradcam = cnnscope.get_method("gradcam")(model)
    started = time.perf_counter()
    for picture, label in zip(pictures, labels, strict=True):
        gradcam(picture, label)
        gradcam(picture, "top1")
    return time.perf_counter() - started


PEER_SCRIPT = r"""
import json, sys, time, types
import numpy as np, torch
sys.path.append(sys.argv[2])  # cnnscope's environment, after the peer's own packages
sys.path.append(sys.argv[3])
try:
    import torchvision  # noqa: F401
    stubbed = False
except Exception:  # the PyPI torchvision does not load beside the CPU torch build: stand-ins for its names
    class Stub(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return Stub(f"{self.__name__}.{name}")
        def __call__(self, *args, **kwargs):
            raise RuntimeError(f"{self.__name__} is a stand-in: torchvision does not load here")
    for key in [key for key in sys.modules if key.split(".")[0] == "torchvision"]:
        del sys.modules[key]
    for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional", "torchvision.ops",
                 "torchvision.models", "torchvision.models.detection"):
        sys.modules[name] = Stub(name)
    stubbed = True
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
import cnnscope
data = np.load(sys.argv[1])
model = cnnscope.load_model()
torch.set_num_threads(int(sys.argv[4]))
head = getattr(model.module, "_conv_head", None)  # the head conv: called once (the shared _swish is not)
cam = GradCAM(model=model.module, target_layers=[head if head is not None else model.default_layer().module])
tensor = model.preprocess(list(data["images"]))
labels = data["labels"].tolist()
def run(count):
    for i in range(count):
        x = tensor[i : i + 1]
        cam(input_tensor=x, targets=[ClassifierOutputTarget(labels[i])])
        cam(input_tensor=x, targets=None)  # the predicted class
run(2)
started = time.perf_counter()
run(len(labels))
print(json.dumps({"seconds": time.perf_counter() - started, "torchvision_stubbed": stubbed}))
"""


def peer_seconds(peer_python: str, pictures, labels) -> float | None:
    """pytorch-grad-cam's per-image loop, in its own environment; None when it cannot run."""
    import site

    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder) / "images.npz"
        np.savez(data, images=np.stack(pictures), labels=np.array(labels))
        script = Path(folder) / "peer.py"
        script.write_text(PEER_SCRIPT)
        ours = site.getsitepackages()[0]
        command = [peer_python, str(script), str(data), str(HERE.parent / "src"), ours, str(torch.get_num_threads())]
        done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        print(f"  pytorch-grad-cam did not run: {done.stderr.strip().splitlines()[-1] if done.stderr else '?'}")
        return None
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    if figures["torchvision_stubbed"]:
        print(
            "  (pytorch-grad-cam ran with stand-ins for torchvision's names: its wheel does not load beside this torch;"
        )
        print("   the Grad-CAM path uses none of them)")
    return figures["seconds"]


# -- memory -----------------------------------------------------------------------------------------------
MEMORY_CHILD = r"""
import json, resource, sys, tempfile, time
import numpy as np, torch
import cnnscope
from cnnscope.audit import audit
from cnnscope.audit.sources import Entry, Source
from cnnscope.data import SmallCNN
count = int(sys.argv[1])
module = SmallCNN(4, generator=torch.Generator().manual_seed(0)).eval()
model = cnnscope.load_model(module, labels=["a", "b", "c", "d"],
    preprocess=cnnscope.Preprocess(size=(64, 64), mean=(0, 0, 0), std=(1, 1, 1)))
def picture(entry):
    rng = np.random.default_rng(int(entry.key))
    image = (rng.random((8, 8, 3)) * 255).astype(np.uint8).repeat(8, 0).repeat(8, 1)
    return image
entries = [Entry(str(i), i % 4) for i in range(count)]
source = Source(entries, {i: n for i, n in enumerate("abcd")}, "synthetic", f"synthetic-{count}", [], picture)
def status(field):
    with open("/proc/self/status") as lines:
        return next(int(line.split()[1]) / 1024 for line in lines if line.startswith(field + ":"))
with open("/proc/self/clear_refs", "w") as refs:
    refs.write("5")  # reset the peak (VmHWM) to the current RSS: import-time peaks do not count
before = status("VmRSS")
with tempfile.TemporaryDirectory() as out:
    started = time.perf_counter()
    result = audit(model, source, out=out, quiet=True, batch_size=64)
    seconds = time.perf_counter() - started
print(json.dumps({"images": result.images, "peak_mib": status("VmHWM"), "before_mib": before,
                  "seconds": seconds}))
"""


def memory_peak(count: int) -> dict:
    done = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(count)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64, help="images for the throughput figures")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=2, help="runs of each throughput candidate (fastest kept)")
    parser.add_argument("--peer-python", default=os.environ.get("GRADCAM_PYTHON"), help="python with grad-cam")
    parser.add_argument("--memory", default="1000,10000", help="dataset sizes for the memory figure ('' skips)")
    args = parser.parse_args()

    model = cnnscope.load_model()
    pictures = bench_images(args.images)
    labels = labels_for(model, pictures)
    tensor = model.preprocess(pictures)
    targets = torch.tensor(labels)
    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{args.images} images 224x224, default model, Grad-CAM of the true and the predicted class")

    floor_s, audit_s, whole_s = [], [], []
    audit_seconds(model, pictures[:8], labels[:8], args.batch_size)  # warm-up
    floor_seconds(model, tensor[:8], targets[:8])
    for _ in range(args.repeat):  # interleaved, fastest kept: the noise on shared machines only adds
        floor_s.append(floor_seconds(model, tensor, targets))
        explaining, whole, _ = audit_seconds(model, pictures, labels, args.batch_size)
        audit_s.append(explaining)
        whole_s.append(whole)
    floor_rate = args.images / min(floor_s)
    audit_rate = args.images / min(audit_s)
    whole_rate = args.images / min(whole_s)
    print(f"floor (forward + backward to the layer, preprocessed): {floor_rate:7.2f} images/s")
    print("audit (read, preprocess, explain 2 classes, features, statistics, thumbnails, Parquet):")
    print(
        f"   explaining and storing: {audit_rate:7.2f} images/s = {audit_rate / floor_rate:.2f}x the floor "
        "(goal >= 0.8)"
    )
    print(f"   whole call (aggregation, SpRAy, manifest): {whole_rate:7.2f} images/s = {whole_rate / floor_rate:.2f}x")

    loop_images = min(args.images, 32)
    peer = peer_seconds(args.peer_python, pictures[:loop_images], labels[:loop_images]) if args.peer_python else None
    if peer is not None:
        peer_rate = loop_images / peer
        print(
            f"pytorch-grad-cam loop (2 calls per image): {peer_rate:7.2f} images/s; audit = "
            f"{audit_rate / peer_rate:.2f}x (goal >= 3)"
        )
    else:
        loop = cnnscope_loop_seconds(model, pictures[:loop_images], labels[:loop_images])
        loop_rate = loop_images / loop
        print(
            f"per-image loop of cnnscope Grad-CAM calls (2 per image; stands in for pytorch-grad-cam, not installed): "
            f"{loop_rate:7.2f} images/s; audit = {audit_rate / loop_rate:.2f}x (goal >= 3 against pytorch-grad-cam)"
        )

    sizes = [int(size) for size in args.memory.split(",") if size.strip()]
    peaks = {}
    for size in sizes:
        figures = memory_peak(size)
        peaks[size] = figures["peak_mib"]
        print(
            f"memory: {size:>6} synthetic 64x64 images, small CNN: peak RSS {figures['peak_mib']:.0f} MiB, "
            f"{figures['peak_mib'] - figures['before_mib']:.0f} MiB above the process before the audit; "
            f"{figures['seconds']:.1f} s"
        )
    if len(peaks) >= 2:
        low, high = peaks[min(peaks)], peaks[max(peaks)]
        print(f"memory: peak at {max(peaks)} images / at {min(peaks)} = {high / low:.3f} (goal <= 1.10)")


if __name__ == "__main__":
    main()
