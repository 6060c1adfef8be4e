"""The run log: one Parquet record per run of a job, kept beside the vectors.

Operators ask "when did this alias last refresh, and what did each run do?" long after Prefect's own history
is gone (a run without a server keeps none). Each run owns one small file,
``<output.uri>/_runs/<job>/<started>-<run id>.parquet``: two runs never write the same object (which matters on
``s3://``), and the names sort by start time, so the latest runs are read without listing them all into memory.

A run writes a ``running`` record as soon as it holds the job's lease and replaces it (one atomic write) with
its final record when it ends: ``ok``, ``up-to-date``, ``trial``, ``blocked`` or ``failed``. A run killed
outright (``kill -9``, the OOM killer, a lost node) never writes its final record; readers show its ``running``
record as ``interrupted`` once its process is gone (on the host it ran on, by pid and start time) or the job's
lease is no longer its own. A run refused because another run held the lease is recorded as ``skipped``, with
the holder. The same record then goes to the run's listeners (``listeners_for``: the pushed metrics), so the
log and what dashboards show never disagree.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import types
import typing
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Literal, Protocol

import pyarrow as pa
import pyarrow.parquet as pq

from reembed.flows.gate import GateFailed
from reembed.flows.guards import GuardBlocked
from reembed.flows.operations.lease import LeaseHeld, LeaseRecord, process_started, read_lease
from reembed.indexing.records import Record, RunSummary, Status
from reembed.indexing.storage import StorageOptions, filesystem, join, protocol_of, write_local_atomic

if TYPE_CHECKING:
    from reembed.flows.config import JobConfig

logger = logging.getLogger(__name__)

Trigger = Literal["cli", "schedule", "deployment", "flow"]
RunStatus = Literal["ok", "trial", "up-to-date", "blocked", "failed", "running", "interrupted", "skipped"]
SUCCESS: tuple[Status, ...] = ("ok", "up-to-date")  # the alias is fresh after these (a trial never touches it)
BLOCKED: tuple[type[BaseException], ...] = (GateFailed, GuardBlocked)  # a run stopped on purpose, not broken


class RunRecord(Record):
    """One run of a job, as ``reembed history`` lists it and dashboards read it."""

    run_id: str
    job: str
    trigger: Trigger
    overrides: list[str] | None = None  # the run's `--set` pairs (CLI) or its deployment run's `overrides`
    status: RunStatus
    mode: str | None = None
    started_at: datetime
    finished_at: datetime
    seconds: float
    collection: str | None = None
    model: str | None = None
    input_rows: int | None = None
    encoded: int | None = None
    reused: int | None = None
    upserted: int | None = None
    deleted: int | None = None
    quarantined: int | None = None
    points: int | None = None
    tokens: int | None = None
    docs_per_s: float | None = None
    tokens_per_s: float | None = None
    gate_metric: str | None = None
    gate_new_score: float | None = None
    gate_live_score: float | None = None
    error: str | None = None
    blocked_by: str | None = None  # a blocked run: "gate" (the quality gate) or "guards"
    host: str
    pid: int | None = None
    pid_started: str | None = None  # the process's start time (/proc), so a reused pid is not taken for it

    @classmethod
    def from_run(cls, run_id: str, job: str, trigger: Trigger, started_at: datetime, summary: RunSummary | None,
                 status: RunStatus, error: str | None = None, overrides: list[str] | None = None) -> "RunRecord":
        finished = datetime.now(timezone.utc)
        seconds = (finished - started_at).total_seconds()
        counts = {}
        if summary is not None:
            counts = {name: getattr(summary, name) for name in (
                "mode", "collection", "model", "input_rows", "encoded", "reused", "upserted", "deleted",
                "quarantined", "points", "tokens", "docs_per_s")}
            work_s = summary.seconds or seconds
            counts["tokens_per_s"] = round(summary.tokens / work_s, 1) if summary.tokens and work_s else None
            if summary.gate is not None:
                counts.update(gate_metric=summary.gate.metric, gate_new_score=summary.gate.new_score,
                              gate_live_score=summary.gate.live_score)
        return cls(run_id=run_id, job=job, trigger=trigger, overrides=overrides or None, status=status,
                   started_at=started_at,
                   finished_at=finished, seconds=round(seconds, 3), error=error, host=socket.gethostname(),
                   pid=os.getpid(), pid_started=process_started(os.getpid()), **counts)


def _arrow_type(annotation: object) -> pa.DataType:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return _arrow_type(args[0])
    if typing.get_origin(annotation) is list:
        return pa.list_(_arrow_type(typing.get_args(annotation)[0]))
    if annotation is int:
        return pa.int64()
    if annotation is float:
        return pa.float64()
    if annotation is datetime:
        return pa.timestamp("us", tz="UTC")
    return pa.string()  # str and the Literal types


SCHEMA = pa.schema([pa.field(name, _arrow_type(f.annotation)) for name, f in RunRecord.model_fields.items()])


class RunLog:
    """A job's run log under an output URI."""

    def __init__(self, output_uri: str, job: str, options: StorageOptions | None = None) -> None:
        self.root = join(output_uri, "_runs", job)
        self.output_uri = output_uri
        self.job = job
        self.options = options

    def append(self, record: RunRecord) -> str:
        """Write a run's record as its own file (replacing, in one atomic write, the ``running`` record the same
        run wrote when it started); returns its URI."""
        uri = join(self.root, f"{record.started_at:%Y%m%dT%H%M%S%f}-{record.run_id}.parquet")
        fs, path = filesystem(uri, self.options)
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist([record.model_dump()], schema=SCHEMA), sink)
        if protocol_of(uri) in ("file", "local"):
            write_local_atomic(path, sink.getvalue().to_pybytes())
        else:
            fs.pipe_file(path, sink.getvalue().to_pybytes())
        return uri

    def _files(self) -> list[str]:
        fs, path = filesystem(self.root, self.options)
        try:
            return sorted(fs.glob(f"{path.rstrip('/')}/*.parquet"))
        except FileNotFoundError:
            return []

    def _read(self, name: str) -> RunRecord | None:
        """One record, or None (with a warning naming the file) when it is torn or unreadable."""
        fs, _ = filesystem(self.root, self.options)
        try:
            with fs.open(name, "rb") as fh:
                (row,) = pq.read_table(fh, schema=SCHEMA).to_pylist()
            return RunRecord.model_validate(row)
        except Exception as exc:
            logger.warning("skipping unreadable run record %s: %s: %s", name, type(exc).__name__, exc)
            return None

    def _settled(self, record: RunRecord, lease: LeaseRecord | None) -> RunRecord:
        """A ``running`` record whose run is gone reads as ``interrupted``."""
        if record.status != "running" or still_running(record, lease):
            return record
        return record.model_copy(update={"status": "interrupted", "error": record.error or (
            "the run stopped without a final record (killed, or its machine lost); its lease is no longer held")})

    def records(self, limit: int | None = None) -> list[RunRecord]:
        """The runs, oldest first; with ``limit``, only the latest ``limit``. Unreadable records are skipped."""
        files = self._files()
        lease = self._lease()
        read = (self._read(name) for name in (files[-limit:] if limit is not None else files))
        return [self._settled(r, lease) for r in read if r is not None]

    def latest(self) -> tuple[RunRecord | None, RunRecord | None]:
        """The last run, and the latest run after which the alias was fresh (one listing, newest first)."""
        last = None
        lease = self._lease()
        for name in reversed(self._files()):
            record = self._read(name)
            if record is None:
                continue
            record = self._settled(record, lease)
            last = last or record
            if record.status in SUCCESS:
                return last, record
        return last, None

    def _lease(self) -> LeaseRecord | None:
        try:
            return read_lease(self.output_uri, self.job, self.options)
        except Exception as exc:  # an unreadable lease: judge by the process alone
            logger.warning("could not read the lease of %s: %s", self.job, exc)
            return None

    def last_success(self) -> RunRecord | None:
        return self.latest()[1]

    def prune(self, keep_days: float) -> int:
        """Remove the records of runs that started more than ``keep_days`` ago, except the latest run's and the
        latest success's (freshness is measured from it); returns how many were removed. Ages come from the
        file names (``<started>-<run id>.parquet``), so only the records kept as latest are read."""
        files = self._files()
        cutoff = datetime.now(timezone.utc) - timedelta(days=keep_days)
        keep = set(files[-1:])
        for name in reversed(files):
            record = self._read(name)
            if record is not None and record.status in SUCCESS:
                keep.add(name)
                break
        old = [name for name in files if name not in keep and (_started(name) or cutoff) < cutoff]
        if old:
            fs, _ = filesystem(self.root, self.options)
            fs.rm(old)
            logger.info("removed %d run record(s) of %s older than %g days", len(old), self.job, keep_days)
        return len(old)


