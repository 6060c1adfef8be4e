"""The run log: one Parquet record per run of a job, successful, blocked or failed, kept beside the vectors.

Operators ask "when did this alias last refresh, and what did each run do?" long after Prefect's own history
is gone (a run without a server keeps none). Each run writes its own small file,
``<output.uri>/_runs/<job>/<started>-<run id>.parquet``: appending never rewrites what is there, two runs never
write the same object (which matters on ``s3://``), and the names sort by start time, so the latest runs are
read without listing them all into memory.
"""

from __future__ import annotations

import logging
import secrets
import socket
import threading
import types
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq

from reembed.flows.gate import GateFailed
from reembed.flows.guards import GuardBlocked
from reembed.indexing.records import Record, RunSummary, Status
from reembed.indexing.storage import StorageOptions, filesystem, join

logger = logging.getLogger(__name__)

Trigger = Literal["cli", "schedule", "deployment", "flow"]
SUCCESS: tuple[Status, ...] = ("ok", "up-to-date")  # the alias is fresh after these (a trial never touches it)
BLOCKED: tuple[type[BaseException], ...] = (GateFailed, GuardBlocked)  # a run stopped on purpose, not broken


class RunRecord(Record):
    """One run of a job, as ``reembed history`` lists it and dashboards read it."""

    run_id: str
    job: str
    trigger: Trigger
    status: Status
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
    host: str

    @classmethod
    def from_run(cls, run_id: str, job: str, trigger: Trigger, started_at: datetime, summary: RunSummary | None,
                 status: Status, error: str | None = None) -> "RunRecord":
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
        return cls(run_id=run_id, job=job, trigger=trigger, status=status, started_at=started_at,
                   finished_at=finished, seconds=round(seconds, 3), error=error, host=socket.gethostname(), **counts)


def _arrow_type(annotation: object) -> pa.DataType:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return _arrow_type(args[0])
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
        self.job = job
        self.options = options

    def append(self, record: RunRecord) -> str:
        """Write one record as its own file; returns its URI."""
        uri = join(self.root, f"{record.started_at:%Y%m%dT%H%M%S%f}-{record.run_id}.parquet")
        fs, path = filesystem(uri, self.options)
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        table = pa.Table.from_pylist([record.model_dump()], schema=SCHEMA)
        with fs.open(path, "wb") as fh:
            pq.write_table(table, fh)
        return uri

    def _files(self) -> list[str]:
        fs, path = filesystem(self.root, self.options)
        try:
            return sorted(fs.glob(f"{path.rstrip('/')}/*.parquet"))
        except FileNotFoundError:
            return []

    def _read(self, name: str) -> RunRecord:
        fs, _ = filesystem(self.root, self.options)
        with fs.open(name, "rb") as fh:
            (row,) = pq.read_table(fh, schema=SCHEMA).to_pylist()
        return RunRecord.model_validate(row)

    def records(self, limit: int | None = None) -> list[RunRecord]:
        """The runs, oldest first; with ``limit``, only the latest ``limit``."""
        files = self._files()
        return [self._read(name) for name in (files[-limit:] if limit is not None else files)]

    def latest(self) -> tuple[RunRecord | None, RunRecord | None]:
        """The last run, and the latest run after which the alias was fresh (one listing, newest first)."""
        last = None
        for name in reversed(self._files()):
            record = self._read(name)
            last = last or record
            if record.status in SUCCESS:
                return last, record
        return last, None

    def last_success(self) -> RunRecord | None:
        return self.latest()[1]


_ACTIVE: set[str] = set()  # run logs with a run being recorded in this process (the CLI, then its flow)
_ACTIVE_LOCK = threading.Lock()


class RecordedRun:
    """What the block tells the recorder: the summary once there is one."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.summary: RunSummary | None = None


@contextmanager
def recorded_run(output_uri: str, job: str, trigger: Trigger, options: StorageOptions | None = None,
                 blocked: tuple[type[BaseException], ...] = BLOCKED) -> Iterator[RecordedRun]:
    """Append one record when the block ends, however it ends: its summary's status, ``blocked`` for the
    ``blocked`` exception types (the gate, the guards), ``failed`` for any other error. Re-entrant within a
    process."""
    log = RunLog(output_uri, job, options)
    with _ACTIVE_LOCK:
        nested = log.root in _ACTIVE
        _ACTIVE.add(log.root)
    run = RecordedRun(secrets.token_hex(6))
    if nested:
        yield run
        return
    started = datetime.now(timezone.utc)
    try:
        yield run
    except BaseException as exc:
        summary = getattr(exc, "summary", None) or run.summary
        status: Status = "blocked" if isinstance(exc, blocked) else "failed"
        error = f"{type(exc).__name__}: {exc}" if not isinstance(exc, KeyboardInterrupt) else "interrupted"
        _append(log, RunRecord.from_run(run.run_id, job, trigger, started, summary, status, error[:2000]))
        raise
    else:
        summary = run.summary
        status = summary.status if summary is not None else "failed"
        error = None if summary is not None else "the run ended without a summary"
        _append(log, RunRecord.from_run(run.run_id, job, trigger, started, summary, status, error))
    finally:
        with _ACTIVE_LOCK:
            _ACTIVE.discard(log.root)


def _append(log: RunLog, record: RunRecord) -> None:
    try:
        log.append(record)
    except Exception as exc:  # the log is for people; never turn a finished run into a failed one over it
        logger.warning("could not append to the run log %s: %s", log.root, exc)
