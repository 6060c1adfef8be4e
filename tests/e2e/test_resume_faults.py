"""Faults mid-run: an embedding actor killed, a run killed on S3, a refresh killed while its points reach
the live collection; each ends equal to a clean run."""

from __future__ import annotations

import json
import os
import signal
import time

from conftest import cli_in_process, last_json, write_jsonl
from reembed.flows.config import load_job
from reembed.flows.run_flow import run_job
from reembed.indexing.vector_store import VectorStore
from resume_helpers import (_assert_same, _cmdline, _indexed, _job, _kill_when, _markers, _points,
                            _start, _vectors)


def test_killing_a_ray_worker_mid_shard(tmp_path, kill_reference, ray_address) -> None:
    """The run (a console-script subprocess on the session's Ray) loses an embedding actor once it has written
    a shard: the actor is SIGKILLed by the PID its shard marker names (its own run's actor, at work on the
    next shard), Ray restarts it, the shard in flight is retried, and the run ends equal to a clean one."""
    docs, ref_vectors, _ = kill_reference
    write_jsonl(tmp_path / "corpus.jsonl", docs)
    job_path = _job(tmp_path, "killed")
    proc = _start(job_path, ray_address=ray_address)
    victim = None
    deadline = time.time() + 120
    while victim is None and time.time() < deadline and proc.poll() is None:
        for marker in (tmp_path / "reembed-data" / "vectors").glob("*/shards/*.json"):
            try:
                pid = json.loads(marker.read_text()).get("pid")
            except (OSError, ValueError):  # being written
                continue
            if pid and "EmbedWorker" in _cmdline(pid):  # a shard is through: kill its actor mid-run
                victim = pid
                os.kill(victim, signal.SIGKILL)
                break
        time.sleep(0.2)
    out, _ = proc.communicate(timeout=600)
    assert victim is not None, "never saw an embedding actor to kill"
    assert proc.returncode == 0, out[-3000:]
    summary = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
    assert summary["points"] == summary["indexed"] == len(docs)
    _assert_same(_vectors(load_job(job_path)), ref_vectors)


def test_sigkill_then_resume_on_s3(tmp_path, kill_reference, s3_server, ray_address) -> None:
    import s3fs

    docs, ref_vectors, ref_points = kill_reference
    fs = s3fs.S3FileSystem(key=s3_server["key"], secret=s3_server["secret"],
                           client_kwargs={"endpoint_url": s3_server["endpoint"]}, skip_instance_cache=True)
    write_jsonl(tmp_path / "local.jsonl", docs)
    fs.put_file(str(tmp_path / "local.jsonl"), "reembed/killed/corpus.jsonl")
    opts = (f"{{endpoint_url: '{s3_server['endpoint']}', key: {s3_server['key']}, secret: {s3_server['secret']}}}")
    job_path = tmp_path / "job.yaml"
    job_path.write_text(
        f"name: killed\ncorpus: {{uri: s3://reembed/killed/corpus.jsonl, id: _id, text: '{{title}} {{text}}', "
        f"storage_options: {opts}}}\noutput: {{uri: s3://reembed/killed-out, storage_options: {opts}}}\n"
        "runtime: {shard_rows: 25}\n"
    )
    def first_marker_on_s3() -> bool:
        fs.invalidate_cache()
        return bool(fs.glob("reembed/killed-out/*/shards/*.json"))

    _kill_when(_start(job_path, ray_address=ray_address), first_marker_on_s3, poll_s=0.2)
    fs.invalidate_cache()
    killed = fs.glob("reembed/killed-out/*/shards/*.json")
    assert killed, "no shard finished before the kill: the resume would test nothing"
    res = cli_in_process("run", str(job_path), "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    summary = last_json(res.stdout)
    assert summary["points"] == summary["vector_rows"] == len(docs)
    assert summary["mode"] == "resume" and summary["shards_embedded"] < summary["shards_total"], (summary, killed)
    job = load_job(job_path)
    assert _points(job) == ref_points
    _assert_same(_vectors(job), ref_vectors)


def test_sigkill_during_a_refresh_upsert_then_rerun_heals_the_collection(tmp_path, kill_reference,
                                                                        ray_address) -> None:
    """A refresh killed after its first shard's points reached the live collection leaves ``writing.json``;
    the re-run trusts nothing about the collection, compares its ids in full, and ends equal to a clean build."""
    docs = [dict(d) for d in kill_reference[0]]
    write_jsonl(tmp_path / "live" / "corpus.jsonl", docs)
    job_path = _job(tmp_path / "live", "refreshed")
    job = load_job(job_path)
    first = cli_in_process("run", str(job_path), "--json")
    assert first.returncode == 0, first.stderr[-3000:]
    for i in range(3, len(docs), 12):  # two or three edits in every shard of 25
        docs[i]["text"] += " (edited)"
    write_jsonl(tmp_path / "live" / "corpus.jsonl", docs)
    old = {k: m["input_fingerprint"] for k, m in _markers(job).items()}
    store = VectorStore(job.output.uri, job.collection_name(384))

    _kill_when(_start(job_path, ray_address=ray_address), lambda: any(  # once a re-embedded shard's points are upserted
        m["stage"] == "indexed" and m["input_fingerprint"] != old.get(k) for k, m in _markers(job).items()),
        poll_s=0.02, what="refresh")
    assert store.writing() is not None, "killed after the commit: the trial tested nothing"

    res = cli_in_process("run", str(job_path), "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    summary = last_json(res.stdout)
    assert summary["points"] == summary["vector_rows"] == len(docs) and summary["encoded"] < len(docs), summary
    assert store.writing() is None
    write_jsonl(tmp_path / "clean" / "corpus.jsonl", docs)
    clean = load_job(_job(tmp_path / "clean", "refreshed"))
    run_job(clean)
    refreshed, rebuilt = _indexed(job), _indexed(clean)
    assert {k: p for k, (p, _) in refreshed.items()} == {k: p for k, (p, _) in rebuilt.items()}
    _assert_same({k: v for k, (_, v) in refreshed.items()}, {k: v for k, (_, v) in rebuilt.items()})
