"""cnnscope.training: the recorder never changes training, stores each epoch as it goes, renders movies; the
demo's two runs; two models compared; the map statistics with ties."""

from __future__ import annotations

import json
import math
import random
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageSequence
from torch import nn

import cnnscope
from cnnscope.data import SmallCNN, make_shapes, train_small_cnn
from cnnscope.errors import InputError
from cnnscope.render.animate import BAR, TRUE_BAR, movie_frame, video_available
from cnnscope.training import (
    Probe,
    Recorder,
    Recording,
    compare_models,
    focus_share,
    pearson,
    rank_correlation,
    sign_agreement,
    top_iou,
    top_region,
)
from cnnscope.training.metrics import average_ranks
from cnnscope.training.recorder import random_states

CLASSES = ["a", "b", "c"]


class Noisy(nn.Module):
    """A small conv net with batch norm and dropout whose forward also draws from Python's ``random``,
    numpy's global generator and torch's global generator (as augmentation or stochastic layers do), in
    train and eval mode alike: a record that let any of those draws through would change training."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()
        )
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        jitter = random.random() * 1e-3 + float(np.random.rand()) * 1e-3
        x = x + jitter + 1e-3 * torch.randn_like(x)
        return self.head(self.drop(self.features(x).mean(dim=(2, 3))))


def _data(count: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    return torch.rand(count, 3, 16, 16, generator=generator), torch.randint(0, 3, (count,), generator=generator)


def _train(recorder: Recorder | None, epochs: int = 3) -> tuple[list[float], dict, dict]:
    """A seeded plain loop: global seeds, a shuffling DataLoader, dropout and the model's own draws."""
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    model = Noisy()
    inputs, labels = _data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(inputs, labels), batch_size=8, shuffle=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    if recorder is not None:
        recorder.record(model, 0)
    for epoch in range(1, epochs + 1):
        model.train()
        for images, targets in loader:
            loss = F.cross_entropy(model(images), targets)
            optimizer.zero_grad()
            loss.backward()
            if recorder is not None and epoch == 2:  # mid-step, .grad populated: still nothing may change
                recorder.record(model, 100 + epoch, force=True)
            optimizer.step()
            losses.append(loss.item())
        if recorder is not None:
            recorder.record(model, epoch)  # the model is still in train mode here
    return losses, {k: v.clone() for k, v in model.state_dict().items()}, random_states()


def _probe_tensor() -> torch.Tensor:
    return torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(3))


def test_training_is_bit_identical_with_and_without_the_recorder(tmp_path):
    recorder = Recorder(_probe_tensor(), labels=[0, 1, 2, 0], classes=CLASSES, out=tmp_path / "run")
    plain_losses, plain_weights, plain_rng = _train(None)
    recorded_losses, recorded_weights, recorded_rng = _train(recorder)
    assert recorded_losses == plain_losses  # bit for bit, every step
    assert plain_weights.keys() == recorded_weights.keys()
    for key, value in plain_weights.items():  # weights, BN running statistics and their counters
        assert torch.equal(value, recorded_weights[key]), key
    assert torch.equal(plain_rng["torch"], recorded_rng["torch"])
    assert plain_rng["python"] == recorded_rng["python"]
    assert all(np.array_equal(a, b) for a, b in zip(plain_rng["numpy"], recorded_rng["numpy"], strict=True))
    assert Recording.open(tmp_path / "run").epochs == (0, 1, 2, 3, 102)


def test_a_record_restores_flags_gradients_rng_and_batchnorm(tmp_path):
    model = Noisy()
    model.train()
    model.features[0].weight.requires_grad_(False)
    model.head.weight.grad = torch.ones_like(model.head.weight)
    grad = model.head.weight.grad
    model.drop.eval()  # a mixed state comes back as it was
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    before = random_states()
    recorder = Recorder(_probe_tensor(), target="top1", classes=CLASSES, out=tmp_path / "run")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "train mode" warning either: the recorder switches modes itself
        summary = recorder.record(model, 0)
    after = random_states()
    assert torch.equal(before["torch"], after["torch"]) and before["python"] == after["python"]
    assert all(np.array_equal(a, b) for a, b in zip(before["numpy"], after["numpy"], strict=True))
    assert model.training and model.features.training and not model.drop.training
    assert not model.features[0].weight.requires_grad and model.features[3].weight.requires_grad
    assert model.head.weight.grad is grad and model.features[3].weight.grad is None
    for key, value in model.state_dict().items():
        assert torch.equal(value, buffers[key]), key
    assert [p["name"] for p in summary["probes"]] == ["probe0", "probe1", "probe2", "probe3"]
    assert all(len(p["top"]) == 3 and p["loss"] is None for p in summary["probes"])


