"""Unattended runs do not hurt the live index: guards, plans, trial runs, progress and honest summaries.

Every case runs against a live collection built by a real run (Ray actors, Prefect, Qdrant local mode) and
checks the live side afterwards by count, vectors, search and alias, not only the exit code.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, cli_in_process, flow_run_artifacts, last_json, no_actors, run_cli
from reembed.flows.config import load_job
from reembed.flows.planning import live_collection, plan_run
from reembed.flows.run_flow import run_job
from reembed.indexing.index import open_index
from reembed.indexing.records import ShardTask
from reembed.indexing.vector_store import VectorStore
from reembed.workers.embed_worker import EmbedWorker
from reembed.workers.encoder import Encoder


SAMPLE_CORPUS = ROOT / "examples" / "sample" / "corpus.jsonl"


def _job(folder: Path, extra: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "corpus.jsonl").exists():
        shutil.copy(SAMPLE_CORPUS, folder / "corpus.jsonl")
    (folder / "job.yaml").write_text(
        "name: guarded\ncorpus: {uri: corpus.jsonl, id: id, text: '{title} {text}', payload: [title]}\n"
        f"runtime: {{shard_rows: 20}}\n{extra}")
    return folder / "job.yaml"


def _docs(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "corpus.jsonl").read_text().splitlines()]


def _write(folder: Path, docs: list[dict]) -> None:
    (folder / "corpus.jsonl").write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs))


def _live(job) -> tuple[str | None, int, dict[str, np.ndarray], list[str]]:
    """Alias target, point count, every point's vector by doc id, and the top hits of a fixed query."""
    query, _ = Encoder(job.model).encode(["why does bread rise"], kind="query")
    with open_index(job.index) as index:
        target = index.alias_target(job.name)
        points = list(index.scroll(job.name, ["doc_id"], with_vectors=True))
        hits = [h["doc_id"] for h in index.search(job.name, query[0], 5)]
        return target, index.count(job.name), {p.payload["doc_id"]: np.asarray(p.vector) for p in points}, hits


def _assert_unchanged(before, after) -> None:
    assert after[0] == before[0] and after[1] == before[1] and after[3] == before[3]
    assert sorted(after[2]) == sorted(before[2])
    assert all(np.allclose(after[2][k], before[2][k]) for k in before[2])


@pytest.fixture()
def live(tmp_path, ray_session):
    job_path = _job(tmp_path / "g")
    job = load_job(job_path)
    summary = run_job(job)
    assert summary.points == 40 and summary.status == "ok"
    return job_path, job, _live(job)


def test_wrong_id_key_against_live_changes_nothing(live) -> None:
    job_path, job, before = live
    res = run_cli("run", str(job_path), "--set", "corpus.id=_id")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "'_id'" in errors[0] and "columns found: ['id'" in errors[0], res.stderr[-2000:]
    _assert_unchanged(before, _live(job))
    assert before[3][0] == "doc-002"


def test_delete_guard_blocks_then_force_is_recorded(live) -> None:
    job_path, job, before = live
    folder = job_path.parent
    _write(folder, _docs(folder)[:20])  # half the corpus vanished (a truncated upload, say)
    res = cli_in_process("run", str(job_path), "--json")
    assert res.returncode == 1, res.stderr[-3000:]
    error = next(line for line in res.stderr.splitlines() if line.startswith("error:"))
    assert "20 of 40 live points would be removed (50.0%)" in error and "guards.max_deleted_fraction 20.0%" in error
    assert f"the live version {before[0]} is unchanged" in error
    assert last_json(res.stdout)["status"] == "blocked"
    _assert_unchanged(before, _live(job))
    manifest_before = VectorStore(job.output.uri, before[0]).read_manifest()
    assert manifest_before.input_rows == 40  # the committed manifest was not touched

    res = cli_in_process("run", str(job_path), "--json", "--force", "corpus halved on purpose")
    assert res.returncode == 0, res.stderr[-3000:]
    summary = last_json(res.stdout)
    assert summary["points"] == 20 and summary["deleted"] == 20
    manifest = VectorStore(job.output.uri, before[0]).read_manifest()
    assert manifest.forced == "corpus halved on purpose"
    failed = [c for c in manifest.guards.checks if not c.passed]
    assert [c.name for c in failed] == ["max_deleted_fraction"] and failed[0].value == 0.5
    # the files the old manifest named and the new one does not are gone; the new ones remain
    parts = {Path(p.part_uri).name for p in manifest.parts}
    assert {p.name for p in Path(VectorStore(job.output.uri, before[0]).root, "vectors").glob("*.parquet")} == parts


