"""The ``VectorIndex`` on Qdrant Edge: Qdrant's own Rust engine embedded in this process (segments, WAL, HNSW,
payload indexes) instead of qdrant-client's local mode, which keeps every point in Python and searches by brute
force.

Edge has no collections and no aliases: one directory is one shard. Here a version is one shard directory
under ``<path>/collections/``, and the aliases live in ``<path>/aliases.json``, replaced atomically (write a
temporary file, then rename), so a reader sees the old target or the new one, never a half-written file.
A shard directory can be open in one process at a time (its WAL is locked); within a process every user shares
one open shard.

Edge builds no index on its own: points land in one appendable segment and search stays brute force until
``optimize()``. One build over the whole bulk load holds the segment's graph under construction beside
everything else (measured: 840 MB peak for 300,000 32-dim points, against 480 MB after the upsert), so the
load optimizes every ``index.segment_points`` points instead, and the segment size is capped at about that
many points, which keeps both the build and any later merge bounded by one segment.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from reembed.indexing.index import IndexError_, IndexSettings, Point

logger = logging.getLogger(__name__)

_OPEN: dict[str, list[Any]] = {}  # shard directory -> [EdgeShard, users]
_OPEN_LOCK = threading.Lock()
_PAGE = 10_000


def _acquire(folder: Path, config: Any | None = None) -> Any:
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
            _OPEN[key] = [shard, 0]
        _OPEN[key][1] += 1
        return _OPEN[key][0]


def _release(folder: Path, force: bool = False) -> None:
    key = str(folder.resolve())
    with _OPEN_LOCK:
        entry = _OPEN.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0 or force:
            entry[0].close()
            del _OPEN[key]


class EdgeIndex:
    """Versions as Qdrant Edge shard directories, the alias as a pointer file; same calls as ``QdrantIndex``."""

    def __init__(self, settings: IndexSettings) -> None:
        self.settings = settings
        self.root = Path(settings.path)
        (self.root / "collections").mkdir(parents=True, exist_ok=True)
        self._held: dict[str, Any] = {}  # collection -> open shard, released on close
        self._unindexed: dict[str, int] = {}  # collection -> points written since its last optimize()
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
        try:
            return json.loads(self._aliases_path().read_text())
        except FileNotFoundError:
            return {}

    def _resolve(self, name: str) -> str:
        """A collection name, or the collection an alias points at."""
        return self._aliases().get(name, name)

    def _shard(self, name: str) -> Any:
        collection = self._resolve(name)
        with self._lock:
            if collection not in self._held:
                if not self._dir(collection).exists():
                    raise IndexError_(f"collection {collection!r} does not exist in {self.where}")
                self._held[collection] = _acquire(self._dir(collection))
            return self._held[collection]

    def exists(self, name: str) -> bool:
        return self._meta_path(self._resolve(name)).exists()

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
            shard = self._held[name] = _acquire(folder, config)
        for field_name in ["doc_id", *(payload_indexes or [])]:
            shard.update(UpdateOperation.create_field_index(field_name, PayloadSchemaType.Keyword))
        shard.flush()
        tmp = self._meta_path(name).with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"dim": dim}))
        os.replace(tmp, self._meta_path(name))  # written last: a shard without it was never fully created

    def drop(self, name: str) -> None:
        with self._lock:
            held = self._held.pop(name, None)
        if held is not None:
            _release(self._dir(name), force=True)
        self._meta_path(name).unlink(missing_ok=True)
        shutil.rmtree(self._dir(name), ignore_errors=True)

    def alias_target(self, alias: str) -> str | None:
        return self._aliases().get(alias)

    def point_alias(self, alias: str, collection: str) -> None:
        """Move the alias by replacing the pointer file in one rename."""
        if not self.exists(collection):
            raise IndexError_(f"cannot point alias {alias!r} at missing collection {collection!r}")
        aliases = {**self._aliases(), alias: collection}
        tmp = self._aliases_path().with_suffix(".json.tmp")
        tmp.write_text(json.dumps(aliases, indent=2, sort_keys=True))
        os.replace(tmp, self._aliases_path())

    # --- points ------------------------------------------------------------------------------------------------

    def upsert(self, collection: str, ids: list[str], vectors: np.ndarray, payloads: list[dict[str, Any]]) -> int:
        from qdrant_edge import Point as EdgePoint
        from qdrant_edge import UpdateOperation

        name = self._resolve(collection)
        shard = self._shard(name)
        size = self.settings.upsert_batch
        for start in range(0, len(ids), size):
            shard.update(UpdateOperation.upsert_points([
                EdgePoint(id=i, vector=v.tolist(), payload=p)
                for i, v, p in zip(ids[start:start + size], vectors[start:start + size], payloads[start:start + size])
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
            shard.optimize()

    def delete_points(self, collection: str, ids: list[str], batch: int = 1000) -> None:
        from qdrant_edge import UpdateOperation

        shard = self._shard(collection)
        for start in range(0, len(ids), batch):
            shard.update(UpdateOperation.delete_points(ids[start:start + batch]))
        shard.flush()

    def scroll(self, name: str, fields: list[str] | None = None, with_vectors: bool = False) -> Iterator[Point]:
        from qdrant_edge import ScrollRequest

        shard = self._shard(name)
        offset = None
        while True:
            records, offset = shard.scroll(ScrollRequest(offset=offset, limit=_PAGE, with_payload=fields or False,
                                                         with_vector=with_vectors))
            for r in records:
                yield Point(str(r.id), _vector(r.vector) if with_vectors else None, dict(r.payload or {}))
            if offset is None:
                return

    def point_ids(self, collection: str) -> list[str]:
        return [p.id for p in self.scroll(collection)]

    def retrieve(self, name: str, ids: list[str]) -> list[Point]:
        return [Point(str(r.id), _vector(r.vector), dict(r.payload or {}))
                for r in self._shard(name).retrieve(ids, with_payload=True, with_vector=True)]

    def count(self, name: str) -> int:
        from qdrant_edge import CountRequest

        return int(self._shard(name).count(CountRequest(exact=True)))

    def finish_bulk_load(self, name: str) -> str:
        """Build the HNSW index once, after the bulk load: Edge searches by brute force until ``optimize()``."""
        shard = self._shard(name)
        shard.optimize()
        shard.flush()
        with self._lock:
            self._unindexed.pop(self._resolve(name), None)
        return "green"

    def search(self, name: str, vector: np.ndarray, k: int = 10, collapse: bool = False) -> list[dict[str, Any]]:
        """Top-k hits; with ``collapse``, the best chunk of each of the top-k documents (fetched wider until k
        distinct documents are found, or the collection runs out)."""
        from qdrant_edge import Query, QueryRequest, SearchParams

        shard = self._shard(name)
        query = Query.Nearest(vector.astype(np.float32).tolist())
        limit = k * 4 if collapse else k
        while True:
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