def _started(name: str) -> datetime | None:
    """A record's start time from its file name; None for a name reembed did not write."""
    try:
        return datetime.strptime(name.rsplit("/", 1)[-1].split("-", 1)[0], "%Y%m%dT%H%M%S%f").replace(
            tzinfo=timezone.utc)
    except ValueError:
        return None


class HistoryPruner:
    """A run's listener that applies ``history.keep_days`` once the run's own record is written."""

    def __init__(self, log: RunLog, keep_days: float) -> None:
        self.log, self.keep_days = log, keep_days

    def finished(self, record: RunRecord, summary: RunSummary | None) -> None:
        self.log.prune(self.keep_days)


class RecordedRun:
    """What the block tells the recorder: the summary once there is one; and who hears of the outcome."""

    def __init__(self, run_id: str, listeners: Sequence[RunListener] = ()) -> None:
        self.run_id = run_id
        self.summary: RunSummary | None = None
        self.listeners: list[RunListener] = list(listeners)

    def listen(self, listeners: Sequence[RunListener]) -> None:
        """Add listeners of a kind not yet listening (the flow inside the CLI brings its own)."""
        kinds = {type(listener) for listener in self.listeners}
        self.listeners += [listener for listener in listeners if type(listener) not in kinds]


_ACTIVE: dict[str, RecordedRun] = {}  # run logs with a run being recorded in this process (the CLI, then its flow)
_ACTIVE_LOCK = threading.Lock()


