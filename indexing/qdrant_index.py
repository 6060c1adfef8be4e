"""The Qdrant side: one client for local mode and servers alike, versioned collections behind an alias.

Point ids are UUIDv5 of the document id, so re-running an upsert overwrites instead of duplicating. Search
goes through the alias, which is what users and downstream services query.
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from qdrant_client import QdrantClient, models
from tenacity import retry, retry_if_exception, stop_after_attempt, wait_exponential

from reembed.indexing.index import IndexError_, IndexSettings, Point
from reembed.indexing.records import point_id

__all__ = ["IndexError_", "IndexSettings", "QdrantIndex", "point_id"]

logger = logging.getLogger(__name__)


def _transient(exc: BaseException) -> bool:
    name = type(exc).__name__
    return name in {"ResponseHandlingException", "ConnectError", "ReadTimeout", "TimeoutException"} or (
        name == "UnexpectedResponse" and getattr(exc, "status_code", 0) in (429, 500, 502, 503, 504)
    )


_retry = retry(
    retry=retry_if_exception(_transient), stop=stop_after_attempt(5), wait=wait_exponential(0.5, max=10), reraise=True
)


_LOCAL: dict[str, list[Any]] = {}  # resolved path -> [client, users]
_LOCAL_LOCK = threading.Lock()


def _open_local(path: str) -> QdrantClient:
    """One local-mode client per folder and process, shared by every user (a search loop beside a run, say).

    Local mode locks its folder against other processes; within a process, sharing the client is what lets a
    reader search through a backfill and alias swap.
    """
    key = str(Path(path).resolve())
    with _LOCAL_LOCK:
        if key not in _LOCAL:
            Path(key).mkdir(parents=True, exist_ok=True)
            try:
                _LOCAL[key] = [QdrantClient(path=key), 0]
            except RuntimeError as exc:
                raise IndexError_(
                    f"Qdrant local storage {key} is in use by another process "
                    f"(local mode allows one process at a time; run a Qdrant server for concurrent access): {exc}"
                ) from None
        _LOCAL[key][1] += 1
        return _LOCAL[key][0]


def _release_local(path: str) -> None:
    key = str(Path(path).resolve())
    with _LOCAL_LOCK:
        entry = _LOCAL.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            entry[0].close()
            del _LOCAL[key]


class QdrantIndex:
    """The ``VectorIndex`` on qdrant-client: a Qdrant server (``index.url``), or qdrant-client's local mode (a
    Python stand-in for the server API, kept for tests and tiny corpora)."""

    def __init__(self, settings: IndexSettings) -> None:
        self.settings = settings
        if settings.url:
            key = settings.api_key.get_secret_value() if settings.api_key else None
            self.client = QdrantClient(url=settings.url, api_key=key, timeout=settings.timeout)
        else:
            self.client = _open_local(settings.path)

    @property
    def where(self) -> str:
        return self.settings.where

    def close(self) -> None:
        if self.settings.url:
            self.client.close()
        else:
            _release_local(self.settings.path)

    def __enter__(self) -> "QdrantIndex":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @_retry
    def ensure_collection(self, name: str, dim: int, payload_indexes: list[str] | None = None) -> None:
        """Create the collection when missing; refuse to write into one of another dimension."""
        existing = self.resolve(name)
        if existing is not None:
            info = self.client.get_collection(existing)
            vectors = info.config.params.vectors
            size = vectors.size if isinstance(vectors, models.VectorParams) else None
            if size is not None and size != dim:
                raise IndexError_(f"collection {name!r} holds {size}-dim vectors but the model makes {dim}-dim ones")
            return
        quantization = None
        if self.settings.quantization == "scalar":
            quantization = models.ScalarQuantization(
                scalar=models.ScalarQuantizationConfig(type=models.ScalarType.INT8, always_ram=True))
        # Per Qdrant's bulk-upload guide: no HNSW building while points stream in, payload indexes first.
        self.client.create_collection(
            name,
            vectors_config=models.VectorParams(size=dim, distance=models.Distance.COSINE, on_disk=self.settings.on_disk),
            optimizers_config=models.OptimizersConfigDiff(indexing_threshold=0) if self.settings.bulk_load else None,
            quantization_config=quantization,
        )
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Payload indexes have no effect in the local Qdrant")
            for field_name in ["doc_id", *(payload_indexes or [])]:
                self.client.create_payload_index(name, field_name, field_schema=models.PayloadSchemaType.KEYWORD)

    def upsert(self, collection: str, ids: list[str], vectors: np.ndarray, payloads: list[dict[str, Any]]) -> int:
        """Write points (ids, [n, dim] vectors, payloads); returns how many. ``upload_points`` batches them by
        ``index.upsert_batch`` and retries failed batches against a server; it waits, so counts are exact."""
        points = [models.PointStruct(id=i, vector=v.tolist(), payload=p) for i, v, p in zip(ids, vectors, payloads)]
        self.client.upload_points(collection, points, batch_size=self.settings.upsert_batch, max_retries=5, wait=True)
        return len(points)

    @property
    def serial_writes(self) -> bool:
        """Local mode applies writes in-process and is not safe for concurrent writers; a server is."""
        return self.settings.resolved_engine == "local"

    def point_ids(self, collection: str) -> list[str]:
        """Every point id in the collection (ids only: no payloads, no vectors)."""
        return [p.id for p in self.scroll(collection)]

    @_retry
    def delete_points(self, collection: str, ids: list[str], batch: int = 1000) -> None:
        for start in range(0, len(ids), batch):
            self.client.delete(collection, points_selector=models.PointIdsList(points=ids[start : start + batch]),
                               wait=True)

    def finish_bulk_load(self, name: str) -> str:
        """Turn indexing back on after a bulk load and wait until the collection is green."""
        name = self.resolve(name) or name  # collection settings are changed on the collection, not an alias
        if self.settings.bulk_load:
            self.client.update_collection(
                name, optimizers_config=models.OptimizersConfigDiff(indexing_threshold=self.settings.indexing_threshold))
        deadline = time.monotonic() + self.settings.green_timeout
        while True:
            status = self.client.get_collection(name).status
            if status == models.CollectionStatus.GREEN:
                return str(status.value)
            if status == models.CollectionStatus.RED:
                raise IndexError_(f"collection {name} turned red while indexing after the bulk load")
            if time.monotonic() > deadline:
                raise IndexError_(f"collection {name} not green after {self.settings.green_timeout}s (status {status})")
            time.sleep(1)

    def count(self, name: str) -> int:
        return self.client.count(name, exact=True).count

    def exists(self, name: str) -> bool:
        return self.resolve(name) is not None

    def resolve(self, name: str) -> str | None:
        """The collection ``name`` is (the target of an alias of that name, or a collection), or None."""
        target = self.alias_target(name)
        if target is not None:
            return target if self.client.collection_exists(target) else None
        return name if self.client.collection_exists(name) else None

    def collections(self) -> list[str]:
        return sorted(c.name for c in self.client.get_collections().collections)

    def aliases(self) -> dict[str, str]:
        return {a.alias_name: a.collection_name for a in self.client.get_aliases().aliases}

    def drop(self, name: str) -> None:
        """Remove the physical collection ``name`` (Qdrant removes the aliases that pointed at it)."""
        self.client.delete_collection(name)

    def dim(self, name: str) -> int | None:
        resolved = self.resolve(name)
        if resolved is None:
            return None
        vectors = self.client.get_collection(resolved).config.params.vectors
        return vectors.size if isinstance(vectors, models.VectorParams) else None

    def scroll(self, name: str, fields: list[str] | None = None, with_vectors: bool = False,
               page: int = 10_000) -> Iterator[Point]:
        """Every point of ``name`` (a collection or an alias), with the chosen payload fields."""
        offset = None
        while True:
            points, offset = self.client.scroll(name, limit=page, offset=offset, with_payload=fields or False,
                                                with_vectors=with_vectors)
            for p in points:
                yield Point(str(p.id), np.asarray(p.vector, dtype=np.float32) if with_vectors else None,
                            p.payload or {})
            if offset is None:
                return

    def retrieve(self, name: str, ids: list[str]) -> list[Point]:
        return [Point(str(p.id), np.asarray(p.vector, dtype=np.float32), p.payload or {})
                for p in self.client.retrieve(name, ids, with_vectors=True, with_payload=True)]

    def alias_target(self, alias: str) -> str | None:
        return self.aliases().get(alias)

    def point_alias(self, alias: str, collection: str) -> None:
        self.point_aliases({alias: collection})

    def point_aliases(self, targets: dict[str, str]) -> None:
        """Move every alias in ``targets`` in one atomic alias update (delete + create each), each to the
        physical collection its target names (a server does not let an alias point at an alias)."""
        current = self.aliases()
        actions: list[Any] = []
        for alias, name in targets.items():
            collection = self.resolve(name)
            if collection is None:
                raise IndexError_(f"cannot point alias {alias!r} at missing collection {name!r}")
            if alias in current:
                actions.append(models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=alias)))
            actions.append(models.CreateAliasOperation(
                create_alias=models.CreateAlias(collection_name=collection, alias_name=alias)))
        self.client.update_collection_aliases(change_aliases_operations=actions)

    def remove_alias(self, alias: str) -> None:
        if alias in self.aliases():
            self.client.update_collection_aliases(change_aliases_operations=[
                models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=alias))])

    def set_aside_damaged_aliases(self) -> str | None:
        """Qdrant keeps its own aliases (server, local mode): there is no file of reembed's to repair."""
        return None

    def search(self, name: str, vector: np.ndarray, k: int = 10, collapse: bool = False) -> list[dict[str, Any]]:
        """Top-k hits; with ``collapse``, the best chunk of each of the top-k documents."""
        query = vector.astype(np.float32).tolist()
        params = models.SearchParams(hnsw_ef=self.settings.search_ef)
        if collapse:
            groups = self.client.query_points_groups(name, query=query, group_by="doc_id", limit=k, group_size=1,
                                                     with_payload=True, search_params=params).groups
            hits = [g.hits[0] for g in groups if g.hits]
        else:
            hits = self.client.query_points(name, query=query, limit=k, with_payload=True,
                                            search_params=params).points
        return [{"id": str(h.id), "score": float(h.score), **(h.payload or {})} for h in hits]
