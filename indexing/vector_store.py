"""The Parquet vector store: the source of truth from which Qdrant can always be rebuilt.

Layout under ``output.uri``::

    <collection>/vectors/part-<shard>-<input>.parquet     doc_id, vector fixed_size_list<float32>[dim], text_sha256, model, text, payload...
    <collection>/quarantine/part-<shard>-<input>.jsonl    rejected rows: file, row, doc_id, reason
    <collection>/shards/<shard>.json                      per-shard marker, written after its Parquet file
    <collection>/current.json                             the run manifest: which parts form the current vector set, written last
    <collection>/writing.json                             present while a run writes to the collection's index and has not committed

Part and quarantine files are named by the shard's input fingerprint as well as its id, so a run never
overwrites a file the committed manifest points at: a run that fails or is stopped by a guard leaves the live
vector set exactly as it was. Files no manifest names any more are removed after the next commit.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from reembed.indexing.records import NOT_PAYLOAD, Manifest, ShardMarker, point_id
from reembed.indexing.storage import StorageOptions, filesystem, join, read_json, write_json

logger = logging.getLogger(__name__)

SNIPPET_CHARS = 500


def vectors_to_arrow(vectors: np.ndarray) -> pa.FixedSizeListArray:
    """[n, dim] float32 as ``fixed_size_list<float32>[dim]`` without copying row by row."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = vectors.shape
    return pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), type=pa.float32()), dim)


def arrow_to_vectors(column: pa.ChunkedArray | pa.FixedSizeListArray) -> np.ndarray:
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    dim = column.type.list_size
    return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass
class PointBatch:
    """Points ready for the index: ids, an [n, dim] float32 array and payloads (every column but the vector)."""

    ids: list[str]
    vectors: np.ndarray
    payloads: list[dict[str, Any]]


def _part_name(shard_id: str, input_fingerprint: str | None) -> str:
    return f"{shard_id}-{input_fingerprint[:12]}" if input_fingerprint else shard_id


