"""Blast-radius guards: a run that looks wrong stops before it deletes a point or moves the alias.

Two numbers decide, both compared with what is live: the fraction of input rows quarantined (a wrong id
key or a broken upload quarantines nearly everything) and the fraction of live points (or, for a new
version, live documents) that the commit would remove. A run that would leave the collection empty always
stops. ``--force REASON`` lets a deliberate change through; the reason and the numbers go into the manifest.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from reembed.flows.config import GuardSettings
from reembed.indexing.records import GuardCheck, GuardReport, RunSummary
from reembed.indexing.storage import filesystem

logger = logging.getLogger(__name__)

FIRST_REASONS = 5


class GuardBlocked(RuntimeError):
    """A guard stopped the run before anything live changed; the message has the numbers and what to do."""

    def __init__(self, report: GuardReport, live: str | None, quarantine: str | None, reasons: list[str],
                 summary: RunSummary | None = None) -> None:
        self.report = report
        self.summary = summary
        parts = "; ".join(c.detail for c in report.failed)
        where = f"; quarantined rows are in {quarantine}" if quarantine else ""
        first = f"; first reasons: {' | '.join(reasons)}" if reasons else ""
        kept = f"the live version {live} is unchanged" if live else "no alias was created"
        super().__init__(f"guard stopped the run before any delete or alias move: {parts}{first}{where}; {kept} "
                         f"(fix the job, or rerun with --force REASON if the change is intended)")


def _fraction_check(name: str, part: int, whole: int, limit: float, what: str) -> GuardCheck:
    fraction = part / whole if whole else 0.0
    return GuardCheck(name=name, value=round(fraction, 6), limit=limit,
                      detail=f"{part} of {whole} {what} ({fraction:.1%}) > guards.{name} {limit:.1%}",
                      passed=fraction <= limit)


def quarantine_check(settings: GuardSettings, input_rows: int, quarantined: int) -> GuardCheck:
    return _fraction_check("max_quarantined_fraction", quarantined, input_rows, settings.max_quarantined_fraction,
                           "input rows quarantined")


def delete_check(settings: GuardSettings, removed: int, live: int, what: str) -> GuardCheck:
    return _fraction_check("max_deleted_fraction", removed, live, settings.max_deleted_fraction,
                           f"live {what} would be removed")


def empty_check(settings: GuardSettings, new_points: int, live_points: int) -> GuardCheck:
    return GuardCheck(
        name="not_empty", value=float(new_points), limit=1.0,
        detail=f"the new version would have 0 points (live has {live_points}); guards.allow_empty is false",
        passed=new_points > 0 or settings.allow_empty)


def first_reasons(quarantine_uris: list[str], options: Any, limit: int = FIRST_REASONS) -> list[str]:
    """The first few quarantined rows as 'file row N: reason', read back from this run's quarantine files."""
    reasons: list[str] = []
    for uri in quarantine_uris:
        fs, path = filesystem(uri, options)
        try:
            with fs.open(path, "rb") as fh:
                for line in fh:
                    entry = json.loads(line)
                    row = f" row {entry['row']}" if entry.get("row") is not None else ""
                    reasons.append(f"{entry.get('file')}{row}: {entry.get('reason')}")
                    if len(reasons) >= limit:
                        return reasons
        except (OSError, ValueError) as exc:
            logger.warning("cannot read quarantine file %s: %s", uri, exc)
    return reasons


def enforce(report: GuardReport, force_reason: str | None) -> bool:
    """True when every guard passed or --force overrides; logs what was overridden."""
    if not report.failed:
        return True
    if force_reason:
        report.forced = force_reason
        logger.warning("guards overridden with --force (%s): %s", force_reason,
                       "; ".join(c.detail for c in report.failed))
        return True
    return False
