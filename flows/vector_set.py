"""A run's new vector set, and what the collection must lose or regain to equal it.

The set is built from the parts' id columns only (column projection: never vectors or text) into one Arrow
table, so the driver holds a few dozen bytes per point in Arrow buffers rather than a Python object per point;
cross-shard duplicates come from an Arrow group-by, and only their rows become Python objects.

What to delete is found in proportion to the change: the points of the committed parts this run replaced
that the new set lacks. That is exact while the collection holds the committed version, which the flow knows
(no earlier run left the collection half-written, and its count matched the manifest when the run began) and
checks (after the run's upserts, the collection's count less the stale points still in it must equal the new
set's size). When either fails, the collection's ids are read in full and compared: extras are deleted and
missing points re-upserted, so a collection an earlier run left half-written heals itself.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from reembed.indexing.index import VectorIndex
from reembed.indexing.records import Manifest, ShardMarker, point_id
from reembed.indexing.vector_store import VectorStore

logger = logging.getLogger(__name__)

KEY_SEPARATOR = "#"  # doc_id#chunk, as ``point_id`` hashes it
LOOKUP_BATCH = 1000  # ids per retrieve call when counting stale points still in the collection


@dataclass
class VectorSet:
    """The points the new vector set defines: one per (doc, chunk), the first shard in plan order winning."""

    parts: list[str]  # part URIs in plan order; ``keys.part`` indexes this list
    keys: pa.Table  # one row per point: key, doc_id, chunk, part, row
    chunked: bool
    duplicates: list[dict[str, Any]]  # quarantine rows (file, row, doc_id, reason) for losing duplicates
    rewrite: dict[str, list[int]]  # part URI -> rows to (re-)upsert: duplicate winners, and points found missing
    stale: list[str] = field(default_factory=list)  # point ids in the collection that are not in the set
    full_scan: bool = False  # whether the collection's ids were read in full to find ``stale``

    @property
    def size(self) -> int:
        return self.keys.num_rows

    def missing_docs(self, doc_ids: Iterable[str]) -> int:
        """How many of ``doc_ids`` the new set lacks (the delete guard of a new version)."""
        docs = pa.array(list(doc_ids), type=pa.string())
        if not len(docs):
            return 0
        return len(docs) - pc.sum(pc.is_in(docs, value_set=self.keys.column("doc_id"))).as_py()



def point_ids(keys: pa.Table, chunked: bool) -> Iterator[tuple[str, int]]:
    """(point id, position) for the rows of a table with ``doc_id`` and ``chunk`` columns."""
    for pos, (doc_id, chunk) in enumerate(zip(keys.column("doc_id").to_pylist(), keys.column("chunk").to_pylist())):
        yield point_id(doc_id, chunk if chunked else None), pos


def read_keys(store: VectorStore, uri: str, chunked: bool, extra: tuple[str, ...] = ()) -> pa.Table:
    """A part's point keys: ``key`` (doc_id, or doc_id#chunk), ``doc_id``, ``chunk``, plus ``extra`` columns."""
    table = store.read_part(uri, ["doc_id", *(["chunk_index"] if chunked else []), *extra])
    doc_id = table.column("doc_id").cast(pa.string())
    if chunked:
        chunk = table.column("chunk_index").cast(pa.int32())
        key = pc.binary_join_element_wise(doc_id, pc.cast(chunk, pa.string()), KEY_SEPARATOR)
    else:
        chunk = pa.chunked_array([np.zeros(table.num_rows, np.int32)], pa.int32())
        key = doc_id
    columns = {"key": key, "doc_id": doc_id, "chunk": chunk}
    columns.update({name: table.column(name) for name in extra})
    return pa.table(columns)


