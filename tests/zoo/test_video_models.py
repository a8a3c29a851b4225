"""torchvision's video classifiers by name (issue 21): r3d_18, mc3_18, r2plus1d_18 and s3d with their weights'
transforms and Kinetics-400 names, at random seeded weights on small clips; Grad-CAM on the default layer and
saliency give maps of the clip's shape; the CLI's JSON has ``peak`` [x, y, t] and ``temporal``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("torchvision", reason="zoo tests run in .venv-zoo: make test-zoo")

import cnnscope
from cnnscope.models import Model
from cnnscope.testing import check_method

from ..cli.test_cli import run

KINETICS_MEAN = (0.43216, 0.394666, 0.37645)

#: The smallest clip each runs on: s3d's final (2, 7, 7) average pool needs 224 px frames and 13 frames.
SMALL = {
    "r3d_18": (4, 64, 64),
    "mc3_18": (4, 64, 64),
    "r2plus1d_18": (4, 64, 64),
    "s3d": (13, 224, 224),
}


def small(name: str) -> Model:
    torch.manual_seed(0)
    model = cnnscope.load_model(f"torchvision:{name}", weights=False)
    if name == "s3d":  # at random init its features are ~1e-6 (BN eps 1e-3 on every block), so the head's bias
        with torch.no_grad():  # alone picks the top class and its Grad-CAM is empty: a head without bias
            model.module.classifier[1].bias.zero_()  # ranks the classes by their evidence instead
    preprocess = cnnscope.models.Preprocess(size=SMALL[name], mean=model.preprocess.mean, std=model.preprocess.std)
    return cnnscope.load_model(model, preprocess=preprocess)


def clip_array(size: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    frames, height, width = size
    return np.random.default_rng(seed).integers(0, 256, (frames, height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize(
    ("name", "size"),
    [("r3d_18", (16, 112, 112)), ("mc3_18", (16, 112, 112)), ("r2plus1d_18", (16, 112, 112)), ("s3d", (128, 224, 224))],
)
def test_video_models_load_with_their_weights_transforms_and_kinetics_names(name, size):
    from torchvision import models

    enum = models.get_model_weights(name).DEFAULT
    model = cnnscope.load_model(f"torchvision:{name}", weights=False)
    assert model.name == f"torchvision:{name} (random weights)"
    assert model.preprocess.size == size  # (T, H, W): the weights' clip_len and crop size
    assert model.preprocess.mean == pytest.approx(KINETICS_MEAN)
    assert model.preprocess.std == pytest.approx(tuple(enum.transforms().std))
    assert model.labels == list(enum.meta["categories"]) and len(model.labels) == 400
    assert not model.module.training


@pytest.mark.parametrize("name", ["r3d_18", "mc3_18", "r2plus1d_18", pytest.param("s3d", marks=pytest.mark.slow)])
def test_gradcam_and_saliency_on_each_video_model(name):
    model = small(name)
    clip = clip_array(SMALL[name])
    layer = model.default_layer()
    assert len(layer.output_shape) == 5 and min(layer.output_shape[2:]) >= 1  # a (N, C, T, h, w) map
    for method in ("gradcam", "saliency"):
        explanation = cnnscope.explain(model, clip, method=method)
        assert tuple(explanation.maps.shape) == (1, 1, *SMALL[name]), (name, method)
        assert torch.isfinite(explanation.maps).all() and float(explanation.maps.abs().max()) > 0
        x, y, t = explanation.peak(0, 0)
        assert 0 <= x < SMALL[name][2] and 0 <= y < SMALL[name][1] and 0 <= t < SMALL[name][0]


def test_gradcam_contract_on_r3d_18():
    model = small("r3d_18")
    clips = torch.stack([model.preprocess([clip_array(SMALL["r3d_18"], seed)])[0] for seed in (1, 2)])
    check_method(cnnscope.get_method("gradcam"), model, clips)


def test_r3d_18_clip_from_the_command_line(capsys, tmp_path):
    from PIL import Image

    folder = tmp_path / "frames"
    folder.mkdir()
    for t, frame in enumerate(clip_array((8, 64, 64), seed=3)):
        Image.fromarray(frame).save(folder / f"frame{t:02d}.png")
    code, out, err = run(
        capsys, "explain", str(folder), "--model", "torchvision:r3d_18", "--no-weights", "--size", "4,64,64",
        "--method", "gradcam", "-o", str(tmp_path / "out"), "--json",
    )  # fmt: skip
    assert code == 0, err
    summary = json.loads(out)
    assert summary["model"] == "torchvision:r3d_18 (random weights)"
    entry = summary["images"][0]["explanations"][0]
    x, y, t = entry["peak"]  # input pixels and the input's frame index
    assert 0 <= x < 64 and 0 <= y < 64 and t in entry["frames"]
    assert entry["frames"] == [0, 2, 5, 7] and len(entry["temporal"]) == 4
    assert sum(entry["temporal"]) == pytest.approx(1.0, abs=1e-4)
    assert 0 <= entry["class_index"] < 400 and entry["class_name"]


@pytest.mark.slow  # three r3d_18 builds and a 127 MB weights file
def test_a_local_weights_file_and_a_state_dict_of_r3d_18(tmp_path):
    """weights=PATH (no download) and a state_dict with arch='torchvision:r3d_18': the weights' clip size, mean
    and std, and the Kinetics-400 names."""
    from torchvision import models

    torch.manual_seed(2)
    module = models.video.r3d_18(weights=None)
    path = tmp_path / "r3d.pth"
    torch.save(module.state_dict(), path)
    categories = list(models.get_model_weights("r3d_18").DEFAULT.meta["categories"])
    for model in (
        cnnscope.load_model("torchvision:r3d_18", weights=path),
        cnnscope.load_model(path, arch="torchvision:r3d_18"),
    ):
        assert model.preprocess.size == (16, 112, 112) and model.preprocess.mean == pytest.approx(KINETICS_MEAN)
        assert model.labels == categories
        assert torch.equal(model.module.fc.weight, module.fc.weight)
        assert "random weights" not in model.name
