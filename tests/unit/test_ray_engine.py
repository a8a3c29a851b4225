"""The Ray engine: same records as the local engine, resume across engines, a killed actor loses nothing,
and the one-line messages without Ray. One local Ray (2 CPUs) for the module, started by the test."""

from __future__ import annotations

import os
import signal
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from cnnscope import Preprocess, load_model
from cnnscope.audit import audit
from cnnscope.audit.engine import AuditStep, check_engine
from cnnscope.audit.sources import open_source
from cnnscope.audit.store import Store
from cnnscope.data import SmallCNN, make_shapes
from cnnscope.errors import InputError

CLASSES = ("circle", "square", "triangle", "cross")


def _model():
    module = SmallCNN(4, width=4, blocks=2, generator=torch.Generator().manual_seed(0)).eval()
    preprocess = Preprocess(size=(32, 32), mean=(0, 0, 0), std=(1, 1, 1))
    return load_model(module, labels=list(CLASSES), preprocess=preprocess)


def _data(count: int = 40):
    shapes = make_shapes(count, size=32, seed=3)
    return shapes.images, shapes.labels


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024 * 1024, log_to_driver=False)
    yield ray
    ray.shutdown()


def _table(folder):
    return pq.read_table(folder / "shards").sort_by("position")


def _matrix(table, column):
    return np.array(table.column(column).to_pylist(), dtype=np.float64)


def test_engine_messages(monkeypatch):
    with pytest.raises(InputError, match="unknown engine 'spark'; choose one of local, ray"):
        check_engine("spark")
    with pytest.raises(InputError, match="--address .* use it with --engine ray"):
        check_engine("local", "ray://head:10001")
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(InputError, match=r"--engine ray needs Ray: pip install 'cnnscope\[ray\]'"):
        check_engine("ray")


@pytest.mark.slow
def test_ray_resumes_a_local_run_and_gives_the_same_records(ray_cluster, tmp_path):
    model = _model()
    data = _data()
    local = audit(model, data, out=tmp_path / "local", shard_size=8, batch_size=4, quiet=True, report=False)

    # a local run stopped after its first two shards, finished by the Ray engine
    class Stop(Exception):
        pass

    def stop_after_two(index):
        if index == 1:
            raise Stop

    with pytest.raises(Stop):
        audit(
            model,
            data,
            out=tmp_path / "mixed",
            shard_size=8,
            batch_size=4,
            quiet=True,
            report=False,
            on_shard=stop_after_two,
        )
    written = []
    mixed = audit(
        model,
        data,
        out=tmp_path / "mixed",
        shard_size=8,
        batch_size=4,
        quiet=True,
        report=False,
        engine="ray",
        actors=2,
        on_shard=written.append,
    )
    assert mixed.complete and mixed.resumed and mixed.images == local.images == 40
    assert sorted(written) == [2, 3, 4]  # the finished shards were not redone

    a, b = _table(tmp_path / "local"), _table(tmp_path / "mixed")
    assert a.column("position").to_pylist() == b.column("position").to_pylist() == list(range(40))
    assert a.column("predicted").to_pylist() == b.column("predicted").to_pylist()
    for column in ("map_true", "map_pred", "features", "probability", "top5_probability"):
        np.testing.assert_allclose(_matrix(a, column), _matrix(b, column), rtol=1e-5, atol=1e-6)
    assert [c.to_json(mixed.labels) for c in mixed.classes] == [c.to_json(local.labels) for c in local.classes]


@pytest.mark.slow
def test_a_killed_actor_loses_no_shard_and_every_image_is_stored_once(ray_cluster, tmp_path):
    from cnnscope.audit import model_identity
    from cnnscope.audit.ray_engine import run_ray

    model = _model()
    source = open_source(_data(48), model.labels)
    step = AuditStep(model, "gradcam")
    identity = {"model": model_identity(model), "method": step.identity(), "dataset": {"digest": source.digest}}
    store = Store(tmp_path / "killed", identity, total=len(source), shard_size=4)
    finished, workers, killed = [], [], []

    def kill_one(index, pid):
        finished.append(index)
        workers.append(pid)
        if not killed and pid != os.getpid():
            killed.append(pid)
            os.kill(pid, signal.SIGKILL)  # the actor that just delivered a shard, now working on the next one

    done = run_ray(source, store, step, batch_size=4, actors=2, quiet=True, on_result=kill_one)
    assert killed, "no actor was killed"
    assert done == 48 and not store.pending()
    assert sorted(finished) == list(range(12))  # every shard once
    table = _table(tmp_path / "killed")
    assert table.column("position").to_pylist() == list(range(48))  # every image once
    after = workers[finished.index(finished[-1]) :]
    assert any(pid != killed[0] for pid in after)  # the run went on without the dead process
