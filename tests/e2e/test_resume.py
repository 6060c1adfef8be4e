"""Safe to re-run: killed runs resume, unchanged data is never re-encoded, vanished documents leave the index."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, last_json, no_actors, no_encoding, reembed_cli, run_cli, write_jsonl
from reembed.flows.config import load_job
from reembed.flows.run_flow import run_job
from reembed.indexing.index import open_index
from reembed.indexing.vector_store import VectorStore, arrow_to_vectors



def _vectors(job) -> dict[str, np.ndarray]:
    with open_index(job.index) as index:
        collection = index.alias_target(job.name)
    table = VectorStore(job.output.uri, collection, job.output.storage_options).read_all(["doc_id", "vector"])
    return dict(zip(table.column("doc_id").to_pylist(), arrow_to_vectors(table.column("vector"))))


def _points(job) -> dict[str, str]:
    with open_index(job.index) as index:
        return {p.id: p.payload["doc_id"] for p in index.scroll(job.name, ["doc_id"])}


def _assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    worst = min(float(np.dot(a[k], b[k])) for k in a)
    assert worst >= 0.99999, worst


def _job(folder: Path, name: str, extra: str = "") -> Path:
    (folder / "job.yaml").write_text(
        f"name: {name}\ncorpus: {{uri: corpus.jsonl, id: _id, text: '{{title}} {{text}}'}}\n"
        f"runtime: {{shard_rows: 25}}\n{extra}"
    )
    return folder / "job.yaml"


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


def _indexed(job) -> dict[str, tuple[str, np.ndarray]]:
    """Every point's payload and vector, read back from the index."""
    with open_index(job.index) as index:
        return {p.id: (json.dumps(p.payload, sort_keys=True), np.asarray(p.vector, dtype=np.float32))
                for p in index.scroll(job.name, ["doc_id", "text_sha256", "model", "text", "source_row", "title"],
                                      with_vectors=True)}


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _start(job: Path, *sets: str) -> subprocess.Popen:
    return subprocess.Popen([*reembed_cli(), "run", str(job), "--json", *sets], cwd=ROOT, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the flow process and everything it started (its temporary Prefect server, its local Ray)."""
    pids = _descendants(proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


def _markers(job) -> dict[str, dict]:
    """The shard markers as stored, each part resolved under the store's root (markers name it relatively)."""
    store = VectorStore(job.output.uri, job.collection_name(384))
    fs_root = Path(store.root) / "shards"
    markers = {p.stem: json.loads(p.read_text()) for p in fs_root.glob("*.json")} if fs_root.exists() else {}
    return {k: {**m, "part_uri": store.locate(m["part_uri"])} for k, m in markers.items()}


@pytest.fixture(scope="module")
def kill_reference(tmp_path_factory, scifact_docs, ray_session):
    folder = tmp_path_factory.mktemp("kill-ref")
    docs = scifact_docs[2500:2700]
    write_jsonl(folder / "corpus.jsonl", docs)
    job = load_job(_job(folder, "killed"))
    run_job(job)
    return docs, _vectors(job), _points(job)


@pytest.mark.parametrize(("after_markers", "engine"), [(None, "edge"), (1, "edge"), (5, "local")])
def test_sigkill_of_the_flow_then_resume(tmp_path, kill_reference, after_markers, engine) -> None:
    """Kill during start-up, after the first shard commits (Edge mid-upsert), and after five of eight (local mode)."""
    docs, ref_vectors, ref_points = kill_reference
    write_jsonl(tmp_path / "corpus.jsonl", docs)
    job_path = _job(tmp_path, "killed", f"index: {{engine: {engine}}}\n")
    job = load_job(job_path)
    proc = _start(job_path)
    deadline = time.time() + (random.Random(0).uniform(2, 6) if after_markers is None else 300)
    while time.time() < deadline and proc.poll() is None:
        if after_markers is not None and len(list(tmp_path.glob("reembed-data/vectors/*/shards/*.json"))) >= after_markers:
            break
        time.sleep(0.05)
    finished_before_kill = proc.poll() is not None
    _kill_group(proc)
    assert not finished_before_kill, "the run ended before the kill: the trial tested nothing"

    before = _markers(job)
    done_rows = sum(m["rows"] for m in before.values()
                    if (Path(m["part_uri"]).exists() and m.get("input_fingerprint")))
    res = run_cli("run", str(job_path), "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    summary = last_json(res.stdout)
    assert summary["encoded"] == len(docs) - done_rows, (summary, len(before), finished_before_kill)
    assert summary["points"] == summary["vector_rows"] == len(docs)
    points = _points(job)
    assert len(points) == len(set(points.values())) == len(docs)  # zero duplicate points
    assert points == ref_points
    _assert_same(_vectors(job), ref_vectors)


def test_killing_a_ray_worker_mid_shard(tmp_path, kill_reference) -> None:
    docs, ref_vectors, _ = kill_reference
    write_jsonl(tmp_path / "corpus.jsonl", docs)
    job_path = _job(tmp_path, "killed")
    proc = _start(job_path)
    victim = None
    deadline = time.time() + 120
    while victim is None and time.time() < deadline and proc.poll() is None:
        workers = [p for p in _descendants(proc.pid) if "EmbedWorker" in _cmdline(p)]
        markers = list((tmp_path / "reembed-data" / "vectors").glob("*/shards/*.json"))
        if workers and markers:  # actors are up and at least one shard is through: kill one mid-run
            victim = workers[0]
            os.kill(victim, signal.SIGKILL)
        time.sleep(0.2)
    out, _ = proc.communicate(timeout=600)
    assert victim is not None, "never saw an embedding actor to kill"
    assert proc.returncode == 0, out[-3000:]
    summary = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
    assert summary["points"] == summary["indexed"] == len(docs)
    _assert_same(_vectors(load_job(job_path)), ref_vectors)


def test_sigkill_then_resume_on_s3(tmp_path, kill_reference, s3_server) -> None:
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
    proc = _start(job_path)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:  # kill once the first shard's marker is on S3
        fs.invalidate_cache()
        if fs.glob("reembed/killed-out/*/shards/*.json"):
            break
        time.sleep(0.2)
    finished_before_kill = proc.poll() is not None
    _kill_group(proc)
    assert not finished_before_kill, "the run ended before the kill: the trial tested nothing"
    fs.invalidate_cache()
    killed = fs.glob("reembed/killed-out/*/shards/*.json")
    assert killed, "no shard finished before the kill: the resume would test nothing"
    res = run_cli("run", str(job_path), "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    summary = last_json(res.stdout)
    assert summary["points"] == summary["vector_rows"] == len(docs)
    assert summary["mode"] == "resume" and summary["shards_embedded"] < summary["shards_total"], (summary, killed)
    job = load_job(job_path)
    assert _points(job) == ref_points
    _assert_same(_vectors(job), ref_vectors)


def test_sigkill_during_a_refresh_upsert_then_rerun_heals_the_collection(tmp_path, kill_reference) -> None:
    """A refresh killed after its first shard's points reached the live collection leaves ``writing.json``;
    the re-run trusts nothing about the collection, compares its ids in full, and ends equal to a clean build."""
    docs = [dict(d) for d in kill_reference[0]]
    write_jsonl(tmp_path / "live" / "corpus.jsonl", docs)
    job_path = _job(tmp_path / "live", "refreshed")
    job = load_job(job_path)
    first = run_cli("run", str(job_path), "--json")
    assert first.returncode == 0, first.stderr[-3000:]
    for i in range(3, len(docs), 12):  # two or three edits in every shard of 25
        docs[i]["text"] += " (edited)"
    write_jsonl(tmp_path / "live" / "corpus.jsonl", docs)
    old = {k: m["input_fingerprint"] for k, m in _markers(job).items()}
    store = VectorStore(job.output.uri, job.collection_name(384))

    proc = _start(job_path)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:  # kill once a re-embedded shard's points are upserted
        if any(m["stage"] == "indexed" and m["input_fingerprint"] != old.get(k) for k, m in _markers(job).items()):
            break
        time.sleep(0.02)
    finished_before_kill = proc.poll() is not None
    _kill_group(proc)
    assert not finished_before_kill, "the refresh ended before the kill: the trial tested nothing"
    assert store.writing() is not None, "killed after the commit: the trial tested nothing"

    res = run_cli("run", str(job_path), "--json")
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


def _wait_for(path: Path, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while not path.exists():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_two_runs_of_one_job_at_once(tmp_path, kill_reference) -> None:
    """The first holds the lease; a second without --wait exits 3 naming it; a third waits, then finds nothing
    to do; the run log holds both runs that ran and the refused one as skipped; the index equals a single clean
    run."""
    docs, ref_vectors, ref_points = kill_reference
    write_jsonl(tmp_path / "corpus.jsonl", docs)
    job_path = _job(tmp_path, "killed")
    job = load_job(job_path)
    first = _start(job_path)
    _wait_for(tmp_path / "reembed-data" / "vectors" / "_leases" / "killed.json", first)
    waiting = _start(job_path, "--wait", "600")
    refused = run_cli("run", str(job_path), "--json")
    assert refused.returncode == 3, refused.stderr[-3000:]
    assert "another run of job 'killed' is in progress: reembed run on" in refused.stderr
    assert first.wait(600) == 0
    assert waiting.wait(600) == 0
    # stdout and stderr share one pipe here: the summary is the last line that is a JSON object
    summaries = [json.loads([line for line in p.stdout.read().splitlines() if line.startswith("{")][-1])
                 for p in (first, waiting)]
    assert [s["status"] for s in summaries] == ["ok", "up-to-date"]
    assert summaries[0]["encoded"] == len(docs)
    points = _points(job)
    assert points == ref_points and len(points) == len(set(points.values())) == len(docs)
    _assert_same(_vectors(job), ref_vectors)

    history = run_cli("history", str(job_path), "--json")
    assert history.returncode == 0, history.stderr[-3000:]
    runs = last_json(history.stdout)
    # both runs that ran, and the refused one as skipped, naming the holder
    assert [(r["status"], r["trigger"]) for r in runs] == [("ok", "cli"), ("skipped", "cli"), ("up-to-date", "cli")]
    assert "another run of job 'killed' is in progress: reembed run on" in runs[1]["error"]
    assert (runs[0]["encoded"], runs[0]["points"], runs[0]["reused"]) == (len(docs), len(docs), 0)
    assert runs[0]["tokens_per_s"] > 0 and runs[0]["model"] == summaries[0]["model"]
    status = last_json(run_cli("status", str(job_path), "--json").stdout)
    assert status["last_run_status"] == "up-to-date" and 0 <= status["last_success_age_s"] < 600

    (tmp_path / "corpus.jsonl").rename(tmp_path / "moved.jsonl")  # a failed run is recorded too
    failed = run_cli("run", str(job_path))
    assert failed.returncode == 2
    last = last_json(run_cli("history", str(job_path), "--json", "--limit", "1").stdout)
    assert [r["status"] for r in last] == ["failed"] and "corpus.jsonl" in last[0]["error"]


def test_the_lease_of_a_sigkilled_run_is_taken_over_after_it_expires(tmp_path, kill_reference) -> None:
    docs, ref_vectors, ref_points = kill_reference
    write_jsonl(tmp_path / "corpus.jsonl", docs)
    job_path = _job(tmp_path, "killed", "lease: {ttl: 15}\n")
    job = load_job(job_path)
    proc = _start(job_path)
    lease = tmp_path / "reembed-data" / "vectors" / "_leases" / "killed.json"
    _wait_for(lease, proc)
    time.sleep(2)
    _kill_group(proc)
    held = json.loads(lease.read_text())  # as if it ran on another worker host: only expiry can free it
    lease.write_text(json.dumps({**held, "holder": "another-host:" + held["holder"].rsplit(":", 1)[1]}))
    refused = run_cli("run", str(job_path))
    assert refused.returncode == 3 and "another run of job 'killed' is in progress" in refused.stderr
    runs = last_json(run_cli("history", str(job_path), "--json").stdout)
    assert [r["status"] for r in runs] == ["interrupted", "skipped"]  # the killed run's process is gone
    started = time.time()
    res = run_cli("run", str(job_path), "--json", "--wait", "120")
    assert res.returncode == 0, res.stderr[-3000:]
    assert time.time() - started < 120
    assert "taking over the expired lease" in res.stderr
    assert last_json(res.stdout)["points"] == len(docs)
    assert _points(job) == ref_points
    _assert_same(_vectors(job), ref_vectors)
    assert not lease.exists()
