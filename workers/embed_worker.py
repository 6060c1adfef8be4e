"""The batch-inference worker that Ray runs as an actor (and that runs fine without Ray).

Ray Data style: ``__init__`` loads the model once, and each call maps a unit of work to its result.
``process_shard`` is that unit: read a shard from its URI, embed it, write its Parquet part and quarantine
file, and return a ``ShardResult`` (counts and URIs, never vectors).
"""

from __future__ import annotations

import gc
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from reembed.indexing.corpus import read_shard
from reembed.indexing.fence import check_fence
from reembed.indexing.records import ActorInfo, ShardMarker, ShardResult, ShardTask, part_schema
from reembed.indexing.vector_store import SNIPPET_CHARS, VectorStore, arrow_to_vectors, text_sha256, vectors_to_arrow
from reembed.workers.actor_metrics import actor_metrics
from reembed.workers.encoder import Encoder
from reembed.workers.settings import ModelSettings

logger = logging.getLogger(__name__)


class Reused(NamedTuple):
    """One chunk (or the whole document) of an unchanged document, as a committed part holds it."""

    chunk: int
    span: tuple[int, int | None]
    vector: Any
    compared: tuple[Any, ...]  # the old row's COMPARED columns then its payload columns


COMPARED = ("source_row",)  # besides payload columns: what can change in a point whose text did not
_ABSENT = object()  # a compared column the old part lacks: equal to nothing, so the point is upserted


