"""The batch-inference worker that Ray runs as an actor (and that runs fine without Ray).

Ray Data style: ``__init__`` loads the model once, ``__call__`` maps an Arrow batch with a ``text`` column to
the same batch plus ``vector``. ``process_shard`` is the whole unit of work the flow hands out: read a shard
from its URI, embed it, write its Parquet part and quarantine file, and return counts (never vectors).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any

import pyarrow as pa

from indexing.corpus import CorpusSettings, Shard, read_shard
from indexing.storage import StorageOptions
from indexing.vector_store import SNIPPET_CHARS, VectorStore, text_sha256, vectors_to_arrow
from workers.encoder import Encoder
from workers.settings import ChunkingSettings, ModelSettings

logger = logging.getLogger(__name__)


class EmbedWorker:
    """Load the model once; embed Arrow batches and whole shards with it."""

    def __init__(self, model: ModelSettings, cpu_threads: int | None = None) -> None:
        self.encoder = Encoder(model, cpu_threads=cpu_threads)
        self.model_id = self.encoder.profile.model_id
        self.dim = self.encoder.dim

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = batch.column("text").to_pylist()
        vectors, _ = self.encoder.encode(texts)
        return batch.append_column("vector", vectors_to_arrow(vectors))

    def ready(self) -> dict[str, Any]:
        """Cheap call the flow uses to wait until the model is loaded, and to learn where the actor lives."""
        return {"dim": self.dim, "model": self.model_id, "node": _node_id(), "pid": os.getpid()}

    def process_shard(
        self,
        shard: Shard,
        corpus: CorpusSettings,
        output_uri: str,
        collection: str,
        output_options: StorageOptions,
        model_fingerprint: str,
        chunking: ChunkingSettings | None = None,
    ) -> dict[str, Any]:
        start = time.perf_counter()
        rows = read_shard(shard, corpus)
        read_s = time.perf_counter() - start
        # One row per document, or per chunk: `owner[i]` is the document row that output row i comes from.
        if chunking is None:
            owner = list(range(len(rows.ids)))
            spans = [(0, len(t)) for t in rows.texts]
            chunk_index = [0] * len(owner)
        else:
            owner, spans, chunk_index = [], [], []
            for doc, doc_spans in enumerate(self.encoder.chunk_spans(rows.texts, chunking.max_tokens, chunking.overlap)):
                for n, span in enumerate(doc_spans):
                    owner.append(doc)
                    spans.append(span)
                    chunk_index.append(n)
        texts = [rows.texts[d][a:b] if chunking else rows.texts[d] for d, (a, b) in zip(owner, spans)]
        vectors, stats = self.encoder.encode(texts)
        doc_sha = [text_sha256(t) for t in rows.texts]
        columns: dict[str, Any] = {
            "doc_id": pa.array([rows.ids[d] for d in owner], type=pa.string()),
            "vector": vectors_to_arrow(vectors),
            "text_sha256": pa.array([doc_sha[d] for d in owner], type=pa.string()),
            "model": pa.array([self.model_id] * len(owner), type=pa.string()),
            "text": pa.array([t[:SNIPPET_CHARS] for t in texts], type=pa.string()),
            "source_row": pa.array([rows.rows[d] for d in owner], type=pa.int64()),
        }
        if chunking is not None:
            columns["chunk_index"] = pa.array(chunk_index, type=pa.int32())
            columns["char_start"] = pa.array([a for a, _ in spans], type=pa.int64())
            columns["char_end"] = pa.array([b for _, b in spans], type=pa.int64())
        for name, values in rows.payload.items():
            columns[name] = pa.array([values[d] for d in owner])
        table = pa.table(columns)
        truncated = sorted({rows.ids[owner[i]] for i in stats.truncated_rows})
        store = VectorStore(output_uri, collection, output_options)
        metadata = {
            "shard_id": shard.shard_id,
            "source": shard.uri,
            "model": self.model_id,
            "model_fingerprint": model_fingerprint,
            "dim": self.dim,
            "rows": len(rows.ids),
            "vector_rows": len(owner),
            "tokens": stats.tokens,
            "truncated_docs": len(truncated),
            "dropped_tokens": stats.dropped_tokens,
        }
        part = store.write_part(shard.shard_id, table, metadata)
        quarantine = store.write_quarantine(shard.shard_id, rows.rejected)
        seconds = time.perf_counter() - start
        result = {
            **metadata,
            "part_uri": part,
            "quarantine_uri": quarantine,
            "input_rows": rows.input_rows,
            "quarantined": len(rows.rejected),
            "padded_tokens": stats.padded_tokens,
            "truncated_ids": truncated[:100],
            "read_s": read_s,
            "encode_s": stats.seconds,
            "seconds": seconds,
            "node": _node_id(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
        }
        store.write_marker(shard.shard_id, {**result, "stage": "written"})
        return result


def _node_id() -> str | None:
    """Ray node id when running inside Ray, else None."""
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except ImportError:
        pass
    return None
