"""Feature embeddings: projections that are seeded and faithful, neighbourhood purity on data whose answer is
known, an audit store reused without reading an image, features of a chosen layer, the report's section,
and the one-line errors."""

from __future__ import annotations

import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import cnnscope
from cnnscope import Preprocess, load_model
from cnnscope.audit import audit
from cnnscope.audit.embedding import (
    embed,
    embed_arrays,
    neighbourhood_purity,
    overlapping_pairs,
    pick_thumbnails,
    project,
)
from cnnscope.data import SmallCNN, make_shapes
from cnnscope.errors import InputError

CLASSES = ("circle", "square", "triangle", "cross")


def _blobs(seed: int = 0, per_class: int = 60, dims: int = 20):
    """Class 0 far from everything; classes 1 and 2 drawn from one distribution (indistinguishable); class 3
    apart from them."""
    rng = np.random.default_rng(seed)
    centres = np.zeros((4, dims))
    centres[0, 0] = 40.0
    centres[3, 1] = 40.0
    labels = np.repeat(np.arange(4), per_class)
    features = centres[labels] + rng.normal(size=(len(labels), dims))
    return features.astype(np.float32), labels


def test_purity_and_overlaps_on_known_blobs():
    features, labels = _blobs()
    purity, per_image, shares = neighbourhood_purity(features, labels, k=10)
    assert purity[0] == 1.0 and purity[3] == 1.0  # far apart: every neighbour of their own class
    assert 0.3 < purity[1] < 0.7 and 0.3 < purity[2] < 0.7  # the same distribution: about half
    assert shares.shape == (4, 4) and np.allclose(shares.sum(axis=1), 1.0)
    assert per_image.shape == labels.shape
    pairs = overlapping_pairs(shares, np.arange(4), list(CLASSES))
    assert pairs[0]["classes"] == ["square", "triangle"] and pairs[0]["overlap"] > 0.3
    assert len(pairs) == 1  # no other pair shares a single neighbour


def test_purity_by_hand_on_a_line():
    # points on a line, k=1: each point's nearest neighbour is known
    features = np.array([[0.0], [1.0], [3.0], [3.5], [10.0], [10.2]], dtype=np.float32)
    labels = np.array([0, 0, 0, 1, 1, 1])
    purity, per_image, _ = neighbourhood_purity(features, labels, k=1)
    # neighbours: 0->1 (same), 1->0 (same), 2->3 (other), 3->2 (other), 4->5 (same), 5->4 (same)
    assert per_image.tolist() == [1.0, 1.0, 0.0, 0.0, 1.0, 1.0]
    assert purity == {0: pytest.approx(2 / 3), 1: pytest.approx(2 / 3)}


def test_projections_are_seeded_and_keep_the_classes_apart():
    features, labels = _blobs(per_class=20)
    first = project(features, "tsne", seed=3)
    assert np.array_equal(first, project(features, "tsne", seed=3))  # same seed, same picture
    assert first.shape == (80, 2) and first.dtype == np.float32
    centres = np.stack([first[labels == c].mean(axis=0) for c in range(4)])
    nearest = np.argmin(((first[:, None] - centres[None]) ** 2).sum(-1), axis=1)
    assert (nearest[labels == 0] == 0).all() and (nearest[labels == 3] == 3).all()
    # PCA: the first axis is the direction of the largest spread (the 40-unit offset of class 0)
    flat = project(features, "pca")
    assert (
        abs(np.corrcoef(flat[:, 0], features[:, 0] - features[:, 1])[0, 1]) > 0.5
        or abs(np.corrcoef(flat[:, 0], features[:, 0])[0, 1]) > 0.9
    )


def test_landmarks_and_sampled_purity_for_large_sets(monkeypatch):
    from cnnscope.audit import embedding

    features, labels = _blobs(per_class=50)
    placed = project(features, "tsne", seed=2, landmarks=60)
    again = project(features, "tsne", seed=2, landmarks=60)
    assert np.array_equal(placed, again)
    # every point sits with its own class: the classes that are apart stay apart
    centres = np.stack([placed[labels == c].mean(axis=0) for c in range(4)])
    nearest = np.argmin(((placed[:, None] - centres[None]) ** 2).sum(-1), axis=1)
    assert (nearest[labels == 0] == 0).all() and (nearest[labels == 3] == 3).all()

    full, _, full_shares = neighbourhood_purity(features, labels, k=10)
    monkeypatch.setattr(embedding, "PURITY_SAMPLE", 100)
    sampled, per_image, shares = neighbourhood_purity(features, labels, k=10)
    assert 100 <= np.isfinite(per_image).sum() < 200  # a stratified sample of the points was queried
    assert sampled[0] == 1.0 and sampled[3] == 1.0
    assert abs(sampled[1] - full[1]) < 0.2 and abs(shares[1, 2] - full_shares[1, 2]) < 0.2


