"""A run's outcome as Prefect artifacts, under keys that stay the same from run to run of a job.

The Prefect UI groups artifacts by key, so each job has one place for its latest run (a headline and a
summary table), with every earlier run's behind them. The listener is made inside the flow run and remembers
it, so the artifacts belong to that flow run even when the outcome is published after the flow returned (the
CLI publishes once the whole command is done). Artifacts are a convenience: one that cannot be written is a
warning, never a failed run.
"""

from __future__ import annotations

import json
import logging
import re
from typing import TYPE_CHECKING
from uuid import UUID

if TYPE_CHECKING:
    from reembed.flows.operations.run_log import RunRecord
    from reembed.indexing.records import RunSummary

logger = logging.getLogger(__name__)

_LEFT_OUT = ("failures", "shards_by_node", "guards", "gate")


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


class PrefectArtifacts:
    """A run's listener that writes its headline and summary table as artifacts of one flow run."""

    def __init__(self, flow_run_id: UUID) -> None:
        self.flow_run_id = flow_run_id

    @classmethod
    def of_this_flow_run(cls) -> "PrefectArtifacts | None":
        """The listener for the flow run this code runs in; None outside one."""
        from prefect.runtime import flow_run

        return cls(UUID(str(flow_run.id))) if flow_run.id else None

    def finished(self, record: RunRecord, summary: RunSummary | None) -> None:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.actions import ArtifactCreate

        rows = [{"metric": k, "value": str(v)} for k, v in (
            summary.model_dump(mode="json") if summary is not None else record.model_dump(mode="json")).items()
            if k not in _LEFT_OUT and v is not None]
        artifacts = [
            ArtifactCreate(key=artifact_key(record.job, "headline"), type="markdown", data=headline(record),
                           description=f"latest run of {record.job}", flow_run_id=self.flow_run_id),
            ArtifactCreate(key=artifact_key(record.job, "summary"), type="table", data=json.dumps(rows),
                           description=f"reembed run of {record.job}", flow_run_id=self.flow_run_id),
        ]
        try:
            with get_client(sync_client=True) as client:
                for artifact in artifacts:
                    client.create_artifact(artifact)
        except Exception as exc:  # artifacts are a convenience; never fail a finished run over them
            logger.warning("could not publish Prefect artifacts of %s: %s", record.job, exc)
