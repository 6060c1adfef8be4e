"""A job's metrics, pushed to a Prometheus Pushgateway: each run's outcome, and its progress while it runs.

A batch run is gone before Prometheus could scrape it, so (as Prometheus' guide for batch jobs says) it pushes:
once at the end, the outcome, from the same record the run log keeps; and, every ``metrics.push_seconds`` while
it runs, how many documents are done. The grouping key is ``{job="reembed", alias=<job name>}`` with no
instance label, so every run of a job, from any host, updates one group. Pushes use push-add (HTTP POST): a
metric a push leaves out keeps its last value, which is how a failed run leaves
``reembed_last_success_timestamp_seconds`` (and the live collection's point count) where the last good run put
them. Nothing is pushed, and no Pushgateway is needed, unless the job names one (``metrics.pushgateway``, env
``REEMBED_METRICS__PUSHGATEWAY``). A push that fails is a warning: metrics never fail a run.

The README lists every metric; ``infra/prometheus/alerts.yml`` and the dashboards use only these.
"""

from __future__ import annotations

import logging
import threading
import time
import typing
from datetime import timedelta
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from reembed.flows.operations.run_log import RunRecord
    from reembed.indexing.records import RunSummary

logger = logging.getLogger(__name__)

JOB_LABEL = "reembed"
DOCUMENT_KINDS = ("input", "encoded", "reused", "upserted", "deleted", "quarantined")


class MetricsSettings(BaseModel):
    """The `metrics:` section of a job file: where the job's metrics go."""

    model_config = ConfigDict(extra="forbid")

    pushgateway: str | None = Field(
        None, description="Pushgateway URL (e.g. http://127.0.0.1:9091) each run pushes its metrics to; "
        "null = push nothing")
    max_age: timedelta = Field(
        timedelta(hours=25), description="the freshness budget: how old the last success may get before "
        "ReembedStale fires (pushed as reembed_freshness_budget_seconds, so one alert rule serves every job); "
        "seconds or ISO 8601 (PT25H); default: a daily schedule with an hour's slack")
    push_seconds: float = Field(15, gt=0, description="seconds between progress pushes while a run is going")
    timeout: float = Field(10, gt=0, description="seconds to wait for the Pushgateway")


def _statuses() -> tuple[str, ...]:
    """Every status the run log can end a run with (not ``running``, which is not an end)."""
    from reembed.flows.operations.run_log import RunStatus

    return tuple(s for s in typing.get_args(RunStatus) if s != "running")


def outcome_registry(record: RunRecord, engine: str, budget_s: float) -> CollectorRegistry:
    """The metrics of one finished run. What a run cannot vouch for is left out, so push-add keeps its last
    value: the last success after a run that was not one, the live collection's points and identity after a
    run that did not leave its own collection live."""
    from prometheus_client import CollectorRegistry, Gauge

    from reembed.flows.operations.run_log import SUCCESS  # after these the run's collection is the live one

    registry = CollectorRegistry()

    def gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
        return Gauge(name, doc, labels, registry=registry)

    gauge("reembed_last_run_timestamp_seconds", "when the last run ended (Unix time)").set(
        record.finished_at.timestamp())
    gauge("reembed_last_run_duration_seconds", "wall time of the last run").set(record.seconds)
    status = gauge("reembed_last_run_status", "1 for the status the last run ended with, 0 for the others",
                   ("status",))
    for name in _statuses():
        status.labels(name).set(1 if record.status == name else 0)
    if record.status in SUCCESS:
        gauge("reembed_last_success_timestamp_seconds",
              "when a run last left the alias fresh (status ok or up-to-date; Unix time)").set(
            record.finished_at.timestamp())
    blocked = gauge("reembed_last_run_blocked", "1 when the last run was blocked by `by` (the quality gate, or "
                    "the guards), else 0", ("by",))
    for by in ("gate", "guards"):
        blocked.labels(by).set(1 if record.status == "blocked" and record.blocked_by == by else 0)
    documents = gauge("reembed_last_run_documents", "the last run's documents by kind: input rows, encoded, "
                      "reused (vector kept), upserted, deleted from the index, quarantined", ("kind",))
    for kind in DOCUMENT_KINDS:
        documents.labels(kind).set(getattr(record, "input_rows" if kind == "input" else kind) or 0)
    gauge("reembed_last_run_tokens", "tokens the last run encoded").set(record.tokens or 0)
    gauge("reembed_last_run_docs_per_second", "documents the last run encoded per second").set(
        record.docs_per_s or 0)
    if record.status in SUCCESS and record.points is not None:
        gauge("reembed_points", "points in the live collection behind the alias").set(record.points)
        gauge("reembed_info", "always 1: the model, collection and engine behind the alias",
              ("model", "collection", "engine")).labels(record.model or "", record.collection or "", engine).set(1)
    if record.gate_new_score is not None:
        score = gauge("reembed_gate_score", "the quality gate's score (gate_metric) of the candidate version and "
                      "of the live one, when the last run's gate ran", ("version",))
        score.labels("candidate").set(record.gate_new_score)
        if record.gate_live_score is not None:
            score.labels("live").set(record.gate_live_score)
    gauge("reembed_freshness_budget_seconds", "how old the last success may get (metrics.max_age)").set(budget_s)
    return registry


def progress_registry(done: int, total: int) -> CollectorRegistry:
    """The documents a run in progress has done, of how many: a dashboard's progress bar and ETA."""
    from prometheus_client import CollectorRegistry, Gauge

    registry = CollectorRegistry()
    Gauge("reembed_run_documents_done", "documents the run in progress has embedded so far",
          registry=registry).set(done)
    Gauge("reembed_run_documents_total", "documents the run in progress has to embed", registry=registry).set(total)
    return registry


class MetricsPusher:
    """A run's listener that pushes its progress and its outcome for one job (``alias``)."""

    def __init__(self, settings: MetricsSettings, alias: str, engine: str) -> None:
        self.settings = settings
        self.alias = alias
        self.engine = engine
        self._last_progress = 0.0
        self._lock = threading.Lock()

    def _push(self, registry: CollectorRegistry, what: str) -> bool:
        from prometheus_client import pushadd_to_gateway

        try:
            pushadd_to_gateway(self.settings.pushgateway, job=JOB_LABEL, grouping_key={"alias": self.alias},
                               registry=registry, timeout=self.settings.timeout)
            return True
        except Exception as exc:  # metrics are for operators; never fail a run over them
            logger.warning("could not push %s of %s to %s: %s", what, self.alias, self.settings.pushgateway, exc)
            return False

    def progress(self, done: int, total: int, final: bool = False) -> None:
        """Push the run's progress, at most every ``push_seconds`` unless ``final``."""
        now = time.monotonic()
        with self._lock:
            if not final and now - self._last_progress < self.settings.push_seconds:
                return
            self._last_progress = now
        self._push(progress_registry(done, total), "progress")

    def finished(self, record: RunRecord, summary: RunSummary | None) -> None:
        """Push the run's outcome (the record the run log keeps)."""
        if self._push(outcome_registry(record, self.engine, self.settings.max_age.total_seconds()), "metrics"):
            logger.info("pushed the outcome of %s (%s) to %s", self.alias, record.status, self.settings.pushgateway)


def pusher_for(job) -> MetricsPusher | None:
    """The job's metrics listener, or None when it names no Pushgateway."""
    if not job.metrics.pushgateway:
        return None
    return MetricsPusher(job.metrics, job.name, job.index.resolved_engine)
