"""Published scores reproduced end to end with the bundled all-MiniLM-L6-v2 (MTEB reference, ±0.3 points)."""

from __future__ import annotations

import json

import pyarrow.parquet as pq

from conftest import SCIFACT
from reembed.flows.evaluate import evaluate_retrieval
from reembed.indexing.index import open_index
from reembed.indexing.vector_store import VectorStore
from reembed.workers.encoder import Encoder

PUBLISHED_SCIFACT_NDCG10 = 64.508


def test_scifact_ndcg_matches_published(scifact_full) -> None:
    job, summary = scifact_full
    assert summary.indexed == summary.points == 5183
    with open_index(job.index) as index:
        metrics = evaluate_retrieval(job, Encoder(job.model), index, job.name, SCIFACT / "queries.jsonl",
                                     SCIFACT / "qrels" / "test.tsv")
    assert metrics["queries"] == 300
    assert abs(metrics["ndcg@10"] * 100 - PUBLISHED_SCIFACT_NDCG10) <= 0.3, metrics
    assert 0 < metrics["mrr@10"] <= 1 and metrics["recall@100"] >= metrics["ndcg@10"]


def test_truncation_is_reported_not_silent(scifact_full) -> None:
    job, summary = scifact_full
    assert summary.truncated_docs > 0 and summary.dropped_tokens > 0
    store = VectorStore(job.output.uri, summary.collection)
    meta = [json.loads(pq.read_schema(p).metadata[b"reembed"]) for p in
            (u for u in store.current_parts())]
    assert sum(m["truncated_docs"] for m in meta) == summary.truncated_docs
    assert sum(m["dropped_tokens"] for m in meta) == summary.dropped_tokens
