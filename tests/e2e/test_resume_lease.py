"""One writer per job: two runs at once, and the lease of a SIGKILLed run taken over once it expires."""

from __future__ import annotations

import json
import time
from datetime import datetime

from conftest import cli_in_process, last_json, run_cli, write_jsonl
from reembed.flows.config import load_job
from reembed.indexing.index import open_index
from resume_helpers import _assert_same, _job, _kill_group, _points, _start, _vectors, _wait_for


def test_two_runs_of_one_job_at_once(tmp_path, kill_reference, ray_address) -> None:
    """The first holds the lease; a second without --wait exits 3 naming it; a third waits, then finds nothing
    to do; the run log holds both runs that ran and the refused one as skipped; the index equals a single clean
    run."""
    docs, ref_vectors, ref_points = kill_reference
    write_jsonl(tmp_path / "corpus.jsonl", docs)
    job_path = _job(tmp_path, "killed")
    job = load_job(job_path)
    first = _start(job_path, ray_address=ray_address)
    _wait_for(tmp_path / "reembed-data" / "vectors" / "_leases" / "killed.json", first)
    waiting = _start(job_path, "--wait", "600", ray_address=ray_address)
    refused = cli_in_process("run", str(job_path), "--json")
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

    history = cli_in_process("history", str(job_path), "--json")
    assert history.returncode == 0, history.stderr[-3000:]
    runs = last_json(history.stdout)
    # both runs that ran, and the refused one as skipped, naming the holder
    assert [(r["status"], r["trigger"]) for r in runs] == [("ok", "cli"), ("skipped", "cli"), ("up-to-date", "cli")]
    assert "another run of job 'killed' is in progress: reembed run on" in runs[1]["error"]
    assert (runs[0]["encoded"], runs[0]["points"], runs[0]["reused"]) == (len(docs), len(docs), 0)
    assert runs[0]["tokens_per_s"] > 0 and runs[0]["model"] == summaries[0]["model"]
    status = last_json(cli_in_process("status", str(job_path), "--json").stdout)
    assert status["last_run_status"] == "up-to-date" and 0 <= status["last_success_age_s"] < 600

    (tmp_path / "corpus.jsonl").rename(tmp_path / "moved.jsonl")  # a failed run is recorded too
    failed = cli_in_process("run", str(job_path))
    assert failed.returncode == 2
    last = last_json(cli_in_process("history", str(job_path), "--json", "--limit", "1").stdout)
    assert [r["status"] for r in last] == ["failed"] and "corpus.jsonl" in last[0]["error"]


def test_the_lease_of_a_sigkilled_run_is_taken_over_after_it_expires(tmp_path, kill_reference, ray_address) -> None:
    docs, ref_vectors, ref_points = kill_reference
    write_jsonl(tmp_path / "corpus.jsonl", docs)
    job_path = _job(tmp_path, "killed", "lease: {ttl: 15}\n")
    job = load_job(job_path)
    proc = _start(job_path, ray_address=ray_address)
    lease = tmp_path / "reembed-data" / "vectors" / "_leases" / "killed.json"
    _wait_for(lease, proc)
    time.sleep(2)
    _kill_group(proc)
    held = json.loads(lease.read_text())  # as if it ran on another worker host: only expiry can free it
    lease.write_text(json.dumps({**held, "holder": "another-host:" + held["holder"].rsplit(":", 1)[1]}))
    refused = cli_in_process("run", str(job_path))
    assert refused.returncode == 3 and "another run of job 'killed' is in progress" in refused.stderr
    runs = last_json(cli_in_process("history", str(job_path), "--json").stdout)
    assert [r["status"] for r in runs] == ["interrupted", "skipped"]  # the killed run's process is gone
    res = run_cli("run", str(job_path), "--json", "--wait", "120", "--set", f"runtime.ray_address={ray_address}")
    assert res.returncode == 0, res.stderr[-3000:]  # it got the lease within --wait (exit 3 otherwise)
    assert "taking over the expired lease" in res.stderr
    took_over = last_json(cli_in_process("history", str(job_path), "--json", "--limit", "1").stdout)[0]
    assert took_over["status"] == "ok"
    assert datetime.fromisoformat(took_over["started_at"]) >= datetime.fromisoformat(held["expires_at"])  # not before
    assert last_json(res.stdout)["points"] == len(docs)
    assert _points(job) == ref_points
    _assert_same(_vectors(job), ref_vectors)
    assert not lease.exists()


