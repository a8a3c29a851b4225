"""The Ray engine: the audit's step run by a Ray Data actor pool, one results-store shard per block.

    cnnscope audit data/ --engine ray                       # a local Ray on this machine's CPUs
    cnnscope audit data/ --engine ray --address auto        # the cluster this machine belongs to
    cnnscope audit data/ --engine ray --address ray://head:10001 --actors 8 --gpus 1

How it runs: the pending shards of the :class:`~cnnscope.audit.store.Store` (the same shards as the local
engine, so a run started with one engine resumes with the other) become a Ray Dataset of one row per shard,
in one block per shard. ``map_batches`` sends each block to an actor of a pool; each actor unpickles the model
once (``ray.put`` ships it to the object store a single time), builds the same
:class:`~cnnscope.audit.engine.AuditStep` as the local engine from the step's ``spec``, reads its shard's
images in the same batches as the local engine (so the predictions and maps are the same, to float
rounding), and returns the shard's records as Parquet bytes. The driver writes each returned shard into the
store and marks it finished in the manifest at once, in the order the shards finish: the workers never need
to see the driver's disk (a cluster's nodes do not share it).

Faults: Ray Data starts the pool's actors with unlimited restarts and task retries (its default), so a worker
process that dies (killed, out of memory, a lost node) is replaced and its shard is done again by another
attempt; a shard counts only when the driver has written it, so a finished shard is never lost and every
image is stored once. If the driver itself dies, the next run resumes from the manifest like the local engine.

On a cluster with GPUs, give ``--gpus 1`` (``num_gpus`` per actor): each actor then holds its copy of the model
on its GPU; ``--actors`` caps the pool (default: the cluster's CPUs, or its GPUs divided by ``--gpus``). The
images are read by the actors, so their paths must be readable on every node (a shared file system, or an
object store mounted at the same path).
"""

from __future__ import annotations

import io
import json
import os

import numpy as np

from ..errors import InputError
from ..progress import Progress, check_cancelled

__all__ = ["ShardWorker", "require_ray", "run_ray"]

#: Object store size of a local Ray started by cnnscope (bytes): shards are small, the model is put once.
LOCAL_OBJECT_STORE = 256 * 1024 * 1024


