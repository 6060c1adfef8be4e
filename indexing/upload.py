"""Parquet part -> Qdrant: the one place that moves stored vectors into the index.

The index adapter takes ids, vectors and payloads and never reads Parquet; the vector store yields point
batches and never talks to Qdrant. A run's upsert step and ``reembed reindex`` both come through here.
"""

from __future__ import annotations

from reembed.indexing.index import VectorIndex
from reembed.indexing.vector_store import VectorStore

READ_BATCHES = 8  # upsert batches read from Parquet at once: fewer, larger Arrow-to-Python conversions


def upsert_part(index: VectorIndex, store: VectorStore, collection: str, part_uri: str,
                rows: list[int] | None = None) -> int:
    """Upsert one Parquet part (or its chosen ``rows``) into ``collection``; returns the points written."""
    return sum(index.upsert(collection, b.ids, b.vectors, b.payloads)
               for b in store.point_batches(part_uri, index.settings.upsert_batch * READ_BATCHES, rows))
