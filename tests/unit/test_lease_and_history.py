"""The job lease (one writer per job) and the run log, on a local disk; tests/e2e covers S3 and real runs."""

from __future__ import annotations

import json
import multiprocessing
import time
from datetime import datetime, timedelta, timezone

import pytest

from reembed.flows.operations.run_log import RunLog, RunRecord, recorded_run
from reembed.flows.operations.lease import LeaseHeld, LeaseLost, LeaseRecord, LeaseSettings, job_lease, lease_uri
from reembed.indexing.records import RunSummary
from reembed.indexing.storage import write_json


def _hold(output: str, release, ready) -> None:
    with job_lease(output, "docs", LeaseSettings(ttl=30), "holder process"):
        ready.set()
        release.wait(600)


def _holder(output: str, release=None) -> multiprocessing.Process:
    """Another process holding the job's lease until ``release`` is set (never, without one); returned once it
    holds it."""
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    release = release or ctx.Event()
    holder = ctx.Process(target=_hold, args=(output, release, ready))
    holder.release = release  # kept alive here: start() drops its args, and the child still needs the event
    holder.start()
    assert ready.wait(60)
    return holder


def _wait_until(condition, what: str, deadline_s: float = 120) -> None:
    deadline = time.monotonic() + deadline_s
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what} after {deadline_s} s"
        time.sleep(0.05)


def test_a_second_process_is_refused_then_waits_for_the_holder(tmp_path, caplog) -> None:
    import threading

    output = str(tmp_path / "vectors")
    release = multiprocessing.get_context("spawn").Event()
    holder = _holder(output, release)
    try:
        with pytest.raises(LeaseHeld, match=r"another run of job 'docs' is in progress: holder process on .*:\d+ since"):
            with job_lease(output, "docs", LeaseSettings(), "second"):
                pass
        got: dict = {}

        def third() -> None:
            with job_lease(output, "docs", LeaseSettings(wait=300), "third"):
                got["released_first"] = release.is_set()  # it waited for the holder, however long that took
                got["command"] = json.loads(open(lease_uri(output, "docs")).read())["command"]

        waiting = threading.Thread(target=third)
        with caplog.at_level("WARNING", logger="reembed.flows.operations.lease"):
            waiting.start()
            _wait_until(lambda: "waiting up to 300 s" in caplog.text, "the third run to start waiting")
        assert waiting.is_alive() and not got  # still waiting: the holder holds it
        release.set()
        waiting.join(300)
        assert got == {"released_first": True, "command": "third"}
    finally:
        release.set()
        holder.join(30)
    assert not (tmp_path / "vectors" / "_leases" / "docs.json").exists()  # released at the end


def _left_by_a_killed_run(output: str, expires_in: float) -> None:
    now = datetime.now(timezone.utc)
    record = LeaseRecord(job="docs", token="dead", holder="otherhost:4242", command="reembed run",
                         acquired_at=now - timedelta(minutes=5), expires_at=now + timedelta(seconds=expires_in))
    write_json(lease_uri(output, "docs"), record.model_dump(mode="json"))


def test_a_killed_runs_lease_is_taken_over_once_it_expires(tmp_path) -> None:
    output = str(tmp_path / "vectors")
    _left_by_a_killed_run(output, expires_in=30)
    with pytest.raises(LeaseHeld, match="reembed run on otherhost:4242 .* expires at"):
        with job_lease(output, "docs", LeaseSettings(), "next run"):
            pass
    _left_by_a_killed_run(output, expires_in=2)
    expires_at = LeaseRecord.model_validate_json(open(lease_uri(output, "docs")).read()).expires_at
    with job_lease(output, "docs", LeaseSettings(wait=300, ttl=3), "next run") as lease:
        assert datetime.now(timezone.utc) >= expires_at  # taken over once expired, not before
        assert lease.record.command == "next run"


