"""The dataset audit: flags on the Clever Hans demo, resume, refusals, bad input, the store, SpRAy."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import cnnscope
from cnnscope.audit import Thresholds, audit, demo_audit
from cnnscope.audit.aggregate import aggregate, flags_for
from cnnscope.audit.engine import AuditStep
from cnnscope.audit.records import to_table
from cnnscope.audit.spray import spray
from cnnscope.audit.store import Store
from cnnscope.data import SmallCNN, make_shapes
from cnnscope.errors import InputError

CLASSES = ("circle", "square", "triangle", "cross")


# -- the demo: the cued class is flagged, nothing is flagged without a cue ---------------------------------
@pytest.fixture(scope="module", params=[("patch", 0), ("patch", 1), ("tint", 0), ("tint", 1), (None, 0), (None, 1)])
def demo_run(request, tmp_path_factory):
    cue, seed = request.param
    out = tmp_path_factory.mktemp(f"demo-{cue}-{seed}")
    return cue, seed, demo_audit(out, cue=cue, seed=seed, quiet=True, report=cue == "patch" and seed == 0)


@pytest.mark.slow
def test_demo_flags_the_cued_class_and_nothing_else(demo_run):
    cue, seed, result = demo_run
    summary = result.summary()
    flagged = {
        entry["name"]: [flag["kind"] for flag in entry["flags"]] for entry in summary["classes"] if entry["flags"]
    }
    if cue is None:
        assert flagged == {}, f"seed {seed}: nothing should be flagged without a cue, got {flagged}"
        return
    assert list(flagged) == ["circle"], f"{cue} seed {seed}: only the cued class, got {flagged}"
    expected = "fixed-place" if cue == "patch" else "off-object"
    assert expected in flagged["circle"]
    flag = next(flag for flag in summary["classes"][0]["flags"] if flag["kind"] == expected)
    assert flag["reason"] and len(flag) > 2  # the reason and its evidence
    assert result.extra["demo"]["test_accuracy"] > 0.85


@pytest.mark.slow
def test_demo_store_and_report(demo_run):
    cue, seed, result = demo_run
    if (cue, seed) != ("patch", 0):
        pytest.skip("checked on one run")
    table = pq.read_table(result.out / "shards")  # plain pyarrow, no cnnscope
    assert table.num_rows == result.images == 240
    assert sorted(table.column("position").to_pylist()) == list(range(240))
    assert table.schema.field("map_true").type.list_size == 256
    row = table.slice(0, 1).to_pylist()[0]
    assert len(row["top5"]) == 4 and len(row["features"]) == 64 and row["thumbnail"][:2] == b"\xff\xd8"
    assert 0 <= row["true_inside"] <= 1 and row["has_mask"]
    html = result.report.read_text(encoding="utf-8")
    assert "fixed-place" in html and "cell-0-0" in html and "http" not in html.replace("http-equiv", "")
    assert html.index("class-0") < html.index("id='confusion'")  # flagged classes first
    manifest = json.loads((result.out / "manifest.json").read_text())
    assert manifest["complete"] and len(manifest["shards"]) == 1


# -- a small model and data for the rest ----------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    data = make_shapes(40, size=32, seed=3)
    module = SmallCNN(4, width=4, blocks=2, generator=torch.Generator().manual_seed(0)).eval()
    preprocess = cnnscope.Preprocess(size=(32, 32), mean=(0, 0, 0), std=(1, 1, 1))
    model = cnnscope.load_model(module, labels=list(CLASSES), preprocess=preprocess)
    other = SmallCNN(4, width=4, blocks=2, generator=torch.Generator().manual_seed(1)).eval()
    return data, model, cnnscope.load_model(other, labels=list(CLASSES), preprocess=preprocess)


def _folder(root, data, *, extra=()):
    for index, (image, label) in enumerate(zip(data.images, data.labels, strict=True)):
        folder = root / data.classes[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"img{index:03d}.png")
    for name in extra:
        (root / name).mkdir(parents=True, exist_ok=True)
    return root


def test_resume_after_a_kill_redoes_no_finished_shard(tiny, tmp_path, monkeypatch):
    data, model, _ = tiny
    out = tmp_path / "audit"
    written: list[int] = []

    def die_after_two(index):
        written.append(index)
        if len(written) == 2:
            raise KeyboardInterrupt  # as if killed right after the second shard

    with pytest.raises(KeyboardInterrupt):
        audit(model, data, out=out, shard_size=8, batch_size=4, quiet=True, on_shard=die_after_two)
    assert written == [0, 1] and len(list((out / "shards").glob("shard-*.parquet"))) == 2

    calls, limit = [], [12]
    original = AuditStep.__call__

    def counting(self, batch):
        calls.extend(item.position for item in batch)
        if len(calls) > limit[0]:  # killed again, in the middle of the fourth shard
            raise RuntimeError("killed")
        return original(self, batch)

    monkeypatch.setattr(AuditStep, "__call__", counting)
    with pytest.raises(RuntimeError):
        audit(model, data, out=out, shard_size=8, batch_size=4, quiet=True)
    assert calls[:8] == list(range(16, 24))  # started after the two finished shards
    calls.clear()
    limit[0] = 10**9
    result = audit(model, data, out=out, shard_size=8, batch_size=4, quiet=True)
    assert calls == list(range(24, 40))  # the third shard was finished; the fourth is redone from its start
    assert result.resumed and result.complete and result.images == 40
    positions = pq.read_table(out / "shards", columns=["position"]).column("position").to_pylist()
    assert sorted(positions) == list(range(40))  # every image exactly once


def test_another_model_or_method_in_the_same_folder_is_refused(tiny, tmp_path):
    data, model, other = tiny
    out = tmp_path / "audit"
    audit(model, data, out=out, quiet=True, report=False)
    with pytest.raises(InputError, match="another model"):
        audit(other, data, out=out, quiet=True)
    with pytest.raises(InputError, match="another method"):
        audit(model, data, out=out, method="cam", quiet=True)
    with pytest.raises(InputError, match="another dataset"):
        audit(model, data, out=out, limit=20, quiet=True)
    again = audit(model, data, out=out, quiet=True, report=False)
    assert again.resumed and again.images == 40
    fresh = audit(other, data, out=out, quiet=True, report=False, resume=False)  # --restart replaces it
    assert not fresh.resumed and fresh.images == 40


def test_corrupt_images_are_skipped_with_their_reason(tiny, tmp_path):
    data, model, _ = tiny
    root = _folder(tmp_path / "data", data)
    (root / "circle" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    Image.fromarray(data.images[0]).save(root / "square" / "cut.jpg")
    (root / "square" / "cut.jpg").write_bytes((root / "square" / "cut.jpg").read_bytes()[:200])
    (root / "triangle" / "notes.txt").write_text("not an image, not listed")
    result = audit(model, root, out=tmp_path / "out", quiet=True, report=False)
    skipped = {item["path"].split("/")[-1]: item["reason"] for item in result.summary()["skipped"]}
    assert set(skipped) == {"broken.png", "cut.jpg"}
    assert "not an image" in skipped["broken.png"] or "corrupt" in skipped["broken.png"]
    assert result.images == 40


def test_a_folder_matching_no_label_is_reported_before_the_run(tiny, tmp_path):
    data, model, _ = tiny
    root = _folder(tmp_path / "data", data, extra=("hexagon", "squares"))
    with pytest.raises(InputError) as info:
        audit(model, root, out=tmp_path / "out", quiet=True)
    message = str(info.value)
    assert "'hexagon'" in message and "'squares'" in message and "did you mean 'square'" in message
    assert "--map" in message and not (tmp_path / "out").exists()  # nothing ran
    result = audit(
        model, root, out=tmp_path / "out", mapping={"hexagon": None, "squares": "square"}, quiet=True, report=False
    )
    problems = [item["reason"] for item in result.problems]
    assert any("holds no images" in reason for reason in problems)  # both folders are empty: one line each
    assert result.images == 40


def test_folders_match_labels_by_synonym_and_masks_and_csv_rows(tiny, tmp_path):
    data, model, _ = tiny
    labelled = cnnscope.load_model(
        model.module, labels=["round, circle", "square box", "triangle", "plus, cross"], preprocess=model.preprocess
    )
    root = tmp_path / "data"
    rows = ["path,label,box"]
    for index, (image, label) in enumerate(zip(data.images[:12], data.labels[:12], strict=True)):
        name = {"square": "square_box"}.get(data.classes[label], data.classes[label])
        (root / name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / name / f"img{index}.png")
        ys, xs = np.nonzero(data.masks[index])
        rows.append(f"{name}/img{index}.png,{name},{xs.min()} {ys.min()} {xs.max() + 1} {ys.max() + 1}")
    rows.append("missing.png,circle,")
    rows.append(f"{rows[1].split(',')[0]},circle,1 2 oops")
    (root / "list.csv").write_text("\n".join(rows))
    masks = tmp_path / "masks"
    for index, label in enumerate(data.labels[:6]):
        name = {"square": "square_box"}.get(data.classes[label], data.classes[label])
        (masks / name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(data.masks[index].astype(np.uint8) * 255).save(masks / name / f"img{index}.png")
    by_folder = audit(labelled, root, out=tmp_path / "a", masks=masks, quiet=True, report=False)
    assert by_folder.images == 12
    assert sum("no mask for" in item["reason"] for item in by_folder.problems) == 6
    table = by_folder.table(["has_mask", "true_inside", "key"])
    assert sum(table.column("has_mask").to_pylist()) == 6
    by_csv = audit(labelled, root / "list.csv", out=tmp_path / "b", quiet=True, report=False)
    assert by_csv.images == 12
    reasons = [item["reason"] for item in by_csv.problems]
    assert any("row 14" in r and "no such file" in r for r in reasons)
    assert any("row 15" in r and "box" in r for r in reasons)
    inside = by_csv.table(["true_inside"]).column("true_inside").to_pylist()
    assert all(value is None or 0 <= value <= 1 for value in inside) and any(value is not None for value in inside)


def test_summary_json_keys_and_memory_flat_batches(tiny, tmp_path):
    data, model, _ = tiny
    result = audit(model, data, out=tmp_path / "out", quiet=True, batch_size=7)
    summary = json.loads(json.dumps(result.summary()))
    assert summary["images"] == 40 and summary["skipped"] == []
    for entry in summary["classes"]:
        assert {"name", "accuracy", "flags"} <= set(entry)
        assert isinstance(entry["flags"], list)
    assert [entry["name"] for entry in summary["classes"]] == list(CLASSES)
    assert result.report.exists()


def test_penultimate_features_come_from_the_same_forward(tiny):
    data, model, _ = tiny
    step = AuditStep(model)
    before = (model.module._forward_pre_hooks, model.module.classifier._forward_pre_hooks)
    from cnnscope.audit.engine import Loaded
    from cnnscope.audit.sources import Entry

    batch = [Loaded(i, Entry(f"k{i}", int(data.labels[i])), data.images[i], None) for i in range(5)]
    columns = step(batch)
    assert step.extra_forwards == 0
    assert not model.module.classifier._forward_pre_hooks and before[1] == model.module.classifier._forward_pre_hooks
    with torch.no_grad():
        inputs = model.preprocess(list(data.images[:5]))
        expected = model.module.pool(model.module.features((inputs - 0.5) / 0.25)).flatten(1)
    np.testing.assert_allclose(columns["features"], expected.numpy(), rtol=1e-4, atol=1e-5)


# -- SpRAy and the cluster flag ----------------------------------------------------------------------------
def _blobs(count, row, col, rng, size=16):
    maps = np.zeros((count, size, size))
    maps[:, row : row + 4, col : col + 4] = 1.0
    maps += rng.random((count, size, size)) * 0.3
    return maps / maps.sum(axis=(1, 2), keepdims=True)


def test_spray_finds_two_known_groups_by_the_eigengap():
    rng = np.random.default_rng(0)
    maps = np.concatenate([_blobs(45, 6, 6, rng), _blobs(15, 12, 0, rng)])
    result = spray(maps)
    assert result.count == 2
    assert (result.labels[:45] == 0).all() and (result.labels[45:] == 1).all()
    assert result.gap == pytest.approx(result.eigenvalues[2] - result.eigenvalues[1])
    assert spray(rng.random((60, 16, 16))).count == 1


def test_a_minority_cluster_off_the_object_is_flagged_clever_hans(tmp_path):
    rng = np.random.default_rng(1)
    count, object_mask = 60, np.zeros((16, 16))
    object_mask[5:11, 5:11] = 1.0
    maps = np.concatenate([_blobs(45, 6, 6, rng), _blobs(15, 12, 0, rng)])
    inside = (maps * object_mask).sum(axis=(1, 2)) / maps.sum(axis=(1, 2))
    columns = {
        "position": np.arange(count),
        "key": [f"k{i}" for i in range(count)],
        "label": np.zeros(count, dtype=np.int32),
        "predicted": np.zeros(count, dtype=np.int32),
        "correct": np.ones(count, dtype=bool),
        "probability": np.full(count, 0.9, dtype=np.float32),
        "label_probability": np.full(count, 0.9, dtype=np.float32),
        "has_mask": np.ones(count, dtype=bool),
        "mask_area": np.full(count, object_mask.mean(), dtype=np.float32),
        "map_true": maps.reshape(count, -1),
        "map_pred": maps.reshape(count, -1),
        "true_inside": inside,
        "true_on_object": np.ones(count),
        "true_peak_x": np.full(count, 0.5),
        "true_peak_y": np.full(count, 0.5),
        "pred_inside": inside,
    }
    store = Store(tmp_path, {"x": 1}, total=count, shard_size=count)
    store.write(store.shards()[0], to_table([columns], 16), [])
    (report,) = aggregate(store, ["thing", "other"], {}, 16)
    assert [cluster.size for cluster in report.clusters] == [45, 15]
    assert [flag.kind for flag in report.flags] == ["clever-hans"]
    assert report.flags[0].evidence["share"] == pytest.approx(0.25)
    assert len(report.galleries["ugly"]) == 6 and set(report.galleries["ugly"]) <= set(range(45, 60))
    assert len(report.galleries["good"]) == 6 and set(report.galleries["good"]) <= set(range(45))
    strict = Thresholds(cluster_max_share=0.2)
    assert flags_for(report, strict) == []
