"""Job metrics against a real Pushgateway and a real Prometheus scraping it (Debian's binaries, on 127.0.0.1).

What Prometheus' HTTP API returns must equal what the run reported; a run that ends badly, in any way, must leave
the last success where the last good run put it and say how it ended.
"""

from __future__ import annotations

import json
import shutil
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT, cli_in_process, last_json
from reembed.flows.config import load_job
from reembed.flows.gate import GateFailed
from reembed.flows.guards import GuardBlocked
from reembed.flows.operations.lease import LeaseHeld
from reembed.flows.operations.metrics import MetricsPusher, MetricsSettings
from reembed.flows.operations.run_log import RunLog, recorded_run, skipped_when_held
from reembed.indexing.records import GateResult, GuardCheck, GuardReport, RunSummary

SAMPLE = ROOT / "examples" / "sample"


def _query(prometheus: str, expr: str) -> dict[tuple, float]:
    """An instant PromQL query through Prometheus' HTTP API: {sorted label items (no __name__): value}."""
    url = f"{prometheus}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
    with urllib.request.urlopen(url, timeout=10) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    return {tuple(sorted((k, v) for k, v in r["metric"].items() if k != "__name__")): float(r["value"][1])
            for r in body["data"]["result"]}


def _one(prometheus: str, expr: str) -> float:
    (value,) = _query(prometheus, expr).values()
    return value


def _until(check, what: str, deadline_s: float = 90):
    """Poll ``check`` until it returns something truthy (Prometheus scrapes every second, evaluates rules every
    second): a deadline for a state, never a bound on speed."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            found = check()
        except (AssertionError, ValueError):
            found = None
        if found:
            return found
        assert time.monotonic() < deadline, f"gave up waiting for {what} after {deadline_s} s"
        time.sleep(0.5)


def _job(tmp_path: Path, name: str, pushgateway: str) -> tuple[Path, list[str]]:
    shutil.copy(SAMPLE / "corpus.jsonl", tmp_path / "corpus.jsonl")
    job = tmp_path / "job.yaml"
    job.write_text((SAMPLE / "job.yaml").read_text())
    return job, ["--set", f"name={name}", "--set", f"corpus.uri={tmp_path / 'corpus.jsonl'}",
                 "--set", f"output.uri={tmp_path / 'vectors'}", "--set", f"index.path={tmp_path / 'qdrant'}",
                 "--set", f"metrics.pushgateway={pushgateway}"]


def test_a_run_pushes_its_outcome_and_a_failed_run_keeps_the_last_success(tmp_path, pushgateway,
                                                                          prometheus) -> None:
    job_path, sets = _job(tmp_path, "metrics-e2e", pushgateway)
    first = cli_in_process("run", str(job_path), *sets, "--json")
    assert first.returncode == 0, first.stderr[-3000:]
    summary = last_json(first.stdout)
    job = load_job(job_path, [s for s in sets if s != "--set"])
    (ok,) = RunLog(job.output.uri, job.name).records()
    alias = '{alias="metrics-e2e"}'

    _until(lambda: _one(prometheus, f"reembed_last_run_timestamp_seconds{alias}") == ok.finished_at.timestamp(),
           "Prometheus to scrape the first run's push")
    assert _one(prometheus, f"reembed_last_success_timestamp_seconds{alias}") == ok.finished_at.timestamp()
    documents = {dict(k)["kind"]: v for k, v in _query(prometheus, f"reembed_last_run_documents{alias}").items()}
    assert documents == {"input": 40, "encoded": summary["encoded"], "reused": 0, "upserted": summary["upserted"],
                         "deleted": summary["deleted"], "quarantined": 0} and summary["encoded"] == 40
    assert _one(prometheus, f"reembed_points{alias}") == summary["points"] == 40
    assert _one(prometheus, f"reembed_last_run_tokens{alias}") == summary["tokens"] > 0
    assert _one(prometheus, f"reembed_last_run_docs_per_second{alias}") == summary["docs_per_s"]
    assert _one(prometheus, f"reembed_freshness_budget_seconds{alias}") == 25 * 3600
    status = {dict(k)["status"]: v for k, v in _query(prometheus, f"reembed_last_run_status{alias}").items()}
    assert status["ok"] == 1 and sum(status.values()) == 1 and {"failed", "blocked", "skipped"} <= set(status)
    (info,) = _query(prometheus, f"reembed_info{alias}")
    assert dict(info) == {"job": "reembed", "alias": "metrics-e2e", "model": summary["model"],
                          "collection": summary["collection"], "engine": "edge"}
    assert "instance" not in dict(info)  # the grouping key has no instance: every host updates one group
    assert _one(prometheus, f"reembed_run_documents_done{alias}") == _one(
        prometheus, f"reembed_run_documents_total{alias}") == 40

    (tmp_path / "corpus.jsonl").rename(tmp_path / "vanished.jsonl")  # stopped by preflight, before Prefect
    failed_run = cli_in_process("run", str(job_path), *sets)
    assert failed_run.returncode == 2 and "corpus.jsonl" in failed_run.stderr
    failed = RunLog(job.output.uri, job.name).records()[-1]
    assert failed.status == "failed"
    _until(lambda: _one(prometheus, f"reembed_last_run_timestamp_seconds{alias}") == failed.finished_at.timestamp(),
           "Prometheus to scrape the failed run's push")
    assert _one(prometheus, f"reembed_last_success_timestamp_seconds{alias}") == ok.finished_at.timestamp()
    status = {dict(k)["status"]: v for k, v in _query(prometheus, f"reembed_last_run_status{alias}").items()}
    assert status["failed"] == 1 and status["ok"] == 0
    assert _one(prometheus, f"reembed_points{alias}") == 40  # the live collection did not change
    _until(lambda: _query(prometheus, 'ALERTS{alertname="ReembedRunFailed", alias="metrics-e2e", '
                                      'alertstate="firing"}'), "ReembedRunFailed to fire in Prometheus")


def _pushed(pushgateway: str, alias: str) -> dict[str, dict[tuple, float]]:
    """What the Pushgateway holds for one alias: {metric: {labels (no job/alias/instance): value}}."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{pushgateway}/metrics", timeout=10) as response:
        text = response.read().decode()
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("alias") == alias and sample.name.startswith("reembed_"):
                labels = tuple(sorted((k, v) for k, v in sample.labels.items()
                                      if k not in ("job", "alias", "instance")))
                out.setdefault(sample.name, {})[labels] = sample.value
    return out