class VectorStore:
    """Paths and reads/writes for one collection's vectors under the output URI."""

    def __init__(self, output_uri: str, collection: str, options: StorageOptions | None = None) -> None:
        self.root = join(output_uri, collection)
        self.collection = collection
        self.options = options or StorageOptions()

    def part_uri(self, shard_id: str, input_fingerprint: str | None = None) -> str:
        return join(self.root, "vectors", f"part-{_part_name(shard_id, input_fingerprint)}.parquet")

    def quarantine_uri(self, shard_id: str, input_fingerprint: str | None = None) -> str:
        return join(self.root, "quarantine", f"part-{_part_name(shard_id, input_fingerprint)}.jsonl")

    @property
    def quarantine_dir(self) -> str:
        return join(self.root, "quarantine")

    def marker_uri(self, shard_id: str) -> str:
        return join(self.root, "shards", f"{shard_id}.json")

    @property
    def manifest_uri(self) -> str:
        return join(self.root, "current.json")

    def write_part(self, shard_id: str, table: pa.Table, metadata: dict[str, Any],
                   input_fingerprint: str | None = None) -> str:
        uri = self.part_uri(shard_id, input_fingerprint)
        fs, path = filesystem(uri, self.options)
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        meta = dict(table.schema.metadata or {})
        meta[b"reembed"] = json.dumps(metadata, sort_keys=True).encode()
        pq.write_table(table.replace_schema_metadata(meta), path, filesystem=fs, compression="zstd")
        return uri

    def write_quarantine(self, shard_id: str, rejected: list[dict[str, Any]],
                         input_fingerprint: str | None = None) -> str | None:
        uri = self.quarantine_uri(shard_id, input_fingerprint)
        fs, path = filesystem(uri, self.options)
        if not rejected:
            if fs.exists(path):
                fs.rm(path)
            return None
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejected).encode("utf-8")
        fs.pipe_file(path, body)
        return uri

    def write_marker(self, marker: ShardMarker) -> None:
        write_json(self.marker_uri(marker.shard_id), marker.model_dump(mode="json"), self.options)

    def read_marker(self, shard_id: str) -> ShardMarker | None:
        uri = self.marker_uri(shard_id)
        return ShardMarker.from_json(read_json(uri, self.options), uri)

    def write_manifest(self, manifest: Manifest) -> None:
        write_json(self.manifest_uri, manifest.model_dump(mode="json", exclude_none=True), self.options)

    def read_manifest(self) -> Manifest | None:
        return Manifest.from_json(read_json(self.manifest_uri, self.options), self.manifest_uri)

    @property
    def writing_uri(self) -> str:
        return join(self.root, "writing.json")

    def mark_writing(self, info: dict[str, Any]) -> None:
        """Say, before the first write to the collection's index, that it may no longer equal the manifest."""
        write_json(self.writing_uri, info, self.options)

    def writing(self) -> dict[str, Any] | None:
        """What an earlier run that wrote to the index and never committed left behind, if any."""
        return read_json(self.writing_uri, self.options)

    def clear_writing(self) -> None:
        fs, path = filesystem(self.writing_uri, self.options)
        if fs.exists(path):
            fs.rm(path)

    def duplicate_doc_ids(self, manifest: Manifest) -> set[str]:
        """Documents the committed version reported as cross-shard duplicates."""
        ids: set[str] = set()
        for uri in manifest.extra_quarantine:
            fs, path = filesystem(uri, self.options)
            try:
                with fs.open(path, "rb") as fh:
                    ids.update(str(json.loads(line)["doc_id"]) for line in fh if line.strip())
            except FileNotFoundError:
                continue
        return ids

    def read_part(self, uri: str, columns: list[str] | None = None) -> pa.Table:
        fs, path = filesystem(uri, self.options)
        return pq.read_table(path, filesystem=fs, columns=columns)

    def part_columns(self, uri: str) -> list[str]:
        """A part's column names, from its footer alone."""
        fs, path = filesystem(uri, self.options)
        return pq.read_schema(path, filesystem=fs).names

    def point_batches(self, part_uri: str, batch: int, rows: list[int] | None = None) -> Iterator[PointBatch]:
        """A part's rows (or the chosen ``rows``) as point batches; the index never reads Parquet itself."""
        table = self.read_part(part_uri)
        if rows is not None:
            table = table.take(rows)
        payload_cols = [c for c in table.column_names if c not in NOT_PAYLOAD]
        for start in range(0, table.num_rows, batch):
            chunk = table.slice(start, batch)
            payloads = chunk.select(payload_cols).to_pylist()
            yield PointBatch([point_id(p["doc_id"], p.get("chunk_index")) for p in payloads],
                             arrow_to_vectors(chunk.column("vector")), payloads)

    def current_parts(self, manifest: Manifest | None = None) -> list[str]:
        """Part URIs of the committed vector set, in plan order."""
        manifest = manifest if manifest is not None else self.read_manifest()
        if manifest is None:
            return []
        if manifest.parts:
            return [p.part_uri for p in manifest.parts]
        return [self.part_uri(s) for s in manifest.shards]  # manifests written before parts were listed

    def remove_unreferenced(self, manifest: Manifest) -> int:
        """Delete part and quarantine files the committed manifest does not name (older inputs' parts, and
        parts of runs that were stopped); returns how many files went."""
        keep = {p.part_uri for p in manifest.parts}
        keep |= {p.quarantine_uri for p in manifest.parts if p.quarantine_uri}
        keep |= set(manifest.extra_quarantine)
        fs, _ = filesystem(self.root, self.options)
        removed = 0
        for folder, pattern in (("vectors", "part-*.parquet"), ("quarantine", "part-*.jsonl")):
            _, path = filesystem(join(self.root, folder), self.options)
            try:
                found = fs.glob(f"{path}/{pattern}")
            except FileNotFoundError:
                continue
            for name in found:
                uri = join(self.root, folder, name.rsplit("/", 1)[-1])
                if uri not in keep:
                    fs.rm(name)
                    removed += 1
        return removed

    def read_all(self, columns: list[str] | None = None) -> pa.Table:
        """The current vector set as one table (tests and small corpora; big ones stream part by part)."""
        parts = [self.read_part(u, columns) for u in self.current_parts()]
        if not parts:
            raise FileNotFoundError(f"no committed vectors under {self.root}")
        return pa.concat_tables(parts)
