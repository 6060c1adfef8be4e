"""Scheduled refreshes on a Prefect server: a deployment per job, the work pool's worker, and a listing.

A deployment runs ``reembed.flows.run_flow.run_job_file`` by module path on a ``process`` work pool: no image and
no remote code storage, only reembed installed where the worker runs. Its parameters are the job file's absolute
path and the ``--set`` overrides as strings, never the resolved job, so secrets stay in the job file or in the
worker's environment and are never stored in Prefect. Registering the same job again updates its deployment in
place. A concurrency limit of 1 that cancels new runs keeps two runs of one deployment from overlapping; the
job's lease stays the backstop for runs started any other way.
"""

from __future__ import annotations

import logging
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from reembed.flows.config import ConfigError, load_job

logger = logging.getLogger(__name__)

DEFAULT_POOL = "reembed"
FLOW_NAME = "reembed-job"
_SECRET_KEYS = ("api_key", "storage_options.key", "storage_options.secret", "storage_options.token")


class PrefectServerMissing(RuntimeError):
    """The command needs a Prefect server and none is configured."""


class DeploymentInfo(BaseModel):
    """One reembed deployment, as ``reembed deployments --json`` lists it."""

    name: str  # <flow>/<deployment>, as `prefect deployment run` takes it
    id: str
    alias: str
    job_file: str
    overrides: list[str]
    schedules: list[str]
    work_pool: str | None
    paused: bool
    concurrency_limit: int | None
    next_run_at: datetime | None
    last_run_state: str | None
    last_run_at: datetime | None
    api_url: str


def api_url() -> str:
    """The configured Prefect API, or a clear error: a deployment on Prefect's temporary per-process server
    would vanish when this command exits."""
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    if not url:
        raise PrefectServerMissing(
            "this command needs a Prefect server: start one (`prefect server start`) and set PREFECT_API_URL, "
            "e.g. export PREFECT_API_URL=http://127.0.0.1:4200/api")
    return str(url)


def check_overrides(overrides: list[str]) -> None:
    """Refuse secrets in ``--set``: deployment parameters are stored, and shown, by the Prefect server."""
    for pair in overrides:
        key = pair.split("=", 1)[0].strip()
        if key.endswith(_SECRET_KEYS):
            raise ConfigError(f"--set {key}=...: a secret would be stored in the deployment's parameters; put it "
                              f"in the job file or in the worker's environment (REEMBED_{key.upper().replace('.', '__')})")


def ensure_pool(pool: str) -> None:
    """Create the ``process`` work pool when it does not exist yet; an existing pool is left as it is."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            found = client.read_work_pool(pool)
        except ObjectNotFound:
            try:
                client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
                logger.info("created process work pool %s", pool)
            except ObjectAlreadyExists:
                pass
            return
    if found.type != "process":
        raise ConfigError(f"work pool {pool!r} is of type {found.type!r}; reembed deployments run on a 'process' pool")


def deploy(job_file: str, overrides: list[str], cron: str, pool: str = DEFAULT_POOL, name: str | None = None,
           timezone: str | None = None) -> DeploymentInfo:
    """Register (or update in place) the job's deployment with its cron schedule on ``pool``."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.types.entrypoint import EntrypointType

    from reembed.flows.run_flow import run_job_file

    url = api_url()
    check_overrides(overrides)
    path = str(Path(job_file).resolve())
    job = load_job(path, overrides)  # a job that does not load fails here, not at 3 a.m.
    ensure_pool(pool)
    deployment = run_job_file.to_deployment(
        name=name or job.name, schedule=_cron(cron, timezone), parameters={"job_file": path, "overrides": overrides},
        work_pool_name=pool, entrypoint_type=EntrypointType.MODULE_PATH, tags=["reembed", f"alias:{job.name}"],
        description=f"Scheduled refresh of alias {job.name!r} from job file {path}: re-embeds what changed",
        concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW))
    deployment_id = str(deployment.apply(work_pool_name=pool))
    logger.info("deployment %s/%s registered on pool %s (%s)", FLOW_NAME, name or job.name, pool, url)
    return next(d for d in list_deployments() if d.id == deployment_id)


