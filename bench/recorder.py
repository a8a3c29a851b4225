"""The training recorder's cost per epoch for 8 probes, as a ratio to one forward + backward of the probes
(run by hand: `python bench/recorder.py`).

The floor is what one training step on the 8 probe images would cost without the optimizer: a forward in
train mode and ``loss.backward()`` to every parameter. A record does less work on the model (a forward and a
backward to one layer only, in eval mode) and more around it: random states and model flags saved and put
back, the epoch's file written (npz, flushed to disk with fsync and renamed), the focus on the object
computed. Both are measured in the same run, interleaved, fastest of several repeats; the ratios travel
between machines better than the seconds do.

Two models: the demos' SmallCNN on 64x64 shapes, and the default EfficientNet-Lite0 on 224x224 photos.
Memory: the process's resident size after 20 records and after 300 more (it should not grow with epochs).
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import cnnscope
from _timing import interleaved
from cnnscope.data import make_shapes, train_small_cnn
from cnnscope.samples import SAMPLES, sample_image
from cnnscope.training import Recorder


def rss_mib() -> float:
    """The current resident set size (Linux /proc), in MiB."""
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def floor(model: cnnscope.Model, images, labels: torch.Tensor):
    """One forward (train mode) + backward of the probes to every parameter, as a training step does."""
    batch = model.prepare(images).tensor
    module = model.module

    def step() -> None:
        module.train()
        loss = F.cross_entropy(model(batch), labels)
        loss.backward()
        module.zero_grad(set_to_none=True)
        module.eval()

    return step


def measure(name: str, model: cnnscope.Model, probes, labels: list[int], masks, repeat: int) -> dict:
    out = Path(tempfile.mkdtemp(prefix="cnnscope-bench-"))
    recorder = Recorder(probes, labels=labels, masks=masks, out=out / "run")
    gradcam = cnnscope.get_method("gradcam")(model)
    epoch = [0]

    def record() -> None:
        recorder.record(model, epoch[0])
        epoch[0] += 1

    def method_only() -> None:
        gradcam(probes, [[label] for label in labels])

    step = floor(model, probes, torch.as_tensor(labels))
    times = interleaved({"floor": step, "method": method_only, "record": record}, repeat, warmup=1)
    return {
        "model": name,
        "probes": len(labels),
        "floor_ms": round(times["floor"] * 1000, 2),
        "record_ms": round(times["record"] * 1000, 2),
        "gradcam_only_ms": round(times["method"] * 1000, 2),
        "record_over_floor": round(times["record"] / times["floor"], 2),
        "gradcam_over_floor": round(times["method"] / times["floor"], 2),
        "overhead_ms": round((times["record"] - times["method"]) * 1000, 2),
    }


def memory(model: cnnscope.Model, probes, labels, masks) -> dict:
    out = Path(tempfile.mkdtemp(prefix="cnnscope-bench-"))
    recorder = Recorder(probes, labels=labels, masks=masks, out=out / "run")
    for epoch in range(20):
        recorder.record(model, epoch)
    start = rss_mib()
    first = time.perf_counter()
    for epoch in range(20, 40):
        recorder.record(model, epoch)
    early = (time.perf_counter() - first) / 20
    for epoch in range(40, 300):
        recorder.record(model, epoch)
    last = time.perf_counter()
    for epoch in range(300, 320):
        recorder.record(model, epoch)
    late = (time.perf_counter() - last) / 20
    return {
        "rss_after_20_records_mib": round(start, 1),
        "rss_after_320_records_mib": round(rss_mib(), 1),
        "record_ms_epochs_20_40": round(early * 1000, 2),
        "record_ms_epochs_300_320": round(late * 1000, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=12)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = []
    shapes = make_shapes(8, seed=5)
    small, _ = train_small_cnn(make_shapes(120, seed=0), epochs=2, seed=0)
    results.append(
        measure(
            "SmallCNN 64x64",
            small,
            list(shapes.images),
            [int(v) for v in shapes.labels],
            list(shapes.masks),
            args.repeat,
        )
    )
    photos = [sample_image(name) for name in SAMPLES] * 2
    default = cnnscope.load_model()
    labels = [int(p[0].index) for p in default.predict(photos, 1)]
    results.append(measure("EfficientNet-Lite0 224x224", default, photos, labels, None, max(4, args.repeat // 2)))
    flat = memory(small, list(shapes.images), [int(v) for v in shapes.labels], list(shapes.masks))
    if args.json:
        print(json.dumps({"results": results, "memory": flat, "threads": torch.get_num_threads()}, indent=2))
        return
    print(f"recorder cost per epoch, 8 probes, {torch.get_num_threads()} threads (fastest of {args.repeat} rounds)")
    for row in results:
        print(
            f"  {row['model']:<28} floor (fwd+bwd) {row['floor_ms']:7.1f} ms   record {row['record_ms']:7.1f} ms "
            f"= {row['record_over_floor']:.2f}x   (Grad-CAM alone {row['gradcam_over_floor']:.2f}x; "
            f"save/restore, focus and the file: {row['overhead_ms']:.1f} ms)"
        )
    print(
        f"  memory: {flat['rss_after_20_records_mib']} MiB after 20 records, {flat['rss_after_320_records_mib']} MiB "
        f"after 320; a record took {flat['record_ms_epochs_20_40']} ms at epochs 20-40 and "
        f"{flat['record_ms_epochs_300_320']} ms at epochs 300-320"
    )


if __name__ == "__main__":
    main()