def test_expiry_is_judged_by_the_holders_renewals_on_the_readers_clock(tmp_path) -> None:
    """A holder whose clock runs an hour ahead (its lease 'expires' in an hour) but that stopped renewing is
    taken over once a waiting run has seen its renewal sequence stand still for a ttl; a holder whose clock
    is behind (its lease 'expired' a second ago) but that keeps renewing is not taken over."""
    import threading

    output = str(tmp_path / "vectors")
    _left_by_a_killed_run(output, expires_in=3600)
    started = time.monotonic()
    with job_lease(output, "docs", LeaseSettings(wait=120, ttl=3), "next run") as lease:
        assert lease.record.command == "next run" and time.monotonic() - started >= 3
    stop, first = threading.Event(), threading.Event()

    def renewing_behind() -> None:
        seq = 0
        while not stop.is_set():
            seq += 1
            now = datetime.now(timezone.utc)
            record = LeaseRecord(job="docs", token="alive", holder="otherhost:4242", command="reembed run", seq=seq,
                                 acquired_at=now - timedelta(minutes=5), expires_at=now - timedelta(seconds=1))
            write_json(lease_uri(output, "docs"), record.model_dump(mode="json"))
            first.set()
            stop.wait(0.5)

    holder = threading.Thread(target=renewing_behind)
    holder.start()
    assert first.wait(60)
    try:
        with pytest.raises(LeaseHeld, match="otherhost:4242"):
            with job_lease(output, "docs", LeaseSettings(wait=5, ttl=3), "next run"):
                pass
    finally:
        stop.set()
        holder.join()


def test_a_run_whose_lease_was_taken_over_stops_before_committing(tmp_path) -> None:
    output = str(tmp_path / "vectors")
    with job_lease(output, "docs", LeaseSettings(), "stalled run") as lease:
        lease.check()
        _left_by_a_killed_run(output, expires_in=60)  # another run took it over while this one stalled
        with pytest.raises(LeaseLost, match="taken over by reembed run on otherhost:4242"):
            lease.check()
    assert (tmp_path / "vectors" / "_leases" / "docs.json").exists()  # the new holder's lease is left alone


def test_the_lease_fences_every_write_once_a_takeover_is_seen(tmp_path) -> None:
    """The renewal thread sees the takeover and marks the lease lost: the next write through the fenced store
    raises and writes nothing, while reads still pass through."""
    from reembed.flows.operations.lease import STORE_WRITES, fenced
    from reembed.indexing.vector_store import VectorStore

    output = str(tmp_path / "vectors")
    with job_lease(output, "docs", LeaseSettings(ttl=3), "stalled run") as lease:
        store = fenced(VectorStore(output, "docs-000000000001"), lease, STORE_WRITES)
        store.mark_writing({"collection": "docs-000000000001"})  # held: writes go through
        assert store.writing() == {"collection": "docs-000000000001"}
        _left_by_a_killed_run(output, expires_in=60)  # taken over
        _wait_until(lambda: lease.lost is not None, "the renewal thread to see the takeover")
        assert "lease lost to otherhost:4242 at" in lease.lost
        with pytest.raises(LeaseLost, match="lease lost to otherhost:4242"):
            store.clear_writing()
        assert store.writing() == {"collection": "docs-000000000001"}  # not removed: the write never happened


def test_a_stalled_run_reads_the_lease_before_its_next_write(tmp_path) -> None:
    """A run whose renewals stopped (a stalled process: here its renewal thread is stopped and its last renewal
    made to look a whole ttl old) reads the lease at its next write and finds the takeover before writing."""
    from reembed.flows.operations.lease import INDEX_WRITES, fenced
    from reembed.indexing.index import IndexSettings, open_index

    output = str(tmp_path / "vectors")
    with job_lease(output, "docs", LeaseSettings(ttl=3), "stalled run") as lease, \
            fenced(open_index(IndexSettings(path=str(tmp_path / "qdrant"))), lease, INDEX_WRITES) as index:
        index.ensure_collection("docs-000000000001", 4)
        lease._stop.set()
        lease._thread.join()
        lease.fence()  # renewed on time: nothing is read, nothing raised
        _left_by_a_killed_run(output, expires_in=60)
        assert lease.lost is None  # nobody has looked yet
        lease.renewed -= 3
        with pytest.raises(LeaseLost, match="lease lost to otherhost:4242"):
            index.point_alias("docs", "docs-000000000001")
        assert index.alias_target("docs") is None and index.exists("docs-000000000001")  # reads pass


def test_the_lease_is_reentrant_within_a_process(tmp_path) -> None:
    output = str(tmp_path / "vectors")
    with job_lease(output, "docs", LeaseSettings(), "cli") as outer:
        with job_lease(output, "docs", LeaseSettings(), "flow") as inner:
            assert inner is outer
        outer.check()  # still held after the inner block


