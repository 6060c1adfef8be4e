"""One writer per job: a lease file next to the vectors, so two runs of a job never write one version at once.

Two schedules firing together, a manual run during a scheduled one, or two workers picking up the same
deployment would otherwise plan against the same manifest and race on the collection. The lease is a small
JSON document at ``<output.uri>/_leases/<job>.json`` and works wherever the vectors do (local disk, ``s3://``),
with no server of its own.

Taking it: read it; when it is missing or expired, write our own (a random token). On a local disk the read and
the write happen under an exclusive ``flock`` on a lock file beside it. Object stores have no locks, so there
the run waits ``SETTLE_S`` and reads the lease back: of two runs that wrote at once, both read the later write,
so exactly one sees its own token. Where the store honours conditional writes (probed once per bucket; AWS
S3 and SeaweedFS do), every write of the lease is conditional instead: ``If-None-Match: *`` to create it,
``If-Match`` on the ETag that was read to take it over, on the ETag of its own last write to renew it; the
store refuses a write when anyone wrote since, so no renewal can erase a takeover and no settle is needed.
Elsewhere a renewal follows the settle protocol: it writes within ``SETTLE_S / 2`` of the read that showed
the lease still its own (else it skips that renewal), then reads it back after ``SETTLE_S``; so a renewal
never erases a takeover that a rival has already confirmed.

Expiry is judged on the waiting run's own clock, not by comparing two hosts' clocks: the holder bumps a
renewal sequence number (``seq``) each time it renews, and a waiting run takes the lease over once the
holder's token and sequence have not changed for a whole ``ttl`` of its own monotonic clock. A lease whose
``expires_at`` lies more than a ``ttl`` in the past by the reader's clock is taken at once (a run that was
not waiting when its holder died need not watch it for a ttl; only a clock off by more than a ttl could
misjudge it).

A holder renews ``expires_at`` from a background thread every third of ``lease.ttl``; a run that was killed
stops renewing, so its lease expires and the next run takes it over. The lease fences the holder's writes:
the index and the vector store a run writes through are wrapped (``fenced``), so every write (an upsert batch,
a delete, a marker, the manifest, the alias move, retention's drops) first calls ``JobLease.fence``. That is
an in-memory check while renewals are on time; once the renewal thread has seen a takeover, or renewals fell
behind (a stalled process: a long GC pause, a suspended VM), the next write raises ``LeaseLost`` instead of
writing. On the host it ran on, a run whose
process is gone (its pid no longer runs with the same start time) is taken over at once. Commands that write
(run, reindex, rollback) take it; within one process taking it again is a no-op, so the CLI and the flow it
starts share one lease.
"""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from typing import Any, Literal, TypeVar, cast

from pydantic import BaseModel, ConfigDict, Field

from reembed.indexing.fence import LeaseLost  # raised here and, by the actors, there
from reembed.indexing.records import LeaseFence, Record
from reembed.indexing.storage import (StorageOptions, StorageUnavailable, conditional_writes, filesystem, join,
                                      protocol_of, put_json_if, read_json, read_json_tagged, transient, write_json)

logger = logging.getLogger(__name__)

WriteMode = Literal["flock", "conditional", "settle"]  # how the lease file is written: see _write_mode
SETTLE_S = 1.0  # between writing the lease and reading it back: longer than any read-then-write gap of a rival
POLL_S = 2.0  # how often a waiting run looks at the lease again


class LeaseSettings(BaseModel):
    """The `lease:` section of a job file: how a second run of the same job behaves while one is running."""

    model_config = ConfigDict(extra="forbid")

    wait: float = Field(0, ge=0, description="seconds a run waits for another run of the job to finish before it "
                        "gives up (exit code 3); 0 = give up at once")
    ttl: float = Field(120, ge=3, description="seconds a lease lives without renewal: a killed run's lease is taken "
                       "over this long after it stopped (a live run renews every ttl/3)")
    conditional_writes: bool | None = Field(
        None, description="s3://: write the lease with If-Match / If-None-Match; null = when the store honours "
        "them (probed once), false = write, settle and read back")