@pytest.mark.slow
def test_umap_is_seeded():
    pytest.importorskip("umap")
    features, labels = _blobs(per_class=40)
    first = project(features, "umap", seed=1)
    assert np.array_equal(first, project(features, "umap", seed=1))
    centres = np.stack([first[labels == c].mean(axis=0) for c in range(4)])
    nearest = np.argmin(((first[:, None] - centres[None]) ** 2).sum(-1), axis=1)
    assert (nearest[labels == 0] == 0).all()


def test_bad_input_messages(monkeypatch, tmp_path):
    with pytest.raises(InputError, match="unknown embedding method 'mds'; choose one of tsne, umap, pca"):
        project(np.zeros((5, 3)), "mds")
    with pytest.raises(InputError, match="at least 3 images"):
        project(np.zeros((2, 3)), "pca")
    with pytest.raises(InputError, match="NaN or infinite"):
        project(np.array([[0.0, 1], [np.nan, 1], [2, 2]]), "pca")
    with pytest.raises(InputError, match="4 feature vectors for 3 labels"):
        embed_arrays(np.zeros((4, 2)), [0, 1, 0], method="pca")
    monkeypatch.setitem(sys.modules, "umap", None)  # as if umap-learn were not installed
    with pytest.raises(InputError, match=r"pip install 'cnnscope\[umap\]'"):
        project(np.random.default_rng(0).normal(size=(10, 3)), "umap")
    with pytest.raises(InputError, match="give the data to embed"):
        embed(None, None, out=tmp_path)


def test_thumbnails_go_to_the_misclassified_first():
    features, labels = _blobs(per_class=30)
    predicted = labels.copy()
    predicted[:7] = 1
    embedding = embed_arrays(features, labels, predicted=predicted, method="pca")
    rows = pick_thumbnails(embedding, limit=20)
    assert len(rows) == 20 and len(set(rows.tolist())) == 20
    assert set(range(7)) <= set(rows.tolist())  # all 7 wrong ones (within half the budget)
    assert pick_thumbnails(embedding, limit=1000).tolist() == list(range(120))


# -- on a store ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    shapes = make_shapes(40, size=32, seed=3)
    module = SmallCNN(4, width=4, blocks=2, generator=torch.Generator().manual_seed(0)).eval()
    preprocess = Preprocess(size=(32, 32), mean=(0, 0, 0), std=(1, 1, 1))
    return (shapes.images, shapes.labels), load_model(module, labels=list(CLASSES), preprocess=preprocess)


@pytest.fixture(scope="module")
def audited(tiny, tmp_path_factory):
    data, model = tiny
    out = tmp_path_factory.mktemp("embed-audit")
    return audit(model, data, out=out, shard_size=16, quiet=True, report=True)


def test_an_audit_folder_is_embedded_from_its_store_alone(audited, tmp_path, monkeypatch):
    from cnnscope.audit import engine, sources

    def never(*args, **kwargs):
        raise AssertionError("an image was read or explained again")

    monkeypatch.setattr(sources.Source, "load_image", never)
    monkeypatch.setattr(engine.AuditStep, "__call__", never)
    first = embed(None, audited.out, out=tmp_path / "a", method="tsne", seed=0)
    assert not first.computed and first.store == audited.out
    summary = first.summary()
    assert summary["points"] == 40 and summary["features"].startswith("penultimate")
    assert {entry["name"] for entry in summary["classes"]} == set(CLASSES)

    # the purity is that of the stored features, recomputed here straight from the Parquet shards
    table = pq.read_table(audited.out / "shards").sort_by("position")
    features = np.array(table.column("features").to_pylist(), dtype=np.float32)
    purity, _, _ = neighbourhood_purity(features, np.array(table.column("label").to_pylist()), k=10)
    for entry in summary["classes"]:
        assert entry["purity"] == pytest.approx(purity[entry["index"]], abs=1e-4)

    # the same seed gives the same picture; the files are written
    second = cnnscope.audit.embed(None, audited.out, out=tmp_path / "b", method="tsne", seed=0)  # the public name
    assert np.array_equal(first.embedding.points, second.embedding.points)
    points = pq.read_table(first.table)
    assert points.num_rows == 40 and set(points.column_names) >= {"position", "x", "y", "purity"}
    html = first.html.read_text()
    assert "<canvas id='plot'>" in html and "http" not in html
    assert first.png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    with pytest.raises(InputError, match="is an audit folder: its features are stored, --layer cannot change"):
        embed(None, audited.out, out=tmp_path / "c", layer="features.2")