def _summary(status: str = "ok") -> RunSummary:
    return RunSummary(alias="docs", collection="docs-abc", mode="refresh", status=status, model="m", dim=8,
                      input_rows=10, indexed=10, encoded=3, reused=7, upserted=3, quarantined=0, tokens=300,
                      seconds=2.0, docs_per_s=5.0, shards_total=1, points=10, output="out", index="edge:x")


def test_every_run_is_recorded_successful_blocked_or_failed(tmp_path) -> None:
    output = str(tmp_path / "vectors")

    class Blocked(Exception):
        pass

    with recorded_run(output, "docs", "cli") as run:
        run.summary = _summary()
    with pytest.raises(Blocked):
        with recorded_run(output, "docs", "schedule", blocked=(Blocked,)):
            raise Blocked("gate: ndcg@10 dropped")
    with pytest.raises(FileNotFoundError):
        with recorded_run(output, "docs", "cli"):
            with recorded_run(output, "docs", "flow"):  # the flow inside the CLI: one record, not two
                raise FileNotFoundError("corpus.jsonl: no such file")
    with recorded_run(output, "docs", "cli") as run:
        run.summary = _summary("up-to-date")

    log = RunLog(output, "docs")
    records = log.records()
    assert [(r.status, r.trigger) for r in records] == [("ok", "cli"), ("blocked", "schedule"), ("failed", "cli"),
                                                       ("up-to-date", "cli")]
    ok = records[0]
    assert (ok.encoded, ok.reused, ok.points, ok.mode, ok.tokens_per_s) == (3, 7, 10, "refresh", 150.0)
    assert records[1].error == "Blocked: gate: ndcg@10 dropped" and records[1].encoded is None
    assert "corpus.jsonl: no such file" in records[2].error
    assert [r.status for r in log.records(limit=2)] == ["failed", "up-to-date"]
    assert log.last_success().run_id == records[3].run_id
    assert all(isinstance(r, RunRecord) and r.finished_at >= r.started_at for r in records)