class LeaseRecord(Record):
    """The lease document: who holds the job, and until when unless renewed."""

    job: str
    token: str
    holder: str  # host:pid, for the message a waiting run prints
    started: str | None = None  # the holder process's start time (/proc), so a reused pid is not taken for it
    command: str
    acquired_at: datetime
    expires_at: datetime
    seq: int = 0  # renewals so far: a reader that sees it stand still for a ttl knows the holder stopped
    ttl: float | None = None  # the holder's lease.ttl

    def describe(self) -> str:
        return (f"{self.command} on {self.holder} since {self.acquired_at:%Y-%m-%d %H:%M:%S} UTC "
                f"(lease expires {self.expires_at:%H:%M:%S} UTC unless renewed)")


class LeaseHeld(RuntimeError):
    """Another run of the job holds its lease, and waiting for it (``lease.wait``) ran out."""


def lease_uri(output_uri: str, job: str) -> str:
    return join(output_uri, "_leases", f"{job}.json")


class JobLease:
    """A held lease: renewed in the background until released; ``check()`` before committing."""

    def __init__(self, uri: str, record: LeaseRecord, ttl: float, options: StorageOptions | None,
                 mode: WriteMode = "flock", etag: str | None = None) -> None:
        self.uri, self.record, self.ttl, self.options = uri, record, ttl, options
        self.mode, self.etag = mode, etag
        self.lost: str | None = None
        self.renewed = time.monotonic()  # when the lease was last known ours and renewed, on this process's clock
        self._renew_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew_loop, name=f"lease-{record.job}", daemon=True)
        self._thread.start()

    def for_actors(self) -> LeaseFence:
        """What an actor checks before it writes a shard's output (``indexing.fence``): this lease's file and
        token. The driver's own writes are fenced in memory; the actors' are not in this process."""
        return LeaseFence(uri=self.uri, token=self.record.token, job=self.record.job)

    def _still_ours(self) -> bool:
        """Read the lease; when another run holds it now, say so in ``lost`` and return False."""
        if self.lost is None:
            current = _read(self.uri, self.options)
            if current is None or current.token != self.record.token:
                seen = f"{_now():%Y-%m-%d %H:%M:%S} UTC"
                self.lost = (f"lease lost to {current.holder} at {seen}: the lease of job {self.record.job!r} was "
                             f"taken over by {current.describe()}" if current else
                             f"lease lost at {seen}: the lease file of job {self.record.job!r} was removed")
        return self.lost is None

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                if not self._renew():
                    logger.error("%s; this run makes no further write", self.lost)
                    return
            except Exception as exc:  # a storage hiccup: try again next time; expiry is ttl away
                logger.warning("could not renew the lease %s: %s", self.uri, exc)

    def _renew(self) -> bool:
        """Read the lease and, while it is still ours, extend it; False (and ``lost`` says why) once it is not.

        On an object store the write must follow the read within ``SETTLE_S / 2`` (a slower round skips this
        renewal: the next one is a third of a ttl away), and the lease is read back ``SETTLE_S`` later: a rival
        that took it over meanwhile either wrote after us (we read its token back: lost) or before our read
        (we saw it: lost), or between our read and write, in which case its own read-back, ``SETTLE_S`` after
        its write, shows our renewal and it backs off."""
        with self._renew_lock, _local_lock(self.uri):
            read_at = time.monotonic()
            if self.mode == "conditional":
                return self._renew_if_unchanged(read_at)
            if not self._still_ours():
                return False
            if self.mode == "settle" and time.monotonic() - read_at > SETTLE_S / 2:
                logger.warning("reading the lease %s took over %.1f s: this renewal is skipped", self.uri,
                               SETTLE_S / 2)
                return True
            renewed = self._extended()
            write_json(self.uri, renewed.model_dump(mode="json"), self.options)
            self.record = renewed
            if self.mode == "settle":
                time.sleep(SETTLE_S)
                if not self._still_ours():
                    return False
            self.renewed = read_at
            return True

    def _extended(self) -> LeaseRecord:
        """Our record, renewed: a ttl from now, the renewal sequence one further."""
        return self.record.model_copy(update={"expires_at": _now() + timedelta(seconds=self.ttl),
                                              "seq": self.record.seq + 1})

    def _renew_if_unchanged(self, started: float) -> bool:
        """Renew with ``If-Match`` on the ETag of our last write: the store refuses it when anyone else wrote
        since, so a renewal can never erase a takeover."""
        if self.lost is not None:
            return False
        renewed = self._extended()
        etag = put_json_if(self.uri, renewed.model_dump(mode="json"), self.etag, self.options)
        if etag is not None:
            self.record, self.etag, self.renewed = renewed, etag, started
            return True
        current, etag = _read_tagged(self.uri, self.options, "conditional")
        if current is not None and current.token == self.record.token:  # our own earlier write: carry on
            self.etag = etag
            return True
        return self._still_ours()  # someone else's: sets ``lost`` naming them

    def check(self) -> None:
        """Raise ``LeaseLost`` when another run took the lease over (read now); called before committing."""
        if not self._still_ours():
            self._raise_lost()

    def fence(self) -> None:
        """Before each write made on the run's behalf: raise ``LeaseLost`` when the lease is known to be lost.
        While renewals are on time this reads nothing; when the last one is older than two thirds of the ttl
        (this process stalled, or storage failed to answer), the lease is read and renewed first, so a run
        that was taken over while it stalled finds out before its next write, not after."""
        if self.lost is None and time.monotonic() - self.renewed > self.ttl * 2 / 3:
            try:
                self._renew()
            except Exception as exc:  # cannot tell whether it is still ours: do not write on a maybe
                if time.monotonic() - self.renewed >= self.ttl:
                    self.lost = (f"the lease of job {self.record.job!r} could not be renewed for {self.ttl:.0f} s "
                                 f"({exc})")
        if self.lost is not None:
            self._raise_lost()

    def _raise_lost(self) -> None:
        raise LeaseLost(f"{self.lost}: this run stopped before its next write; the other run owns the job now")

    def release(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            current = _read(self.uri, self.options)
            if current is not None and current.token == self.record.token:
                fs, path = filesystem(self.uri, self.options)
                fs.rm(path)
        except Exception as exc:  # the lease then expires on its own
            logger.warning("could not release the lease %s: %s", self.uri, exc)


# What writes, on the two kinds of object a run writes through (reembed.indexing.index.VectorIndex and
# reembed.indexing.vector_store.VectorStore): each of these calls is fenced by the run's lease.
INDEX_WRITES = frozenset({"ensure_collection", "upsert", "delete_points", "finish_bulk_load", "drop", "point_alias",
                          "point_aliases", "remove_alias", "set_aside_damaged_aliases"})
STORE_WRITES = frozenset({"write_part", "write_quarantine", "write_marker", "write_manifest", "mark_writing",
                          "clear_writing", "remove_unreferenced"})

T = TypeVar("T")


class _Fenced:
    """``target`` with every method named in ``writes`` preceded by ``fence()``; everything else passes through."""

    def __init__(self, target: Any, fence: Callable[[], None], writes: frozenset[str]) -> None:
        self._target, self._fence, self._writes = target, fence, writes

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._target, name)
        if name not in self._writes:
            return attr

        def fenced_call(*args: Any, **kwargs: Any) -> Any:
            self._fence()
            return attr(*args, **kwargs)

        return fenced_call

    def __enter__(self) -> Any:
        self._target.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._target.__exit__(*exc)


