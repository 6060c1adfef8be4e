"""``reembed``: run a job, search its alias, show its status.

Every option has an environment twin (``REEMBED_<COMMAND>_<OPTION>``, e.g. ``REEMBED_SEARCH_K=5``), and every
job-file key can be overridden with ``--set section.key=value`` or ``REEMBED_<SECTION>__<KEY>``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from reembed.indexing.records import RunSummary

logger = logging.getLogger(__name__)
# Piped output is not cut to 80 columns: a table read by a script or a log collector keeps whole values.
err = Console(stderr=True, width=None if sys.stderr.isatty() else 200)
out = Console(width=None if sys.stdout.isatty() else 200)

_SET_HELP = "override a job-file key, e.g. --set runtime.num_actors=2 (repeatable)"


class NothingYet(RuntimeError):
    """The job has never produced what the command shows (no alias, no committed version)."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from reembed.flows.errors import JOB_LEVEL_ERRORS
    from reembed.flows.ray_pool import RayError
    from reembed.flows.gate import GateFailed
    from reembed.flows.guards import GuardBlocked
    from reembed.flows.operations.lease import LeaseHeld, LeaseLost
    from reembed.flows.versions import ReindexFailed
    from reembed.indexing.storage import StorageUnavailable
    from reembed.workers.model_loader import ModelUnreachable

    errors: tuple[type[BaseException], ...] = (*JOB_LEVEL_ERRORS, RayError, GateFailed, GuardBlocked,
                                               FileNotFoundError, NothingYet, LeaseHeld, LeaseLost, ReindexFailed,
                                               ModelUnreachable, StorageUnavailable)
    if "reembed.flows.run_flow" in sys.modules:  # only a run can raise it; importing Prefect costs seconds
        errors += (sys.modules["reembed.flows.run_flow"].RunFailed,)
    return errors


def _exit_code(exc: BaseException) -> int:
    """1: the run worked but was stopped (failed shards, gate, guards, its lease lost, a rebuild that did not
    check out, a model hub that did not answer); 2: the job or its input is wrong; 3: another run of the job
    holds it."""
    from reembed.flows.operations.run_log import BLOCKED
    from reembed.flows.operations.lease import LeaseHeld, LeaseLost
    from reembed.flows.versions import ReindexFailed
    from reembed.workers.model_loader import ModelUnreachable

    if isinstance(exc, LeaseHeld):
        return 3
    from reembed.flows.ray_pool import NoActorsLeft
    from reembed.indexing.storage import StorageUnavailable

    blocked = (*BLOCKED, LeaseLost, ReindexFailed, ModelUnreachable, NoActorsLeft, StorageUnavailable)
    if "reembed.flows.run_flow" in sys.modules:
        blocked += (sys.modules["reembed.flows.run_flow"].RunFailed,)
    return 1 if isinstance(exc, blocked) else 2


def _fail(exc: BaseException, verbose: bool, as_json: bool = False) -> None:
    if verbose:
        err.print_exception()
    err.print(f"[bold red]error:[/] {exc}", highlight=False, markup=True, soft_wrap=True)
    summary = getattr(exc, "summary", None)
    if as_json and summary is not None:
        _print_json_last({**summary.model_dump(mode="json"), "error": str(exc)})
    sys.exit(_exit_code(exc))


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("reembed.workers").setLevel(logging.INFO if verbose else logging.WARNING)


def _print_json_last(obj: Any) -> None:
    """One JSON document on the last stdout line: typed records as ``model_dump_json`` writes them."""
    from pydantic import BaseModel

    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json")
    elif isinstance(obj, list):
        obj = [o.model_dump(mode="json") if isinstance(o, BaseModel) else o for o in obj]
    sys.stdout.flush()
    print(json.dumps(obj, default=str, ensure_ascii=False), flush=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "REEMBED",
                               "show_default": True})
@click.version_option(package_name="reembed")
def cli() -> None:
    """reembed: embed a text corpus into Parquet vectors and a Qdrant collection, and keep them fresh.

    A job file (YAML) names the corpus, the model, where vectors go and which Qdrant to fill. Without any
    services it runs on one machine: local files, Qdrant Edge (Qdrant's engine embedded in-process), Prefect
    without a server, a local Ray.
    """


def _job_options(fn: Any) -> Any:
    fn = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=_SET_HELP, show_envvar=True)(fn)
    fn = click.option("-v", "--verbose", is_flag=True, help="more logging, and tracebacks on errors", show_envvar=True)(fn)
    fn = click.argument("job", type=click.Path(dir_okay=False))(fn)
    return fn


@cli.command()
@_job_options
@click.option("--json", "as_json", is_flag=True, help="print the summary as one JSON object on the last line",
              show_envvar=True)
@click.option("--force", "force_reason", metavar="REASON", default=None,
              help="let the run through when the quality gate or a guard (guards.*: most rows quarantined, most "
              "points deleted, an empty collection) would stop it; the reason is logged and recorded in the manifest",
              show_envvar=True)