def test_the_report_has_the_embedding_section(audited):
    report = audited.report.read_text()
    assert "id='embedding'" in report and "<iframe class='embedding'" in report
    section = report[report.index("id='embedding'") :]
    assert "neighbourhood purity" in section and section.index("<iframe") < section.index("id='confusion'")
    for name in CLASSES:
        assert f"<td>{name}</td>" in section


def test_features_of_a_chosen_layer(tiny, tmp_path):
    data, model = tiny
    result = embed(model, data, out=tmp_path, layer="features.2", method="pca", html=False, png=False, quiet=True)
    assert result.computed and result.summary()["features"] == "global average of features.2"
    table = pq.read_table(tmp_path / "store" / "shards").sort_by("position")
    stored = np.array(table.column("features").to_pylist(), dtype=np.float32)
    # by hand: the mean over space of the first ReLU's output (SmallCNN normalizes its input in its forward)
    module = model.module
    with torch.inference_mode():
        batch = model.prepare(list(data[0][:40])).tensor
        expected = module.features[:3]((batch - 0.5) / 0.25).mean(dim=(2, 3)).numpy()
    assert stored.shape == (40, 4)
    np.testing.assert_allclose(stored, expected, rtol=1e-4, atol=1e-5)
    assert not (tmp_path / "embedding.html").exists()


def test_scatter_payload_round_trips_and_atlases_are_tiled():
    import base64
    import io
    import json

    from PIL import Image

    from cnnscope.render.scatter import ATLAS_TILES, TILE, ScatterData, atlases, payload, scatter_html

    per_atlas = ATLAS_TILES * ATLAS_TILES
    buffer = io.BytesIO()
    Image.new("RGB", (72, 36), (200, 10, 10)).save(buffer, format="JPEG")
    sheets, sizes = atlases([buffer.getvalue()] * (per_atlas + 1))
    assert len(sheets) == 2  # one full atlas and one more, not one sprite sheet
    assert sizes[0].tolist() == [TILE, TILE // 2]  # scaled to fit the tile, aspect kept
    with Image.open(io.BytesIO(base64.b64decode(sheets[1].split(",", 1)[1]))) as second:
        assert second.size == (ATLAS_TILES * TILE, TILE)  # a partial atlas is only as tall as its rows
        assert np.abs(np.asarray(second)[TILE // 2, TILE // 2] - [200, 10, 10]).max() < 40

    points = np.array([[0.0, 10.0], [5.0, 20.0], [10.0, 0.0]])
    maps = np.stack([np.eye(4), -np.ones((4, 4)), np.full((4, 4), 2.0)]).astype(np.float32)
    data = ScatterData(
        points=points,
        labels=np.array([0, 1, 1]),
        predicted=np.array([0, 0, 1]),
        class_names=["a", "b"],
        names=["x.png", "y.png", "z.png"],
        top3=np.array([[0, 1], [0, 1], [1, 0]]),
        top3_probability=np.array([[0.9, 0.1], [0.6, 0.4], [0.8, 0.2]]),
        thumbnail_rows=np.array([0, 2]),
        thumbnails=[buffer.getvalue(), buffer.getvalue()],
        maps=maps[[0, 2]],
    )
    blob = payload(data)

    def decode(key, dtype):
        return np.frombuffer(base64.b64decode(blob[key]), dtype=dtype)

    xy = decode("xy", np.float32).reshape(3, 2)
    assert xy.min() == 0.0 and xy.max() == 1.0 and xy[2].tolist() == [1.0, 0.0]  # scaled into the unit square
    assert decode("thumb", np.int32).tolist() == [0, -1, 1]
    assert decode("top3", np.int32).reshape(3, 3)[:, 2].tolist() == [-1, -1, -1]  # only two classes
    quantized = decode("maps", np.uint8).reshape(2, 4, 4)
    assert quantized[0].tolist() == (np.eye(4) * 255).astype(int).tolist() and (quantized[1] == 255).all()
    page = scatter_html(data)
    embedded = page.split("id='scatter-data'>", 1)[1].split("</script>", 1)[0]
    assert json.loads(embedded)["names"] == ["x.png", "y.png", "z.png"]