def fenced(target: T, lease: JobLease, writes: frozenset[str]) -> T:
    """``target`` (an index or a vector store) whose writes ``lease`` fences: ``INDEX_WRITES`` or ``STORE_WRITES``."""
    return cast(T, _Fenced(target, lease.fence, writes))


_ACTIVE: dict[str, JobLease] = {}  # lease URI -> the lease this process holds (re-entrant within a process)
_ACTIVE_LOCK = threading.Lock()


@contextmanager
def job_lease(output_uri: str, job: str, settings: LeaseSettings, command: str,
              options: StorageOptions | None = None, wait: float | None = None) -> Iterator[JobLease]:
    """Hold ``job``'s lease for the block; waits up to ``wait`` (default ``settings.wait``) seconds for a holder
    to finish, then raises ``LeaseHeld`` naming it. Re-entrant within a process."""
    uri = lease_uri(output_uri, job)
    with _ACTIVE_LOCK:
        active = _ACTIVE.get(uri)
    if active is not None:
        yield active
        return
    try:
        lease = _acquire(uri, job, settings, command, options, settings.wait if wait is None else wait)
    except Exception as exc:
        if not transient(uri, exc):
            raise
        # Not retried here: a write that failed after reaching the store would look like a rival's lease.
        raise StorageUnavailable(f"the object store did not answer while taking job {job!r}'s lease {uri} "
                                 f"({type(exc).__name__}: {exc}); the run did not start. Run it again once the "
                                 "store answers") from None
    with _ACTIVE_LOCK:
        _ACTIVE[uri] = lease
    try:
        yield lease
    finally:
        with _ACTIVE_LOCK:
            _ACTIVE.pop(uri, None)
        lease.release()