@click.option("--limit", type=click.IntRange(1), default=None, metavar="N",
              help="trial run: embed only the first N input rows into a separate trial version "
              "(<name>-trial-<fingerprint>) that never becomes live", show_envvar=True)
@click.option("--progress", type=click.Choice(["auto", "bar", "log", "off"]), default="auto",
              help="auto = a progress bar on a terminal, periodic log lines otherwise (and with --json)",
              show_envvar=True)
@click.option("--wait", type=click.FloatRange(0), default=None, metavar="SECONDS",
              help="when another run of the job is in progress, wait this long for it before giving up "
              "(exit code 3) [default: the job's lease.wait, 0]", show_envvar=True)
def run(job: str, overrides: tuple[str, ...], verbose: bool, as_json: bool, force_reason: str | None,
        limit: int | None, progress: str, wait: float | None) -> None:
    """Embed JOB's corpus: plan shards, encode them on Ray actors, write Parquet, upsert into Qdrant.

    Progress over documents (done / total, docs/s, ETA) shows while it runs; the end prints a summary. A run
    with nothing to do says so and ends in seconds, without starting Ray or Prefect. Re-running is safe: point
    ids are deterministic, so the collection never holds duplicates. Guards stop a run that would quarantine
    most rows or delete most of the live collection before anything live changes (exit code 1). One run of a
    job writes at a time (a lease beside the vectors); every run is appended to the job's run log
    (`reembed history`).

    Exit codes: 0 done, 1 stopped (failed shards, quality gate, guards, a model hub that did not answer),
    2 the job or its input is wrong (a model that does not exist included),
    3 another run of the job is in progress.
    """
    _setup_logging(verbose)
    started = time.perf_counter()
    try:
        from reembed.flows.config import load_job
        from reembed.flows.operations.run_log import listeners_for, recorded_run, skipped_when_held
        from reembed.flows.operations.lease import job_lease
        from reembed.flows.planning import plan_job, preflight, up_to_date_summary

        cfg = load_job(job, list(overrides))
        out_opts = cfg.output.storage_options
        listeners = [*listeners_for(cfg), ConsoleSummary(as_json)]
        with skipped_when_held(cfg.output.uri, cfg.name, "cli", out_opts, list(overrides), listeners), \
                job_lease(cfg.output.uri, cfg.name, cfg.lease, "reembed run", out_opts, wait), \
                recorded_run(cfg.output.uri, cfg.name, "cli", out_opts, overrides=list(overrides),
                             listeners=listeners) as record:
            checked = time.perf_counter()
            preflight(cfg)
            preflight_s = time.perf_counter() - checked
            plan = plan_job(cfg, limit)
            plan.phases = {"preflight": round(preflight_s, 4), **plan.phases}
            plan_s = time.perf_counter() - started
            if plan.mode == "up-to-date":
                record.summary = up_to_date_summary(cfg, plan, time.perf_counter() - started)
                return
            from reembed.flows.errors import quiet_prefect_tracebacks
            from reembed.flows.run_flow import run_job

            if not verbose:
                quiet_prefect_tracebacks()
            mode = "log" if as_json and progress == "auto" else progress
            summary = run_job(cfg, force_reason, limit, mode, plan).model_copy(update={"plan_s": round(plan_s, 3)})
            record.summary = summary
    except _user_errors() as exc:
        _fail(exc, verbose, as_json)