def test_a_record_works_under_inference_mode_as_in_lightning_hooks(tmp_path):
    model = Noisy().eval()
    recorder = Recorder(_probe_tensor(), labels=[0, 1, 2, 0], classes=CLASSES, out=tmp_path / "run")
    with torch.inference_mode():
        summary = recorder.record(model, 4)
    assert summary["epoch"] == 4 and all(p["loss"] > 0 for p in summary["probes"])
    assert not torch.is_inference_mode_enabled()


def _shapes_model(tmp_path, epochs: int, on_epoch=None):
    data = make_shapes(40, size=32, seed=1)
    model, _ = train_small_cnn(data, epochs=epochs, seed=0, blocks=2, on_epoch=on_epoch)
    return model


def test_each_epoch_is_on_disk_as_it_goes_and_a_crash_keeps_them(tmp_path):
    probes = make_shapes(4, size=32, seed=9)
    recorder = Recorder(probes, out=tmp_path / "run")

    def crash_at_three(model, epoch):
        recorder.record(model, epoch)
        files = sorted(p.name for p in (tmp_path / "run" / "epochs").iterdir())
        assert files == [f"epoch-{e:06d}.npz" for e in range(epoch + 1)]  # written before training goes on
        if epoch == 2:
            raise RuntimeError("the run dies here")

    with pytest.raises(RuntimeError, match="dies"):
        _shapes_model(tmp_path, 5, crash_at_three)
    recording = Recording.open(tmp_path / "run")
    assert recording.epochs == (0, 1, 2)
    assert not [p for p in (tmp_path / "run").rglob("*.tmp")]
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["method"] == "gradcam" and manifest["target"] == "true" and manifest["layer"] == "features"
    assert [p["label"] for p in manifest["probes"]] == [int(v) for v in probes.labels]
    table = recording.scalars()
    assert table["focus"].shape == (3, 4) and table["top_indices"].shape == (3, 4, 3)
    assert np.isfinite(table["loss"]).all() and (table["loss"] > 0).all()
    assert recording.maps(2).shape == (4, 8, 8)
    with np.load(tmp_path / "run" / "epochs" / "epoch-000001.npz") as data:  # readable without cnnscope
        assert int(data["epoch"]) == 1 and data["maps"].dtype == np.float32
    # a new recorder with the same recording continues the folder; another recording is refused
    again = Recorder(probes, out=tmp_path / "run", every=2)
    model = _shapes_model(tmp_path, 1)
    again.record(model, 3)  # not a multiple of every: skipped
    again.record(model, 4)
    assert Recording.open(tmp_path / "run").epochs == (0, 1, 2, 4)
    with pytest.raises(InputError, match="another method"):
        Recorder(probes, method="gradcam++", out=tmp_path / "run").record(model, 5)


def test_recorder_arguments_are_checked(tmp_path):
    images = make_shapes(3, size=32, seed=2)
    with pytest.raises(InputError, match="one class per probe"):
        Recorder(images, target="top3")
    with pytest.raises(InputError, match="needs a label for every probe"):
        Recorder(list(images.images), target="true")
    with pytest.raises(InputError, match="all images or all preprocessed tensors"):
        Recorder([images.images[0], torch.rand(3, 32, 32)])
    with pytest.raises(InputError, match="mask"):
        Recorder([Probe(images.images[0], 0, np.zeros((8, 8), bool))])
    with pytest.raises(InputError, match="every"):
        Recorder(images, every=0)
    assert Recorder(list(images.images)).target == "top1" and Recorder(images).target == "true"


def test_focus_share_is_the_share_of_positive_mass_on_the_mask():
    mask = np.zeros((8, 8), bool)
    mask[:, :4] = True
    assert focus_share(np.ones((8, 8)), mask) == pytest.approx(0.5)
    inside = np.where(mask, 1.0, -3.0)  # negative values are no evidence
    assert focus_share(inside, mask) == pytest.approx(1.0)
    assert math.isnan(focus_share(np.zeros((4, 4)), mask))