class _Watch:
    """What a waiting run has seen of the holder: its token and renewal sequence, since when (its own clock)."""

    def __init__(self) -> None:
        self.seen: tuple[str, int] | None = None
        self.since = time.monotonic()

    def verdict(self, current: LeaseRecord, ttl: float) -> str | None:
        """Why the lease may be taken over (``dead holder's``, ``expired``), or None while its holder renews."""
        if _holder_gone(current):
            return "dead holder's"
        ttl = current.ttl or ttl
        if (current.token, current.seq) != self.seen:
            self.seen, self.since = (current.token, current.seq), time.monotonic()
        if time.monotonic() - self.since >= ttl or current.expires_at + timedelta(seconds=ttl) <= _now():
            return "expired"
        return None


def _acquire(uri: str, job: str, settings: LeaseSettings, command: str, options: StorageOptions | None,
             wait: float) -> JobLease:
    deadline = time.monotonic() + wait
    announced = False
    watch = _Watch()
    mode = _write_mode(uri, settings, options)
    while True:
        with _local_lock(uri):
            current, etag = _read_tagged(uri, options, mode)
            why = watch.verdict(current, settings.ttl) if current is not None else None
            if current is None or why:
                if current is not None:
                    logger.warning("taking over the %s lease of job %r from %s", why, job, current.describe())
                mine = LeaseRecord(job=job, token=secrets.token_hex(8), command=command,
                                   holder=f"{socket.gethostname()}:{os.getpid()}", started=process_started(os.getpid()),
                                   acquired_at=_now(), ttl=settings.ttl,
                                   expires_at=_now() + timedelta(seconds=settings.ttl))
                held, etag = _claim(uri, mine, etag, mode, options)
                if held:
                    logger.info("holding the lease of job %r (%s)", job, uri)
                    return JobLease(uri, mine, settings.ttl, options, mode, etag)
                current, _ = _read_tagged(uri, options, mode)
        if current is None:  # written, then gone when read back: a rival took it and released it at once
            if time.monotonic() >= deadline + 30 * SETTLE_S:
                raise LeaseHeld(f"could not take the lease of job {job!r}: it vanished each time it was read "
                                f"back ({uri})")
            time.sleep(SETTLE_S / 4)
            continue
        if time.monotonic() >= deadline:
            ttl = current.ttl or settings.ttl
            raise LeaseHeld(f"another run of job {job!r} is in progress: {current.describe()}. Nothing was "
                            f"changed. Wait for it (lease.wait / --wait SECONDS), or, if that run is gone, its "
                            f"lease expires at {current.expires_at:%H:%M:%S} UTC: a run waiting for it takes it "
                            f"over once it has gone {ttl:.0f} s (lease.ttl) without renewal, any run after "
                            f"{current.expires_at + timedelta(seconds=ttl):%H:%M:%S} UTC ({uri})")
        if not announced:
            logger.warning("another run of job %r is in progress (%s); waiting up to %.0f s", job,
                           current.describe(), wait)
            announced = True
        time.sleep(min(POLL_S, max(0.1, deadline - time.monotonic())))