def build_vector_set(store: VectorStore, results: list[ShardMarker], chunked: bool) -> VectorSet:
    """Read the id columns of every part in plan order and resolve cross-shard duplicates: the first shard
    keeps the id, later rows are reported. ``chunked`` comes from the job: every part of one version is
    written with the same chunking settings."""
    tables = []
    for i, result in enumerate(results):
        keys = read_keys(store, result.part_uri, chunked, ("source_row",))
        n = keys.num_rows
        tables.append(keys.append_column("part", pa.array(np.full(n, i, np.int32)))
                      .append_column("row", pa.array(np.arange(n, dtype=np.int64))))
    parts = [r.part_uri for r in results]
    if not tables:
        empty = pa.table({"key": pa.array([], pa.string()), "doc_id": pa.array([], pa.string()),
                          "chunk": pa.array([], pa.int32()), "part": pa.array([], pa.int32()),
                          "row": pa.array([], pa.int64())})
        return VectorSet(parts, empty, chunked, [], {})
    table = pa.concat_tables(tables)
    counts = table.group_by("key").aggregate([("row", "count")])
    repeated = counts.filter(pc.greater(counts.column("row_count"), 1)).column("key")
    duplicates: list[dict[str, Any]] = []
    rewrite: dict[str, list[int]] = {}
    if len(repeated):
        where = np.flatnonzero(pc.is_in(table.column("key"), value_set=repeated).to_numpy(zero_copy_only=False))
        first: dict[str, dict[str, Any]] = {}
        losers = []
        for pos, row in zip(where, table.take(pa.array(where)).to_pylist()):  # plan order: the first one wins
            kept = first.get(row["key"])
            if kept is None:
                first[row["key"]] = row
                rewrite.setdefault(parts[row["part"]], []).append(row["row"])
                continue
            losers.append(pos)
            if row["chunk"] == 0:  # count documents, not their chunks
                duplicates.append({
                    "file": results[row["part"]].source, "row": row["source_row"], "doc_id": row["doc_id"],
                    "reason": f"duplicate id {row['doc_id']!r} (kept the one in {results[kept['part']].source} "
                              f"row {kept['source_row']})"})
        keep = np.ones(table.num_rows, dtype=bool)
        keep[losers] = False
        table = table.filter(pa.array(keep))
    return VectorSet(parts, table.drop_columns(["source_row"]), chunked, duplicates, rewrite)


def replaced_stale(store: VectorStore, vector_set: VectorSet, committed: Manifest) -> list[str]:
    """Points of the committed parts this run replaced (changed shards, vanished files) that the new set
    lacks: the deletes a refresh needs, found by reading only the replaced parts' id columns."""
    kept = set(vector_set.parts)
    stale: list[str] = []
    for part in committed.parts:
        if part.part_uri in kept:
            continue
        keys = read_keys(store, part.part_uri, committed.chunked)
        gone = keys.filter(pc.invert(pc.is_in(keys.column("key"), value_set=vector_set.keys.column("key"))))
        stale += [pid for pid, _ in point_ids(gone, committed.chunked)]
    return stale


def rewrite_docs(vector_set: VectorSet, doc_ids: set[str]) -> None:
    """Re-upsert the points of ``doc_ids`` from their winning rows: documents that had a duplicate in the
    committed version may have a new winner whose row is otherwise unchanged."""
    if not doc_ids:
        return
    keys = vector_set.keys
    where = pc.is_in(keys.column("doc_id"), value_set=pa.array(sorted(doc_ids), type=pa.string()))
    chosen = keys.filter(where)
    for part, row in zip(chosen.column("part").to_pylist(), chosen.column("row").to_pylist()):
        vector_set.rewrite.setdefault(vector_set.parts[part], []).append(row)


def present(index: VectorIndex, collection: str, ids: list[str]) -> int:
    """How many of ``ids`` the collection holds, looked up by id in batches."""
    return sum(len(index.retrieve(collection, ids[i:i + LOOKUP_BATCH])) for i in range(0, len(ids), LOOKUP_BATCH))


def full_diff(index: VectorIndex, collection: str, vector_set: VectorSet) -> None:
    """Compare the collection's ids with the new set in full: extras become ``stale``, missing points join
    ``rewrite``. Reads every id of the collection: taken only when the collection may not hold the committed
    version (an earlier run stopped while writing to it, or the counts do not add up)."""
    held = set(index.point_ids(collection))
    for start in range(0, vector_set.size, 100_000):
        batch = vector_set.keys.slice(start, 100_000)
        parts = batch.column("part").to_pylist()
        rows = batch.column("row").to_pylist()
        for pid, pos in point_ids(batch, vector_set.chunked):
            if pid in held:
                held.discard(pid)
            else:
                vector_set.rewrite.setdefault(vector_set.parts[parts[pos]], []).append(rows[pos])
    vector_set.stale = sorted(held)
    vector_set.full_scan = True
