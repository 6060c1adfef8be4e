"""`reembed dashboard` over real runs of two jobs (one ok, one blocked by its guards): the page's text carries
each alias, each last run's status and the live point count; ``/api/status`` agrees with `reembed status
--json`; the page never writes; while another process holds an embedded index it says the index is busy and
still shows the run log's and the manifests' figures. And a run's Prefect artifacts, seen in Prefect's own UI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import ROOT, cli_in_process, last_json

SAMPLE = ROOT / "examples" / "sample"


def _job(folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(SAMPLE / "corpus.jsonl", folder / "corpus.jsonl")
    text = (SAMPLE / "job.yaml").read_text().replace("name: sample", f"name: {name}")
    text = text.replace("../../reembed-data/vectors", str(folder / "vectors"))
    text = text.replace("../../reembed-data/qdrant", str(folder / "qdrant"))
    (folder / "job.yaml").write_text(text)
    return folder / "job.yaml"


def _files(root: Path) -> dict[str, tuple[int, int]]:
    """Every file the dashboard must leave alone: the vectors, manifests and run logs, and the alias pointer
    files. (Opening a Qdrant Edge shard rewrites the engine's own mmap trackers, as `reembed status` does;
    the points and aliases in it do not change.)"""
    files = [p for p in root.rglob("*") if p.is_file()
             and (p.relative_to(root).parts[1] == "vectors" or p.name == "aliases.json")]
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in files}


@pytest.fixture(scope="module")
def two_jobs(tmp_path_factory, ray_session) -> tuple[Path, Path]:
    """`dash-ok`: one good run. `dash-blocked`: a good run, then one with a bad row that its guards stop.
    In this process, on the session's Ray: three runs without three Ray start-ups."""
    root = tmp_path_factory.mktemp("dashboard")
    ok, blocked = _job(root / "ok", "dash-ok"), _job(root / "blocked", "dash-blocked")
    for job in (ok, blocked):
        res = cli_in_process("run", str(job), "--json")
        assert res.returncode == 0, res.stderr[-3000:]
    with (blocked.parent / "corpus.jsonl").open("a") as corpus:
        corpus.write('{"title": "no id", "text": "a row without its id"}\n')
    res = cli_in_process("run", str(blocked), "--set", "guards.max_quarantined_fraction=0")
    assert res.returncode != 0 and "quarantined" in res.stderr, res.stderr[-3000:]
    return ok, blocked


def test_page_and_api_show_both_jobs_and_agree_with_status(two_jobs) -> None:
    from fastapi.testclient import TestClient

    from reembed.flows.operations.dashboard import create_app

    ok, blocked = two_jobs
    before = _files(ok.parent.parent)
    client = TestClient(create_app([str(ok), str(blocked)]))
    page = client.get("/")
    assert page.status_code == 200 and "<script" not in page.text  # numbers in the HTML, no JavaScript
    text = page.text
    for alias in ("dash-ok", "dash-blocked"):
        assert f'<section id="alias-{alias}">' in text
    ok_html = text.split('<section id="alias-dash-ok">')[1].split("</section>")[0]
    blocked_html = text.split('<section id="alias-dash-blocked">')[1].split("</section>")[0]
    assert '<dd class="last-status">ok</dd>' in ok_html and '<dd class="points">40</dd>' in ok_html
    assert '<dd class="last-status">blocked</dd>' in blocked_html and "blocked (guards)" in blocked_html
    assert '<dd class="points">40</dd>' in blocked_html  # the good version still serves
    assert "fresh:" in ok_html and "<svg" in ok_html  # freshness against the budget, and a trend

    data = client.get("/api/status").json()
    assert [a["alias"] for a in data["aliases"]] == ["dash-ok", "dash-blocked"]
    for view, job in zip(data["aliases"], (ok, blocked)):
        status = cli_in_process("status", str(job), "--json")
        assert status.returncode == 0, status.stderr
        expected = last_json(status.stdout)
        got = view["status"]
        for volatile in ("last_success_age_s",):
            expected.pop(volatile), got.pop(volatile)
        assert got == expected
        assert view["points"] == expected["points"] == 40 and view["live"] == expected["collection"]
        assert view["fresh"] and view["index_busy"] is None
        assert [v["live"] for v in view["versions"]].count(True) == 1
    runs = data["aliases"][1]["runs"]
    assert [r["status"] for r in runs] == ["blocked", "ok"] and runs[0]["blocked_by"] == "guards"
    assert data["aliases"][1]["quarantine_folder"].endswith("/quarantine")
    after = _files(ok.parent.parent)
    assert after == before and any(p.endswith("aliases.json") for p in after)  # read-only


def test_busy_index_is_shown_not_failed(two_jobs) -> None:
    """Another process holds dash-ok's Qdrant Edge shard (as a run does): the page says so and shows the
    live version and its points from the run log, the versions from the manifests."""
    from fastapi.testclient import TestClient

    from reembed.flows.operations.dashboard import create_app

    ok, _ = two_jobs
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        "from reembed.flows.config import load_job\n"
        "from reembed.indexing.index import open_index\n"
        "job = load_job(sys.argv[1])\n"
        "index = open_index(job.index)\n"
        "print(index.count(index.alias_target(job.name)), flush=True)\n"
        "time.sleep(300)\n"), str(ok)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "40"  # it holds the shard now
        data = TestClient(create_app([str(ok)])).get("/api/status").json()
        (view,) = data["aliases"]
        assert view["index_busy"] and "in use by another process" in view["index_busy"]
        assert view["status"] is None and view["points"] == 40 and view["live"]
        assert [v["live"] for v in view["versions"]] == [True] and view["versions"][0]["points"] is None
        page = TestClient(create_app([str(ok)])).get("/").text
        assert "index busy" in page and '<dd class="points">40</dd>' in page
    finally:
        holder.kill()
        holder.wait(timeout=30)


