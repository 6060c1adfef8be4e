"""Scheduled refreshes against a real `prefect server start` on 127.0.0.1 (the session's ``prefect_server``):
deployments registered, updated in place, listed and removed through the console script, read back through
Prefect's API."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import ROOT, last_json, run_cli

SAMPLE = ROOT / "examples" / "sample"


def _api_deployment(prefect_server: str, name: str):
    from prefect.client.orchestration import SyncPrefectClient

    with SyncPrefectClient(prefect_server) as client:
        return client.read_deployment_by_name(f"reembed-job/{name}")


def _on_session_ray(ray_address: str) -> dict[str, str]:
    """The environment of a worker or `reembed serve`: the flow runs it starts join the session's Ray (its
    address as the job setting's env twin) instead of each starting a local Ray of its own; what these tests
    check is the scheduling, and a shared cluster is how a worker runs in production."""
    import os

    return {**os.environ, "REEMBED_RUNTIME__RAY_ADDRESS": ray_address}


@pytest.fixture
def job_file(tmp_path) -> Path:
    """The sample job with a secret in it (a Qdrant API key), writing under tmp_path."""
    text = (SAMPLE / "job.yaml").read_text()
    text = text.replace("uri: corpus.jsonl", f"uri: {SAMPLE / 'corpus.jsonl'}")
    text = text.replace("../../reembed-data/vectors", str(tmp_path / "vectors"))
    text = text.replace("../../reembed-data/qdrant", str(tmp_path / "qdrant"))
    text = text.replace("  url: null", "  url: null\n  api_key: s3cr3t-qdrant-key-123")
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


def test_deploy_updates_in_place_lists_and_keeps_secrets_out(prefect_server, job_file, tmp_path) -> None:
    pool = f"pool-{tmp_path.name[-12:]}"
    first = run_cli("deploy", str(job_file), "--cron", "0 3 * * *", "--pool", pool, "--json")
    assert first.returncode == 0, first.stderr[-3000:]
    info = last_json(first.stdout)
    assert info["name"] == "reembed-job/sample" and info["schedules"] == ["0 3 * * * (UTC)"] and info["work_pool"] == pool
    assert info["job_file"] == str(job_file) and info["next_run_at"] and info["concurrency_limit"] == 1

    api = _api_deployment(prefect_server, "sample")
    assert [s.schedule.cron for s in api.schedules] == ["0 3 * * *"]
    assert api.parameters == {"job_file": str(job_file), "overrides": []}
    assert api.entrypoint == "reembed.flows.run_flow.run_job_file" and api.work_pool_name == pool
    assert "s3cr3t" not in json.dumps(api.model_dump(mode="json"))  # the job file's secret stays in the job file
    assert "alias 'sample'" in api.description and str(job_file) in api.description

    again = run_cli("deploy", str(job_file), "--cron", "0 3 * * *", "--pool", pool, "--json")
    assert again.returncode == 0 and last_json(again.stdout)["id"] == info["id"]
    moved = run_cli("deploy", str(job_file), "--cron", "30 4 * * *", "--pool", pool,
                    "--set", "runtime.num_actors=1", "--json")
    assert moved.returncode == 0, moved.stderr[-3000:]
    updated = _api_deployment(prefect_server, "sample")
    assert str(updated.id) == info["id"]  # updated in place, not a second deployment
    assert [s.schedule.cron for s in updated.schedules] == ["30 4 * * *"]
    assert updated.parameters["overrides"] == ["runtime.num_actors=1"]

    refused = run_cli("deploy", str(job_file), "--cron", "0 3 * * *", "--pool", pool,
                      "--set", "index.api_key=another-secret")
    assert refused.returncode == 2 and "would be stored in the deployment's parameters" in refused.stderr
    assert "another-secret" not in json.dumps(_api_deployment(prefect_server, "sample").model_dump(mode="json"))

    listed = run_cli("deployments", "--json")
    assert listed.returncode == 0, listed.stderr[-3000:]
    (row,) = [d for d in last_json(listed.stdout) if d["id"] == info["id"]]
    assert row["schedules"] == ["30 4 * * * (UTC)"] and row["next_run_at"] and row["alias"] == "sample"

    gone = run_cli("undeploy", "sample")
    assert gone.returncode == 0 and "removed deployment reembed-job/sample" in gone.stderr
    assert not [d for d in last_json(run_cli("deployments", "--json").stdout) if d["id"] == info["id"]]
    missing = run_cli("undeploy", "sample")
    assert missing.returncode == 2 and "no deployment 'reembed-job/sample'" in missing.stderr


def test_prefect_yaml_deploys_what_reembed_deploy_does(prefect_server, tmp_path) -> None:
    """infra/prefect/prefect.yaml, deployed by Prefect's own `prefect deploy`, registers the deployment
    `reembed deploy` would (flow, module-path entrypoint, pool, schedule, one run at a time), with a pull step
    that needs nothing from the machine that deployed it, and `reembed deployments` / `undeploy` manage it."""
    import subprocess
    import sys

    prefect = str(Path(sys.executable).parent / "prefect")
    assert run_cli("deployments", "--json").returncode == 0
    # The file's first step, through Prefect's CLI: a subprocess reads PREFECT_API_URL (the session server); the
    # pytest process keeps the settings it imported Prefect with, which may be its own temporary server.
    pool = subprocess.run([prefect, "--no-prompt", "work-pool", "create", "reembed", "--type", "process"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert pool.returncode == 0 or "already exists" in pool.stdout + pool.stderr, pool.stdout + pool.stderr
    deployed = subprocess.run([prefect, "--no-prompt", "deploy", "--all", "--prefect-file",
                               str(ROOT / "infra" / "prefect" / "prefect.yaml")],
                              capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
    api = _api_deployment(prefect_server, "docs")
    try:
        assert api.entrypoint == "reembed.flows.run_flow.run_job_file" and api.work_pool_name == "reembed"
        assert api.parameters == {"job_file": "/etc/reembed/job.yaml", "overrides": []}
        assert [(s.schedule.cron, s.schedule.timezone) for s in api.schedules] == [("0 3 * * *", "UTC")]
        assert api.global_concurrency_limit.limit == 1
        assert str(api.concurrency_options.collision_strategy.value) == "CANCEL_NEW"
        assert api.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": "/tmp"}}]
        assert str(tmp_path) not in json.dumps(api.model_dump(mode="json"))  # nothing of the deploying machine
        listed = run_cli("deployments", "--json")
        (row,) = [d for d in last_json(listed.stdout) if d["id"] == str(api.id)]
        assert row["alias"] == "docs" and row["schedules"] == ["0 3 * * * (UTC)"] and row["concurrency_limit"] == 1
    finally:
        gone = run_cli("undeploy", "docs")
    assert gone.returncode == 0, gone.stderr[-2000:]


def test_schedule_commands_need_a_server(job_file) -> None:
    res = run_cli("deployments", unset=("PREFECT_API_URL",))
    assert res.returncode == 2 and "needs a Prefect server" in res.stderr and "PREFECT_API_URL" in res.stderr
    res = run_cli("deploy", str(job_file), "--cron", "0 3 * * *", unset=("PREFECT_API_URL",))
    assert res.returncode == 2 and "needs a Prefect server" in res.stderr


def _stop_group(proc, log) -> None:
    """Stop a worker (or `reembed serve`) and the flow-run processes it started: SIGTERM to its process group,
    then SIGKILL to whatever is left after 30 s (a loaded machine can keep Prefect's graceful shutdown busy)."""
    import os
    import signal
    import subprocess

    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    except ProcessLookupError:
        pass
    log.close()


def _wait_idle(prefect_server: str, deployment_id, deadline_s: float = 420) -> None:
    """Wait until no run of the deployment is pending or running (after its schedule was removed), so stopping
    the worker interrupts nothing."""
    _quiet_moment(prefect_server, deployment_id, deadline_s)


def _quiet_moment(prefect_server: str, deployment_id, deadline_s: float = 420):
    """A time at which no run of the deployment was pending or running (read just after it): a run that had
    started before it had also finished before it."""
    import time
    from datetime import datetime, timezone

    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import (DeploymentFilter, DeploymentFilterId, FlowRunFilter,
                                                FlowRunFilterState, FlowRunFilterStateType)
    from prefect.client.schemas.objects import StateType

    active = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(
        any_=[StateType.PENDING, StateType.RUNNING])))
    deadline = time.monotonic() + deadline_s
    with SyncPrefectClient(prefect_server) as client:
        while True:
            now = datetime.now(timezone.utc)
            if not client.read_flow_runs(flow_run_filter=active, limit=1, deployment_filter=DeploymentFilter(
                    id=DeploymentFilterId(any_=[deployment_id]))):
                return now
            assert time.monotonic() < deadline, f"runs of {deployment_id} still active after {deadline_s} s"
            time.sleep(1)