class ConsoleSummary:
    """The CLI's listener of its run: the summary on the console (and ``--json``'s last line) for a run that
    finished; a run that did not is reported by ``_fail``, from its exception."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json

    def finished(self, record: Any, summary: RunSummary | None) -> None:
        if summary is None or record.status not in ("ok", "up-to-date", "trial"):
            return
        if record.status == "up-to-date":
            err.print(f"{summary.message} [{summary.seconds:.1f} s]", highlight=False)
        else:
            _print_summary(summary)
        if self.as_json:
            _print_json_last(summary)


def _print_summary(summary: RunSummary) -> None:
    if summary.message:
        err.print(summary.message, highlight=False)
    table = Table(title="reembed run", show_header=False)
    values = summary.model_dump(mode="json")
    for key in ("alias", "collection", "status", "mode", "model", "dim", "input_rows", "indexed", "encoded",
                "reused", "deleted", "quarantined", "duplicates", "tokens", "truncated_docs", "dropped_tokens",
                "seconds", "startup_s", "docs_per_s", "embed_docs_per_s", "shards_total", "shards_embedded",
                "actors", "actors_used", "points", "output", "index"):
        table.add_row(key, "-" if values[key] is None else str(values[key]))
    err.print(table)
    if summary.shards_retried or summary.actors_lost:
        err.print(f"{summary.actors_lost} embedding actor(s) lost mid-run ({summary.actors_replaced} replaced); "
                  f"{len(summary.shards_retried)} shard(s) retried on the actors left: "
                  f"{', '.join(summary.shards_retried)}", highlight=False, soft_wrap=True)
    if summary.quarantined:
        err.print(f"{summary.quarantined} row(s) quarantined with their file, row and reason: "
                  f"{summary.quarantine or summary.output}", highlight=False, soft_wrap=True)


@cli.command()
@_job_options
@click.option("--limit", type=click.IntRange(1), default=None, metavar="N",
              help="plan the trial run `reembed run --limit N` would make", show_envvar=True)
@click.option("--json", "as_json", is_flag=True, help="print the plan as one JSON object on the last line",
              show_envvar=True)
def plan(job: str, overrides: tuple[str, ...], verbose: bool, limit: int | None, as_json: bool) -> None:
    """Show what `reembed run JOB` would do, encoding nothing and starting neither Ray nor Prefect.

    Prints the resolved job (file < environment < --set, secrets masked), the collection and alias, whether
    the run builds a new version (a backfill), refreshes the live one, resumes a stopped run or has nothing
    to do, and every shard with its state (indexed, written, todo).
    """
    _setup_logging(verbose)
    try:
        from reembed.flows.config import load_job
        from reembed.flows.planning import plan_job, preflight

        cfg = load_job(job, list(overrides))
        preflight(cfg)
        info = plan_job(cfg, limit).describe(cfg)
    except _user_errors() as exc:
        _fail(exc, verbose)
        return
    table = Table(title=f"reembed plan: {cfg.name}", show_header=False)
    for key in ("alias", "collection", "live_collection", "mode", "backfill", "shards_total", "shards_done",
                "shards_written", "shards_todo", "rows_known"):
        table.add_row(key, str(info[key]))
    (err if as_json else out).print(table)
    shards = Table(title="shards")
    for col in ("state", "shard_id", "uri", "range", "rows"):
        shards.add_column(col, overflow="fold")
    for sh in info["shards"][:50]:
        span = "" if sh["start"] is None else f"{sh['start']}..{sh['end']}"
        shards.add_row(sh["state"], sh["shard_id"], sh["uri"], span, "" if sh["rows"] is None else str(sh["rows"]))
    (err if as_json else out).print(shards)
    if len(info["shards"]) > 50:
        (err if as_json else out).print(f"... and {len(info['shards']) - 50} more shard(s) (--json lists all)")
    if not as_json:
        import yaml

        out.print("resolved job (secrets masked):", highlight=False)
        out.print(yaml.safe_dump(info["job"], sort_keys=False), highlight=False, markup=False)
    if as_json:
        _print_json_last(info)


@cli.command()
@_job_options
@click.argument("query")
@click.option("-k", "--top-k", "k", default=10, type=click.IntRange(1, 1000), help="number of hits", show_envvar=True)
@click.option("--chunks", is_flag=True, help="with chunking on, list chunks instead of collapsing them to documents",
              show_envvar=True)
@click.option("--json", "as_json", is_flag=True, help="print hits as one JSON list on the last line", show_envvar=True)
@click.option("--version", "version", metavar="COLLECTION", default=None,
              help="search this version (e.g. a trial from `run --limit`) instead of the alias; it must have been "
              "built with the job's current model settings", show_envvar=True)
def search(job: str, query: str, overrides: tuple[str, ...], verbose: bool, k: int, chunks: bool, as_json: bool,
           version: str | None) -> None:
    """Embed QUERY and print the top hits from JOB's alias (doc id, score, snippet).

    The query is encoded with the model that built the version searched (its manifest says which), which after a
    tuned backfill or a rollback is not always the job file's. With chunking on, each document appears once, represented by its best-matching chunk.
    """
    _setup_logging(verbose)
    try:
        from reembed.flows.config import load_job
        from reembed.flows.versions import query_model
        from reembed.indexing.index import open_index
        from reembed.workers.encoder import Encoder

        cfg = load_job(job, list(overrides))
        with open_index(cfg.index) as index:
            if version is not None and not index.exists(version):
                raise FileNotFoundError(f"version {version!r} does not exist in {index.where}; "
                                        f"`reembed versions {job}` lists them")
            if version is None and index.alias_target(cfg.name) is None:
                raise FileNotFoundError(f"alias {cfg.name!r} does not exist in {index.where}; run `reembed run {job}` first")
            encoder = Encoder(query_model(cfg, index, version or cfg.name))  # the served version's model
            vectors, _ = encoder.encode([query], kind="query")
            hits = index.search(version or cfg.name, vectors[0], k, collapse=cfg.chunking is not None and not chunks)
    except _user_errors() as exc:
        _fail(exc, verbose)
        return
    rows = [{"rank": i + 1, "doc_id": h.get("doc_id"), "score": round(h["score"], 6), "text": h.get("text", ""),
             **({"chunk_index": h["chunk_index"], "char_start": h["char_start"], "char_end": h["char_end"]}
                if "chunk_index" in h else {})}
            for i, h in enumerate(hits)]
    table = Table(title=f"{cfg.name}: {query}")
    for col in ("rank", "doc_id", "score", "snippet"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(str(r["rank"]), str(r["doc_id"]), f"{r['score']:.4f}", (r["text"] or "")[:100])
    (err if as_json else out).print(table)
    if as_json:
        _print_json_last(rows)


@cli.command()
@_job_options
@click.option("--json", "as_json", is_flag=True, help="print status as one JSON object on the last line",
              show_envvar=True)
def status(job: str, overrides: tuple[str, ...], verbose: bool, as_json: bool) -> None:
    """Show what JOB has written (Parquet vector set) and indexed (collection behind its alias)."""
    _setup_logging(verbose)
    try:
        from reembed.flows.config import load_job
        from reembed.flows.versions import job_status
        from reembed.indexing.index import open_index

        cfg = load_job(job, list(overrides))
        with open_index(cfg.index) as index:
            info = job_status(cfg, index)
    except _user_errors() as exc:
        _fail(exc, verbose)
        return
    if not info.collection:
        if as_json:
            _print_json_last(info)
        _fail(NothingYet(f"alias {cfg.name!r} not found in {info.index}: nothing indexed yet; "
                         f"run `reembed run {job}` first"), verbose)
        return
    table = Table(title=f"reembed status: {cfg.name}", show_header=False)
    for key, value in info.model_dump(mode="json").items():
        table.add_row(key, str(value))
    (err if as_json else out).print(table)
    if as_json:
        _print_json_last(info)


@cli.command()
@_job_options
@click.option("--queries", required=True, type=click.Path(exists=True, dir_okay=False),
              help="training queries: BEIR queries.jsonl (or id<TAB>text TSV)", show_envvar=True)
@click.option("--qrels", required=True, type=click.Path(exists=True, dir_okay=False),
              help="training judgements, BEIR qrels TSV (never the test qrels the gate uses)", show_envvar=True)
@click.option("--dev-qrels", type=click.Path(exists=True, dir_okay=False), default=None,
              help="judgements that pick the epoch; default: 10% of the training queries held out", show_envvar=True)
@click.option("--negatives", type=click.Choice(["none", "bm25", "dense"]), default="none", show_default=True,
              help="a hard negative per query besides the in-batch ones: none; bm25 (the top lexical hit not judged "
                   "relevant); dense (the live collection's best such hit after its first 3, for unlabelled positives)",
              show_envvar=True)
@click.option("--epochs", default=1, show_default=True, type=click.IntRange(1, 50), show_envvar=True)
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(2, 4096),
              help="pairs per step: each query's other positives in the batch are its in-batch negatives",
              show_envvar=True)
@click.option("--learning-rate", default=5e-5, show_default=True, type=click.FloatRange(0, 1, min_open=True),
              show_envvar=True)
@click.option("--seed", default=42, show_default=True, type=int, help="the same seed reproduces the model",
              show_envvar=True)
@click.option("--out", "out_dir", default=None,
              help="folder (or s3:// prefix) for the tuned model and its job variant; default: "
                   "<output.uri>/../tuned/<name>-<seed> for a local output, <output.uri>/_tuned/<name>-<seed> on "
                   "object storage (the variant then goes beside JOB, as <job>.tuned-<seed>.yaml)",
              show_envvar=True)
@click.option("--json", "as_json", is_flag=True, help="print the report as one JSON object on the last line",
              show_envvar=True)
def tune(job: str, overrides: tuple[str, ...], verbose: bool, queries: str, qrels: str, dev_qrels: str | None,
         negatives: str, epochs: int, batch_size: int, learning_rate: float, seed: int, out_dir: str | None,
         as_json: bool) -> None:
    """Fine-tune JOB's model on your relevance judgements (contrastive, in-batch negatives).

    Pairs are (query, relevant document) with the document's text built from JOB's corpus and template, and the
    model's prompts applied as at encode time; queries without a relevant document in the corpus, empty
    queries and duplicate pairs are reported and left out. Writes a sentence-transformers model folder with its
    model card (reembed_tune.json) and a job variant using it: `reembed run VARIANT` backfills a new version
    beside the live one, and the job's quality gate decides whether the alias moves.
    """
    _setup_logging(verbose)
    try:
        from reembed.flows.config import load_job
        from reembed.flows.tuning import tune as run_tune
        from reembed.indexing.storage import join, protocol_of

        cfg = load_job(job, list(overrides))
        if out_dir is None:  # beside the vectors: on object storage, where every node of a cluster can read it
            out_dir = (str(Path(cfg.output.uri.removeprefix("file://")).parent / "tuned" / f"{cfg.name}-{seed}")
                       if protocol_of(cfg.output.uri) in ("file", "local") else
                       join(cfg.output.uri, "_tuned", f"{cfg.name}-{seed}"))
        report = run_tune(cfg, job, queries, qrels, out_dir, negatives=negatives, epochs=epochs,  # type: ignore[arg-type]
                          batch_size=batch_size, learning_rate=learning_rate, dev_qrels=dev_qrels, seed=seed)
    except _user_errors() as exc:
        _fail(exc, verbose)
        return
    table = Table(title=f"reembed tune: {cfg.name}", show_header=False)
    for key in ("model_path", "job_variant", "train_pairs", "val_queries", "negatives", "epochs", "best_epoch",
                "base_val_score", "val_score", "seconds"):
        table.add_row(key, str(getattr(report, key)))
    (err if as_json else out).print(table)
    err.print(f"backfill with it: reembed run {report.job_variant}", highlight=False, soft_wrap=True)
    if as_json:
        _print_json_last(report)


@cli.command(name="eval")
@_job_options
@click.option("--queries", type=click.Path(exists=True, dir_okay=False), help="BEIR queries.jsonl (or id<TAB>text TSV)",
              show_envvar=True)
@click.option("--qrels", type=click.Path(exists=True, dir_okay=False), help="BEIR qrels TSV: query-id, corpus-id, score",
              show_envvar=True)
@click.option("--pairs", type=click.Path(exists=True, dir_okay=False),
              help="sentence pairs with gold scores: STS Benchmark TSV, SICK, or JSON lines", show_envvar=True)
@click.option("--pairs-format", type=click.Choice(["auto", "stsb", "sick", "jsonl"]), default="auto",
              help="format of --pairs", show_envvar=True)
@click.option("--depth", default=1000, type=click.IntRange(10, 10000), help="hits retrieved per query",
              show_envvar=True)
@click.option("--json", "as_json", is_flag=True, help="print metrics as one JSON object on the last line",
              show_envvar=True)
def evaluate(job: str, overrides: tuple[str, ...], verbose: bool, queries: str | None, qrels: str | None,
             pairs: str | None, pairs_format: str, depth: int, as_json: bool) -> None:
    """Measure JOB's quality: retrieval (--queries + --qrels) against the live alias, or similarity (--pairs).

    Retrieval reports nDCG@10, recall@100 and MRR@10 over the top DEPTH hits (pytrec_eval); similarity reports
    Spearman and Pearson of cosine vs gold. Metrics are fractions (0.645, not 64.5).
    """
    _setup_logging(verbose)
    if not pairs and not (queries and qrels):
        raise click.UsageError("give --queries and --qrels (retrieval), or --pairs (similarity)")
    try:
        from reembed.flows.config import load_job
        from reembed.flows.evaluate import evaluate_pairs, evaluate_retrieval
        from reembed.flows.versions import query_model
        from reembed.indexing.index import open_index
        from reembed.workers.encoder import Encoder

        cfg = load_job(job, list(overrides))
        if pairs:
            metrics = evaluate_pairs(Encoder(cfg.model), pairs, pairs_format)  # type: ignore[arg-type]
        else:
            with open_index(cfg.index) as index:
                if index.alias_target(cfg.name) is None:
                    raise FileNotFoundError(f"alias {cfg.name!r} does not exist in {index.where}; run `reembed run {job}` first")
                encoder = Encoder(query_model(cfg, index, cfg.name))  # the live version's model, as a search uses
                metrics = evaluate_retrieval(cfg, encoder, index, cfg.name, queries, qrels, depth)  # type: ignore[arg-type]
    except _user_errors() as exc:
        _fail(exc, verbose)
        return
    table = Table(title=f"reembed eval: {cfg.name}", show_header=False)
    for key, value in metrics.items():
        table.add_row(key, f"{value:.5f}" if isinstance(value, float) else str(value))
    (err if as_json else out).print(table)
    if as_json:
        _print_json_last(metrics)


@cli.command()
@_job_options
@click.option("--limit", type=click.IntRange(1), default=20, metavar="N", help="show the latest N runs",
              show_default=True, show_envvar=True)
@click.option("--json", "as_json", is_flag=True, help="print the runs as one JSON list on the last line",
              show_envvar=True)
@click.option("--prune-days", type=click.FloatRange(min=0, min_open=True), default=None, metavar="DAYS",
              help="first remove the records of runs older than DAYS (the latest run and the latest success are "
              "kept); `history.keep_days` in the job file does this after every run", show_envvar=True)
def history(job: str, overrides: tuple[str, ...], verbose: bool, limit: int, as_json: bool,
            prune_days: float | None) -> None:
    """List JOB's latest runs from its run log (beside the vectors): when, how started, outcome, counts, speed.

    Every `reembed run` and every flow run from a deployment appends one record, whether it succeeded, was
    blocked (quality gate, guards) or failed; the log outlives any Prefect server. A run that was killed shows
    as `interrupted` once its process is gone or its lease expired; a run refused by another's lease, as
    `skipped` with the holder."""
    _setup_logging(verbose)
    try:
        from reembed.flows.config import load_job
        from reembed.flows.operations.run_log import RunLog

        cfg = load_job(job, list(overrides))
        log = RunLog(cfg.output.uri, cfg.name, cfg.output.storage_options)
        if prune_days is not None:
            removed = log.prune(prune_days)
            err.print(f"removed {removed} run record(s) older than {prune_days:g} days from {log.root} (the latest "
                      f"run and the latest success are kept)", highlight=False, soft_wrap=True)
        rows = log.records(limit=limit)
        if not rows:
            raise NothingYet(f"no runs of {cfg.name!r} recorded under {log.root}; run `reembed run {job}` first")
    except _user_errors() as exc:
        _fail(exc, verbose, as_json)
        return
    table = Table(title=f"reembed history: {cfg.name} (latest {len(rows)})")
    columns = ("started_at", "trigger", "overrides", "status", "mode", "seconds", "encoded", "reused", "deleted",
               "quarantined", "points", "docs_per_s", "error")
    for col in columns:
        table.add_column(col, overflow="fold")
    for r in reversed(rows):
        values = r.model_dump(mode="json")
        values["started_at"] = f"{r.started_at:%Y-%m-%d %H:%M:%S}"
        values["error"] = (r.error or "")[:80]
        values["overrides"] = " ".join(r.overrides or [])
        table.add_row(*("" if values[c] is None else str(values[c]) for c in columns))
    (err if as_json else out).print(table)
    if as_json:
        _print_json_last(rows)


@cli.command()
@_job_options
@click.option("--json", "as_json", is_flag=True, help="print the versions as one JSON list on the last line",
              show_envvar=True)
def versions(job: str, overrides: tuple[str, ...], verbose: bool, as_json: bool) -> None:
    """List JOB's versions (one per model/pooling/prompt/dimension fingerprint), newest first, and which is live.

    `physical` is the Qdrant collection holding each version now: the version's own name, or `<version>-r<N>`
    after N-1 rebuilds by `reembed reindex`; `-` when only Parquet holds it (`reembed reindex` brings it back).
    `gate` is the quality gate's verdict when it was built: passed, failed (a blocked backfill: rollback skips
    it and retention does not count it), forced (failed, let through with --force), none (no gate applied)."""
    _setup_logging(verbose)
    try:
        from reembed.flows.config import load_job
        from reembed.flows.versions import list_versions
        from reembed.indexing.index import open_index

        cfg = load_job(job, list(overrides))
        with open_index(cfg.index) as index:
            rows = list_versions(cfg, index)
        if not rows:
            raise NothingYet(f"no committed version of {cfg.name!r} under {cfg.output.uri}; "
                             f"run `reembed run {job}` first")
    except _user_errors() as exc:
        _fail(exc, verbose, as_json)
        return
    table = Table(title=f"reembed versions: {cfg.name}")
    for col in ("live", "collection", "physical", "model", "dim", "points", "vector_rows", "gate", "score",
                "finished_at"):
        table.add_column(col)
    for v in rows:
        table.add_row("*" if v.live else "", v.collection, str(v.physical or "-"), str(v.model), str(v.dim),
                      str(v.points), str(v.vector_rows), v.gate, str(v.score), str(v.finished_at))
    (err if as_json else out).print(table)
    if as_json:
        _print_json_last(rows)


@cli.command()
@_job_options
@click.argument("version", required=False)
@click.option("--force", "force_reason", metavar="REASON", default=None,
              help="allow VERSION although it failed its quality gate; the reason is recorded in its manifest",
              show_envvar=True)
@click.option("--json", "as_json", is_flag=True, help="print the result as one JSON object on the last line",
              show_envvar=True)
def rollback(job: str, version: str | None, overrides: tuple[str, ...], verbose: bool, force_reason: str | None,
             as_json: bool) -> None:
    """Point JOB's alias back at VERSION, atomically.

    VERSION defaults to the newest version older than the live one that Qdrant holds and that did not fail its
    quality gate (a blocked backfill is never picked). Naming a gate-failed version needs --force REASON.
    """
    _setup_logging(verbose)
    try:
        from reembed.flows.config import load_job
        from reembed.flows.operations.lease import INDEX_WRITES, fenced, job_lease
        from reembed.flows.versions import rollback as do_rollback
        from reembed.indexing.index import open_index

        cfg = load_job(job, list(overrides))
        with job_lease(cfg.output.uri, cfg.name, cfg.lease, "reembed rollback", cfg.output.storage_options) as lease, \
                fenced(open_index(cfg.index), lease, INDEX_WRITES) as index:
            result = do_rollback(cfg, index, version, force_reason)
    except _user_errors() as exc:
        _fail(exc, verbose)
        return
    err.print(f"alias {result.alias} -> {result.collection} (was {result.previous})"
              f"{f'; forced past its failed quality gate: {result.forced}' if result.forced else ''}",
              highlight=False, soft_wrap=True)
    if as_json:
        _print_json_last(result)


@cli.command()
@_job_options
@click.argument("version", required=False)
@click.option("--activate/--no-activate", default=None,
              help="move the alias to the rebuilt version (default: only when no alias exists); the alias always "
              "follows a rebuild of the version it already serves", show_envvar=True)
@click.option("--json", "as_json", is_flag=True, help="print the result as one JSON object on the last line",
              show_envvar=True)
def reindex(job: str, version: str | None, overrides: tuple[str, ...], verbose: bool, activate: bool | None,
            as_json: bool) -> None:
    """Rebuild a version's Qdrant collection from JOB's stored Parquet vectors, encoding nothing.

    For after losing Qdrant, or to apply new index settings. VERSION defaults to the live version, else the
    newest committed one. The rebuild goes into a new collection beside the one serving the version
    (`<version>-r<N>`), is checked (point count equal to the manifest's vector rows, a sample of vectors read
    back equal to Parquet's), and only then does the alias move to it, in one atomic update, and the old
    collection go: searches never see a partial collection. A rebuild that fails (a corrupt Parquet part, say)
    is dropped, leaves the live collection exactly as it was, and exits 1 naming the part and the reason.
    """
    _setup_logging(verbose)
    try:
        from reembed.flows.config import load_job
        from reembed.flows.operations.lease import INDEX_WRITES, fenced, job_lease
        from reembed.flows.versions import reindex as do_reindex
        from reembed.indexing.index import open_index

        cfg = load_job(job, list(overrides))
        with job_lease(cfg.output.uri, cfg.name, cfg.lease, "reembed reindex", cfg.output.storage_options) as lease, \
                fenced(open_index(cfg.index), lease, INDEX_WRITES) as index:
            result = do_reindex(cfg, index, version, activate)
    except _user_errors() as exc:
        _fail(exc, verbose)
        return
    err.print(f"rebuilt {result.collection} as {result.physical} from {result.source}: {result.points} points, "
              f"0 encoded{' (live)' if result.live else ''}"
              f"{f'; dropped {result.previous}' if result.previous and result.previous != result.physical else ''}",
              highlight=False, soft_wrap=True)
    if as_json:
        _print_json_last(result)


# --- scheduling on a Prefect server (reembed.flows.operations.scheduling) ---------------------------------


def _schedule_errors() -> tuple[type[BaseException], ...]:
    from prefect.exceptions import PrefectHTTPStatusError

    from reembed.flows.operations.scheduling import PrefectServerMissing

    return (*_user_errors(), PrefectServerMissing, PrefectHTTPStatusError, ConnectionError)


def _print_deployments(rows: list[Any], as_json: bool) -> None:
    table = Table(title="reembed deployments")
    for col in ("deployment", "alias", "job file", "schedule", "pool", "next run", "last run"):
        table.add_column(col, overflow="fold")
    for d in rows:
        last = f"{d.last_run_state} {d.last_run_at:%Y-%m-%d %H:%M}" if d.last_run_at else (d.last_run_state or "-")
        table.add_row(d.name, d.alias, d.job_file, ", ".join(d.schedules) or "-", str(d.work_pool),
                      f"{d.next_run_at:%Y-%m-%d %H:%M:%S %Z}" if d.next_run_at else "-", last)
    (err if as_json else out).print(table)
    if as_json:
        _print_json_last(rows)


_POOL = click.option("--pool", default="reembed", metavar="NAME",
                     help="Prefect work pool (type process; created when missing)", show_envvar=True)
_CRON = click.option("--cron", required=True, metavar="EXPR", help="cron schedule, e.g. '0 3 * * *'",
                     show_envvar=True)
_TZ = click.option("--timezone", default=None, metavar="TZ", help="time zone of the cron schedule [default: UTC]",
                   show_envvar=True)
_NAME = click.option("--name", default=None, metavar="NAME", help="deployment name [default: the job's alias]",
                     show_envvar=True)


@cli.command()
@_job_options
@_CRON
@_POOL
@_NAME
@_TZ
@click.option("--json", "as_json", is_flag=True, help="print the deployment as one JSON object on the last line",
              show_envvar=True)
def deploy(job: str, overrides: tuple[str, ...], verbose: bool, cron: str, pool: str, name: str | None,
           timezone: str | None, as_json: bool) -> None:
    """Register JOB as a Prefect deployment that refreshes it on a schedule (needs PREFECT_API_URL).

    The deployment runs reembed's job flow by module path on a `process` work pool (no image, no code storage);
    `reembed worker` runs the pool's worker. Its parameters are the job file's absolute path and the --set
    overrides, never the resolved job: secrets stay in the job file or the worker's environment (a secret in
    --set is refused). Each run is an incremental refresh with the same preflight, guards and lease as
    `reembed run`, and runs of one deployment never overlap (a concurrency limit of 1 cancels a new run while
    one is running). Deploying the same job again updates its deployment in place.
    """
    _setup_logging(verbose)
    try:
        from reembed.flows.operations.scheduling import deploy as register

        info = register(job, list(overrides), cron, pool, name, timezone)
    except _schedule_errors() as exc:
        _fail(exc, verbose, as_json)
        return
    err.print(f"deployed {info.name} on pool {info.work_pool}; its worker: `reembed worker --pool {pool}`",
              highlight=False)
    if as_json:
        _print_json_last(info)
    else:
        _print_deployments([info], False)


@cli.command()
@click.argument("name")
@click.option("-v", "--verbose", is_flag=True, help="more logging, and tracebacks on errors", show_envvar=True)
def undeploy(name: str, verbose: bool) -> None:
    """Remove the deployment NAME (the job's alias, unless it was deployed with --name) from the Prefect server."""
    _setup_logging(verbose)
    try:
        from reembed.flows.operations.scheduling import undeploy as remove

        full = remove(name)
    except _schedule_errors() as exc:
        _fail(exc, verbose)
        return
    err.print(f"removed deployment {full}", highlight=False)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="print the deployments as one JSON list on the last line",
              show_envvar=True)
