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

The store is relocatable: manifests and shard markers name their files relative to the version's folder
(``vectors/part-….parquet``), and readers resolve them against the current ``output.uri``, so a store copied to
another disk or bucket keeps working. Records written before this named files by absolute URI; those still load,
and a file missing at its old place is looked for under the current root by its folder and file name.
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


_FILE_FOLDERS = ("vectors", "quarantine")  # the folders of a version whose files its records name


def stored_name(uri: str) -> str:
    """How a version's records name one of its files: ``<folder>/<file>`` (its place under the version's folder),
    whatever the root was spelled (``file://`` or a plain path, a trailing slash) or wherever the store was."""
    folder, _, name = uri.rstrip("/").rpartition("/")
    folder = folder.rpartition("/")[2]
    return f"{folder}/{name}" if folder in _FILE_FOLDERS else uri


def _is_absolute(name: str) -> bool:
    return "://" in name or name.startswith("/")


class VectorStore:
    """Paths and reads/writes for one collection's vectors under the output URI."""

    def __init__(self, output_uri: str, collection: str, options: StorageOptions | None = None) -> None:
        self.root = join(output_uri, collection)
        self.collection = collection
        self.options = options or StorageOptions()
        self._moved_warned: set[str] = set()

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
        stored = marker.model_copy(update={"part_uri": self._stored(marker.part_uri),
                                           "quarantine_uri": self._stored(marker.quarantine_uri)})
        write_json(self.marker_uri(marker.shard_id), stored.model_dump(mode="json"), self.options)

    def read_marker(self, shard_id: str) -> ShardMarker | None:
        uri = self.marker_uri(shard_id)
        marker = ShardMarker.from_json(read_json(uri, self.options), uri)
        if marker is None:
            return None
        return marker.model_copy(update={"part_uri": self.locate(marker.part_uri, uri),
                                         "quarantine_uri": self.locate(marker.quarantine_uri, uri)})

    def write_manifest(self, manifest: Manifest) -> None:
        stored = manifest.model_copy(update={
            "parts": [p.model_copy(update={"part_uri": self._stored(p.part_uri),
                                           "quarantine_uri": self._stored(p.quarantine_uri)}) for p in manifest.parts],
            "extra_quarantine": [self._stored(u) for u in manifest.extra_quarantine]})
        write_json(self.manifest_uri, stored.model_dump(mode="json", exclude_none=True), self.options)

    def read_manifest(self) -> Manifest | None:
        manifest = Manifest.from_json(read_json(self.manifest_uri, self.options), self.manifest_uri)
        if manifest is None:
            return None
        where = self.manifest_uri
        return manifest.model_copy(update={
            "parts": [p.model_copy(update={"part_uri": self.locate(p.part_uri, where),
                                           "quarantine_uri": self.locate(p.quarantine_uri, where)})
                      for p in manifest.parts],
            "extra_quarantine": [self.locate(u, where) for u in manifest.extra_quarantine]})

    def _stored(self, uri: str | None) -> str | None:
        return None if uri is None else stored_name(uri)

    def locate(self, name: str | None, record: str = "") -> str | None:
        """The URI, under the current root, of a file a record names: relative names resolve against the
        version's folder; an absolute one (a record from before relocatable stores) is used where it is when it
        lies under the current root or still exists, else looked for here by its folder and file name."""
        if name is None:
            return None
        if not _is_absolute(name):
            return join(self.root, name)
        relative = stored_name(name)
        if relative == name:  # not one of the version's files: leave it as recorded
            return name
        here = join(self.root, relative)
        _, root_path = filesystem(self.root, self.options)
        fs, path = filesystem(name, self.options)
        if path.startswith(root_path.rstrip("/") + "/"):
            return here
        fs_here, path_here = filesystem(here, self.options)
        if fs_here.exists(path_here):
            if name not in self._moved_warned:
                self._moved_warned.add(name)
                logger.warning("%s names %s, outside the store's current root %s (the store was moved or "
                               "copied): using %s", record or "a record", name, self.root, here)
            return here
        return name if fs.exists(path) else here

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
        try:
            return pq.read_table(path, filesystem=fs, columns=columns)
        except FileNotFoundError:
            raise self._missing(uri) from None

    def part_columns(self, uri: str) -> list[str]:
        """A part's column names, from its footer alone."""
        fs, path = filesystem(uri, self.options)
        try:
            return pq.read_schema(path, filesystem=fs).names
        except FileNotFoundError:
            raise self._missing(uri) from None

    def _missing(self, uri: str) -> FileNotFoundError:
        return FileNotFoundError(
            f"Parquet part {uri} of version {self.collection} is missing (the store's root is {self.root}; if the "
            f"vector store was moved or copied, point output.uri at the whole copy, every version folder included)")

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
        parts of runs that were stopped); returns how many files went. Files are compared by their place in the
        version's folder, so no spelling of the root (or a moved root) makes a file the manifest needs look
        unreferenced."""
        keep = {stored_name(p.part_uri) for p in manifest.parts}
        keep |= {stored_name(p.quarantine_uri) for p in manifest.parts if p.quarantine_uri}
        keep |= {stored_name(u) for u in manifest.extra_quarantine}
        keep |= {stored_name(self.part_uri(s)) for s in manifest.shards if not manifest.parts}  # oldest manifests
        fs, _ = filesystem(self.root, self.options)
        removed = 0
        for folder, pattern in (("vectors", "part-*.parquet"), ("quarantine", "part-*.jsonl")):
            _, path = filesystem(join(self.root, folder), self.options)
            try:
                found = fs.glob(f"{path}/{pattern}")
            except FileNotFoundError:
                continue
            for name in found:
                if f"{folder}/{name.rsplit('/', 1)[-1]}" not in keep:
                    fs.rm(name)
                    removed += 1
        return removed

    def read_all(self, columns: list[str] | None = None) -> pa.Table:
        """The current vector set as one table (tests and small corpora; big ones stream part by part)."""
        parts = [self.read_part(u, columns) for u in self.current_parts()]
        if not parts:
            raise FileNotFoundError(f"no committed vectors under {self.root}")
        return pa.concat_tables(parts)
