"""Safe to re-run: unchanged data is never re-encoded, vanished documents leave the index, and a run
SIGKILLed at start-up, mid-upsert or late resumes to exactly a clean run's index."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from conftest import cli_in_process, last_json, no_actors, no_encoding, write_jsonl
from reembed.flows.config import load_job
from reembed.flows.run_flow import run_job
from resume_helpers import (_assert_same, _indexed, _job, _kill_when, _markers, _points, _start,
                            _vectors, _wait_for)


def test_incremental_refresh_on_scifact(tmp_path, scifact_docs, ray_session) -> None:
    docs = [dict(d) for d in scifact_docs[2000:2400]]
    write_jsonl(tmp_path / "inc" / "corpus.jsonl", docs)
    job = load_job(_job(tmp_path / "inc", "inc", "runtime: {shard_rows: 100}\n"))
    first = run_job(job)
    assert first.encoded == 400 and first.points == 400

    rng = random.Random(3)
    changed = rng.sample(range(len(docs)), 4)
    for i in changed:
        docs[i]["text"] += " (revised)"
    deleted = {docs[i]["_id"] for i in rng.sample([i for i in range(len(docs)) if i not in changed], 4)}
    docs = [d for d in docs if d["_id"] not in deleted] + [dict(d, _id=f"new-{d['_id']}") for d in scifact_docs[3000:3004]]
    write_jsonl(tmp_path / "inc" / "corpus.jsonl", docs)
    second = run_job(job)
    assert second.encoded == 8, second  # 4 changed + 4 added, nothing else
    assert second.reused == 392 and second.deleted == 4
    # a normal 1% change passes every guard untouched: nothing forced, every check passed
    assert second.guards.forced is None and all(c.passed for c in second.guards.checks)
    assert {c.name for c in second.guards.checks} == {"max_quarantined_fraction", "max_deleted_fraction",
                                                                "not_empty"}
    assert second.points == second.vector_rows == 400

    with no_encoding(), no_actors():  # nothing to encode: no actor may start, no model may load
        third = run_job(job)
    assert third.shards_skipped == third.shards_total
    assert third.status == "up-to-date" and third.tokens == 0

    for i in (5, 150, 390):  # edited in place: no row moves, so only these three points are written
        docs[i]["text"] += " (edited)"
    write_jsonl(tmp_path / "inc" / "corpus.jsonl", docs)
    fourth = run_job(job)
    assert fourth.encoded == 3 and fourth.upserted == 3 and fourth.deleted == 0, fourth
    assert fourth.points == fourth.vector_rows == 400

    write_jsonl(tmp_path / "clean" / "corpus.jsonl", docs)
    clean = load_job(_job(tmp_path / "clean", "inc", "runtime: {shard_rows: 100}\n"))
    run_job(clean)
    _assert_same(_vectors(job), _vectors(clean))
    assert _points(job) == _points(clean)
    refreshed, rebuilt = _indexed(job), _indexed(clean)  # the refreshed index equals a clean build
    assert {k: p for k, (p, _) in refreshed.items()} == {k: p for k, (p, _) in rebuilt.items()}
    _assert_same({k: v for k, (_, v) in refreshed.items()}, {k: v for k, (_, v) in rebuilt.items()})



@pytest.mark.parametrize(("after_markers", "engine"), [(None, "edge"), (1, "edge"), (5, "local")])
def test_sigkill_of_the_flow_then_resume(tmp_path, kill_reference, after_markers, engine, ray_address) -> None:
    """Kill during start-up, after the first shard commits (Edge mid-upsert), and after five of eight (local mode).
    The killed run is a console-script subprocess on the session Ray; the resume runs in this process."""
    docs, ref_vectors, ref_points = kill_reference
    write_jsonl(tmp_path / "corpus.jsonl", docs)
    job_path = _job(tmp_path, "killed", f"index: {{engine: {engine}}}\n")
    job = load_job(job_path)
    proc = _start(job_path, ray_address=ray_address)
    if after_markers is None:  # during start-up: once the run holds its lease, before any shard can commit
        _wait_for(tmp_path / "reembed-data" / "vectors" / "_leases" / "killed.json", proc)
        _kill_when(proc, lambda: True)
    else:
        _kill_when(proc, lambda: len(list(tmp_path.glob("reembed-data/vectors/*/shards/*.json"))) >= after_markers)

    before = _markers(job)
    done_rows = sum(m["rows"] for m in before.values()
                    if (Path(m["part_uri"]).exists() and m.get("input_fingerprint")))
    res = cli_in_process("run", str(job_path), "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    summary = last_json(res.stdout)
    assert summary["encoded"] == len(docs) - done_rows, (summary, len(before))
    assert summary["points"] == summary["vector_rows"] == len(docs)
    points = _points(job)
    assert len(points) == len(set(points.values())) == len(docs)  # zero duplicate points
    assert points == ref_points
    _assert_same(_vectors(job), ref_vectors)