class RunListener(Protocol):
    """Told of every run's outcome, from the record the run log keeps (the pushed metrics are one)."""

    def finished(self, record: RunRecord, summary: RunSummary | None) -> None: ...


def listeners_for(job: "JobConfig") -> list[RunListener]:
    """Who besides the run log hears of the job's runs: the Pushgateway, when the job names one; the pruning
    of old records, when ``history.keep_days`` is set."""
    from reembed.flows.operations.metrics import pusher_for

    pruner = (HistoryPruner(RunLog(job.output.uri, job.name, job.output.storage_options), job.history.keep_days)
              if job.history.keep_days else None)
    return [p for p in (pusher_for(job), pruner) if p is not None]


@contextmanager
def recorded_run(output_uri: str, job: str, trigger: Trigger, options: StorageOptions | None = None,
                 blocked: tuple[type[BaseException], ...] = BLOCKED, overrides: list[str] | None = None,
                 listeners: Sequence[RunListener] = ()) -> Iterator[RecordedRun]:
    """Append one record when the block ends, however it ends: its summary's status, ``blocked`` for the
    ``blocked`` exception types (the gate, the guards), ``failed`` for any other error; then tell the
    ``listeners`` from that same record. This is the one place a run's outcome is published. Re-entrant
    within a process (the flow inside the CLI publishes nothing of its own)."""
    log = RunLog(output_uri, job, options)
    with _ACTIVE_LOCK:
        outer = _ACTIVE.get(log.root)
        run = outer or RecordedRun(secrets.token_hex(6), listeners)
        _ACTIVE[log.root] = run
    if outer is not None:  # the flow inside the CLI: one record, published by the outer block, to both's listeners
        outer.listen(listeners)
        yield outer
        return
    started = datetime.now(timezone.utc)
    running = RunRecord.from_run(run.run_id, job, trigger, started, None, "running", overrides=overrides)
    _append(log, running.model_copy(update={"finished_at": started, "seconds": 0.0}))
    try:
        yield run
    except BaseException as exc:
        summary = getattr(exc, "summary", None) or run.summary
        status: Status = "blocked" if isinstance(exc, blocked) else "failed"
        error = f"{type(exc).__name__}: {exc}" if not isinstance(exc, KeyboardInterrupt) else "interrupted"
        record = RunRecord.from_run(run.run_id, job, trigger, started, summary, status, error[:2000], overrides)
        if status == "blocked":
            record.blocked_by = "gate" if isinstance(exc, GateFailed) else "guards" if isinstance(
                exc, GuardBlocked) else type(exc).__name__
        _publish(log, record, summary, run.listeners)
        raise
    else:
        summary = run.summary
        status = summary.status if summary is not None else "failed"
        error = None if summary is not None else "the run ended without a summary"
        _publish(log, RunRecord.from_run(run.run_id, job, trigger, started, summary, status, error, overrides),
                 summary, run.listeners)
    finally:
        with _ACTIVE_LOCK:
            _ACTIVE.pop(log.root, None)