def test_a_run_taken_over_mid_upsert_makes_no_further_write(tmp_path, kill_reference, monkeypatch) -> None:
    """The test steals the lease while the run's first upsert batch is in flight: once the run's renewal thread
    has seen the takeover, no write reaches the index (no upsert batch, delete or alias move) and nothing is
    committed; the run exits 1 naming the new holder and is recorded as failed with that reason. The new holder
    (here: the next run, once the stolen lease is gone) ends equal to a clean build."""
    from reembed.flows.operations import lease as lease_module
    from reembed.flows.operations.run_log import RunLog
    from reembed.indexing.edge_index import EdgeIndex
    from reembed.indexing.vector_store import VectorStore

    docs, ref_vectors, ref_points = kill_reference
    write_jsonl(tmp_path / "corpus.jsonl", docs)
    job_path = _job(tmp_path, "stolen", "lease: {ttl: 3}\nindex: {upsert_batch: 10}\n")
    job = load_job(job_path)
    lease_file = tmp_path / "reembed-data" / "vectors" / "_leases" / "stolen.json"
    seen: dict[str, object] = {}
    writes_after: list[str] = []

    def steal_on_first_batch(original):
        def upsert(self, *args, **kwargs):
            if "lease" not in seen:
                (held,) = lease_module._ACTIVE.values()
                record = json.loads(lease_file.read_text())
                lease_file.write_text(json.dumps({**record, "token": "stolen", "holder": "otherhost:4242",
                                                  "command": "reembed run", "expires_at": "2999-01-01T00:00:00Z"}))
                deadline = time.monotonic() + 120
                while held.lost is None:  # the renewal thread (every ttl/3 = 1 s) sees the takeover
                    assert time.monotonic() < deadline, "the takeover was never seen"
                    time.sleep(0.05)
                seen["lease"] = held
            elif seen["lease"].lost is not None:
                writes_after.append("upsert")
            return original(self, *args, **kwargs)
        return upsert

    def counted(name, original):
        def write(self, *args, **kwargs):
            if "lease" in seen:
                writes_after.append(name)
            return original(self, *args, **kwargs)
        return write

    monkeypatch.setattr(EdgeIndex, "upsert", steal_on_first_batch(EdgeIndex.upsert))
    for name in ("delete_points", "finish_bulk_load", "point_alias", "point_aliases", "drop"):
        monkeypatch.setattr(EdgeIndex, name, counted(name, getattr(EdgeIndex, name)))
    res = cli_in_process("run", str(job_path))
    assert res.returncode == 1, res.stderr[-3000:]
    assert "error:" in res.stderr and "lease lost to otherhost:4242" in res.stderr, res.stderr[-3000:]
    assert writes_after == []  # the batch in flight finished; nothing was written after the takeover was seen
    record = RunLog(job.output.uri, "stolen").records()[-1]
    assert record.status == "failed" and "lease lost to otherhost:4242" in record.error
    with open_index(job.index) as index:
        assert index.alias_target("stolen") is None  # nothing went live
        collections = index.collections()
    assert all(VectorStore(job.output.uri, c).read_manifest() is None for c in collections)  # nothing committed
    assert json.loads(lease_file.read_text())["token"] == "stolen"  # the new holder's lease is left alone

    monkeypatch.undo()
    lease_file.unlink()  # the new holder is done
    again = cli_in_process("run", str(job_path), "--json")
    assert again.returncode == 0, again.stderr[-3000:]
    points = _points(job)
    assert points == ref_points and len(points) == len(set(points.values())) == len(docs)
    _assert_same(_vectors(job), ref_vectors)