def test_a_runs_overrides_are_recorded_and_older_records_still_read(tmp_path) -> None:
    """A deployment run's `overrides` (or the CLI's `--set` pairs) are in its record; a record written before the
    log had the column reads with none."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    output = str(tmp_path / "vectors")
    with recorded_run(output, "docs", "deployment", overrides=["runtime.progress_seconds=2", "corpus.limit=5"]) as run:
        run.summary = _summary()
    log = RunLog(output, "docs")
    (record,) = log.records()
    assert (record.trigger, record.overrides) == ("deployment", ["runtime.progress_seconds=2", "corpus.limit=5"])

    old = record.model_copy(update={"run_id": "0ld0ld", "started_at": record.started_at.replace(year=2020)})
    row = old.model_dump()
    row.pop("overrides")
    schema = pq.read_schema(log._files()[0])
    schema = schema.remove(schema.get_field_index("overrides"))
    pq.write_table(pa.Table.from_pylist([row], schema=schema),
                   f"{log.root}/{old.started_at:%Y%m%dT%H%M%S%f}-0ld0ld.parquet")
    first, second = log.records()
    assert (first.run_id, first.overrides, first.encoded) == ("0ld0ld", None, 3) and second.run_id == record.run_id


def test_a_dead_holder_on_this_host_is_taken_over_at_once(tmp_path) -> None:
    output = str(tmp_path / "vectors")
    holder = _holder(output)
    holder.kill()  # SIGKILL: it never releases
    holder.join(30)
    expires_at = LeaseRecord.model_validate_json(open(lease_uri(output, "docs")).read()).expires_at
    with job_lease(output, "docs", LeaseSettings(wait=0), "next run") as lease:  # no waiting allowed
        assert lease.record.command == "next run"
        assert datetime.now(timezone.utc) < expires_at  # at once: long before the dead holder's lease expired


def _run_then_hang(output: str, ready) -> None:
    with job_lease(output, "docs", LeaseSettings(ttl=30), "reembed run"), recorded_run(output, "docs", "cli"):
        ready.set()
        time.sleep(600)  # killed long before


def test_a_killed_run_shows_interrupted_and_a_refused_one_skipped(tmp_path) -> None:
    import os
    import signal

    from reembed.flows.operations.run_log import skipped_when_held

    output = str(tmp_path / "vectors")
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    run = ctx.Process(target=_run_then_hang, args=(output, ready))
    run.start()
    try:
        assert ready.wait(60)
        log = RunLog(output, "docs")
        (record,) = log.records()
        assert record.status == "running" and record.pid == run.pid  # written when the run took the lease
        with pytest.raises(LeaseHeld):
            with skipped_when_held(output, "docs", "schedule"), job_lease(output, "docs", LeaseSettings(), "second"):
                pass
        skipped = log.records()[-1]
        assert skipped.status == "skipped" and skipped.trigger == "schedule"
        assert "reembed run on" in skipped.error and f":{run.pid}" in skipped.error  # names the holder
    finally:
        os.kill(run.pid, signal.SIGKILL)
        run.join(30)
    first, second = RunLog(output, "docs").records()
    assert first.status == "interrupted" and "without a final record" in first.error  # its process is gone
    assert second.status == "skipped"
    last, success = RunLog(output, "docs").latest()
    assert last.status == "skipped" and success is None


def test_a_running_record_elsewhere_is_judged_by_the_lease(tmp_path) -> None:
    from reembed.flows.operations.run_log import still_running

    now = datetime.now(timezone.utc)
    record = RunRecord(run_id="r", job="docs", trigger="cli", status="running", started_at=now, finished_at=now,
                       seconds=0, host="otherhost", pid=4242, pid_started="1")
    lease = LeaseRecord(job="docs", token="t", holder="otherhost:4242", command="reembed run", acquired_at=now,
                        expires_at=now + timedelta(seconds=60))
    assert still_running(record, lease)
    assert not still_running(record, lease.model_copy(update={"expires_at": now - timedelta(seconds=1)}))
    assert not still_running(record, lease.model_copy(update={"holder": "otherhost:999"}))  # taken over
    assert not still_running(record, None)  # released, never finished


def test_a_torn_run_record_is_skipped_with_a_warning(tmp_path, caplog) -> None:
    output = str(tmp_path / "vectors")
    with recorded_run(output, "docs", "cli") as run:
        run.summary = None
    folder = tmp_path / "vectors" / "_runs" / "docs"
    (folder / "20990101T000000000000-torn.parquet").write_bytes(b"PAR1 not a whole file")
    with caplog.at_level("WARNING"):
        records = RunLog(output, "docs").records()
    assert [r.status for r in records] == ["failed"]
    assert "skipping unreadable run record" in caplog.text and "torn.parquet" in caplog.text


def _aged(output: str, days: float, status: str, run_id: str) -> None:
    started = datetime.now(timezone.utc) - timedelta(days=days)
    RunLog(output, "docs").append(RunRecord(run_id=run_id, job="docs", trigger="schedule", status=status,
                                            started_at=started, finished_at=started, seconds=1.0, host="h"))


def test_old_run_records_are_pruned_but_the_latest_run_and_success_stay(tmp_path) -> None:
    """`history --prune-days` and `history.keep_days` (a listener of every run) remove records older than the
    limit, never the latest run's or the latest success's: freshness is measured from that one."""
    from conftest import cli_in_process, last_json
    from reembed.flows.config import load_job
    from reembed.flows.operations.run_log import HistoryPruner, listeners_for

    output = str(tmp_path / "vectors")
    for days, status, run_id in ((90, "ok", "old-ok"), (60, "failed", "old-failed"), (45, "ok", "last-ok"),
                                 (40, "failed", "failed-1"), (35, "failed", "failed-2"), (1, "failed", "recent")):
        _aged(output, days, status, run_id)
    (tmp_path / "job.yaml").write_text(f"name: docs\ncorpus: {{uri: corpus.jsonl}}\noutput: {{uri: {output}}}\n")
    res = cli_in_process("history", str(tmp_path / "job.yaml"), "--prune-days", "50", "--json")
    assert res.returncode == 0, res.stderr
    assert "removed 2 run record(s) older than 50 days" in res.stderr
    assert [r["run_id"] for r in last_json(res.stdout)] == ["last-ok", "failed-1", "failed-2", "recent"]

    job = load_job(tmp_path / "job.yaml", ["history.keep_days=30"])
    (pruner,) = [p for p in listeners_for(job) if isinstance(p, HistoryPruner)]
    with recorded_run(output, "docs", "cli", listeners=[pruner]) as run:  # a run with keep_days: 30
        run.summary = None
    kept = RunLog(output, "docs").records()
    assert [r.run_id for r in kept[:2]] == ["last-ok", "recent"] and len(kept) == 3  # + this run's own record
    assert kept[-1].status == "failed" and kept[-1].run_id == run.run_id
    assert not [p for p in listeners_for(load_job(tmp_path / "job.yaml")) if isinstance(p, HistoryPruner)]
