"""A run's outcome as Prefect artifacts, under keys that stay the same from run to run of a job.

The Prefect UI groups artifacts by key, so each job has one place for its latest run, with every earlier
run's behind them:

- ``reembed-<job>-headline`` (markdown): how the run ended and what it did, the reason when it stopped;
- ``reembed-<job>-summary`` (table): the run's summary, its guards' and gate's verdicts included;
- ``reembed-<job>-shards`` (table): every planned shard, what this run did to it (embedded, skipped,
  upserted, failed), its rows, encoded, reused and quarantined counts, seconds and actor;
- ``reembed-<job>-gate`` (table): the quality gate's scores, when it ran (a blocked run's too);
- ``reembed-<job>-progress`` (progress): documents embedded out of the run's total, updated as the actors
  report and as shards complete.

The listener is made inside the flow run and remembers it, so the artifacts belong to that flow run even
when the outcome is published after the flow returned (the CLI publishes once the whole command is done).
Artifacts are a convenience: one that cannot be written is a warning, never a failed run.
"""

from __future__ import annotations

import json
import logging
import re
from typing import TYPE_CHECKING, Any
from uuid import UUID

if TYPE_CHECKING:
    from reembed.flows.operations.run_log import RunRecord
    from reembed.indexing.records import GateResult, GuardReport, RunSummary, ShardRow

logger = logging.getLogger(__name__)

_LEFT_OUT = ("failures", "shards_by_node", "guards", "gate", "shards")
_SHARD_COLUMNS = ("shard", "outcome", "rows", "encoded", "reused", "quarantined", "seconds", "actor", "error")


def artifact_key(job_name: str, what: str) -> str:
    """``reembed-<job>-<what>``: Prefect keys allow only lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9-]+", "-", f"reembed-{job_name.lower()}-{what}")


def headline(record: RunRecord) -> str:
    """One line for people: how the run ended and what it did."""
    line = f"**{record.status}**"
    if record.mode:
        line += f" ({record.mode})"
    if record.collection:
        line += (f": {record.points} points in `{record.collection}` (alias `{record.job}`); {record.encoded} "
                 f"encoded, {record.reused} reused, {record.deleted} deleted, {record.quarantined} quarantined")
    if record.error:
        line += f"\n\n{record.error}"
    return line


def summary_rows(record: RunRecord, summary: RunSummary | None) -> list[dict[str, str]]:
    """The summary table: one row per figure, then one per guard check and the gate's verdict."""
    values = summary.model_dump(mode="json") if summary is not None else record.model_dump(mode="json")
    rows = [{"metric": k, "value": str(v)} for k, v in values.items() if k not in _LEFT_OUT and v is not None]
    if summary is not None:
        rows += _guard_rows(summary.guards)
        if summary.gate is not None:
            gate = summary.gate
            rows.append({"metric": "gate", "value": f"{'passed' if gate.passed else 'failed'}: {gate.metric} "
                                                    f"{gate.new_score:.4f} vs live {_score(gate.live_score)}"})
    return rows


def _guard_rows(guards: GuardReport | None) -> list[dict[str, str]]:
    if guards is None:
        return []
    rows = [{"metric": f"guard {c.name}",
             "value": f"passed: {c.value:g} (limit {c.limit:g})" if c.passed else f"failed: {c.detail}"}
            for c in guards.checks]
    if guards.forced:
        rows.append({"metric": "forced", "value": guards.forced})
    return rows


def _score(score: float | None) -> str:
    return "-" if score is None else f"{score:.4f}"


def shard_table(shards: list[ShardRow]) -> list[dict[str, Any]]:
    return [{c: getattr(row, c) for c in _SHARD_COLUMNS} for row in shards]


