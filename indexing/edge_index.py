"""The ``VectorIndex`` on Qdrant Edge: Qdrant's own Rust engine embedded in this process (segments, WAL, HNSW,
payload indexes) instead of qdrant-client's local mode, which keeps every point in Python and searches by brute
force.

Edge has no collections and no aliases: one directory is one shard. Here a collection is one shard directory
under ``<path>/collections/``, and the aliases (a job's alias, and version aliases from a version to the
generation rebuilt beside it) live in ``<path>/aliases.json``, replaced atomically (write a temporary file, then
rename), so a reader sees the old target or the new one, never a half-written file. A shard directory can be
open in one process at a time (its WAL is locked); within a process every user shares one open shard, and a
drop waits for the calls in flight on it, so a search that resolved the alias just before a swap still
finishes.

Edge builds no index on its own: points land in one appendable segment and search stays brute force until
``optimize()``. One build over the whole bulk load holds the segment's graph under construction beside
everything else (measured: 840 MB peak for 300,000 32-dim points, against 480 MB after the upsert), so the
load optimizes every ``index.segment_points`` points instead, and the segment size is capped at about that
many points, which keeps both the build and any later merge bounded by one segment.
"""

from __future__ import annotations

import fcntl
import json
import logging
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from reembed.indexing.index import AliasFileDamaged, IndexError_, IndexSettings, Point
from reembed.indexing.storage import write_local_atomic

logger = logging.getLogger(__name__)

class _Handle:
    """The process's one open shard of a directory, how many ``EdgeIndex`` objects hold it, and how many calls
    are inside it right now (a drop waits for those, so a search never meets a shard closed under it)."""

    def __init__(self, shard: Any) -> None:
        self.shard = shard
        self.users = 0
        self.busy = 0
        self.closed = False


_OPEN: dict[str, _Handle] = {}  # shard directory -> its handle
_OPEN_LOCK = threading.Condition()
_PAGE = 10_000
_DROP_WAIT_S = 30.0  # a drop waits this long for calls in flight on the shard before closing it anyway


def _acquire(folder: Path, config: Any | None = None) -> _Handle:
    """The process's one open handle on a shard directory (created with ``config`` when given)."""
    from qdrant_edge import EdgeShard

    key = str(folder.resolve())
    with _OPEN_LOCK:
        if key not in _OPEN:
            try:
                shard = EdgeShard.create(key, config) if config is not None else EdgeShard.load(key)
            except Exception as exc:  # the binding raises plain Exception; a locked WAL is the common cause
                if "WouldBlock" in str(exc) or "WAL" in str(exc):
                    raise IndexError_(
                        f"Qdrant Edge storage {key} is in use by another process (an embedded shard opens in one "
                        f"process at a time; stop the other reembed, or run a Qdrant server for concurrent "
                        f"access): {exc}") from None
                raise IndexError_(f"cannot open Qdrant Edge shard {key}: {exc}") from None
            _OPEN[key] = _Handle(shard)
        _OPEN[key].users += 1
        return _OPEN[key]


def _release(folder: Path) -> None:
    key = str(folder.resolve())
    with _OPEN_LOCK:
        entry = _OPEN.get(key)
        if entry is None:
            return
        entry.users -= 1
        if entry.users <= 0:
            entry.closed = True
            entry.shard.close()
            del _OPEN[key]


def _close_for_drop(folder: Path) -> None:
    """Close the shard for good once the calls in flight on it have returned (new calls re-resolve their name)."""
    key = str(folder.resolve())
    with _OPEN_LOCK:
        entry = _OPEN.pop(key, None)
        if entry is None:
            return
        entry.closed = True
        if not _OPEN_LOCK.wait_for(lambda: entry.busy == 0, timeout=_DROP_WAIT_S):
            logger.warning("dropping %s with %d call(s) still in it after %.0f s", key, entry.busy, _DROP_WAIT_S)
        entry.shard.close()