@click.option("-v", "--verbose", is_flag=True, help="more logging, and tracebacks on errors", show_envvar=True)
def deployments(as_json: bool, verbose: bool) -> None:
    """List reembed's deployments on the Prefect server: alias, job file, schedule, pool, next and last run."""
    _setup_logging(verbose)
    try:
        from reembed.flows.operations.scheduling import list_deployments

        rows = list_deployments()
    except _schedule_errors() as exc:
        _fail(exc, verbose, as_json)
        return
    if not rows:
        err.print("no reembed deployments on this Prefect server; register one with `reembed deploy JOB --cron ...`",
                  highlight=False)
    _print_deployments(rows, as_json)


@cli.command()
@_POOL
@click.option("--limit", type=click.IntRange(1), default=None, metavar="N",
              help="flow runs at once on this worker [default: no limit; each deployment runs one at a time]",
              show_envvar=True)
@click.option("-v", "--verbose", is_flag=True, help="more logging, and tracebacks on errors", show_envvar=True)
def worker(pool: str, limit: int | None, verbose: bool) -> None:
    """Run the work pool's worker in the foreground: Prefect's process worker, which starts each scheduled or
    triggered run of the pool's deployments in a subprocess here (Ray, or the cluster the job names, does the
    embedding). Logs go to stderr. Needs PREFECT_API_URL."""
    _setup_logging(verbose)
    try:
        from reembed.flows.operations.scheduling import start_worker

        start_worker(pool, limit)
    except _schedule_errors() as exc:
        _fail(exc, verbose)