def test_quarantine_guard_blocks_before_any_write(live) -> None:
    job_path, job, before = live
    folder = job_path.parent
    docs = _docs(folder)
    for d in docs[5:17]:  # 12 of 40 rows (30%) lose their text
        d["text"], d["title"] = "", ""
    docs[0]["text"] = "A completely different first document about volcanoes."
    _write(folder, docs)
    res = cli_in_process("run", str(job_path))
    assert res.returncode == 1, res.stderr[-3000:]
    error = next(line for line in res.stderr.splitlines() if line.startswith("error:"))
    assert "12 of 40 input rows quarantined (30.0%)" in error and "first reasons:" in error
    assert "row 6: empty text" in error
    quarantine = re.search(r"quarantined rows are in (\S+?);", error).group(1)
    rows = [json.loads(line) for p in Path(quarantine).glob("*.jsonl") for line in p.read_text().splitlines()]
    assert len(rows) == 12 and all(r["reason"] == "empty text" for r in rows)
    # nothing was written into the live collection: the changed document keeps its old vector
    _assert_unchanged(before, _live(job))


def test_plan_fresh_half_done_refresh_and_changed_model(tmp_path, ray_session) -> None:
    job_path = _job(tmp_path / "p")
    job = load_job(job_path)
    fresh = json.loads(cli_in_process("plan", str(job_path), "--json").stdout.splitlines()[-1])
    assert fresh["mode"] == "new-version" and fresh["live_collection"] is None
    assert fresh["shards_total"] == fresh["shards_todo"] == 2 and fresh["rows_known"] == 40
    assert fresh["job"]["corpus"]["id"] == "id" and fresh["collection"].startswith("guarded-")

    plan = plan_run(job, None, None)  # a killed run: one shard's Parquet part and marker written, nothing else
    shard = plan.shards[0]
    EmbedWorker(job.model).process_shard(ShardTask(
        shard=shard, corpus=job.corpus, output_uri=job.output.uri, collection=plan.collection,
        storage_options=job.output.storage_options, model_fingerprint=plan.model_fingerprint,
        input_fingerprint=plan.input_fps[shard.shard_id]))
    half = last_json(cli_in_process("plan", str(job_path), "--json").stdout)
    assert half["mode"] == "resume" and half["shards_written"] == 1 and half["shards_todo"] == 1
    assert [s["state"] for s in half["shards"]] == ["written", "todo"]

    state = run_job(job, return_state=True)  # the resumed run: the half-done shard is upserted, the other embedded
    assert state.is_completed() and state.result().shards_embedded == 1
    # every step of the data path is a task run of this flow run in Prefect's API (what its UI shows)
    expected = ("plan-shards", "embed-", "mark-writing", "upsert-", "vector-set", "check-guards", "reconcile",
                "check-invariant", "write-manifest", "quality-gate", "move-alias", "retention")
    deadline = time.monotonic() + 60  # task run states reach the API through Prefect's event stream, a bit later
    while True:
        steps = _task_runs(state.state_details.flow_run_id)
        missing = [s for s in expected if not any(name.startswith(s) for name in steps)]
        if (not missing and set(steps.values()) == {"COMPLETED"}) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert not missing, (missing, steps)
    assert set(steps.values()) == {"COMPLETED"}, steps
    # the outcome is published as this flow run's artifacts, under the job's stable keys
    artifacts = flow_run_artifacts(state.state_details.flow_run_id)
    assert set(artifacts) == {f"reembed-guarded-{what}" for what in ("headline", "summary", "shards", "progress")}
    assert artifacts["reembed-guarded-headline"].startswith("**ok** (resume): 40 points in")
    summary_table = json.loads(artifacts["reembed-guarded-summary"])
    assert {"metric": "encoded", "value": "20"} in summary_table
    assert {"metric": "guard max_quarantined_fraction", "value": "passed: 0 (limit 0.05)"} in summary_table
    assert {"metric": "guard not_empty", "value": "passed: 40 (limit 1)"} in summary_table
    # one row per shard, in plan order: the half-done one only upserted, the other embedded by an actor
    shards = json.loads(artifacts["reembed-guarded-shards"])
    assert [(s["shard"], s["outcome"], s["rows"], s["encoded"]) for s in shards] == [
        (plan.shards[0].shard_id, "upserted", 20, 0), (plan.shards[1].shard_id, "embedded", 20, 20)]
    assert shards[1]["actor"] and shards[1]["seconds"] > 0 and shards[0]["actor"] is None
    assert artifacts["reembed-guarded-progress"] == 100.0  # 20 of the 20 documents this run embedded
    assert plan_run(job, None, live_collection(job)).mode == "up-to-date"
    docs = _docs(job_path.parent)
    docs[30]["text"] += " (revised)"
    _write(job_path.parent, docs)
    refresh = last_json(cli_in_process("plan", str(job_path), "--json").stdout)
    # a changed file changes every shard cut from it; unchanged documents will reuse their vectors
    assert refresh["mode"] == "refresh" and refresh["shards_done"] == 0 and refresh["shards_todo"] == 2

    changed = last_json(cli_in_process("plan", str(job_path), "--set", "model.pooling=cls", "--json").stdout)
    assert changed["mode"] == "new-version" and changed["backfill"] is True
    assert changed["live_collection"] == refresh["collection"] != changed["collection"]