def test_rank_statistics_handle_the_ties_of_mostly_zero_maps():
    first = np.zeros((32, 32))
    second = np.zeros((32, 32))
    first[2:6, 2:6] = np.arange(16).reshape(4, 4) + 1.0  # 1.6% of the pixels carry evidence
    second[20:24, 20:24] = 1.0  # elsewhere, disjoint
    # the trap: the top 20% by sort order is mostly tied zeros, picked alike in both maps
    count = int(0.2 * first.size)
    naive_a = set(np.argsort(-first.ravel(), kind="stable")[:count])
    naive_b = set(np.argsort(-second.ravel(), kind="stable")[:count])
    assert len(naive_a & naive_b) / len(naive_a | naive_b) > 0.8
    # handled: zero pixels are never "top", so disjoint evidence has no overlap
    assert top_region(first).sum() == 16 and top_region(second).sum() == 16
    assert top_iou(first, second) == 0.0
    assert sign_agreement(first, second) == 0.0
    assert rank_correlation(first, second) < 0
    # ranks of ties are averaged, as scipy does
    from scipy.stats import rankdata

    assert np.array_equal(average_ranks(first), rankdata(first.ravel()))
    # the same evidence at another scale agrees fully; an empty map has no answer, not a made-up one
    for statistic in (pearson, rank_correlation, top_iou, sign_agreement):
        assert statistic(first, 3 * first) == pytest.approx(1.0)
    assert math.isnan(pearson(first, np.zeros_like(first)))
    assert math.isnan(top_iou(np.zeros_like(first), np.zeros_like(first)))
    # ties at the threshold are kept together: 30% of the pixels at the top value all count
    flat = np.zeros(100)
    flat[:30] = 1.0
    assert top_region(flat, 0.2).sum() == 30


def test_movie_frame_has_the_epoch_and_bars_in_proportion():
    picture = np.full((64, 64, 3), 128, np.uint8)
    frame = movie_frame(picture, epoch=7, top=[("circle", 0.75, True), ("square", 0.25, False), ("cross", 0.0, False)])
    assert frame.shape[0] % 16 == 0 and frame.shape[1] == 256
    assert (frame[5:25, 5:90] != 255).any(axis=2).sum() > 40  # "epoch 7" drawn in the header
    rows = [np.all(frame == colour, axis=2).sum(axis=1) for colour in (TRUE_BAR, BAR)]
    green, blue = rows[0].max(), rows[1].max()
    assert green == pytest.approx(3 * blue, rel=0.1)  # bar lengths follow the probabilities
    other = movie_frame(picture, epoch=8, top=[("circle", 0.75, True), ("square", 0.25, False), ("cross", 0.0, False)])
    assert (other[:30] != frame[:30]).any() and np.array_equal(other[30:], frame[30:])


# -- the demo: the clean run looks at the shape, the cued run at the mark ------------------------------------
@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from cnnscope.training import demo_training

    out = tmp_path_factory.mktemp("demo")
    return demo_training(out, seed=0, quiet=True)


def test_demo_clean_focus_rises_and_cued_ends_lower(demo):
    clean = demo["runs"]["clean"]["focus_marked_circles"]
    cued = demo["runs"]["cued"]["focus_marked_circles"]
    assert len(clean) == len(cued) == 11 and demo["epochs"] == list(range(11))
    assert clean[0] < 0.15 and clean[-1] > clean[0] + 0.3  # from nowhere in particular onto the shape
    late_clean = np.mean([v for v in clean[-3:] if v is not None])
    assert cued[-1] < clean[-1] - 0.15 and np.mean([v for v in cued[-3:] if v is not None]) < late_clean - 0.15
    assert demo["runs"]["cued"]["accuracy_mark_everywhere"] < demo["runs"]["clean"]["accuracy_mark_everywhere"]
    json.dumps(demo)  # JSON-able as it is
    assert demo["text"].count("Grad-CAM on the marked circles") == 2 and "training.html" in demo["text"]


def test_demo_movies_show_bars_and_the_epoch_in_every_frame(demo):
    gifs = [path for path in demo["side_by_side"] if path.endswith(".gif")]
    assert len(gifs) == 8 and demo["html"].endswith("training.html")
    with Image.open(gifs[0]) as movie:
        frames = [np.asarray(frame.convert("RGB")) for frame in ImageSequence.Iterator(movie)]
    assert len(frames) == 11  # one frame per recorded epoch
    first, last = frames[0], frames[-1]
    width = first.shape[1]
    assert width > 500  # two runs side by side
    # the bar area under each picture: the bar colours are there, and they change as the model learns
    bars = last[24 + 30 + 256 + 8 : 24 + 30 + 256 + 8 + 63]
    close = [np.abs(bars.astype(int) - colour).sum(axis=2) < 40 for colour in (BAR, TRUE_BAR)]
    assert (close[0] | close[1]).sum() > 500

    def changed(a: np.ndarray, b: np.ndarray) -> int:  # pixels that differ by more than a GIF palette's error
        return int((np.abs(a.astype(int) - b.astype(int)).sum(axis=2) > 60).sum())

    assert changed(first[24 + 30 + 256 :], last[24 + 30 + 256 :]) > 200
    # the header with "epoch N" differs between the first and last frames, the caption band does not
    assert changed(first[24:54, :120], last[24:54, :120]) > 20
    assert changed(first[:20], last[:20]) == 0
    html = Path(demo["html"]).read_text(encoding="utf-8")
    assert "type='range'" in html and html.count("data:image/png;base64,") >= 8 * 11
    if video_available():
        from imageio_ffmpeg import count_frames_and_secs

        mp4 = next(path for path in demo["side_by_side"] if path.endswith(".mp4"))
        assert count_frames_and_secs(mp4)[0] == 11