class EmbedWorker:
    """Load the model once; embed Arrow batches and whole shards with it."""

    def __init__(self, model: ModelSettings, cpu_threads: int | None = None, model_key: str | None = None) -> None:
        self.cpu_threads = cpu_threads
        self._loading = threading.Lock()
        self.metrics = None
        self._load(model, model_key)

    def _load(self, model: ModelSettings, model_key: str | None) -> None:
        self.encoder = None  # the old weights go before the new ones load (a GPU holds one model at a time)
        gc.collect()
        self.encoder = Encoder(model, cpu_threads=self.cpu_threads)
        self.model_key = model_key
        self.model_id = self.encoder.profile.model_id
        self.dim = self.encoder.dim
        if self.metrics is None:
            self.metrics = actor_metrics(self.model_id, self.encoder.device)  # None outside a Ray actor
        else:  # one set of Ray metrics per process; its series are labelled with the model now loaded
            self.metrics.tags = {"model": self.model_id}

    def load(self, model: ModelSettings, model_key: str | None) -> ActorInfo:
        """Hold the model ``model_key`` names, loading it in place of the one held if it differs: a parked
        actor adopted by a run of another model keeps its process (torch and transformers already imported,
        seconds saved) and only its weights change."""
        with self._loading:
            if model_key != self.model_key:
                logger.info("loading %s in place of %s", model.name, self.model_id)
                self._load(model, model_key)
        return self.ready()

    def ready(self) -> ActorInfo:
        """Cheap call the flow uses to wait until the model is loaded, and to learn where the actor lives."""
        return ActorInfo(dim=self.dim, model=self.model_id, node=_node_id(), pid=os.getpid(), model_key=self.model_key)

    def process_shard(self, task: ShardTask, progress: Any | None = None) -> ShardResult:
        """Read, embed and write one shard. ``progress`` (a Ray actor handle with ``update``) hears how many
        of the shard's input rows are done, at most every ``task.progress_seconds`` and once at the end."""
        if task.model is not None and task.model_key is not None:
            # The model the pool expects, always: Ray restarts a dead actor with the model it was first built
            # for, which may not be the one it held since (``load``).
            self.load(task.model, task.model_key)
        start = time.perf_counter()
        shard, chunking = task.shard, task.chunking
        report = _Reporter(progress, shard.shard_id, task.progress_seconds)
        rows = read_shard(shard, task.corpus)
        read_s = time.perf_counter() - start
        store = VectorStore(task.output_uri, task.collection, task.storage_options)
        doc_sha = [text_sha256(t) for t in rows.texts]
        compare = [*COMPARED, *rows.payload]
        if chunking is None:  # one point per document: matched in Arrow and numpy, no Python loop per row
            documents = _reused_documents(store, task.reuse_uris, rows.ids, doc_sha, compare, self.dim)
            todo = documents.todo(len(rows.ids))
        else:
            reused = _previous_vectors(store, task.reuse_uris, rows.ids, doc_sha, compare)
            todo = [d for d in range(len(rows.ids)) if d not in reused]
        reuse_s = time.perf_counter() - start - read_s
        if chunking is None:
            todo_spans = [[(0, len(rows.texts[d]))] for d in todo]
        else:
            todo_spans = self.encoder.chunk_spans([rows.texts[d] for d in todo], chunking.max_tokens, chunking.overlap)
        pieces = [(d, n, span) for d, spans in zip(todo, todo_spans) for n, span in enumerate(spans)]
        n_reused = len(rows.ids) - len(todo)
        settled = len(rows.rejected) + n_reused  # rows needing no encoding count as done at once
        report(settled)
        fresh, stats = self.encoder.encode(
            [rows.texts[d][a:b] for d, _, (a, b) in pieces],
            progress=lambda n: report(settled + len(todo) * n // max(len(pieces), 1)),
            observe=self.metrics.batch if self.metrics is not None else None,
        )
        if chunking is None:
            owner, chunk_index, spans, vectors, olds = documents.assemble(rows.texts, todo, fresh)
        else:
            owner, chunk_index, spans, vectors, olds = _assemble_chunks(len(rows.ids), reused, pieces, fresh,
                                                                        self.dim)
        texts = [rows.texts[d][a:b] for d, (a, b) in zip(owner, spans)]
        values: dict[str, Any] = {
            "doc_id": [rows.ids[d] for d in owner],
            "text_sha256": [doc_sha[d] for d in owner],
            "model": [self.model_id] * len(owner),
            "text": [t[:SNIPPET_CHARS] for t in texts],
            "source_row": [rows.rows[d] for d in owner],
            "chunk_index": chunk_index,
            "char_start": [a for a, _ in spans],
            "char_end": [b for _, b in spans],
        }
        schema = part_schema(self.dim, chunking is not None)
        columns: dict[str, Any] = {
            f.name: vectors_to_arrow(vectors) if f.name == "vector" else pa.array(values[f.name], type=f.type)
            for f in schema
        }
        for name, payload in rows.payload.items():
            columns[name] = pa.array([payload[d] for d in owner])
        table = pa.table(columns)
        changed_rows = None
        if task.reuse_since is not None:  # which points differ from the committed version's: only they need upserting
            now = list(zip(*(table.column(c).to_pylist() for c in compare))) if compare else [()] * len(owner)
            changed_rows = _changed_ranges(np.array([old is None or old != new for old, new in zip(olds, now)],
                                                    dtype=bool))
        truncated = sorted({rows.ids[pieces[i][0]] for i in stats.truncated_rows})
        metadata = {
            "shard_id": shard.shard_id,
            "source": shard.uri,
            "model": self.model_id,
            "model_fingerprint": task.model_fingerprint,
            "input_fingerprint": task.input_fingerprint,
            "dim": self.dim,
            "rows": len(rows.ids),
            "vector_rows": len(owner),
            "tokens": stats.tokens,
            "truncated_docs": len(truncated),
            "dropped_tokens": stats.dropped_tokens,
        }
        writing = time.perf_counter()
        check_fence(task.lease, task.storage_options)  # a driver that lost its job's lease gets nothing written
        part = store.write_part(shard.shard_id, table, metadata, task.input_fingerprint)
        quarantine = store.write_quarantine(shard.shard_id, rows.rejected, task.input_fingerprint)
        write_s = time.perf_counter() - writing
        result = ShardResult(
            **metadata,
            part_uri=part,
            quarantine_uri=quarantine,
            changed_rows=changed_rows,
            changed_since=task.reuse_since if changed_rows is not None else None,
            input_rows=rows.input_rows,
            encoded=len(todo),
            reused=n_reused,
            quarantined=len(rows.rejected),
            padded_tokens=stats.padded_tokens,
            truncated_ids=truncated[:100],
            read_s=read_s,
            reuse_s=reuse_s,
            encode_s=stats.seconds,
            write_s=write_s,
            seconds=time.perf_counter() - start,
            node=_node_id(),
            host=socket.gethostname(),
            pid=os.getpid(),
        )
        check_fence(task.lease, task.storage_options)
        store.write_marker(ShardMarker(**result.model_dump(), stage="written"))
        if self.metrics is not None:
            self.metrics.encoded(len(todo))
        report(rows.input_rows, final=True)
        return result


class _Reporter:
    """Sends a shard's rows-done count to the driver's progress board, at most every ``seconds``.

    Fire-and-forget Ray calls: a slow or missing board never slows the encoder.
    """

    def __init__(self, board: Any | None, shard_id: str, seconds: float) -> None:
        self.board = board
        self.shard_id = shard_id
        self.seconds = seconds
        self.last = 0.0

    def __call__(self, done: int, final: bool = False) -> None:
        if self.board is None:
            return
        now = time.monotonic()
        if final or now - self.last >= self.seconds:
            self.last = now
            self.board.update.remote(self.shard_id, int(done), final)


def _assemble_chunks(docs: int, reused: dict[int, list[Reused]], pieces: list[tuple[int, int, tuple[int, int]]],
                     fresh: Any, dim: int) -> tuple[list[int], list[int], list[Any], np.ndarray, list[Any]]:
    """One output row per chunk, in document then chunk order: ``owner[i]`` is the document behind row i."""
    encoded: dict[int, list[tuple[int, tuple[int, int], Any]]] = {}
    for (d, n, span), vec in zip(pieces, fresh):
        encoded.setdefault(d, []).append((n, span, vec))
    owner, chunk_index, spans, vecs, olds = [], [], [], [], []
    for d in range(docs):
        if d in reused:
            entries = [(r.chunk, r.span, r.vector, r.compared) for r in reused[d]]
        else:
            entries = [(n, span, vec, None) for n, span, vec in encoded.get(d, [])]
        for n, span, vec, old in entries:
            owner.append(d)
            chunk_index.append(n)
            spans.append(span)
            vecs.append(vec)
            olds.append(old)
    return owner, chunk_index, spans, np.asarray(vecs, dtype=np.float32).reshape(len(vecs), dim), olds


@dataclass
class ReusedDocuments:
    """The unchanged documents of a shard embedded one point per document, found in committed parts: their
    rows in the shard (``doc``), their stored vectors row for row, and the old rows' compared columns."""

    doc: np.ndarray  # int64 row indices into the shard's documents
    vectors: np.ndarray  # (len(doc), dim) float32
    compared: list[tuple[Any, ...]]

    def todo(self, docs: int) -> list[int]:
        """The documents left to encode, in shard order."""
        left = np.ones(docs, dtype=bool)
        left[self.doc] = False
        return np.flatnonzero(left).tolist()

    def assemble(self, texts: list[str], todo: list[int], fresh: Any
                 ) -> tuple[list[int], list[int], list[Any], np.ndarray, list[Any]]:
        """Every document's output row, in shard order: its stored vector, or the one just encoded."""
        docs = len(texts)
        vectors = np.empty((docs, self.vectors.shape[1]), dtype=np.float32)
        vectors[self.doc] = self.vectors
        if todo:
            vectors[todo] = np.asarray(fresh, dtype=np.float32).reshape(len(todo), -1)
        olds: list[Any] = [None] * docs
        for d, old in zip(self.doc.tolist(), self.compared):
            olds[d] = old
        return list(range(docs)), [0] * docs, [(0, None)] * docs, vectors, olds


def _old_rows(store: VectorStore, uri: str, wanted: pa.Array, columns: list[str]) -> tuple[np.ndarray, pa.Table] | None:
    """The rows of the old part ``uri`` that hold documents of this shard (``wanted``, its ids in order): each
    row's document (its index in the shard) and those rows' ``columns`` that the part has; None when it holds
    none of them or cannot be read. The part is read twice, narrowly: its ``doc_id`` column, then the asked
    columns of those rows only, so a shard reads about its own share of the old vectors however many parts
    its file had."""
    try:
        doc_ids = store.read_part(uri, ["doc_id"]).column("doc_id")
        where = pc.index_in(doc_ids, value_set=wanted)  # each old row's document in this shard, or null
        rows = np.flatnonzero(pc.is_valid(where).to_numpy(zero_copy_only=False))
        if not len(rows):
            return None
        present = set(store.part_columns(uri))
        table = store.read_part(uri, [c for c in columns if c in present]).take(rows)
    except (FileNotFoundError, OSError, KeyError, ValueError, pa.ArrowInvalid) as exc:
        logger.warning("cannot reuse vectors from %s: %s", uri, exc)
        return None
    return where.take(pa.array(rows)).to_numpy(zero_copy_only=False).astype(np.int64), table


def _reused_documents(store: VectorStore, uris: list[str], ids: list[str], shas: list[str], compare: list[str],
                      dim: int) -> ReusedDocuments:
    """What ``_previous_vectors`` finds for documents embedded whole, matched in Arrow and numpy: a shard of
    250,000 unchanged documents takes a fraction of a second here against seconds in a Python loop per row.
    A document seen in two old parts (moved between shards) keeps the vector of the first."""
    doc_rows, vectors, olds = [], [], []
    if not uris:  # a first build: nothing to reuse, nothing to convert
        return ReusedDocuments(np.empty(0, dtype=np.int64), np.empty((0, dim), dtype=np.float32), [])
    taken = np.zeros(len(ids), dtype=bool)
    wanted = pa.array(ids, type=pa.string())
    new_shas = pa.array(shas, type=pa.string())
    for uri in uris:
        old = _old_rows(store, uri, wanted, ["text_sha256", "vector", *compare])
        if old is None:
            continue
        d, table = old
        same = pc.fill_null(pc.equal(table.column("text_sha256"), new_shas.take(pa.array(d))), False)
        keep = np.flatnonzero(same.to_numpy(zero_copy_only=False) & ~taken[d])
        if not len(keep):
            continue
        keep = keep[np.unique(d[keep], return_index=True)[1]]  # a document twice in one part: its first match
        keep.sort()
        taken[d[keep]] = True
        chosen = table.take(pa.array(keep))
        doc_rows.append(d[keep])
        vectors.append(arrow_to_vectors(chosen.column("vector")))
        olds.extend(zip(*(chosen.column(c).to_pylist() if c in chosen.column_names else [_ABSENT] * len(keep)
                          for c in compare)))
    if not doc_rows:
        return ReusedDocuments(np.empty(0, dtype=np.int64), np.empty((0, dim), dtype=np.float32), [])
    return ReusedDocuments(np.concatenate(doc_rows), np.concatenate(vectors).astype(np.float32, copy=False), olds)


def _previous_vectors(store: VectorStore, uris: list[str], ids: list[str], shas: list[str],
                      compare: list[str]) -> dict[int, list[Reused]]:
    """Chunks of documents whose text is unchanged since a committed part, per document: one ``Reused`` per
    chunk, carrying the old row's ``compare`` columns so the caller can tell an unchanged point from one whose
    payload moved on (documents embedded whole go through ``_reused_documents`` instead).

    """
    if not uris:
        return {}
    wanted = pa.array(ids, type=pa.string())
    found: dict[int, list[Reused]] = {}
    columns = ["text_sha256", "vector", *compare, "chunk_index", "char_start", "char_end"]
    for uri in uris:
        old = _old_rows(store, uri, wanted, columns)
        if old is None:
            continue
        docs, table = old
        vectors = arrow_to_vectors(table.column("vector"))
        data = table.drop_columns(["vector"]).to_pydict()
        old_shas = data["text_sha256"]
        olds = list(zip(*(data.get(c) or [_ABSENT] * len(docs) for c in compare)))
        for i, d in enumerate(docs.tolist()):
            if old_shas[i] != shas[d]:
                continue
            span = (data["char_start"][i], data["char_end"][i])
            found.setdefault(d, []).append(Reused(data["chunk_index"][i], span, vectors[i], olds[i]))
    for entries in found.values():
        entries.sort(key=lambda e: e.chunk)
    return found


def _changed_ranges(changed: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) runs of True in a boolean array: compact for a few scattered changes and for all-changed."""
    padded = np.concatenate([[False], changed, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]


def _node_id() -> str | None:
    """Ray node id when running inside Ray, else None."""
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except ImportError:
        pass
    return None
