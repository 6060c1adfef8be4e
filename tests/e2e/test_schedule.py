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


def test_schedule_commands_need_a_server(job_file) -> None:
    res = run_cli("deployments", unset=("PREFECT_API_URL",))
    assert res.returncode == 2 and "needs a Prefect server" in res.stderr and "PREFECT_API_URL" in res.stderr
    res = run_cli("deploy", str(job_file), "--cron", "0 3 * * *", unset=("PREFECT_API_URL",))
    assert res.returncode == 2 and "needs a Prefect server" in res.stderr