def _summary(status: str = "ok") -> RunSummary:
    return RunSummary(alias="ends", collection="ends-1", mode="refresh", status=status, model="m", dim=4,
                      input_rows=10, indexed=10, encoded=3, reused=7, upserted=3, quarantined=0, tokens=300,
                      seconds=2.0, docs_per_s=5.0, shards_total=1, points=10, output="out", index="edge:x")


def test_every_bad_ending_keeps_the_last_success_and_says_how_it_ended(tmp_path, pushgateway) -> None:
    output = str(tmp_path / "vectors")
    pusher = MetricsPusher(MetricsSettings(pushgateway=pushgateway, max_age=3600), "ends", "edge")
    with recorded_run(output, "ends", "schedule", listeners=[pusher]) as run:
        run.summary = _summary()
    success = RunLog(output, "ends").records()[-1].finished_at.timestamp()
    assert _pushed(pushgateway, "ends")["reembed_last_success_timestamp_seconds"] == {(): success}

    report = GuardReport(checks=[GuardCheck(name="max_deleted_fraction", value=0.9, limit=0.2,
                                            detail="9 of 10 live points", passed=False)])
    gate = GateResult(metric="ndcg@10", new="ends-2", live="ends-1", new_score=0.4, live_score=0.6,
                      tolerance=0.01, passed=False)
    endings = [
        (GuardBlocked(report, "ends-1", None, []), "blocked", "guards"),
        (GateFailed(gate, _summary("ok").model_copy(update={"gate": gate})), "blocked", "gate"),
        (RuntimeError("Qdrant went away"), "failed", None),
        (KeyboardInterrupt(), "failed", None),
        (LeaseHeld("another run of job 'ends' is in progress"), "skipped", None),
    ]
    for error, status, blocked_by in endings:
        with pytest.raises(type(error)):
            with skipped_when_held(output, "ends", "schedule", listeners=[pusher]):
                if isinstance(error, LeaseHeld):
                    raise error  # refused at the lease: the run never started
                with recorded_run(output, "ends", "schedule", listeners=[pusher]):
                    raise error
        record = RunLog(output, "ends").records()[-1]
        pushed = _pushed(pushgateway, "ends")
        assert record.status == status, error
        assert pushed["reembed_last_run_timestamp_seconds"] == {(): record.finished_at.timestamp()}, error
        assert pushed["reembed_last_success_timestamp_seconds"] == {(): success}, error  # unchanged
        assert pushed["reembed_last_run_status"][(("status", status),)] == 1, error
        assert sum(pushed["reembed_last_run_status"].values()) == 1, error
        assert pushed["reembed_last_run_blocked"] == {
            (("by", "gate"),): float(blocked_by == "gate"), (("by", "guards"),): float(blocked_by == "guards")}, error
        assert pushed["reembed_points"] == {(): 10}, error  # the live collection is the good run's
        if blocked_by == "gate":
            assert pushed["reembed_gate_score"] == {(("version", "candidate"),): 0.4, (("version", "live"),): 0.6}