def undeploy(name: str) -> str:
    """Delete the deployment ``name`` (a job's alias unless deployed with --name); returns its full name."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    api_url()
    full = f"{FLOW_NAME}/{name}"
    with get_client(sync_client=True) as client:
        try:
            found = client.read_deployment_by_name(full)
        except ObjectNotFound:
            raise ConfigError(f"no deployment {full!r} on this Prefect server; `reembed deployments` lists them") from None
        client.delete_deployment(found.id)
    return full


def list_deployments() -> list[DeploymentInfo]:
    """Every deployment of reembed's job flow with its schedules, next scheduled run and last run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (DeploymentFilter, DeploymentFilterId, FlowFilter, FlowFilterName,
                                                FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType)
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    url = api_url()
    out: list[DeploymentInfo] = []
    with get_client(sync_client=True) as client:
        for d in sorted(client.read_deployments(flow_filter=FlowFilter(name=FlowFilterName(any_=[FLOW_NAME]))),
                        key=lambda d: d.name):
            by_deployment = DeploymentFilter(id=DeploymentFilterId(any_=[d.id]))
            upcoming = client.read_flow_runs(
                deployment_filter=by_deployment, sort=FlowRunSort.EXPECTED_START_TIME_ASC, limit=1,
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                    type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))))
            last = client.read_flow_runs(
                deployment_filter=by_deployment, sort=FlowRunSort.START_TIME_DESC, limit=1,
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(
                    not_any_=[StateType.SCHEDULED, StateType.PENDING]))))
            params = d.parameters or {}
            alias = next((t.split(":", 1)[1] for t in d.tags if t.startswith("alias:")), d.name)
            limit = d.global_concurrency_limit.limit if d.global_concurrency_limit else None
            out.append(DeploymentInfo(
                name=f"{FLOW_NAME}/{d.name}", id=str(d.id), alias=alias, job_file=str(params.get("job_file", "")),
                overrides=list(params.get("overrides") or []),
                schedules=[_describe(s.schedule) for s in d.schedules if s.active], work_pool=d.work_pool_name,
                paused=bool(d.paused), concurrency_limit=limit,
                next_run_at=upcoming[0].expected_start_time if upcoming else _next_date(d.schedules),
                last_run_state=last[0].state_type.value if last and last[0].state_type else None,
                last_run_at=(last[0].start_time or last[0].expected_start_time) if last else None, api_url=url))
    return out


def _cron(expr: str, timezone: str | None) -> Any:
    from prefect.schedules import Cron

    return Cron(expr, timezone=timezone or "UTC")


def _next_date(schedules: list[Any]) -> datetime | None:
    """The next date of the active schedules, from the schedules themselves: right after a deploy the server's
    scheduler (a loop of about a minute) has not created the scheduled runs yet."""
    from prefect.server.schemas.schedules import CronSchedule, IntervalSchedule

    dates = []
    for item in schedules:
        schedule = item.schedule if item.active else None
        if getattr(schedule, "cron", None):
            server_side: Any = CronSchedule(cron=schedule.cron, timezone=schedule.timezone, day_or=schedule.day_or)
        elif getattr(schedule, "interval", None):
            server_side = IntervalSchedule(interval=schedule.interval, anchor_date=schedule.anchor_date,
                                           timezone=schedule.timezone)
        else:
            continue
        dates += list(server_side._get_dates_generator(n=1))
    return min(dates) if dates else None


def _describe(schedule: Any) -> str:
    cron = getattr(schedule, "cron", None)
    if cron:
        tz = getattr(schedule, "timezone", None)
        return f"{cron} ({tz})" if tz else cron
    interval = getattr(schedule, "interval", None)
    if interval:
        return f"every {interval}"
    return str(getattr(schedule, "rrule", schedule))


def worker_command(pool: str, limit: int | None = None) -> list[str]:
    """The ``prefect worker start`` command line for ``pool``, with the Prefect of this environment."""
    prefect = Path(sys.executable).parent / "prefect"
    cmd = [str(prefect)] if prefect.exists() else [sys.executable, "-m", "prefect"]
    cmd += ["worker", "start", "--pool", pool, "--type", "process"]
    if limit:
        cmd += ["--limit", str(limit)]
    return cmd


def start_worker(pool: str = DEFAULT_POOL, limit: int | None = None) -> None:
    """Replace this process with the pool's worker: it polls the server and runs each flow run of the pool's
    deployments in a subprocess (reembed must be importable there, as it is here)."""
    api_url()
    ensure_pool(pool)
    cmd = worker_command(pool, limit)
    logger.info("starting %s", " ".join(cmd))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(cmd[0], cmd)


def serve(job_file: str, overrides: list[str], cron: str, name: str | None = None,
          timezone: str | None = None) -> None:
    """Run the job's schedule from this process (``flow.serve``): no work pool and no worker."""
    from reembed.flows.run_flow import run_job_file

    api_url()
    check_overrides(overrides)
    path = str(Path(job_file).resolve())
    job = load_job(path, overrides)
    run_job_file.serve(name=name or job.name, schedule=_cron(cron, timezone),
                       parameters={"job_file": path, "overrides": overrides}, tags=["reembed", f"alias:{job.name}"],
                       description=f"Scheduled refresh of alias {job.name!r} from job file {path} (served)")
