"""`reembed dashboard`: one read-only web page over many jobs, served by reembed itself (FastAPI, uvicorn).

Per alias: freshness against its budget, the last runs from the run log, a docs/s and duration trend, quarantine
counts and folder, the versions with their gate verdicts and which is live, and the live point count. It reads
the run log, the manifests and the index directly, so it needs no Prometheus; with one it adds the actors' live
figures. The numbers are in the HTML (no JavaScript: `curl` and a text browser see them), charts are inline SVG,
the page reloads itself, and ``/api/status`` returns the same data as JSON.

It never writes. An embedded index (Qdrant Edge) opens in one process at a time, so while a run holds it the
page shows the manifests' and the run log's figures and says the index is busy instead of failing.
"""

from __future__ import annotations

import html
import json
import logging
import urllib.parse
import urllib.request
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from pydantic import Field

from reembed.flows.operations.run_log import SUCCESS, RunLog, RunRecord
from reembed.indexing.index import IndexError_, open_index
from reembed.indexing.records import Record, StatusInfo, VersionInfo
from reembed.indexing.storage import join

if TYPE_CHECKING:
    from fastapi import FastAPI

    from reembed.flows.config import JobConfig

logger = logging.getLogger(__name__)

RECENT_RUNS = 20  # runs listed per alias, newest first; the trend charts draw the same runs
REFRESH_S = 30  # the page reloads itself this often


class ActorFigures(Record):
    """The actors' live figures from Prometheus (``--prometheus``), per model."""

    tokens_per_s: dict[str, float] = Field(default_factory=dict)
    encode_p95_s: dict[str, float] = Field(default_factory=dict)
    error: str | None = None  # Prometheus did not answer: the page says so and shows the rest


class AliasView(Record):
    """Everything the dashboard shows about one job's alias."""

    alias: str
    job_file: str
    status: StatusInfo | None = None  # None while the index is busy (or unreachable)
    index_busy: str | None = None  # why the index could not be read right now
    live: str | None = None  # the live version (the index's, or the run log's while the index is busy)
    points: int | None = None  # the live collection's points (the last run's count while the index is busy)
    freshness_budget_s: float
    last_success_at: datetime | None = None
    last_success_age_s: float | None = None
    fresh: bool = False  # a success within the freshness budget
    quarantined: int | None = None  # the live version's quarantined rows (its manifest)
    quarantine_folder: str | None = None
    versions: list[VersionInfo] = Field(default_factory=list)
    runs: list[RunRecord] = Field(default_factory=list)  # newest first


class DashboardData(Record):
    generated_at: datetime
    aliases: list[AliasView]
    actors: ActorFigures | None = None


def alias_view(job: "JobConfig", job_file: str) -> AliasView:
    """Read one job's run log, manifests and (when it can be opened) index; never writes."""
    from reembed.flows.versions import job_status, list_versions
    from reembed.indexing.vector_store import VectorStore

    log = RunLog(job.output.uri, job.name, job.output.storage_options)
    runs = list(reversed(log.records(limit=RECENT_RUNS)))
    status = busy = None
    try:
        with open_index(job.index) as index:
            status = job_status(job, index)  # the live version's manifest and the run log's last success
            versions = list_versions(job, index)
        live, points, quarantined = status.collection, status.points, status.quarantined
        success_at = status.last_success_at
    except IndexError_ as exc:  # a run holds the embedded index, or the server is away: the files still answer
        busy = str(exc)
        good = next((r for r in runs if r.status in SUCCESS and r.collection), None)
        live, points = (good.collection, good.points) if good else (None, None)
        versions = list_versions(job, None, live)
        manifest = VectorStore(job.output.uri, live, job.output.storage_options).read_manifest() if live else None
        quarantined = manifest.quarantined if manifest is not None else None
        _, success = log.latest()  # past the runs listed, when the latest RECENT_RUNS all failed
        success_at = success.finished_at if success else None
    age = (datetime.now(timezone.utc) - success_at).total_seconds() if success_at else None
    budget = job.metrics.max_age.total_seconds()
    folder = join(VectorStore(job.output.uri, live).root, "quarantine") if live else None
    return AliasView(
        alias=job.name, job_file=job_file, status=status, index_busy=busy, live=live, points=points,
        freshness_budget_s=budget, last_success_at=success_at,
        last_success_age_s=round(age, 1) if age is not None else None, fresh=age is not None and age <= budget,
        quarantined=quarantined, quarantine_folder=folder, versions=versions, runs=runs,
    )


