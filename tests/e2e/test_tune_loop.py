"""The fine-tuning loop end to end on a SciFact slice (issue 17): `reembed tune` on the train qrels, then a
backfill with the job variant it writes, gated on the test qrels. Real training steps on the bundled
all-MiniLM-L6-v2: a tune on the real judgements passes the gate and goes live, and `reembed versions` shows both
versions' scores; a tune on shuffled judgements (a deliberately harmful training set) is blocked, and the base
model stays live. `tune --negatives dense` mines the live collection and never opens the test qrels the job's
gate names (checked in the first loop)."""

from __future__ import annotations

import random
import shutil
import sys
from pathlib import Path

import pytest

from conftest import SCIFACT, cli_in_process, last_json, write_jsonl

pytestmark = pytest.mark.slow

TRAIN_QUERIES = 100  # SciFact train queries the slice keeps, with every document judged relevant to them
TEST_QUERIES = 100  # test queries the gate scores on, with theirs
OTHERS = 100  # documents nobody judged, so a query has more to miss


def _qrels_file(path: Path, pairs: list[tuple[str, str]]) -> Path:
    path.write_text("query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t1\n" for q, d in pairs))
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory, scifact_docs, ray_session) -> dict:
    """The slice, its job (a retrieval gate on the slice's test qrels, tolerance 0) and the base model's run."""
    from reembed.flows.config import load_job
    from reembed.flows.evaluate import read_qrels
    from reembed.flows.run_flow import run_job

    folder = tmp_path_factory.mktemp("tune-loop")
    train, test = read_qrels(SCIFACT / "qrels" / "train.tsv"), read_qrels(SCIFACT / "qrels" / "test.tsv")
    train_pairs = [(q, d) for q in sorted(train)[:TRAIN_QUERIES] for d, g in train[q].items() if g > 0]
    test_pairs = [(q, d) for q in sorted(test)[:TEST_QUERIES] for d, g in test[q].items() if g > 0]
    judged = {d for _, d in train_pairs + test_pairs}
    docs = [d for d in scifact_docs if str(d["_id"]) in judged]
    docs += [d for d in scifact_docs if str(d["_id"]) not in judged][:OTHERS]
    present = {str(d["_id"]) for d in docs}
    write_jsonl(folder / "corpus.jsonl", docs)
    _qrels_file(folder / "train.tsv", [(q, d) for q, d in train_pairs if d in present])
    _qrels_file(folder / "test.tsv", [(q, d) for q, d in test_pairs if d in present])
    (folder / "job.yaml").write_text(
        "name: loop\ncorpus: {uri: corpus.jsonl, id: _id, text: '{title} {text}'}\nmodel: {name: all-MiniLM-L6-v2}\n"
        f"gate: {{queries: '{SCIFACT / 'queries.jsonl'}', qrels: test.tsv, metric: ndcg@10, tolerance: 0.0}}\n")
    summary = run_job(load_job(folder / "job.yaml"))
    assert summary.points == len(docs)
    return {"folder": folder, "collection": summary.collection, "docs": len(docs), "train_pairs": train_pairs}


@pytest.fixture()
def loop(base, tmp_path) -> Path:
    """A copy of the base run's folder (corpus, job, vectors and index) for one test to move the alias in."""
    folder = tmp_path / "loop"
    shutil.copytree(base["folder"], folder)
    return folder


def _eval(job: Path) -> dict:
    res = cli_in_process("eval", str(job), "--queries", str(SCIFACT / "queries.jsonl"), "--qrels",
                         str(job.parent / "test.tsv"), "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    return last_json(res.stdout)


def _tune(job: Path, qrels: Path, out: Path, *extra: str) -> dict:
    res = cli_in_process("tune", str(job), "--queries", str(SCIFACT / "queries.jsonl"), "--qrels", str(qrels),
                         "--out", str(out), "--json", *extra)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return last_json(res.stdout)


def _opened_while(watched_name: str, action):
    """Run ``action`` and return what it returned and the paths named ``watched_name`` it opened (an audit
    hook sees every open() of the process; hooks cannot be removed, so this one stops recording after)."""
    opened: list[str] = []
    watching = [True]

    def audit(event: str, args: tuple) -> None:
        if watching[0] and event == "open" and isinstance(args[0], str) and Path(args[0]).name == watched_name:
            opened.append(str(Path(args[0]).resolve()))

    sys.addaudithook(audit)
    try:
        return action(), opened
    finally:
        watching[0] = False


def test_a_model_tuned_on_the_judgements_passes_the_gate_and_goes_live(base, loop) -> None:
    """Dense negatives mined from the live collection (it holds every test document), and the job's gate names
    the test qrels: `tune` opens none of them. The tuned model then passes the gate on those test qrels."""
    from reembed.flows.config import load_job
    from reembed.flows.run_flow import run_job

    job = loop / "job.yaml"
    before = _eval(job)
    assert before["collection"] == base["collection"]
    report, opened = _opened_while("test.tsv", lambda: _tune(job, loop / "train.tsv", loop / "tuned",
                                                              "--negatives", "dense"))
    assert not opened, opened  # the gate's judgements, named in the job file, were never read by tune
    assert {Path(f["path"]).name for f in report["data"].values()} == {"queries.jsonl", "train.tsv"}
    assert report["negatives"] == "dense" and report["hard_negatives"] >= 0.9 * report["train_queries"]
    assert report["train_pairs"] > 0 and report["val_score"] > 0
    backfill = run_job(load_job(report["job_variant"]))  # an ordinary backfill: a new version beside the live one
    assert backfill.collection != base["collection"] and backfill.points == base["docs"]
    gate = backfill.gate
    assert gate is not None and gate.passed and gate.live_score is not None
    assert gate.new_score > gate.live_score  # better on test queries it never saw, not merely let through
    after = _eval(job)
    assert after["collection"] == backfill.collection and after["ndcg@10"] == pytest.approx(gate.new_score)
    assert after["ndcg@10"] > before["ndcg@10"] == pytest.approx(gate.live_score)
    listed = cli_in_process("versions", str(job), "--json")
    assert listed.returncode == 0, listed.stderr[-2000:]
    versions = {v["collection"]: v for v in last_json(listed.stdout)}
    assert versions[backfill.collection]["live"] and versions[backfill.collection]["gate"] == "passed"
    assert versions[backfill.collection]["score"] == pytest.approx(gate.new_score)
    assert not versions[base["collection"]]["live"]  # the base, first built with no gate, shows its gate score
    assert versions[base["collection"]]["score"] == pytest.approx(gate.live_score)


def test_a_model_tuned_on_shuffled_judgements_is_blocked_and_the_base_stays_live(base, loop) -> None:
    from reembed.flows.config import load_job
    from reembed.flows.gate import GateFailed
    from reembed.flows.run_flow import run_job

    job = loop / "job.yaml"
    pairs = base["train_pairs"]
    documents = [d for _, d in pairs]
    random.Random(7).shuffle(documents)
    shuffled = _qrels_file(loop / "shuffled.tsv", [(q, d) for (q, _), d in zip(pairs, documents)])
    report = _tune(job, shuffled, loop / "tuned", "--epochs", "2", "--learning-rate", "1e-4")
    with pytest.raises(GateFailed) as blocked:
        run_job(load_job(report["job_variant"]))
    gate = blocked.value.result
    assert not gate.passed and gate.live == base["collection"] and gate.new_score < gate.live_score
    after = _eval(job)
    assert after["collection"] == base["collection"] and after["ndcg@10"] == pytest.approx(gate.live_score)
