"""The one narrow interface between the flow and a vector index, its settings, and the factory that picks an engine.

Two implementations sit behind it: ``EdgeIndex`` (Qdrant Edge, Qdrant's own engine embedded in-process: the
engine for one machine) and ``QdrantIndex`` (qdrant-client: a Qdrant server, or qdrant-client's local mode,
a Python stand-in for the server API that tests use). The flow, the CLI and the version commands only call
what ``VectorIndex`` declares, so they do not know which engine they talk to.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

Engine = Literal["edge", "local", "server"]


class IndexSettings(BaseModel):
    """The `index:` section of a job file."""

    model_config = ConfigDict(extra="forbid")

    engine: Engine | None = Field(
        None, description="edge = Qdrant Edge, Qdrant's engine embedded in-process, at `path`; server = a Qdrant "
        "server at `url`; local = qdrant-client's local mode at `path` (a slow in-memory stand-in for the server API, "
        "for tests); null = server when `url` is set, else edge")
    url: str | None = Field(None, description="Qdrant server, e.g. http://host:6333 (engine: server)")
    api_key: SecretStr | None = Field(None, description="API key for a Qdrant server")
    path: str = Field("./reembed-data/qdrant", description="storage folder of the embedded engines (edge, local)")
    upsert_batch: int = Field(256, ge=1, description="points per upsert request")
    upsert_parallel: int = Field(4, ge=1, description="shards upserted at once into a server (local mode: always 1)")
    bulk_load: bool = Field(True, description="defer HNSW indexing while a new collection is filled, then build it once")
    indexing_threshold: int = Field(20000, ge=0, description="Qdrant's indexing_threshold restored after a bulk load")
    on_disk: bool = Field(False, description="keep original vectors on disk (memmap) instead of RAM")
    quantization: Literal["none", "scalar"] = Field("none", description="scalar = int8 scalar quantization kept in RAM")
    search_ef: int = Field(256, ge=1, description="HNSW beam width per search (Qdrant's hnsw_ef): wider finds more "
                           "of the exact top-k at some latency; Qdrant's own default is the index's ef_construct")
    segment_points: int = Field(100_000, ge=1000, description="edge: build the HNSW index each time this many points "
                                "have been written, into segments of about this size, so building it never holds more "
                                "than one segment's worth in memory (one build over a million points peaks near 3 GB)")
    keep_versions: int = Field(3, ge=1, description="retention: newest versions that could serve kept (gate passed, "
                               "forced or not applied; gate-failed ones do not count), with the live one, the one "
                               "that served before the run and the latest attempt; older collections and vector sets "
                               "are deleted")
    green_timeout: int = Field(600, ge=1, description="seconds to wait for the collection to turn green after a bulk load")
    timeout: int = Field(60, ge=1, description="seconds per request to a server")

    @model_validator(mode="after")
    def _engine_matches_url(self) -> "IndexSettings":
        if self.engine == "server" and not self.url:
            raise ValueError("index.engine 'server' needs index.url (e.g. http://host:6333)")
        if self.engine in ("edge", "local") and self.url:
            raise ValueError(f"index.engine {self.engine!r} is embedded and takes index.path, not index.url "
                             f"({self.url}); set index.engine: server, or drop index.url")
        return self

    @property
    def resolved_engine(self) -> Engine:
        return self.engine or ("server" if self.url else "edge")

    @property
    def where(self) -> str:
        return self.url if self.resolved_engine == "server" else f"{self.resolved_engine}:{self.path}"


_GENERATION = re.compile(r"-r(\d+)$")


def physical_name(version: str, generation: int) -> str:
    """The Qdrant collection that holds generation ``generation`` of a version: the version's own name for the
    first build, ``<version>-r<N>`` for each rebuild beside it (``reembed reindex``).

    A version's identity is its name (``<name>-<fingerprint>``: 12 hex digits, so never ending in ``-r<N>``);
    its physical collection may change when it is rebuilt, and a version alias of the version's name points at
    it, so every call made with the version's name reaches the current generation."""
    return version if generation <= 1 else f"{version}-r{generation}"


def version_of(physical: str) -> str:
    """The version a physical collection belongs to (its name without a ``-r<N>`` generation)."""
    return _GENERATION.sub("", physical)


def generation_of(physical: str) -> int:
    match = _GENERATION.search(physical)
    return int(match.group(1)) if match else 1


class IndexError_(RuntimeError):
    """A job-level Qdrant problem (unreachable server, dimension mismatch, storage in use by another process)."""


class AliasFileDamaged(IndexError_):
    """Qdrant Edge's alias file does not parse: a clear error that says how to repair it (``reembed rollback
    JOB VERSION`` sets it aside and starts a new one)."""


@dataclass
class Point:
    """One point read back from an index: id, vector (when asked for) and payload."""

    id: str
    vector: np.ndarray | None
    payload: dict[str, Any]


class VectorIndex(Protocol):
    """What reembed asks of an index. Collections hold versions; an alias names the live one.

    Every call that takes a ``name`` accepts a collection or an alias (a job's alias, or a version alias from a
    version's name to the generation rebuilt beside it), except ``drop``, which removes exactly the physical
    collection it is given, and ``point_aliases``, whose targets are resolved to physical collections first.
    """

    settings: IndexSettings

    @property
    def where(self) -> str: ...
    @property
    def serial_writes(self) -> bool: ...
    def ensure_collection(self, name: str, dim: int, payload_indexes: list[str] | None = None) -> None: ...
    def upsert(self, collection: str, ids: list[str], vectors: np.ndarray, payloads: list[dict[str, Any]]) -> int: ...
    def delete_points(self, collection: str, ids: list[str]) -> None: ...
    def point_ids(self, collection: str) -> list[str]: ...
    def scroll(self, name: str, fields: list[str] | None = None, with_vectors: bool = False) -> Iterator[Point]: ...
    def retrieve(self, name: str, ids: list[str]) -> list[Point]: ...
    def finish_bulk_load(self, name: str) -> str: ...
    def count(self, name: str) -> int: ...
    def exists(self, name: str) -> bool: ...
    def drop(self, name: str) -> None: ...
    def dim(self, name: str) -> int | None: ...
    def collections(self) -> list[str]: ...
    def resolve(self, name: str) -> str | None: ...
    def aliases(self) -> dict[str, str]: ...
    def alias_target(self, alias: str) -> str | None: ...
    def point_alias(self, alias: str, collection: str) -> None: ...
    def point_aliases(self, targets: dict[str, str]) -> None: ...
    def remove_alias(self, alias: str) -> None: ...
    def set_aside_damaged_aliases(self) -> str | None: ...
    def search(self, name: str, vector: np.ndarray, k: int = 10, collapse: bool = False) -> list[dict[str, Any]]: ...
    def close(self) -> None: ...
    def __enter__(self) -> "VectorIndex": ...
    def __exit__(self, *exc: object) -> None: ...


def open_index(settings: IndexSettings) -> VectorIndex:
    """The index the settings name; close it (or use it as a context manager) when done."""
    if settings.resolved_engine == "edge":
        from reembed.indexing.edge_index import EdgeIndex

        return EdgeIndex(settings)
    from reembed.indexing.qdrant_index import QdrantIndex

    return QdrantIndex(settings)