@cli.command()
@_job_options
@_CRON
@_NAME
@_TZ
def serve(job: str, overrides: tuple[str, ...], verbose: bool, cron: str, name: str | None,
          timezone: str | None) -> None:
    """Run JOB's schedule from this one process (Prefect's flow.serve): no work pool, no worker; each run is the
    same flow a deployment runs. Runs until stopped (Ctrl-C). Needs PREFECT_API_URL."""
    _setup_logging(verbose)
    try:
        from reembed.flows.operations.scheduling import serve as serve_job

        serve_job(job, list(overrides), cron, name, timezone)
    except _schedule_errors() as exc:
        _fail(exc, verbose)


@cli.command()
@click.argument("jobs", nargs=-1, required=True, type=click.Path(dir_okay=False), metavar="JOB...")
@click.option("--host", default="127.0.0.1", show_default=True, show_envvar=True,
              help="address to listen on (0.0.0.0 for every interface: the page has no login)")
@click.option("--port", type=click.IntRange(1, 65535), default=8765, show_default=True, show_envvar=True)
@click.option("--prometheus", metavar="URL", default=None, show_envvar=True,
              help="a Prometheus that scrapes the Ray nodes: adds the actors' live tokens/s and encode times")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=_SET_HELP, show_envvar=True)
@click.option("-v", "--verbose", is_flag=True, help="more logging, and tracebacks on errors", show_envvar=True)
def dashboard(jobs: tuple[str, ...], host: str, port: int, prometheus: str | None, overrides: tuple[str, ...],
              verbose: bool) -> None:
    """Serve a read-only web page over one or more JOBs: freshness against the budget, the last runs, trends,
    quarantine, versions with their gate verdicts, live points. /api/status has the same data as JSON. It reads
    the run logs, manifests and indexes; while a run holds an embedded index it says so and shows the rest."""
    _setup_logging(verbose)
    try:
        from reembed.flows.operations.dashboard import serve as serve_dashboard

        serve_dashboard(list(jobs), host, port, list(overrides), prometheus)
    except _user_errors() as exc:
        _fail(exc, verbose)


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # The temporary Prefect server would try to phone home at start; this workplace (and many clusters) has no
    # route out, and the failed attempt races the server's first database writes.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The temporary server migrates a fresh SQLite database on its first start; on a loaded 2-core machine
    # that took 22 s here, past Prefect's default 20 s wait, and failed the run for nothing.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    cli()


if __name__ == "__main__":
    main()