def actor_figures(prometheus: str) -> ActorFigures:
    """The actors' tokens/s and p95 batch encode seconds over the last 5 minutes, per model."""
    queries = {
        "tokens_per_s": "sum by (model) (rate(ray_reembed_actor_tokens_total[5m]))",
        "encode_p95_s": "histogram_quantile(0.95, sum by (le, model) (rate(ray_reembed_actor_encode_seconds_bucket[5m])))",
    }
    figures: dict[str, dict[str, float]] = {}
    try:
        for key, expr in queries.items():
            url = f"{prometheus.rstrip('/')}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
            with urllib.request.urlopen(url, timeout=5) as answer:
                body = json.load(answer)
            figures[key] = {r["metric"].get("model", ""): float(r["value"][1]) for r in body["data"]["result"]
                            if r["value"][1] not in ("NaN", "+Inf", "-Inf")}
    except (OSError, ValueError, KeyError) as exc:
        return ActorFigures(error=f"Prometheus at {prometheus} did not answer: {exc}")
    return ActorFigures(**figures)


def collect(jobs: list[tuple[str, "JobConfig"]], prometheus: str | None = None) -> DashboardData:
    return DashboardData(generated_at=datetime.now(timezone.utc),
                         aliases=[alias_view(job, path) for path, job in jobs],
                         actors=actor_figures(prometheus) if prometheus else None)


def _e(value: object) -> str:
    return html.escape("" if value is None else str(value))


def _when(moment: datetime | None) -> str:
    return f"{moment:%Y-%m-%d %H:%M:%S} UTC" if moment is not None else "never"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def _sparkline(values: list[float | None], label: str, unit: str) -> str:
    """An inline SVG line of the values (oldest left), with its last value and range written out as text."""
    points = [(i, v) for i, v in enumerate(values) if v is not None]
    if not points:
        return f"<p>{_e(label)}: no runs with figures yet</p>"
    width, height = 240, 40
    top = max(v for _, v in points) or 1.0
    step = (width - 8) / max(len(values) - 1, 1)  # 4 px each side, for the dot on the last value
    line = " ".join(f"{4 + i * step:.1f},{height - (v / top) * (height - 8) - 4:.1f}" for i, v in points)
    last = points[-1][1]
    x, y = line.rsplit(" ", 1)[-1].split(",")
    return (f'<figure><svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
            f'aria-label="{_e(label)}"><polyline fill="none" stroke="#2563eb" stroke-width="2" points="{line}"/>'
            f'<circle cx="{x}" cy="{y}" r="3" fill="#2563eb"/></svg><figcaption>{_e(label)}: last {last:,.1f} {unit} (max {top:,.1f}, over {len(points)} runs)'
            f'</figcaption></figure>')


_RUN_COLUMNS = ("started_at", "trigger", "status", "seconds", "encoded", "reused", "deleted", "quarantined",
                "docs_per_s", "error")