def test_actor_counters_add_up_to_the_run_and_the_grafana_queries_hold(tmp_path, pushgateway) -> None:
    """A Ray head with a metrics export port and its dashboard (which writes the file of scrape targets), a
    Prometheus running infra/prometheus/prometheus.yml (the Pushgateway's address and the targets file moved
    here), and a run on that head with two actors: the actors' counters, summed over actors, are the run's
    tokens, encoded documents and batches. Then every query of infra/grafana/reembed.json is accepted by that
    Prometheus and names only metrics it has scraped."""
    import tempfile

    from conftest import _binary, _serve, _stop, free_port, ray_node, run_cli, wait_nodes

    temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: Ray's socket paths must fit in 107 bytes
    port, export_port, dashboard_port = free_port(), free_port(), free_port()
    address = f"127.0.0.1:{port}"
    head = ray_node(["--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
                     f"--metrics-export-port={export_port}", "--include-dashboard=true",
                     "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", f"--temp-dir={temp}"],
                    tmp_path / "head.log")
    prom = None
    try:
        wait_nodes(address, 1)
        targets = temp / "prom_metrics_service_discovery.json"
        _until(lambda: targets.exists() and json.loads(targets.read_text()), "Ray to write its scrape targets")
        config = (ROOT / "infra" / "prometheus" / "prometheus.yml").read_text()
        assert "/tmp/ray/prom_metrics_service_discovery.json" in config
        config = config.replace("/tmp/ray/prom_metrics_service_discovery.json", str(targets))
        config = config.replace("scrape_interval: 15s", "scrape_interval: 1s").replace("  - alerts.yml\n", "")
        assert "127.0.0.1:9091" in config
        config = config.replace("127.0.0.1:9091", pushgateway.removeprefix("http://"))
        (tmp_path / "prometheus.yml").write_text(config)
        prom_port = free_port()
        prom = _serve([_binary("prometheus"), f"--config.file={tmp_path / 'prometheus.yml'}",
                       f"--storage.tsdb.path={tmp_path / 'prom-data'}", f"--web.listen-address=127.0.0.1:{prom_port}"],
                      f"http://127.0.0.1:{prom_port}/-/ready", tmp_path / "prometheus.log", "Prometheus")
        prometheus = f"http://127.0.0.1:{prom_port}"

        job_path, sets = _job(tmp_path, "actor-metrics", pushgateway)
        res = run_cli("run", str(job_path), *sets, "--json", "--set", f"runtime.ray_address={address}",
                      "--set", "runtime.num_actors=2", "--set", "runtime.shard_rows=10")
        assert res.returncode == 0, res.stderr[-4000:]
        summary = last_json(res.stdout)
        assert summary["actors"] == 2 and summary["encoded"] == 40 and summary["tokens"] > 0

        model = f'{{model="{summary["model"]}"}}'

        def totals() -> dict[str, float] | None:
            got = {name: _one(prometheus, f"sum(ray_reembed_actor_{name}{model})")
                   for name in ("tokens_total", "documents_total", "batches_total", "encode_seconds_count")}
            return got if got["tokens_total"] == summary["tokens"] and got["documents_total"] == 40 else None

        got = _until(totals, "Prometheus to scrape the actors' counters")
        assert got["batches_total"] == got["encode_seconds_count"] >= 4  # four shards, one batch or more each
        per_actor = _query(prometheus, f"ray_reembed_actor_tokens_total{model}")
        assert len({dict(k)["WorkerId"] for k in per_actor}) == 2  # one series per actor, both did work
        assert all(v > 0 for v in per_actor.values())
        assert _query(prometheus, f"ray_reembed_actor_tokenize_queue_depth{model}")
        from reembed.flows.operations.dashboard import actor_figures  # `reembed dashboard --prometheus`

        def figures_of_the_run():
            figures = actor_figures(prometheus)
            assert figures.error is None, figures.error
            return figures if summary["model"] in figures.tokens_per_s else None

        # a rate needs two scrapes of the counter: the totals above may have come from the first one
        figures = _until(figures_of_the_run, "two scrapes of the actors' counters (a rate over them)")
        assert figures.tokens_per_s[summary["model"]] >= 0
        assert "did not answer" in actor_figures(f"http://127.0.0.1:{free_port()}").error
        _grafana_queries_hold(prometheus, pushgateway, tmp_path)
    finally:
        if prom is not None:
            _stop(prom)
        _stop(head, timeout=30)
        shutil.rmtree(temp, ignore_errors=True)