def _task_runs(flow_run_id) -> dict[str, str]:
    """Task run name -> state type of one flow run, read back from the Prefect API."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name: r.state_type.value for r in runs}


def test_noop_rerun_says_so_and_trial_never_goes_live(live, monkeypatch) -> None:
    import ray

    import reembed.flows.run_flow

    job_path, job, before = live

    def tripwire(*args, **kwargs):
        raise AssertionError("a no-op run started a Prefect flow or Ray")

    with monkeypatch.context() as patched, no_actors():  # neither Prefect's flow nor Ray may start
        patched.setattr(reembed.flows.run_flow, "run_job", tripwire)
        patched.setattr(ray, "init", tripwire)
        res = cli_in_process("run", str(job_path), "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    summary = last_json(res.stdout)
    assert summary["status"] == "up-to-date" and summary["encoded"] == summary["tokens"] == 0
    assert summary["truncated_docs"] == 0 and summary["points"] == 40
    assert "nothing to do: guarded is up to date" in res.stderr

    trial = cli_in_process("run", str(job_path), "--limit", "7", "--json")
    assert trial.returncode == 0, trial.stderr[-2000:]
    t = last_json(trial.stdout)
    assert t["status"] == "trial" and t["points"] == 7 and t["collection"].startswith("guarded-trial-")
    assert "never becomes live" in trial.stderr
    hits = last_json(cli_in_process("search", str(job_path), "why does bread rise", "--version", t["collection"],
                                    "--json").stdout)
    assert len(hits) == 7  # only the trial's first 7 documents are in it
    _assert_unchanged(before, _live(job))
    versions = last_json(cli_in_process("versions", str(job_path), "--json").stdout)
    assert [v["collection"] for v in versions] == [before[0]]


def test_status_and_versions_before_any_run(tmp_path) -> None:
    job_path = _job(tmp_path / "never")
    for command in ("status", "versions"):
        res = run_cli(command, str(job_path))
        assert res.returncode == 2, (command, res.stderr)
        assert "run `reembed run" in res.stderr and "Traceback" not in res.stderr
