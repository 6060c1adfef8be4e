"""Published scores reproduced end to end with the bundled all-MiniLM-L6-v2 (MTEB reference, ±0.3 points)."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from conftest import DATASETS, ROOT, SCIFACT, last_json, run_cli
from reembed.flows.config import load_job
from reembed.flows.evaluate import evaluate_pairs, evaluate_retrieval
from reembed.flows.run_flow import run_job
from reembed.indexing.index import open_index
from reembed.indexing.vector_store import VectorStore
from reembed.workers.encoder import Encoder

PUBLISHED_SCIFACT_NDCG10 = 64.508
PUBLISHED_STSB_SPEARMAN = 82.032


@pytest.fixture(scope="module")
def scifact_full(tmp_path_factory, ray_session):
    if not (SCIFACT / "corpus.jsonl").exists():
        pytest.skip(f"SciFact not found at {SCIFACT}")
    folder = tmp_path_factory.mktemp("scifact-full")
    (folder / "job.yaml").write_text(
        f"name: scifact\ncorpus: {{uri: '{SCIFACT / 'corpus.jsonl'}', id: _id, text: '{{title}} {{text}}'}}\n"
        "runtime: {shard_rows: 1000}\n"
    )
    job = load_job(folder / "job.yaml")
    return job, run_job(job)


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


def test_stsb_spearman_matches_published() -> None:
    path = DATASETS / "stsbenchmark" / "sts-test.csv"
    if not path.exists():
        pytest.skip(f"STS Benchmark not found at {path}")
    metrics = evaluate_pairs(Encoder(), path)
    assert metrics["pairs"] == 1379
    assert abs(metrics["spearman"] * 100 - PUBLISHED_STSB_SPEARMAN) <= 0.3, metrics


def test_eval_cli_json_on_sample(tmp_path) -> None:
    sick = DATASETS / "sickr" / "SICK.txt"
    if not sick.exists():
        pytest.skip(f"SICK-R not found at {sick}")
    job = ROOT / "examples" / "sample" / "job.yaml"
    sets = ["--set", f"output.uri={tmp_path / 'v'}", "--set", f"index.path={tmp_path / 'q'}"]
    assert run_cli("run", str(job), *sets).returncode == 0
    (tmp_path / "queries.jsonl").write_text(
        "".join(json.dumps({"_id": q, "text": t}) + "\n" for q, t in
                [("q1", "how does yeast make bread rise"), ("q2", "what causes tides"), ("q3", "桜")]))
    (tmp_path / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\nq1\tdoc-002\t1\nq2\tdoc-017\t1\nq3\tdoc-039\t1\n")
    res = run_cli("eval", str(job), *sets, "--queries", str(tmp_path / "queries.jsonl"),
                  "--qrels", str(tmp_path / "qrels.tsv"), "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = last_json(res.stdout)
    assert set(metrics) >= {"ndcg@10", "recall@100", "mrr@10"}
    assert metrics["mrr@10"] == 1.0 and metrics["ndcg@10"] == 1.0
    res = run_cli("eval", str(job), *sets, "--pairs", str(sick), "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    pairs = last_json(res.stdout)
    assert pairs["pairs"] == 9927 and 0.7 < pairs["spearman"] < 0.9
