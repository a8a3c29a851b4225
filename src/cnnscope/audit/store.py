"""The results store: Parquet shards written as the audit goes, and a JSON manifest that makes it resumable.

Layout of an audit folder::

    OUT/manifest.json             what was audited (model, method, options, dataset) and the finished shards
    OUT/shards/shard-00000.parquet  one row per image of positions [0, shard_size), and so on
    OUT/report.html               written at the end (cnnscope.audit.report)

Shard ``i`` holds the images at positions ``[i * shard_size, (i + 1) * shard_size)`` of the source's fixed
order (minus the unreadable ones, which the manifest lists under the shard's ``skipped``). A shard is written
to a temporary name and renamed into place, then the manifest (also written to a temporary name and renamed)
records it as finished: a process killed at any moment leaves either a finished shard the manifest names or
nothing that counts, so a resumed run redoes only the shard that was in progress. The manifest's identity
(model fingerprint, method, layer, options, dataset digest, map size) must match for a run to resume; any
difference is refused with a message naming it.

Nothing here needs cnnscope to read: ``pyarrow.parquet.read_table("OUT/shards")``, ``pandas.read_parquet``
or DuckDB's ``read_parquet('OUT/shards/*.parquet')`` see one table.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from ..io import write_atomically

FORMAT = "cnnscope-audit/1"
MANIFEST = "manifest.json"
SHARDS = "shards"


def require_pyarrow():
    """``pyarrow`` and ``pyarrow.parquet``, or the one-line error saying how to install them."""
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise InputError("the audit needs pyarrow and scikit-learn: pip install 'cnnscope[audit]'") from None
    return pyarrow, pyarrow.parquet


@dataclass(frozen=True)
class Shard:
    """Positions ``start`` to ``stop`` (exclusive) of the source, stored in ``path``."""

    index: int
    start: int
    stop: int
    path: Path


class Store:
    """An audit folder: ``open`` it with the run's identity, write shards, read them back.

    Args:
        out: the folder (created if needed).
        identity: what makes two runs the same audit (model, method, dataset, ...); compared key by key.
        total: number of source positions; shard_size: positions per shard (a resumed run keeps the
            folder's own).
        resume: continue a compatible run found in ``out`` (True), or discard its manifest and shards
            and start again (False). A run with a different identity is refused either way, unless
            ``resume`` is False.
        extra: more facts for the manifest (class names, problems found before the run).
    """

    def __init__(
        self,
        out: str | os.PathLike,
        identity: dict,
        *,
        total: int,
        shard_size: int,
        resume: bool = True,
        extra: dict | None = None,
    ) -> None:
        if shard_size < 1:
            raise InputError(f"shard_size must be at least 1, got {shard_size}")
        self.root = Path(out)
        if self.root.exists() and not self.root.is_dir():
            raise InputError(f"--out '{self.root}' is a file; give a folder for the audit")
        self.shard_dir = self.root / SHARDS
        self.manifest_path = self.root / MANIFEST
        self.shard_dir.mkdir(parents=True, exist_ok=True)
        previous = self._read_manifest()
        self.resumed = False
        if previous is not None and resume:
            self._check_same(previous, identity)
            self.manifest = previous
            self.resumed = bool(previous["shards"])
        else:
            if previous is not None:
                self._clear()
            self.manifest = {
                "format": FORMAT,
                "identity": identity,
                "total": total,
                "shard_size": shard_size,
                "shards": {},
                "complete": False,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
        self.manifest.update(extra or {})
        self._save()

    # -- identity ---------------------------------------------------------------------------------
    def _read_manifest(self) -> dict | None:
        if not self.manifest_path.exists():
            return None
        try:
            manifest = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InputError(
                f"'{self.manifest_path}' cannot be read ({exc}); remove it or choose another --out"
            ) from None
        if manifest.get("format") != FORMAT:
            raise InputError(
                f"'{self.root}' holds a {manifest.get('format', 'foreign')!r} folder, not a {FORMAT} audit; "
                "choose another --out"
            )
        return manifest

    def _check_same(self, previous: dict, identity: dict) -> None:
        before = previous["identity"]
        for key in identity:
            if before.get(key) != identity[key]:
                raise InputError(
                    f"'{self.root}' holds an audit with another {key} ({_describe(before.get(key))}; this run: "
                    f"{_describe(identity[key])}); choose another --out, or --restart to replace it"
                )

    def _clear(self) -> None:
        for path in self.shard_dir.glob("shard-*.parquet"):
            path.unlink()
        self.manifest_path.unlink(missing_ok=True)

    def _save(self) -> None:
        write_atomically(self.manifest_path, json.dumps(self.manifest, indent=1).encode("utf-8"))

    # -- shards -----------------------------------------------------------------------------------
    @property
    def shard_size(self) -> int:
        return int(self.manifest["shard_size"])

    @property
    def total(self) -> int:
        return int(self.manifest["total"])

    def shards(self) -> list[Shard]:
        """Every shard of the run, finished or not, in order."""
        size, total = self.shard_size, self.total
        return [
            Shard(i, start, min(total, start + size), self.shard_dir / f"shard-{i:05d}.parquet")
            for i, start in enumerate(range(0, total, size))
        ]

    def is_finished(self, shard: Shard) -> bool:
        return str(shard.index) in self.manifest["shards"] and shard.path.exists()

    def pending(self) -> list[Shard]:
        """The shards still to do (a finished shard whose file went missing is done again)."""
        return [shard for shard in self.shards() if not self.is_finished(shard)]

    def write(self, shard: Shard, table, skipped: Sequence[dict]) -> None:
        """Store ``shard``'s rows (a pyarrow Table) and the images it skipped, then mark it finished."""
        _, parquet = require_pyarrow()
        temporary = shard.path.with_name(f".{shard.path.name}.tmp")
        parquet.write_table(table, temporary, compression="zstd")
        os.replace(temporary, shard.path)
        self.manifest["shards"][str(shard.index)] = {
            "file": f"{SHARDS}/{shard.path.name}",
            "start": shard.start,
            "stop": shard.stop,
            "rows": table.num_rows,
            "skipped": list(skipped),
        }
        self._save()

    def finished_paths(self) -> list[Path]:
        return [shard.path for shard in self.shards() if self.is_finished(shard)]

    def skipped(self) -> list[dict]:
        """Every image skipped so far, in source order: ``{"path", "reason"}``."""
        entries = [self.manifest["shards"][key] for key in sorted(self.manifest["shards"], key=int)]
        return [item for entry in entries for item in entry["skipped"]]

    def rows(self) -> int:
        return sum(entry["rows"] for entry in self.manifest["shards"].values())

    def batches(self, columns: Sequence[str] | None = None) -> Iterator:
        """The finished shards as pyarrow Tables (only ``columns``), one at a time, in source order."""
        _, parquet = require_pyarrow()
        for path in self.finished_paths():
            yield parquet.read_table(path, columns=list(columns) if columns is not None else None)

    def finish(self, **facts) -> None:
        """Mark the run complete, with summary ``facts`` in the manifest."""
        self.manifest.update(facts)
        self.manifest["complete"] = not self.pending()
        self._save()


def _describe(value: object) -> str:
    if isinstance(value, dict):
        parts = [f"{k}={str(v)[:12] if k in ('fingerprint', 'digest') else v}" for k, v in value.items()]
        return ", ".join(parts) or json.dumps(value)
    return str(value)
