"""Progress arithmetic and guard verdicts, without Ray or Prefect (the slow tests run them for real)."""

from __future__ import annotations

import io

from reembed.flows.config import GuardSettings
from reembed.flows.guards import GuardBlocked, GuardReport, delete_check, empty_check, enforce, quarantine_check
from reembed.flows.progress import RunProgress
from reembed.indexing.corpus import Shard


def _shards() -> list[Shard]:
    return [Shard("a", "f.jsonl", "jsonl", 0, 1000, 1, rows_hint=10, bytes_hint=1000),
            Shard("b", "g.jsonl", "jsonl", bytes_hint=3000)]


def test_totals_estimate_unknown_rows_from_bytes_then_correct() -> None:
    lines: list[str] = []
    progress = RunProgress(_shards(), "log", 5, lines.append)
    assert progress.total() == (40, False)  # 10 known + 3000 bytes at 100 bytes/row
    progress.done["a"] = 4
    assert progress.line().startswith("progress: 4/~40 docs (10.0%)")
    progress.finish_shard("a", 10)
    progress.finish_shard("b", 25)
    assert progress.total() == (35, True)
    progress._render()
    assert lines[-1].startswith("progress: 35/35 docs (100.0%)") and "shards 2/2 done" in lines[-1]
    progress._render(only_if_changed=True)
    assert len(lines) == 1  # nothing new: no duplicate line at the end of a run


def test_bar_mode_draws_on_a_terminal() -> None:
    from rich.console import Console

    buffer = io.StringIO()
    progress = RunProgress(_shards(), "bar", 5, lambda _: None,
                           console=Console(file=buffer, force_terminal=True, width=120))
    with progress:
        progress.finish_shard("a", 10)
        progress._render()
        progress._bar.refresh()
    drawn = buffer.getvalue()
    assert "embedding (2 shards, ~total)" in drawn and "10/40" in drawn and "docs" in drawn


def test_guard_verdicts_and_force() -> None:
    settings = GuardSettings()
    assert quarantine_check(settings, 100, 5).passed and not quarantine_check(settings, 100, 6).passed
    assert delete_check(settings, 20, 100, "points").passed and not delete_check(settings, 21, 100, "points").passed
    assert delete_check(settings, 0, 0, "points").passed  # nothing live: nothing to lose
    assert not empty_check(settings, 0, 40).passed and empty_check(GuardSettings(allow_empty=True), 0, 40).passed
    report = GuardReport(checks=[quarantine_check(settings, 10, 3), delete_check(settings, 1, 100, "points")])
    assert not enforce(report, None) and report.forced is None
    error = str(GuardBlocked(report, "live-1", "/q", ["f row 2: empty text"]))
    assert "3 of 10 input rows quarantined (30.0%)" in error and "f row 2: empty text" in error
    assert "the live version live-1 is unchanged" in error and "--force REASON" in error
    assert enforce(report, "known bad batch") and report.forced == "known bad batch"