@contextmanager
def skipped_when_held(output_uri: str, job: str, trigger: Trigger, options: StorageOptions | None = None,
                      overrides: list[str] | None = None, listeners: Sequence[RunListener] = ()) -> Iterator[None]:
    """Around taking the job's lease: a run refused because another run holds it is recorded as ``skipped``."""
    try:
        yield
    except LeaseHeld as exc:
        record_skipped(output_uri, job, trigger, str(exc), options, overrides, listeners)
        raise


def record_skipped(output_uri: str, job: str, trigger: Trigger, reason: str,
                   options: StorageOptions | None = None, overrides: list[str] | None = None,
                   listeners: Sequence[RunListener] = ()) -> None:
    """Record a run that did not start because another run of the job held its lease (``reason`` names it)."""
    now = datetime.now(timezone.utc)
    _publish(RunLog(output_uri, job, options),
             RunRecord.from_run(secrets.token_hex(6), job, trigger, now, None, "skipped", reason[:2000], overrides),
             None, listeners)


def still_running(record: RunRecord, lease: LeaseRecord | None) -> bool:
    """Whether the run behind a ``running`` record may still be going: on this host, its process (pid and start
    time) is alive; elsewhere, the job's lease is held, unexpired, by that run's process."""
    if record.host == socket.gethostname() and record.pid is not None and record.pid_started is not None:
        return process_started(record.pid) == record.pid_started
    if lease is None:
        return False
    return lease.holder == f"{record.host}:{record.pid}" and lease.expires_at > datetime.now(timezone.utc)


def _publish(log: RunLog, record: RunRecord, summary: RunSummary | None, listeners: Sequence[RunListener]) -> None:
    """The run log first (it is what `history` and `status` read), then every listener; none can fail the run."""
    _append(log, record)
    for listener in listeners:
        try:
            listener.finished(record, summary)
        except Exception as exc:
            logger.warning("run listener %s failed: %s", type(listener).__name__, exc)


def _append(log: RunLog, record: RunRecord) -> None:
    try:
        log.append(record)
    except Exception as exc:  # the log is for people; never turn a finished run into a failed one over it
        logger.warning("could not append to the run log %s: %s", log.root, exc)