def process_started(pid: int) -> str | None:
    """A process's start time in clock ticks since boot (Linux), or None where /proc does not say."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return None


def _holder_gone(record: LeaseRecord) -> bool:
    """The holder ran on this host and its process is gone (killed, crashed): no need to wait for expiry."""
    host, _, pid = record.holder.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit() or record.started is None:
        return False
    return process_started(int(pid)) != record.started


def _is_local(uri: str) -> bool:
    return protocol_of(uri) in ("file", "local")


@contextmanager
def _local_lock(uri: str) -> Iterator[None]:
    """An exclusive ``flock`` beside a local lease for its read-then-write; nothing for object stores."""
    if not _is_local(uri):
        yield
        return
    _, path = filesystem(uri)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def read_lease(output_uri: str, job: str, options: StorageOptions | None = None) -> LeaseRecord | None:
    """The job's lease as it stands, or None when no run holds it."""
    return _read(lease_uri(output_uri, job), options)


def _read(uri: str, options: StorageOptions | None) -> LeaseRecord | None:
    data = read_json(uri, options)
    return LeaseRecord.model_validate(data) if data is not None else None


def _read_tagged(uri: str, options: StorageOptions | None, mode: WriteMode) -> tuple[LeaseRecord | None, str | None]:
    """The lease and, where writes are conditional, the ETag of what was read."""
    if mode != "conditional":
        return _read(uri, options), None
    data, etag = read_json_tagged(uri, options)
    return (LeaseRecord.model_validate(data) if data is not None else None), etag


def _write_mode(uri: str, settings: LeaseSettings, options: StorageOptions | None) -> WriteMode:
    """``flock`` on a local disk; on an object store ``conditional`` (If-Match) where it is honoured and not
    turned off, else ``settle`` (write, wait ``SETTLE_S``, read back)."""
    if _is_local(uri):
        return "flock"
    if settings.conditional_writes is False:
        return "settle"
    honoured = conditional_writes(uri, options)
    if settings.conditional_writes and not honoured:
        logger.warning("lease.conditional_writes is on but the store behind %s does not honour If-Match: the "
                       "lease writes, settles and reads back instead", uri)
    return "conditional" if honoured else "settle"


def _claim(uri: str, mine: LeaseRecord, seen: str | None, mode: WriteMode,
           options: StorageOptions | None) -> tuple[bool, str | None]:
    """Write our lease over the version just read (``seen``: its ETag, None when there was none); whether we
    hold it now, and the ETag of our write where writes are conditional."""
    data = mine.model_dump(mode="json")
    if mode == "conditional":
        etag = put_json_if(uri, data, seen, options)  # refused when anyone wrote since we read
        return etag is not None, etag
    write_json(uri, data, options)
    if mode == "flock":
        return True, None
    time.sleep(SETTLE_S)  # of two runs that wrote at once, both read the later write back
    current = _read(uri, options)
    return current is not None and current.token == mine.token, None


def _now() -> datetime:
    return datetime.now(timezone.utc)