def _grafana_queries_hold(prometheus: str, pushgateway: str, tmp_path: Path) -> None:
    """Every PromQL expression of the Grafana dashboard (its variables given values, as Grafana would) is
    accepted by Prometheus' query API and names only metrics Prometheus has scraped; a gate-blocked run is
    pushed first, so the gate's scores are among them."""
    import re

    gate = GateResult(metric="ndcg@10", new="gated-2", live="gated-1", new_score=0.4, live_score=0.6,
                      tolerance=0.01, passed=False)
    pusher = MetricsPusher(MetricsSettings(pushgateway=pushgateway), "gated", "edge")
    with pytest.raises(GateFailed):
        with recorded_run(str(tmp_path / "gated"), "gated", "cli", listeners=[pusher]):
            raise GateFailed(gate, _summary("ok").model_copy(update={"gate": gate}))

    dashboard = json.loads((ROOT / "infra" / "grafana" / "reembed.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    exprs += [v["query"]["query"] for v in dashboard["templating"]["list"] if isinstance(v.get("query"), dict)]
    named = {m for e in exprs for m in re.findall(r"\b(?:ray_)?reembed_[a-z_]+", e)}
    assert len(exprs) >= 12 and "ray_reembed_actor_tokens_total" in named and "reembed_gate_score" in named

    def scraped() -> set[str] | None:
        with urllib.request.urlopen(f"{prometheus}/api/v1/label/__name__/values", timeout=10) as response:
            names = set(json.load(response)["data"])
        return names if named <= names else None

    _until(scraped, f"Prometheus to have scraped every metric the dashboard names: {sorted(named)}")
    for expr in exprs:
        if expr.startswith("label_values("):  # Grafana's own function: ask for the label's values instead
            metric, label = re.fullmatch(r"label_values\((\w+), (\w+)\)", expr).groups()
            url = f"{prometheus}/api/v1/label/{label}/values?{urllib.parse.urlencode({'match[]': metric})}"
            with urllib.request.urlopen(url, timeout=10) as response:
                assert "actor-metrics" in json.load(response)["data"], expr
            continue
        promql = expr.replace('"$alias"', '".*"').replace("$__rate_interval", "1m")
        assert "$" not in promql, expr  # a Grafana variable this test does not know how to fill
        _query(prometheus, promql)  # raises unless Prometheus accepted it
