"""infra/prometheus: the alert rules and the Prometheus config are valid, and every alert fires when it should
and stays quiet when it should not (promtool's rule unit tests, alerts.test.yml)."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from conftest import ROOT

PROMETHEUS = ROOT / "infra" / "prometheus"
ALERTS = ("ReembedStale", "ReembedRunFailed", "ReembedGateBlocked", "ReembedQuarantineHigh")


def _promtool(*args: str) -> subprocess.CompletedProcess:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed: `bash infra/install.sh --test` installs Debian's prometheus")
    return subprocess.run([promtool, *args], capture_output=True, text=True, timeout=120, cwd=PROMETHEUS)


def test_rules_and_config_are_valid() -> None:
    checked = _promtool("check", "rules", "alerts.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in checked.stdout
    config = _promtool("check", "config", "--syntax-only", "prometheus.yml")
    assert config.returncode == 0, config.stdout + config.stderr
    scrape = {s["job_name"]: s for s in yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())["scrape_configs"]}
    assert scrape["pushgateway"]["honor_labels"] is True  # keeps the pushed job and alias labels
    assert scrape["ray"]["file_sd_configs"][0]["files"] == ["/tmp/ray/prom_metrics_service_discovery.json"]


def test_each_alert_has_a_firing_and_a_quiet_case() -> None:
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    assert [r["alert"] for g in rules["groups"] for r in g["rules"]] == list(ALERTS)
    cases = yaml.safe_load((PROMETHEUS / "alerts.test.yml").read_text())["tests"]
    for alert in ALERTS:
        evals = [e for t in cases for e in t["alert_rule_test"] if e["alertname"] == alert]
        assert any(e["exp_alerts"] for e in evals), f"{alert}: no case where it fires"
        assert any(not e["exp_alerts"] for e in evals), f"{alert}: no case where it stays quiet"
    tested = _promtool("test", "rules", "alerts.test.yml")
    assert tested.returncode == 0, tested.stdout + tested.stderr