def _wait_final(prefect_server: str, flow_run_id, deadline_s: float = 420):
    """The flow run once it reaches a final state (completed, failed, cancelled, crashed)."""
    import time

    from prefect.client.orchestration import SyncPrefectClient

    deadline = time.monotonic() + deadline_s
    with SyncPrefectClient(prefect_server) as client:
        while True:
            run = client.read_flow_run(flow_run_id)
            if run.state is not None and run.state.is_final():
                return run
            assert time.monotonic() < deadline, f"flow run {flow_run_id} still {run.state_name} after {deadline_s} s"
            time.sleep(2)


def _scheduled_runs(prefect_server: str, deployment_id, after=None) -> list:
    """Completed or running auto-scheduled runs of the deployment (started after ``after``), oldest first."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    with SyncPrefectClient(prefect_server) as client:
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
                                     sort=FlowRunSort.EXPECTED_START_TIME_ASC, limit=200)
    return [r for r in runs if r.auto_scheduled and r.start_time is not None
            and (after is None or r.start_time > after)]


def test_a_worker_runs_the_schedule_and_api_triggers(prefect_server, job_file, tmp_path, ray_address) -> None:
    """`reembed worker` runs a run started through the API (with an override) and the runs the schedule fires
    every minute; after a document changes, the next scheduled run encodes exactly that document; the run log
    records each run with its trigger."""
    import subprocess

    from prefect.deployments import run_deployment

    from conftest import reembed_cli
    from reembed.flows.config import load_job
    from reembed.flows.operations.run_log import RunLog

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text((SAMPLE / "corpus.jsonl").read_text())
    job_file.write_text(job_file.read_text().replace(str(SAMPLE / "corpus.jsonl"), str(corpus)))
    pool = f"pool-{tmp_path.name[-12:]}"
    deployed = run_cli("deploy", str(job_file), "--cron", "* * * * *", "--pool", pool, "--name", "every-minute",
                       "--json")
    assert deployed.returncode == 0, deployed.stderr[-3000:]
    deployment = last_json(deployed.stdout)
    log = (tmp_path / "worker.log").open("w")
    worker = subprocess.Popen([*reembed_cli(), "worker", "--pool", pool], stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True, cwd=ROOT, env=_on_session_ray(ray_address))
    from prefect.settings import PREFECT_API_URL, temporary_settings

    try:
        for _ in range(5):  # a scheduled run in flight cancels the API's run (the concurrency limit): again
            with temporary_settings(updates={PREFECT_API_URL: prefect_server}):  # this process's Prefect
                triggered = run_deployment("reembed-job/every-minute", timeout=0, parameters={
                    "job_file": str(job_file), "overrides": ["runtime.progress_seconds=2"]})
            done = _wait_final(prefect_server, triggered.id)
            if not (done.state.is_cancelled() and "concurrency limit" in (done.state.message or "")):
                break
            _wait_idle(prefect_server, deployment["id"])
        assert done.state.is_completed(), (done.state, (tmp_path / "worker.log").read_text()[-4000:])

        # The change is written while no run is pending or running, so no run already under way can see it:
        # the first scheduled run started after changed_at is the one that finds it.
        changed_at = _quiet_moment(prefect_server, deployment["id"])
        lines = corpus.read_text().splitlines()
        lines[3] = lines[3].replace('"text": "', '"text": "Revised: ', 1)
        corpus.write_text("\n".join(lines) + "\n")
        _completed_scheduled(prefect_server, deployment["id"], changed_at, tmp_path)
    finally:
        run_cli("undeploy", "every-minute")  # no more scheduled runs; the one in flight, if any, finishes
        try:
            _wait_idle(prefect_server, deployment["id"])
        finally:
            _stop_group(worker, log)

    job = load_job(job_file)
    records = RunLog(job.output.uri, job.name).records(limit=50)
    by_trigger = {}
    for r in records:
        by_trigger.setdefault(r.trigger, []).append(r)
    (api_run,) = by_trigger["deployment"]  # the API's run; a scheduled run may have come first and done the work
    assert api_run.status in ("ok", "up-to-date") and api_run.overrides == ["runtime.progress_seconds=2"]
    first = min(records, key=lambda r: r.started_at)
    assert first.status == "ok" and first.encoded == 40  # whichever ran first indexed the corpus
    assert sum(r.encoded or 0 for r in records) == 40 + 1  # nothing encoded twice: the corpus once, then the change
    scheduled = sorted(by_trigger["schedule"], key=lambda r: r.started_at)
    assert scheduled and all(r.status in ("ok", "up-to-date") for r in scheduled)
    last = [r for r in scheduled if r.started_at > changed_at]
    assert last and last[0].status == "ok" and last[0].encoded == 1  # exactly the changed document


def _completed_scheduled(prefect_server: str, deployment_id, after, tmp_path, deadline_s: float = 420):
    """The first auto-scheduled run started after ``after`` that completes; runs the concurrency limit
    cancelled (they collided with a running one) are passed over."""
    import time

    deadline = time.monotonic() + deadline_s
    seen: set = set()
    while True:
        for run in _scheduled_runs(prefect_server, deployment_id, after):
            if run.id in seen:
                continue
            final = _wait_final(prefect_server, run.id)
            if final.state.is_completed():
                return final
            logs = "\n".join(f.read_text()[-3000:] for f in tmp_path.glob("*.log"))
            assert final.state.is_cancelled(), (final.state, logs)
            seen.add(run.id)
        assert time.monotonic() < deadline, f"no scheduled run completed within {deadline_s} s"
        time.sleep(3)


def test_serve_runs_the_schedule_in_one_process(prefect_server, job_file, tmp_path, ray_address) -> None:
    import subprocess
    import time

    from prefect.client.orchestration import SyncPrefectClient

    from conftest import reembed_cli
    from reembed.flows.config import load_job
    from reembed.flows.operations.run_log import RunLog

    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen([*reembed_cli(), "serve", str(job_file), "--cron", "* * * * *", "--name", "served"],
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT,
                              env=_on_session_ray(ray_address))
    try:
        deadline = time.monotonic() + 120
        while True:  # serve registers its deployment first
            try:
                with SyncPrefectClient(prefect_server) as client:
                    deployment = client.read_deployment_by_name("reembed-job/served")
                break
            except Exception:
                assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "serve registered no deployment in 120 s"
                time.sleep(2)
        run = _completed_scheduled(prefect_server, deployment.id, None, tmp_path)
        assert run.state.is_completed()
    finally:
        _stop_group(server, log)
    job = load_job(job_file)
    records = RunLog(job.output.uri, job.name).records(limit=10)
    assert [(r.trigger, r.status, r.points) for r in records][:1] == [("schedule", "ok", 40)]


def test_two_triggers_at_once_write_once(prefect_server, job_file, tmp_path, ray_address) -> None:
    """Two runs of one deployment triggered together: one writes, the other is cancelled by the deployment's
    concurrency limit (or, had it started after, finds nothing to do); the collection equals one clean run."""
    import subprocess

    import numpy as np
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from conftest import reembed_cli
    from reembed.flows.config import load_job
    from reembed.flows.operations.run_log import RunLog
    from reembed.indexing.index import open_index
    from reembed.indexing.records import point_id
    from reembed.indexing.vector_store import VectorStore, arrow_to_vectors

    pool = f"pool-{tmp_path.name[-12:]}"
    deployed = run_cli("deploy", str(job_file), "--cron", "0 3 1 1 *", "--pool", pool, "--name", "twice")
    assert deployed.returncode == 0, deployed.stderr[-3000:]
    log = (tmp_path / "worker.log").open("w")
    worker = subprocess.Popen([*reembed_cli(), "worker", "--pool", pool], stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True, cwd=ROOT, env=_on_session_ray(ray_address))
    try:
        with temporary_settings(updates={PREFECT_API_URL: prefect_server}):
            runs = [run_deployment("reembed-job/twice", timeout=0) for _ in range(2)]
        finals = [_wait_final(prefect_server, r.id) for r in runs]
    finally:
        _stop_group(worker, log)
        run_cli("undeploy", "twice")
    states = sorted(f.state.type.value for f in finals)
    assert states in (["CANCELLED", "COMPLETED"], ["COMPLETED", "COMPLETED"]), (
        states, (tmp_path / "worker.log").read_text()[-4000:])
    job = load_job(job_file)
    records = RunLog(job.output.uri, job.name).records(limit=10)
    assert [r.status for r in records if r.status == "ok"] == ["ok"]  # exactly one run wrote
    assert all(r.status in ("ok", "up-to-date") for r in records), [(r.status, r.error) for r in records]
    with open_index(job.index) as index:
        assert index.count(job.name) == 40
        table = VectorStore(job.output.uri, records[0].collection).read_all(["doc_id", "vector"])
        ids = [point_id(d) for d in table.column("doc_id").to_pylist()]
        stored = {p.id: p.vector for p in index.retrieve(job.name, ids)}
    expected = arrow_to_vectors(table.column("vector"))
    assert len(stored) == 40 and all(np.allclose(stored[i], v, atol=1e-6) for i, v in zip(ids, expected))