class EdgeIndex:
    """Versions as Qdrant Edge shard directories, the alias as a pointer file; same calls as ``QdrantIndex``."""

    def __init__(self, settings: IndexSettings) -> None:
        self.settings = settings
        self.root = Path(settings.path)
        (self.root / "collections").mkdir(parents=True, exist_ok=True)
        self._held: dict[str, _Handle] = {}  # collection -> open shard, released on close
        self._unindexed: dict[str, int] = {}  # collection -> points written since its last optimize()
        # collection -> seconds spent building its HNSW index (every optimize(), during the load or after it),
        # so a benchmark can tell the upserts from the builds that happen inside them
        self.build_seconds: dict[str, float] = {}
        self._lock = threading.Lock()

    @property
    def where(self) -> str:
        return f"edge:{self.settings.path}"

    @property
    def serial_writes(self) -> bool:
        return True  # one process owns the shard; upserts go through it one at a time

    def close(self) -> None:
        with self._lock:
            held, self._held = self._held, {}
        for name in held:
            _release(self._dir(name))

    def __enter__(self) -> "EdgeIndex":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- versions and the alias -------------------------------------------------------------------------------

    def _dir(self, name: str) -> Path:
        return self.root / "collections" / name

    def _meta_path(self, name: str) -> Path:
        return self.root / "collections" / f"{name}.json"

    def _aliases_path(self) -> Path:
        return self.root / "aliases.json"

    def _aliases(self) -> dict[str, str]:
        path = self._aliases_path()
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            folder = self.root / "collections"
            names = sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
            raise AliasFileDamaged(
                f"Qdrant Edge alias file {path} is damaged ({exc}); it maps each alias to a collection folder "
                f"under {folder} ({', '.join(names) or 'none'}). Repair: `reembed rollback JOB VERSION` sets the "
                f"damaged file aside and points JOB's alias at VERSION (one of those folders); do it for each "
                f"job that shares this index.path") from None

    def set_aside_damaged_aliases(self) -> str | None:
        """When the alias file does not parse, rename it aside (``aliases.json.damaged-<time>``) so a new one
        can be written; returns where it went, or None when it was fine (or absent)."""
        with open(self.root / "aliases.lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                self._aliases()
                return None
            except AliasFileDamaged:
                path = self._aliases_path()
                aside = path.with_name(f"{path.name}.damaged-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}")
                path.rename(aside)
                logger.warning("set the damaged alias file %s aside as %s; aliases it held must be pointed again",
                               path, aside)
                return str(aside)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _resolve(self, name: str) -> str:
        """A collection name, or the collection an alias points at."""
        return self._aliases().get(name, name)

    def resolve(self, name: str) -> str | None:
        collection = self._resolve(name)
        return collection if self._present(collection) else None

    def collections(self) -> list[str]:
        return sorted(p.name[:-len(".json")] for p in (self.root / "collections").glob("*.json"))

    def aliases(self) -> dict[str, str]:
        return dict(self._aliases())

    @contextmanager
    def _using(self, name: str) -> Iterator[tuple[str, Any]]:
        """The physical collection behind ``name`` and its open shard, counted as in use until the block ends."""
        for _ in range(3):
            collection = self._resolve(name)
            with self._lock:
                entry = self._held.get(collection)
                if entry is None or entry.closed:
                    if not self._dir(collection).exists():
                        raise IndexError_(f"collection {collection!r} does not exist in {self.where}")
                    entry = self._held[collection] = _acquire(self._dir(collection))
            with _OPEN_LOCK:
                if entry.closed:  # dropped between resolving and entering: resolve the name again
                    continue
                entry.busy += 1
            break
        else:
            raise IndexError_(f"collection {name!r} was dropped while in use in {self.where}")
        try:
            yield collection, entry.shard
        finally:
            with _OPEN_LOCK:
                entry.busy -= 1
                _OPEN_LOCK.notify_all()

    def exists(self, name: str) -> bool:
        return self._present(self._resolve(name))

    def _present(self, collection: str) -> bool:
        """Whether a physical collection is there: its meta file (written last when it was created) and its
        shard folder; nothing is loaded, so the check costs the same at any size."""
        return self._meta_path(collection).exists() and self._dir(collection).is_dir()

    def dim(self, name: str) -> int | None:
        try:
            return int(json.loads(self._meta_path(self._resolve(name)).read_text())["dim"])
        except FileNotFoundError:
            return None

    def ensure_collection(self, name: str, dim: int, payload_indexes: list[str] | None = None) -> None:
        """Create the shard when missing; refuse to write into one of another dimension."""
        from qdrant_edge import (Distance, EdgeConfig, EdgeOptimizersConfig, EdgeVectorParams, PayloadSchemaType,
                                 ScalarQuantizationConfig, ScalarType, UpdateOperation)

        if self.exists(name):
            size = self.dim(name)
            if size != dim:
                raise IndexError_(f"collection {name!r} holds {size}-dim vectors but the model makes {dim}-dim ones")
            return
        folder = self._dir(name)
        if folder.exists():  # a shard whose creation died before its meta file: start it again
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        quantization = (ScalarQuantizationConfig(type=ScalarType.Int8, always_ram=True)
                        if self.settings.quantization == "scalar" else None)
        segment_kb = _segment_kb(self.settings.segment_points, dim)  # a tenth of a segment or more gets its HNSW
        config = EdgeConfig(vectors=EdgeVectorParams(size=dim, distance=Distance.Cosine, on_disk=self.settings.on_disk),
                            quantization_config=quantization,
                            optimizers=EdgeOptimizersConfig(max_segment_size=segment_kb,
                                                            indexing_threshold=max(1, segment_kb // 10)))
        with self._lock:
            entry = self._held[name] = _acquire(folder, config)
        shard = entry.shard
        for field_name in ["doc_id", *(payload_indexes or [])]:
            shard.update(UpdateOperation.create_field_index(field_name, PayloadSchemaType.Keyword))
        shard.flush()
        # written last: a shard without it was never fully created
        write_local_atomic(self._meta_path(name), json.dumps({"dim": dim}).encode())

    def drop(self, name: str) -> None:
        """Remove the physical collection ``name`` (never resolved through an alias), once calls in it returned,
        and the aliases that pointed at it (as a Qdrant server does)."""
        with self._aliases_locked() as aliases:
            for alias in [a for a, target in aliases.items() if target == name]:
                del aliases[alias]
        with self._lock:
            self._held.pop(name, None)
        _close_for_drop(self._dir(name))
        self._meta_path(name).unlink(missing_ok=True)
        shutil.rmtree(self._dir(name), ignore_errors=True)

    def alias_target(self, alias: str) -> str | None:
        return self._aliases().get(alias)

    def point_alias(self, alias: str, collection: str) -> None:
        self.point_aliases({alias: collection})

    def point_aliases(self, targets: dict[str, str]) -> None:
        """Move every alias in ``targets`` at once, by replacing the pointer file in one rename."""
        with self._aliases_locked() as aliases:
            for alias, name in targets.items():
                collection = self.resolve(name)
                if collection is None:
                    raise IndexError_(f"cannot point alias {alias!r} at missing collection {name!r}")
                aliases[alias] = collection

    def remove_alias(self, alias: str) -> None:
        with self._aliases_locked() as aliases:
            aliases.pop(alias, None)

    @contextmanager
    def _aliases_locked(self) -> Iterator[dict[str, str]]:
        """Read, change and rewrite ``aliases.json`` under an exclusive lock (``aliases.lock``, flock): two jobs
        that share ``index.path`` (each under its own lease) never lose each other's alias move. The file is
        rewritten only when the block changed it."""
        with open(self.root / "aliases.lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                aliases = self._aliases()
                before = dict(aliases)
                yield aliases
                if aliases != before:
                    write_local_atomic(self._aliases_path(),
                                       json.dumps(aliases, indent=2, sort_keys=True).encode())
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    # --- points ------------------------------------------------------------------------------------------------

    def upsert(self, collection: str, ids: list[str], vectors: np.ndarray, payloads: list[dict[str, Any]]) -> int:
        from qdrant_edge import Point as EdgePoint
        from qdrant_edge import UpdateOperation

        size = self.settings.upsert_batch
        with self._using(collection) as (name, shard):
            for start in range(0, len(ids), size):
                shard.update(UpdateOperation.upsert_points([
                    EdgePoint(id=i, vector=v.tolist(), payload=p)
                    for i, v, p in zip(ids[start:start + size], vectors[start:start + size],
                                       payloads[start:start + size])
                ]))
                self._optimize_when_due(name, shard, min(size, len(ids) - start))
            shard.flush()
        return len(ids)

    def _optimize_when_due(self, name: str, shard: Any, written: int) -> None:
        """Optimize collection ``name`` once a segment's worth of points has been written since the last time."""
        with self._lock:
            self._unindexed[name] = self._unindexed.get(name, 0) + written
            due = self._unindexed[name] >= self.settings.segment_points
            if due:
                self._unindexed[name] = 0
        if due:
            logger.debug("building the HNSW index of %s's latest %d points", name, self.settings.segment_points)
            self._optimize(name, shard)

    def _optimize(self, name: str, shard: Any) -> None:
        started = time.perf_counter()
        shard.optimize()
        with self._lock:
            self.build_seconds[name] = self.build_seconds.get(name, 0.0) + time.perf_counter() - started

    def delete_points(self, collection: str, ids: list[str], batch: int = 1000) -> None:
        from qdrant_edge import UpdateOperation

        with self._using(collection) as (_, shard):
            for start in range(0, len(ids), batch):
                shard.update(UpdateOperation.delete_points(ids[start:start + batch]))
            shard.flush()

    def scroll(self, name: str, fields: list[str] | None = None, with_vectors: bool = False) -> Iterator[Point]:
        from qdrant_edge import ScrollRequest

        offset = None
        while True:
            with self._using(name) as (_, shard):  # page by page: a drop never waits on a paused reader
                records, offset = shard.scroll(ScrollRequest(offset=offset, limit=_PAGE,
                                                             with_payload=fields or False, with_vector=with_vectors))
            for r in records:
                yield Point(str(r.id), _vector(r.vector) if with_vectors else None, dict(r.payload or {}))
            if offset is None:
                return

    def point_ids(self, collection: str) -> list[str]:
        return [p.id for p in self.scroll(collection)]

    def retrieve(self, name: str, ids: list[str]) -> list[Point]:
        with self._using(name) as (_, shard):
            records = shard.retrieve(ids, with_payload=True, with_vector=True)
        return [Point(str(r.id), _vector(r.vector), dict(r.payload or {})) for r in records]

    def count(self, name: str) -> int:
        from qdrant_edge import CountRequest

        with self._using(name) as (_, shard):
            return int(shard.count(CountRequest(exact=True)))

    def shard_info(self, name: str) -> Any:
        """Edge's own view of the shard behind ``name`` (segments, indexed vectors): for tests and benchmarks."""
        with self._using(name) as (_, shard):
            return shard.info()

    def finish_bulk_load(self, name: str) -> str:
        """Build the HNSW index once, after the bulk load: Edge searches by brute force until ``optimize()``."""
        with self._using(name) as (collection, shard):
            self._optimize(collection, shard)
            shard.flush()
        with self._lock:
            self._unindexed.pop(collection, None)
        return "green"

    def search(self, name: str, vector: np.ndarray, k: int = 10, collapse: bool = False) -> list[dict[str, Any]]:
        """Top-k hits; with ``collapse``, the best chunk of each of the top-k documents (fetched wider until k
        distinct documents are found, or the collection runs out)."""
        from qdrant_edge import Query, QueryRequest, SearchParams

        query = Query.Nearest(vector.astype(np.float32).tolist())
        limit = k * 4 if collapse else k
        while True:
            with self._using(name) as (_, shard):
                hits = shard.query(QueryRequest(limit=limit, query=query, with_payload=True,
                                                params=SearchParams(hnsw_ef=max(self.settings.search_ef, limit))))
            if not collapse:
                break
            best: dict[Any, Any] = {}
            for h in hits:
                best.setdefault((h.payload or {}).get("doc_id"), h)
            if len(best) >= k or len(hits) < limit:
                hits = list(best.values())[:k]
                break
            limit *= 4
        return [{"id": str(h.id), "score": float(h.score), **(h.payload or {})} for h in hits]


def _segment_kb(points: int, dim: int) -> int:
    """Qdrant's ``max_segment_size`` is in kilobytes of float32 vectors; this is ``points`` of them."""
    return max(1, points * dim * 4 // 1024)


def _vector(value: Any) -> np.ndarray:
    if isinstance(value, dict):  # the default (unnamed) vector
        value = value.get("", next(iter(value.values())))
    return np.asarray(value, dtype=np.float32)