def test_render_writes_a_movie_per_probe_a_page_and_the_focus_plot(tmp_path):
    probes = make_shapes(3, size=32, seed=9)
    recorder = Recorder(probes, out=tmp_path / "run")
    _shapes_model(tmp_path, 2, recorder.record)
    summary = recorder.render(tmp_path / "movie", mp4=False)
    assert summary["epochs"] == [0, 1, 2] and len(summary["probes"]) == 3
    assert all("gif" in probe and "mp4" not in probe for probe in summary["probes"])
    assert (tmp_path / "movie" / "movie.html").exists() and (tmp_path / "movie" / "focus.png").exists()
    assert len(summary["focus_mean"]) == 3
    with Image.open(summary["probes"][0]["gif"]) as movie:
        assert movie.n_frames == 3


# -- two models ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_model():
    module = SmallCNN(4, generator=torch.Generator().manual_seed(0)).eval()
    preprocess = cnnscope.Preprocess(size=(64, 64), mean=(0, 0, 0), std=(1, 1, 1))
    return cnnscope.Model(module, labels=["circle", "square", "triangle", "cross"], preprocess=preprocess, name="small")


def test_compare_models_across_architectures_and_input_sizes(default_model, small_model, chelsea, coffee):
    result = compare_models(default_model, small_model, [chelsea, coffee], names=["chelsea", "coffee"])
    assert result.layer_a == "_swish@1" and result.layer_b == "features"
    assert {row.name for row in result.images} == {"chelsea", "coffee"}
    pearsons = [row.pearson for row in result.images]
    assert pearsons == sorted(pearsons)  # the most disagreeing image first
    for row in result.images:
        assert row.a.map.shape == row.b.map.shape == (149, 224)  # one grid over the whole 451x300 photo
        assert -1 <= row.pearson <= 1 and not row.top1_agree  # a 4-class model never says "Egyptian cat"
        assert row.difference.shape == row.a.map.shape
    document = result.to_json()
    assert set(document["images"][0]) >= {"pearson", "rank_correlation", "top_iou", "sign_agreement", "top1_agree"}
    json.dumps(document)


def test_a_model_compared_with_itself_agrees_fully(default_model, chelsea, coffee):
    result = compare_models(default_model, default_model, [chelsea, coffee])
    for row in result.images:
        assert row.pearson == pytest.approx(1.0) and row.rank_correlation == pytest.approx(1.0)
        assert row.top_iou == 1.0 and row.sign_agreement == 1.0 and row.top1_agree


# -- Lightning ---------------------------------------------------------------------------------------------------
def _lightning_fit(tmp_path, callbacks):
    lightning = pytest.importorskip("lightning")

    class Module(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = Noisy()

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, _):
            images, labels = batch
            return F.cross_entropy(self(images), labels)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    lightning.seed_everything(0, verbose=False)
    module = Module()
    inputs, labels = _data(32)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(inputs, labels), batch_size=8, shuffle=True)
    trainer = lightning.Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        default_root_dir=tmp_path,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="lightning")
        warnings.filterwarnings("ignore", module="pytorch_lightning")
        warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers|LeafSpec).*")
        trainer.fit(module, loader)
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_the_lightning_callback_records_every_epoch_and_changes_nothing(tmp_path):
    pytest.importorskip("lightning")
    from cnnscope.training import LightningRecorder

    recorder = Recorder(_probe_tensor(), labels=[0, 1, 2, 0], classes=CLASSES, out=tmp_path / "run")
    callback = recorder.lightning()
    assert isinstance(callback, LightningRecorder)
    plain = _lightning_fit(tmp_path / "plain", [])
    recorded = _lightning_fit(tmp_path / "recorded", [callback])
    for key, value in plain.items():
        assert torch.equal(value, recorded[key]), key
    assert Recording.open(tmp_path / "run").epochs == (0, 1, 2)