def _alias_html(view: AliasView) -> str:
    state = "fresh" if view.fresh else "STALE"
    rows = []
    for r in view.runs:
        cells = {c: getattr(r, c) for c in _RUN_COLUMNS}
        cells["started_at"] = f"{r.started_at:%Y-%m-%d %H:%M:%S}"
        cells["error"] = (r.error or "")[:120]
        if r.blocked_by:
            cells["status"] = f"{r.status} ({r.blocked_by})"
        rows.append("<tr>" + "".join(f'<td class="{c}">{_e(cells[c])}</td>' for c in _RUN_COLUMNS) + "</tr>")
    versions = "".join(
        f"<tr><td>{_e(v.collection)}</td><td>{'live' if v.live else ''}</td><td>{_e(v.model)}</td>"
        f"<td>{_e(v.points)}</td><td>{_e(v.vector_rows)}</td><td>{_e(v.gate)}</td><td>{_e(v.score)}</td>"
        f"<td>{_e(v.finished_at)}</td></tr>" for v in view.versions)
    oldest_first = list(reversed(view.runs))
    busy = f'<p class="busy">index busy: {_e(view.index_busy)}; figures from the manifests and the run log</p>' \
        if view.index_busy else ""
    last = view.runs[0] if view.runs else None
    return f"""
<section id="alias-{_e(view.alias)}">
<h2>{_e(view.alias)}</h2>
{busy}
<dl>
<dt>freshness</dt><dd class="{state.lower()}">{state}: last success {_e(_when(view.last_success_at))}
 ({_duration(view.last_success_age_s)} ago; budget {_duration(view.freshness_budget_s)})</dd>
<dt>last run</dt><dd class="last-status">{_e(last.status if last else 'none yet')}</dd>
<dt>live version</dt><dd>{_e(view.live or 'none')}</dd>
<dt>live points</dt><dd class="points">{_e(view.points)}</dd>
<dt>quarantined (live version)</dt><dd>{_e(view.quarantined)} rows, in <code>{_e(view.quarantine_folder)}</code></dd>
<dt>job file</dt><dd><code>{_e(view.job_file)}</code></dd>
</dl>
<div class="trends">
{_sparkline([r.docs_per_s for r in oldest_first], 'documents per second', 'docs/s')}
{_sparkline([r.seconds for r in oldest_first], 'run duration', 's')}
</div>
<h3>Last runs</h3>
<table><thead><tr>{''.join(f'<th>{c}</th>' for c in _RUN_COLUMNS)}</tr></thead><tbody>{''.join(rows)}</tbody></table>
<h3>Versions</h3>
<table><thead><tr><th>version</th><th></th><th>model</th><th>points</th><th>vector rows</th><th>gate</th>
<th>score</th><th>finished</th></tr></thead><tbody>{versions}</tbody></table>
</section>"""


def render_html(data: DashboardData) -> str:
    actors = ""
    if data.actors is not None:
        if data.actors.error:
            actors = f"<section><h2>Actors</h2><p>{_e(data.actors.error)}</p></section>"
        else:
            rows = "".join(f"<tr><td>{_e(m)}</td><td>{v:,.0f}</td><td>{data.actors.encode_p95_s.get(m, 0):.3f}</td></tr>"
                           for m, v in sorted(data.actors.tokens_per_s.items()))
            actors = ("<section><h2>Actors (last 5 minutes)</h2><table><thead><tr><th>model</th><th>tokens/s</th>"
                      f"<th>p95 batch encode s</th></tr></thead><tbody>{rows}</tbody></table></section>")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="{REFRESH_S}">
<title>reembed dashboard</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5rem; color: #111; }}
table {{ border-collapse: collapse; margin-bottom: 1rem; font-size: 0.9rem; }}
th, td {{ border: 1px solid #ccc; padding: 0.2rem 0.5rem; text-align: left; }}
dt {{ font-weight: 600; float: left; clear: left; width: 17rem; }} dd {{ margin-left: 17rem; }}
.stale {{ color: #b91c1c; font-weight: 600; }} .fresh {{ color: #15803d; }} .busy {{ color: #b45309; }}
.trends {{ display: flex; gap: 2rem; }} section {{ border-top: 2px solid #ddd; padding-top: 0.5rem; }}
</style></head>
<body><h1>reembed</h1><p>generated {data.generated_at:%Y-%m-%d %H:%M:%S} UTC; reloads every {REFRESH_S} s;
same data as JSON: <a href="api/status">api/status</a></p>
{''.join(_alias_html(v) for v in data.aliases)}
{actors}
</body></html>"""


def create_app(job_files: list[str], overrides: list[str] | None = None, prometheus: str | None = None) -> "FastAPI":
    """The dashboard's web app; job files are loaded once (a bad one fails here, before serving)."""
    from fastapi import FastAPI
    from fastapi.responses import HTMLResponse

    from reembed.flows.config import ConfigError, load_job

    jobs = [(path, load_job(path, list(overrides or []))) for path in job_files]
    names = [job.name for _, job in jobs]
    if len(set(names)) != len(names):
        raise ConfigError(f"two job files name the same alias: {', '.join(job_files)} give {names}")
    app = FastAPI(title="reembed dashboard", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return render_html(collect(jobs, prometheus))

    @app.get("/api/status")
    def api_status() -> DashboardData:
        return collect(jobs, prometheus)

    return app


def serve(job_files: list[str], host: str, port: int, overrides: list[str] | None = None,
          prometheus: str | None = None) -> None:
    import uvicorn

    app = create_app(job_files, overrides, prometheus)
    logger.info("dashboard for %d job(s) on http://%s:%d/", len(job_files), host, port)
    uvicorn.run(app, host=host, port=port, log_level="warning")