def require_ray():
    """``ray`` with ``ray.data``, or the one-line error saying how to install it."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise InputError("--engine ray needs Ray: pip install 'cnnscope[ray]'") from None
    return ray


class ShardWorker:
    """One actor of the pool: the model (unpickled once per actor) and the audit step built next to it.
    Called with a batch of shard descriptors (index, start, stop), it returns each shard's records as
    Parquet bytes and the images it skipped (JSON)."""

    def __init__(self, refs: list, spec: dict, batch_size: int, workers: int, gpus: float = 0.0) -> None:
        import ray
        import torch

        from .engine import AuditStep

        model, source = ray.get(refs)
        if gpus and torch.cuda.is_available():  # this actor's own copy of the model goes to its GPU
            model.module.to("cuda")
        self.source = source
        self.step = AuditStep(model, **spec)
        self.batch_size = batch_size
        self.workers = workers

    def __call__(self, batch: dict) -> dict:
        import pyarrow.parquet as parquet

        from .engine import read_batches
        from .records import to_table

        out: dict[str, list] = {"index": [], "table": [], "skipped": [], "pid": []}
        for index, start, stop in zip(batch["index"], batch["start"], batch["stop"], strict=True):
            parts, skipped, notes = [], [], []
            for loaded, skipped_here, notes_here in read_batches(
                self.source, int(start), int(stop), self.batch_size, self.workers
            ):
                skipped.extend(skipped_here)
                notes.extend(notes_here)
                if loaded:
                    parts.append(self.step(loaded))
            buffer = io.BytesIO()
            parquet.write_table(to_table(parts, self.step.map_size), buffer, compression="zstd")
            out["index"].append(int(index))
            out["table"].append(buffer.getvalue())
            out["skipped"].append(json.dumps(skipped + [{**n, "kind": "note"} for n in notes]))
            out["pid"].append(os.getpid())
        return {
            "index": np.array(out["index"], dtype=np.int64),
            "table": np.array(out["table"], dtype=object),
            "skipped": np.array(out["skipped"], dtype=object),
            "pid": np.array(out["pid"], dtype=np.int64),
        }


def _start(ray, address: str | None, quiet: bool) -> bool:
    """Connect to ``address`` or start a local Ray; True when this call started it (and must stop it)."""
    if ray.is_initialized():
        return False
    settings = {}  # a cluster keeps its own settings (Ray Client forwards every keyword to the server's init)
    if address is None:
        settings = {
            "num_cpus": os.cpu_count() or 1,
            "object_store_memory": LOCAL_OBJECT_STORE,
            "include_dashboard": False,
            "log_to_driver": not quiet,
            "logging_level": "ERROR",
        }
    try:
        ray.init(address=address, **settings)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"the Ray cluster at '{address}'" if address else "a local Ray"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"cannot start or reach {where} ({first}); check --address (ray status shows it)") from None
    return True


def pool_size(ray, pending: int, actors: int | None, gpus: float) -> int:
    """Actors in the pool: ``actors`` if given, else one per CPU (or per ``gpus`` GPUs), never more than the
    pending shards."""
    if actors is not None:
        if actors < 1:
            raise InputError(f"--actors must be at least 1, got {actors}")
        return max(1, min(actors, pending))
    resources = ray.cluster_resources()
    if gpus > 0:
        available = int(resources.get("GPU", 0) // gpus)
        if available < 1:
            raise InputError(f"--gpus {gpus} per actor, but the Ray cluster has {resources.get('GPU', 0)} GPUs")
    else:
        available = int(resources.get("CPU", 1))
    return max(1, min(available, pending))


def run_ray(
    source,
    store,
    step,
    *,
    batch_size: int = 32,
    workers: int = 2,
    quiet: bool = False,
    on_shard=None,
    address: str | None = None,
    actors: int | None = None,
    num_gpus: float = 0.0,
    cpus_per_actor: float = 1.0,
    on_result=None,
) -> int:
    """Run ``step`` over the pending shards of ``store`` on a Ray actor pool (see the module's docstring).
    Returns the number of images explained in this run. ``on_shard(index)`` is called after each shard is
    written; ``on_result(index, pid)`` too, with the actor process that did it (for tests and logs)."""
    import pyarrow as pa
    import pyarrow.parquet as parquet

    ray = require_ray()
    if num_gpus < 0:
        raise InputError(f"--gpus must be 0 or more, got {num_gpus}")
    pending = store.pending()
    if not pending:
        return 0
    started = _start(ray, address, quiet)
    try:
        from ray.data import DataContext

        context = DataContext.get_current()
        context.enable_progress_bars = False
        context.print_on_execution_start = False
        size = pool_size(ray, len(pending), actors, num_gpus)
        refs = [ray.put(step.model), ray.put(source)]
        shards = {shard.index: shard for shard in pending}
        items = [{"index": s.index, "start": s.start, "stop": s.stop} for s in pending]
        dataset = ray.data.from_items(items, override_num_blocks=len(items))
        results = dataset.map_batches(
            ShardWorker,
            batch_size=1,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=size),
            num_cpus=cpus_per_actor,
            num_gpus=num_gpus or None,
            fn_constructor_kwargs={
                "refs": refs,
                "spec": step.spec,
                "batch_size": batch_size,
                "workers": workers,
                "gpus": num_gpus,
            },
        )  # Ray Data's actor pools restart dead actors and retry their tasks without limit by default
        progress = Progress(sum(s.stop - s.start for s in pending), "auditing (ray)", quiet=quiet)
        done = 0
        try:
            for batch in results.iter_batches(batch_size=1, batch_format="numpy", prefetch_batches=0):
                check_cancelled()
                for index, payload, skipped, pid in zip(
                    batch["index"], batch["table"], batch["skipped"], batch["pid"], strict=True
                ):
                    shard = shards[int(index)]
                    if store.is_finished(shard):  # a retried block that had already come back: stored once
                        continue
                    table = parquet.read_table(pa.BufferReader(bytes(payload)))
                    store.write(shard, table, json.loads(skipped))
                    done += table.num_rows
                    progress.update(shard.stop - shard.start)
                    if on_shard is not None:
                        on_shard(shard.index)
                    if on_result is not None:
                        on_result(shard.index, int(pid))
        finally:
            progress.close()
        return done
    finally:
        if started:
            ray.shutdown()
