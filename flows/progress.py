"""Progress of a run over documents, not shards: actors report rows done while a shard is being encoded.

Actors send ``(shard, rows done)`` to a small Ray actor (the board) at most once a second; a thread in the
driver reads the board and shows a rich progress bar when stderr is a terminal, or writes a plain log line
every ``runtime.progress_seconds`` when it is not (or with ``--json``), so a long shard is never silent.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

from reembed.indexing.corpus import Shard

logger = logging.getLogger(__name__)

ProgressMode = Literal["auto", "bar", "log", "off"]
_DEFAULT_BYTES_PER_ROW = 1000.0  # until a shard with a known row count says otherwise


class ProgressBoard:
    """Ray actor: the latest rows-done count of every shard in flight. Zero CPUs: it only holds numbers."""

    def __init__(self) -> None:
        self.done: dict[str, int] = {}
        self.final: set[str] = set()

    def update(self, shard_id: str, done: int, final: bool = False) -> None:
        if shard_id in self.final:
            return
        self.done[shard_id] = max(done, self.done.get(shard_id, 0))
        if final:
            self.final.add(shard_id)

    def snapshot(self) -> dict[str, int]:
        return dict(self.done)


def start_board() -> Any:
    import ray

    return ray.remote(num_cpus=0)(ProgressBoard).remote()


def _fmt_seconds(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


class RunProgress:
    """Documents done / total with docs/s and an ETA, for the shards this run embeds.

    Totals come from the plan: exact where a shard knows its rows (Parquet metadata, cut JSONL/CSV ranges),
    else estimated from its bytes at the bytes-per-row seen so far (shown with ``~``), and replaced by the
    real count as each shard finishes.
    """

    def __init__(self, shards: list[Shard], mode: ProgressMode, interval: float, emit: Callable[[str], None],
                 board: Any | None = None, console: Any | None = None,
                 listeners: Sequence[Callable[..., None]] = ()) -> None:
        self.shards = {s.shard_id: s for s in shards}
        self.exact: dict[str, int] = {s.shard_id: s.rows_hint for s in shards if s.rows_hint is not None}
        self.board = board
        self.interval = interval
        self.emit = emit
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "log"
        self.mode = mode
        self.done: dict[str, int] = {}
        self.finished: set[str] = set()
        self.started = time.perf_counter()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._bar: Any = None
        self._task: Any = None
        self._last_state: tuple[int, int] = (-1, -1)
        self._console = console
        # each called as listener(done, total) every tick and listener(done, total, final=True) at the end:
        # the Pushgateway's progress push, the Prefect progress artifact
        self.listeners = list(listeners)

    def total(self) -> tuple[int, bool]:
        """(documents in this run's shards, whether that is exact)."""
        known_rows = sum(self.exact.values())
        known_bytes = sum(self.shards[s].bytes_hint or 0 for s in self.exact)
        per_row = known_bytes / known_rows if known_rows and known_bytes else _DEFAULT_BYTES_PER_ROW
        unknown = [s for s in self.shards.values() if s.shard_id not in self.exact]
        estimate = sum(round((s.bytes_hint or 0) / per_row) for s in unknown)
        return known_rows + estimate, not unknown

    def finish_shard(self, shard_id: str, input_rows: int) -> None:
        """A shard's result arrived: its real row count replaces the estimate."""
        self.exact[shard_id] = input_rows
        self.done[shard_id] = input_rows
        self.finished.add(shard_id)

    def poll(self) -> None:
        if self.board is None:
            return
        try:
            import ray

            snapshot = ray.get(self.board.snapshot.remote(), timeout=10)
        except Exception as exc:  # progress is never worth failing a run over
            logger.debug("progress board unreachable: %s", exc)
            return
        for shard_id, done in snapshot.items():
            if shard_id in self.shards and shard_id not in self.finished:
                self.done[shard_id] = max(done, self.done.get(shard_id, 0))

    def line(self) -> str:
        done = sum(self.done.values())
        total, exact = self.total()
        total = max(total, done)
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        rate = done / elapsed
        eta = _fmt_seconds((total - done) / rate) if rate > 0 and total > done else "-"
        finished = len(self.finished)
        pct = 100.0 * done / total if total else 100.0
        return (f"progress: {done}/{'' if exact else '~'}{total} docs ({pct:.1f}%) | {rate:.1f} docs/s | "
                f"ETA {eta} | shards {finished}/{len(self.shards)} done")

    def _render(self, only_if_changed: bool = False) -> None:
        if self.mode == "bar" and self._bar is not None:
            done = sum(self.done.values())
            total, exact = self.total()
            self._bar.update(self._task, completed=done, total=max(total, done),
                             description=f"embedding ({len(self.shards)} shards{'' if exact else ', ~total'})")
        elif self.mode == "log":
            state = (sum(self.done.values()), len(self.finished))
            if not only_if_changed or state != self._last_state:
                self._last_state = state
                self.emit(self.line())

    def counts(self) -> tuple[int, int]:
        """(documents done, documents in this run's shards, the estimate where not yet exact)."""
        done = sum(self.done.values())
        return done, max(self.total()[0], done)

    def _tell(self, final: bool = False) -> None:
        counts = self.counts()
        for listener in self.listeners:
            try:
                listener(*counts, final=final)
            except Exception as exc:  # a listener (metrics, artifacts) never fails a run
                logger.warning("progress listener failed: %s", exc)

    def _loop(self) -> None:
        last = 0.0
        while not self._stop.wait(min(1.0, self.interval)):
            self.poll()
            self._tell()
            now = time.monotonic()
            if self.mode == "bar" or now - last >= self.interval:
                last = now
                self._render()

    def __enter__(self) -> "RunProgress":
        if self.mode == "off" or not self.shards:
            return self
        if self.mode == "bar":
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TaskProgressColumn(), TextColumn("docs"), TimeElapsedColumn(), TimeRemainingColumn(),
                                 console=self._console or Console(stderr=True), transient=False)
            self._bar.start()
            total, _ = self.total()
            self._task = self._bar.add_task("embedding", total=total)
        self._thread = threading.Thread(target=self._loop, name="reembed-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.mode == "off" or not self.shards:
            return
        self.poll()
        self._tell(final=True)
        self._render(only_if_changed=True)
        if self._bar is not None:
            self._bar.stop()