@contextmanager
def _served(log: Path, *jobs: Path) -> Iterator[str]:
    """`reembed dashboard JOB...` (the console script, default host 127.0.0.1) until the block ends; its URL."""
    from conftest import _serve, _stop, free_port, reembed_cli

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _serve([*reembed_cli(), "dashboard", *map(str, jobs), "--port", str(port)], f"{url}/api/status", log,
                  "reembed dashboard", deadline_s=120)
    try:
        yield url
    finally:
        _stop(proc, timeout=30)


def test_dashboard_command_serves_and_refuses_duplicate_aliases(two_jobs, tmp_path) -> None:
    """The console script serves on 127.0.0.1 (the default); two job files naming one alias are refused."""
    import urllib.request

    ok, _ = two_jobs
    twin = tmp_path / "twin.yaml"
    twin.write_text(ok.read_text())
    refused = cli_in_process("dashboard", str(ok), str(twin))
    assert refused.returncode == 2 and "name the same alias" in refused.stderr
    with _served(tmp_path / "dashboard.log", ok) as url:
        with urllib.request.urlopen(f"{url}/api/status", timeout=10) as answer:
            body = json.load(answer)
    assert body["aliases"][0]["alias"] == "dash-ok" and body["aliases"][0]["points"] == 40


def test_chromium_shows_both_jobs_and_saves_a_screenshot(two_jobs, tmp_path) -> None:
    """Headless Chromium (Debian's, driven by Playwright through executable_path) loads the served page; its
    text has each alias, each last run's status and the live points; the screenshot is the test's output
    (copied into $REEMBED_SCREENSHOTS when set: docs/dashboard.png is made that way)."""
    from playwright.sync_api import sync_playwright

    from conftest import _binary

    chromium = _binary("chromium")
    ok, blocked = two_jobs
    shot = tmp_path / "dashboard.png"
    with _served(tmp_path / "dashboard.log", ok, blocked) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(url, wait_until="load")
            sections = {alias: page.inner_text(f"#alias-{alias}") for alias in ("dash-ok", "dash-blocked")}
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert "last run\nok" in sections["dash-ok"] and "live points\n40" in sections["dash-ok"]
    assert "last run\nblocked" in sections["dash-blocked"] and "live points\n40" in sections["dash-blocked"]
    assert "blocked (guards)" in sections["dash-blocked"]
    assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("REEMBED_SCREENSHOTS"):
        shutil.copy(shot, Path(os.environ["REEMBED_SCREENSHOTS"]) / "dashboard.png")


def test_chromium_shows_the_summary_artifact_in_the_prefect_ui(tmp_path, prefect_server, ray_address) -> None:
    """A run through the console script (on the session's Ray) publishes its artifacts to the session's
    `prefect server`; the same
    browser loads that flow run's page in Prefect's UI: the Artifacts tab lists the summary, shards, headline
    and progress artifacts, the summary's card and its table show the run's point count."""
    import re
    import urllib.request

    from playwright.sync_api import sync_playwright

    from conftest import _binary, run_cli

    chromium = _binary("chromium")
    job = _job(tmp_path / "ui", "ui-run")
    res = run_cli("run", str(job), "--json", "--set", f"runtime.ray_address={ray_address}")
    assert res.returncode == 0, res.stderr[-3000:]
    summary = last_json(res.stdout)
    points, collection = summary["points"], summary["collection"]
    assert points == 40
    query = json.dumps({"artifacts": {"key": {"any_": ["reembed-ui-run-summary"]}}, "limit": 1}).encode()
    request = urllib.request.Request(f"{prefect_server}/artifacts/filter", data=query,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        (artifact,) = json.load(answer)
    ui = prefect_server.removesuffix("/api")
    shot = tmp_path / "prefect-artifacts.png"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{ui}/runs/flow-run/{artifact['flow_run_id']}", wait_until="networkidle")
            page.get_by_text("Artifacts", exact=True).first.click()
            page.get_by_text("reembed-ui-run-progress").wait_for()
            cards = page.inner_text("body")
            page.screenshot(path=str(shot), full_page=True)
            page.get_by_text("reembed-ui-run-summary").click()  # the artifact's own page renders its table
            page.get_by_text("index_status").wait_for()
            table = page.inner_text("body")
        finally:
            browser.close()
    for what in ("summary", "shards", "headline", "progress"):
        assert f"reembed-ui-run-{what}" in cards
    assert f"reembed run of ui-run: ok, {points} points in {collection}" in cards
    assert "40/40 documents embedded (done)" in cards
    assert re.search(rf"\bpoints\s+{points}\b", table), table[-3000:]
    if os.environ.get("REEMBED_SCREENSHOTS"):
        shutil.copy(shot, Path(os.environ["REEMBED_SCREENSHOTS"]) / "prefect-artifacts.png")
