"""One writer per job: two runs at once, and the lease of a SIGKILLed run taken over once it expires."""

from __future__ import annotations

import json
import time
from datetime import datetime

from conftest import cli_in_process, last_json, run_cli, write_jsonl
from reembed.flows.config import load_job
from resume_helpers import _assert_same, _job, _kill_group, _points, _start, _vectors, _wait_for


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
    failed = run_cli("run", str(job_path))
    assert failed.returncode == 2
    last = last_json(cli_in_process("history", str(job_path), "--json", "--limit", "1").stdout)
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
    runs = last_json(cli_in_process("history", str(job_path), "--json").stdout)
    assert [r["status"] for r in runs] == ["interrupted", "skipped"]  # the killed run's process is gone
    res = run_cli("run", str(job_path), "--json", "--wait", "120")
    assert res.returncode == 0, res.stderr[-3000:]  # it got the lease within --wait (exit 3 otherwise)
    assert "taking over the expired lease" in res.stderr
    took_over = last_json(cli_in_process("history", str(job_path), "--json", "--limit", "1").stdout)[0]
    assert took_over["status"] == "ok"
    assert datetime.fromisoformat(took_over["started_at"]) >= datetime.fromisoformat(held["expires_at"])  # not before
    assert last_json(res.stdout)["points"] == len(docs)
    assert _points(job) == ref_points
    _assert_same(_vectors(job), ref_vectors)
    assert not lease.exists()