def gate_table(gate: GateResult) -> list[dict[str, Any]]:
    return [{"version": "candidate", "collection": gate.new, "metric": gate.metric, "score": gate.new_score,
             "tolerance": gate.tolerance, "passed": gate.passed},
            {"version": "live", "collection": gate.live, "metric": gate.metric, "score": gate.live_score,
             "tolerance": gate.tolerance, "passed": gate.passed}]


class PrefectArtifacts:
    """A run's listener that writes its headline, summary, per-shard and gate tables as artifacts of one
    flow run, and (through ``progress_for``) its progress while the shards are embedded."""

    def __init__(self, flow_run_id: UUID) -> None:
        self.flow_run_id = flow_run_id

    @classmethod
    def of_this_flow_run(cls) -> "PrefectArtifacts | None":
        """The listener for the flow run this code runs in; None outside one."""
        from prefect.runtime import flow_run

        return cls(UUID(str(flow_run.id))) if flow_run.id else None

    def finished(self, record: RunRecord, summary: RunSummary | None) -> None:
        from prefect.client.schemas.actions import ArtifactCreate

        def table(what: str, rows: list[dict[str, Any]], description: str) -> ArtifactCreate:
            return ArtifactCreate(key=artifact_key(record.job, what), type="table", data=json.dumps(rows),
                                  description=description, flow_run_id=self.flow_run_id)

        artifacts = [
            ArtifactCreate(key=artifact_key(record.job, "headline"), type="markdown", data=headline(record),
                           description=f"latest run of {record.job}", flow_run_id=self.flow_run_id),
            table("summary", summary_rows(record, summary), f"reembed run of {record.job}: {record.status}"
                  + (f", {record.points} points in {record.collection}" if record.points is not None else "")),
        ]
        if summary is not None and summary.shards:
            artifacts.append(table("shards", shard_table(summary.shards), f"the shards of {record.job}'s run"))
        if summary is not None and summary.gate is not None:
            artifacts.append(table("gate", gate_table(summary.gate),
                                   f"quality gate of {record.job}: {'passed' if summary.gate.passed else 'failed'}"))
        self.send(record.job, lambda client: [client.create_artifact(a) for a in artifacts])

    def progress_for(self, job_name: str) -> "ProgressArtifact":
        return ProgressArtifact(self, job_name)

    def send(self, job_name: str, call: Any) -> Any:
        """Run ``call(client)`` with a Prefect client; a failure is a warning naming the job."""
        from prefect.client.orchestration import get_client

        try:
            with get_client(sync_client=True) as client:
                return call(client)
        except Exception as exc:  # artifacts are a convenience; never fail a run over them
            logger.warning("could not publish Prefect artifacts of %s: %s", job_name, exc)
            return None


class ProgressArtifact:
    """The run's progress artifact: created on the first report, updated when the documents done move and
    once at the end (``RunProgress`` calls it every tick as ``(done, total, final=...)``)."""

    def __init__(self, artifacts: PrefectArtifacts, job_name: str) -> None:
        self.artifacts = artifacts
        self.job_name = job_name
        self.artifact_id: UUID | None = None
        self._last: tuple[int, int] | None = None

    def __call__(self, done: int, total: int, final: bool = False) -> None:
        from prefect.client.schemas.actions import ArtifactCreate, ArtifactUpdate

        if (done, total) == self._last and not final:
            return
        self._last = (done, total)
        percent = round(100.0 * done / total, 2) if total else 100.0
        description = f"{done}/{total} documents embedded" + (" (done)" if final else "")
        if self.artifact_id is None:
            created = self.artifacts.send(self.job_name, lambda client: client.create_artifact(ArtifactCreate(
                key=artifact_key(self.job_name, "progress"), type="progress", data=percent,
                description=description, flow_run_id=self.artifacts.flow_run_id)))
            self.artifact_id = created.id if created is not None else None
        else:
            artifact_id = self.artifact_id
            self.artifacts.send(self.job_name, lambda client: client.update_artifact(
                artifact_id, ArtifactUpdate(data=percent, description=description)))
