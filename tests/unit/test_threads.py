"""One model shared by several threads: calls are serialized on the model, results equal the serial
ones, and the model's flags and hooks come back exactly as they were."""

import threading
import warnings

import torch

import cnnscope
from cnnscope.testing import Snapshot, tiny_model

CALLS = [
    ("gradcam", {}),
    ("saliency", {}),
    ("guided-backprop", {}),
    ("ablationcam", {}),
    ("occlusion", {"window": 16, "stride": 16, "quiet": True}),
    ("integrated-gradients", {"steps": 4}),
    ("layercam", {}),
    ("eigencam", {}),
]


def test_eight_threads_on_one_model_give_the_serial_results_and_restore_everything():
    model = tiny_model()
    module = model.module
    module.train()
    module.conv2.training = False  # a mixed state must come back exactly
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cnnscope.CnnscopeWarning)  # "the model was in train mode"
        serial = {name: cnnscope.get_method(name)(model, **options)(images, "top2").raw for name, options in CALLS}
    before = Snapshot.take(module)
    # a fresh Model around the same module: its first trace must not collide with the other threads either
    shared = cnnscope.load_model(module, preprocess=model.preprocess)
    problems: list[str] = []
    barrier = threading.Barrier(8)

    def worker(seed: int) -> None:
        barrier.wait()
        for call in range(25):
            name, options = CALLS[(seed + call) % len(CALLS)]
            try:
                raw = cnnscope.get_method(name)(shared, **options)(images, "top2").raw
            except Exception as exc:
                problems.append(f"{name}: {type(exc).__name__}: {exc}")
                continue
            if raw.shape != serial[name].shape or not torch.allclose(raw, serial[name], rtol=1e-5, atol=1e-6):
                problems.append(f"{name}: differs from the serial result")

    # the warning filter is process-wide state: set it once here, not in each thread
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cnnscope.CnnscopeWarning)  # "the model was in train mode"
        threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not problems, problems[:5]
    assert not before.differences(Snapshot.take(module))
    assert module.training and not module.conv2.training and module.conv1.training
