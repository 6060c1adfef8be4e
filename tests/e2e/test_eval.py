"""Published pair scores reproduced with the bundled all-MiniLM-L6-v2 (MTEB reference, ±0.3 points), and
`reembed eval` on the sample as a user runs it."""

from __future__ import annotations

import json

import pytest

from conftest import DATASETS, ROOT, cli_in_process, last_json
from reembed.flows.evaluate import evaluate_pairs
from reembed.workers.encoder import Encoder

PUBLISHED_STSB_SPEARMAN = 82.032


def test_stsb_spearman_matches_published() -> None:
    path = DATASETS / "stsbenchmark" / "sts-test.csv"
    if not path.exists():
        pytest.skip(f"STS Benchmark not found at {path}")
    metrics = evaluate_pairs(Encoder(), path)
    assert metrics["pairs"] == 1379
    assert abs(metrics["spearman"] * 100 - PUBLISHED_STSB_SPEARMAN) <= 0.3, metrics


def test_eval_cli_json_on_sample(tmp_path, ray_session) -> None:
    sick = DATASETS / "sickr" / "SICK.txt"
    if not sick.exists():
        pytest.skip(f"SICK-R not found at {sick}")
    job = ROOT / "examples" / "sample" / "job.yaml"
    sets = ["--set", f"output.uri={tmp_path / 'v'}", "--set", f"index.path={tmp_path / 'q'}"]
    assert cli_in_process("run", str(job), *sets).returncode == 0
    (tmp_path / "queries.jsonl").write_text(
        "".join(json.dumps({"_id": q, "text": t}) + "\n" for q, t in
                [("q1", "how does yeast make bread rise"), ("q2", "what causes tides"), ("q3", "桜")]))
    (tmp_path / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\nq1\tdoc-002\t1\nq2\tdoc-017\t1\nq3\tdoc-039\t1\n")
    res = cli_in_process("eval", str(job), *sets, "--queries", str(tmp_path / "queries.jsonl"),
                  "--qrels", str(tmp_path / "qrels.tsv"), "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = last_json(res.stdout)
    assert set(metrics) >= {"ndcg@10", "recall@100", "mrr@10"}
    assert metrics["mrr@10"] == 1.0 and metrics["ndcg@10"] == 1.0
    res = cli_in_process("eval", str(job), *sets, "--pairs", str(sick), "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    pairs = last_json(res.stdout)
    assert pairs["pairs"] == 9927 and 0.7 < pairs["spearman"] < 0.9
