"""The Prefect flow behind ``reembed run``: plan shards, fan them out to Ray actors, upsert, guard, commit.

Tasks pass shard descriptions and URIs, never tables or vectors: actors read their shard from storage and
write Parquet back; the upsert task reads that Parquet part into Qdrant. The run manifest (``current.json``)
and the alias move are written last, so a run that dies midway leaves the previous state searchable. When
the run refreshes the live collection itself, no point is written into it until every shard is embedded and
the quarantine guard has passed, and nothing is deleted until the delete guard has passed (``flows.guards``).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from flows.config import JobConfig
from flows.errors import JOB_LEVEL_ERRORS, retry_unless_job_level
from flows.gate import GateFailed, check_gate
from flows.guards import (GuardBlocked, GuardReport, delete_check, empty_check, enforce, first_reasons,
                          quarantine_check)
from flows.planning import RunPlan, live_collection, plan_run, up_to_date_summary
from flows.progress import ProgressMode, RunProgress, start_board
from flows.versions import apply_retention
from flows.ray_pool import ActorPool, init_ray
from indexing.corpus import Shard
from indexing.qdrant_index import IndexError_, QdrantIndex, point_id
from indexing.storage import join
from indexing.vector_store import VectorStore

logger = logging.getLogger(__name__)

_POOLS: dict[str, ActorPool] = {}
_INDEXES: dict[str, tuple[QdrantIndex, threading.Lock]] = {}


class RunFailed(RuntimeError):
    """Some shards failed after their retries; the others completed and are reported."""

    def __init__(self, summary: dict[str, Any]) -> None:
        self.summary = summary
        failed = summary.get("failures", [])
        super().__init__(f"{len(failed)} shard(s) failed: " + "; ".join(f"{f['shard']}: {f['error']}" for f in failed))


@task(name="plan-shards", retries=2, retry_delay_seconds=[2, 10], cache_policy=NO_CACHE,
      retry_condition_fn=retry_unless_job_level)
def plan_task(job: JobConfig, limit: int | None) -> RunPlan:
    return plan_run(job, limit, live_collection(job))


@task(name="embed-shard", retries=2, retry_delay_seconds=[2, 10], cache_policy=NO_CACHE,
      retry_condition_fn=retry_unless_job_level,
      task_run_name="embed-{shard.shard_id}")
def embed_task(pool_key: str, shard: Shard, job: JobConfig, collection: str, fingerprint: str,
               input_fp: str, reuse_uris: list[str], board: Any) -> dict[str, Any]:
    return _POOLS[pool_key].process_shard(
        shard, job.corpus, job.output.uri, collection, job.output.storage_options, fingerprint, job.chunking,
        reuse_uris, input_fp, board, min(1.0, job.runtime.progress_seconds),
    )


@task(name="upsert-shard", retries=3, retry_delay_seconds=[1, 5, 15], cache_policy=NO_CACHE,
      retry_condition_fn=retry_unless_job_level,
      task_run_name="upsert-{result[shard_id]}")
def upsert_task(index_key: str, result: dict[str, Any], job: JobConfig, collection: str) -> int:
    index, lock = _INDEXES[index_key]
    store = VectorStore(job.output.uri, collection, job.output.storage_options)
    with lock:
        points = index.upsert_part(collection, store, result["part_uri"])
    # The shard's commit marker: written after its Parquet part and its points, so a re-run can skip it.
    store.write_marker(result["shard_id"], {**result, "stage": "indexed", "points": points})
    return points


def _reuse_sources(store: VectorStore, previous: dict[str, Any] | None) -> dict[str, list[str]]:
    """Committed parts of the previous run, by source file: where unchanged documents' vectors can come from.

    Taken from the manifest, never from markers: a run that was stopped may have rewritten a marker, but the
    parts the manifest names are never overwritten.
    """
    by_source: dict[str, list[str]] = {}
    previous = previous or {}
    if "parts" in previous:
        for part in previous["parts"]:
            by_source.setdefault(part["source"], []).append(part["part_uri"])
        return by_source
    for shard_id in previous.get("shards", []):  # manifests written before parts were listed
        marker = store.read_marker(shard_id)
        if marker and marker.get("source"):
            by_source.setdefault(marker["source"], []).append(store.part_uri(shard_id))
    return by_source


@dataclass
class _Expected:
    """The points the new vector set defines: one per (doc, chunk), the first shard in plan order winning."""

    points: dict[str, tuple[str, int]]  # point id -> (part, row)
    doc_ids: set[str]
    duplicate_ids: set[str]
    duplicates: list[dict[str, Any]]


def _expected_points(store: VectorStore, results: list[dict[str, Any]], chunked: bool) -> _Expected:
    """Read only the id columns of each part (never vectors or text) and resolve cross-shard duplicates.

    `chunked` comes from the job: every part of one version is written with the same chunking settings.
    """
    expected: dict[str, tuple[str, int]] = {}
    first_seen: dict[str, tuple[str, int]] = {}
    duplicates: list[dict[str, Any]] = []
    duplicate_ids: set[str] = set()
    doc_ids: set[str] = set()
    for result in results:
        columns = ["doc_id", "source_row"] + (["chunk_index"] if chunked else [])
        table = store.read_part(result["part_uri"], columns)
        ids = table.column("doc_id").to_pylist()
        chunks = table.column("chunk_index").to_pylist() if chunked else [None] * len(ids)
        source_rows = table.column("source_row").to_pylist()
        for row, (doc_id, chunk) in enumerate(zip(ids, chunks)):
            pid = point_id(doc_id, chunk)
            doc_ids.add(doc_id)
            if pid in expected:
                duplicate_ids.add(pid)
                if chunk in (None, 0):  # count documents, not their chunks
                    src, src_row = first_seen[pid]
                    duplicates.append({"file": result["source"], "row": source_rows[row], "doc_id": doc_id,
                                       "reason": f"duplicate id {doc_id!r} (kept the one in {src} row {src_row})"})
                continue
            expected[pid] = (result["part_uri"], row)
            first_seen[pid] = (result["source"], source_rows[row])
    return _Expected(expected, doc_ids, duplicate_ids, duplicates)


def _reconcile(index: QdrantIndex, store: VectorStore, collection: str, expected: _Expected,
               stale: list[str]) -> None:
    """Make the collection equal the current vector set: re-upsert duplicate winners, delete ``stale`` points.

    Deleting every point that is not in the current set also removes documents that vanished from the
    corpus, and leftovers of a run that died.
    """
    if expected.duplicate_ids:  # re-upsert the winners so the outcome does not depend on which shard finished last
        by_part: dict[str, list[int]] = {}
        for pid in expected.duplicate_ids:
            part, row = expected.points[pid]
            by_part.setdefault(part, []).append(row)
        for part, rows in by_part.items():
            index.upsert_rows(collection, store, part, rows)
    index.delete_points(collection, stale)


def _live_doc_ids(index: QdrantIndex, collection: str) -> set[str]:
    docs: set[str] = set()
    offset = None
    while True:
        points, offset = index.client.scroll(collection, limit=10_000, offset=offset, with_payload=["doc_id"],
                                             with_vectors=False)
        docs.update(str((p.payload or {}).get("doc_id")) for p in points)
        if offset is None:
            return docs


@flow(name="reembed-run", task_runner=ThreadPoolTaskRunner(max_workers=8), validate_parameters=False)
def run_job(job: JobConfig, force_reason: str | None = None, limit: int | None = None,
            progress: ProgressMode = "log") -> dict[str, Any]:
    """Embed the job's corpus into Parquet and its Qdrant collection, then point the alias at it.

    Shards whose commit marker matches their input and the model are skipped; documents whose text is
    unchanged reuse their stored vectors; points not in the new vector set are deleted at the end, after the
    guards. ``limit`` embeds only the first N input rows into a trial version that never becomes live.
    """
    log = get_run_logger()
    started = time.perf_counter()
    plan: RunPlan = plan_task(job, limit)
    collection, dim, model_fp = plan.collection, plan.dim, plan.model_fingerprint
    store = VectorStore(job.output.uri, collection, job.output.storage_options)
    todo = plan.todo
    log.info("planned %d shard(s) from %s into %s (%s): %d already indexed, %d written but not indexed, %d to embed",
             len(plan.shards), job.corpus.uri, collection, plan.mode, len(plan.indexed), len(plan.written), len(todo))
    key = uuid.uuid4().hex
    owns_ray = False
    pool: ActorPool | None = None
    index = QdrantIndex(job.index)
    _INDEXES[key] = (index, threading.Lock())
    try:
        if plan.mode == "up-to-date":
            summary = up_to_date_summary(job, plan, index.count(collection), time.perf_counter() - started)
            log.info(summary["message"])
            return summary
        reuse = _reuse_sources(store, plan.manifest)
        index.ensure_collection(collection, dim, job.corpus.payload)
        # Refreshing the live collection itself: hold every write to it until the quarantine guard has passed.
        hold = plan.live == collection
        live_points = index.count(plan.live) if plan.live else 0
        failures: list[dict[str, str]] = []
        fresh: list[dict[str, Any]] = []
        held: list[dict[str, Any]] = list(plan.written.values())
        upserts = [] if hold else [upsert_task.submit(key, m, job, collection) for m in held]
        if not hold:
            held = []
        encode_started = embed_done = time.perf_counter()
        if todo:
            owns_ray = init_ray(job)
            pool = ActorPool(job, max_actors=len(todo))
            if pool.dim != dim:
                raise IndexError_(f"model makes {pool.dim}-dim vectors but its config says {dim}")
            _POOLS[key] = pool
            board = start_board()
            encode_started = time.perf_counter()
            with RunProgress(todo, progress, job.runtime.progress_seconds, log.info, board) as tracker:
                embeds = {s.shard_id: embed_task.submit(key, s, job, collection, model_fp, plan.input_fps[s.shard_id],
                                                         reuse.get(s.uri, []), board) for s in todo}
                for done, future in enumerate(as_completed(list(embeds.values())), start=1):
                    shard_id = next(k for k, f in embeds.items() if f is future)
                    try:
                        result = future.result()
                    except JOB_LEVEL_ERRORS:
                        raise  # a missing column or on_bad_rows=fail: one clear message, not a list of shard failures
                    except Exception as exc:
                        failures.append({"shard": shard_id, "error": f"{type(exc).__name__}: {exc}"})
                        log.error("shard %s failed after retries: %s", shard_id, exc)
                        continue
                    tracker.finish_shard(shard_id, result["input_rows"])
                    fresh.append(result)
                    if hold:
                        held.append(result)
                    else:
                        upserts.append(upsert_task.submit(key, result, job, collection))
                    log.info("shards %d/%d embedded | %d encoded, %d reused, %d quarantined | shard %s on node %s",
                             done + len(plan.indexed) + len(plan.written), len(plan.shards), result["encoded"],
                             result["reused"], result["quarantined"], shard_id, (result["node"] or "")[:8])
            embed_done = time.perf_counter()
        known = list(plan.indexed.values()) + list(plan.written.values()) + fresh
        report = GuardReport()
        input_rows = sum(r["input_rows"] for r in known)
        quarantined = sum(r["quarantined"] for r in known)
        quarantine_files = [r["quarantine_uri"] for r in known if r.get("quarantine_uri")]
        report.checks.append(quarantine_check(job.guards, input_rows, quarantined))
        partial = _summary(job, plan, known, fresh, failures, started, len(pool.actors) if pool else 0,
                           encode_started, embed_done)
        if failures and hold:  # nothing of a failed refresh reaches the live collection; a re-run resumes
            raise RunFailed({**partial, "status": "failed", "points": index.count(collection)})
        if not failures and not enforce(report, force_reason):
            raise GuardBlocked(report, plan.live, store.quarantine_dir if quarantine_files else None,
                               first_reasons(quarantine_files, job.output.storage_options), {**partial, "status": "blocked"})
        upserts += [upsert_task.submit(key, r, job, collection) for r in held]
        for future in upserts:
            try:
                future.result()
            except Exception as exc:
                failures.append({"shard": "upsert", "error": f"{type(exc).__name__}: {exc}"})
        results: list[dict[str, Any]] = list(plan.indexed.values())
        for shard_id in list(plan.written) + [s.shard_id for s in todo]:
            marker = store.read_marker(shard_id)
            if marker and marker.get("stage") == "indexed" and marker.get("input_fingerprint") == plan.input_fps[shard_id]:
                results.append(marker)
        order = {s.shard_id: i for i, s in enumerate(plan.shards)}
        results.sort(key=lambda r: order[r["shard_id"]])
        summary = _summary(job, plan, results, fresh, failures, started, len(pool.actors) if pool else 0,
                           encode_started, embed_done)
        if failures:
            raise RunFailed({**summary, "status": "failed", "points": index.count(collection)})
        expected = _expected_points(store, results, job.chunking is not None)
        stale = [pid for pid in index.point_ids(collection) if pid not in expected.points]
        if not plan.trial:
            if plan.live == collection:
                report.checks.append(delete_check(job.guards, len(stale), live_points, "points"))
            elif plan.live is not None:  # a new version: the alias move drops live documents it lacks
                live_docs = _live_doc_ids(index, plan.live)
                report.checks.append(delete_check(job.guards, len(live_docs - expected.doc_ids), len(live_docs),
                                                  "documents"))
        report.checks.append(empty_check(job.guards, len(expected.points), live_points))
        if not enforce(report, force_reason):
            raise GuardBlocked(report, plan.live, None, [], {**summary, "status": "blocked"})
        _reconcile(index, store, collection, expected, stale)
        extra_quarantine = store.write_quarantine("cross-shard-duplicates", expected.duplicates)
        summary["index_status"] = index.finish_bulk_load(collection)
        summary.update(vector_rows=len(expected.points), duplicates=len(expected.duplicates), deleted=len(stale),
                       points=index.count(collection), guards=report.to_dict())
        _check_invariant(summary)
        manifest = {
            "collection": collection, "alias": job.name, "model": summary["model"], "dim": dim,
            "model_settings": job.model.model_dump(mode="json"),
            "fingerprint": model_fp, "shards": [r["shard_id"] for r in results],
            "parts": [{"shard_id": r["shard_id"], "part_uri": r["part_uri"], "source": r["source"],
                       "quarantine_uri": r.get("quarantine_uri")} for r in results],
            "extra_quarantine": [extra_quarantine] if extra_quarantine else [],
            "vector_rows": len(expected.points), "input_rows": summary["input_rows"], "chunked": job.chunking is not None,
            "quarantined": summary["quarantined"], "duplicates": len(expected.duplicates),
            "guards": report.to_dict(), "trial": plan.trial,
            "finished_at": datetime.now(timezone.utc).isoformat(),
        }
        if report.forced:
            manifest["forced"] = report.forced
        store.write_manifest(manifest)
        removed = store.remove_unreferenced(manifest)
        if removed:
            log.info("removed %d part/quarantine file(s) no longer in the vector set", removed)
        if plan.trial:
            summary["status"] = "trial"
            summary["message"] = (f"trial version {collection} built from the first {limit} input rows; "
                                  f"it never becomes live (the alias stays on {plan.live}); search it with "
                                  f"`reembed search JOB QUERY --version {collection}`")
            log.info(summary["message"])
            _publish(job, summary)
            return summary
        live = plan.live
        if job.gate is not None and live is not None and live != collection:
            live_manifest = VectorStore(job.output.uri, live, job.output.storage_options).read_manifest() or {}
            gate = check_gate(job, index, collection, live, live_manifest)
            summary["gate"] = gate
            manifest.update(score=gate["new_score"], gate=gate)
            store.write_manifest(manifest)
            log.info("quality gate: %s new %.4f vs live %s", gate["metric"], gate["new_score"], gate["live_score"])
            if not gate["passed"]:
                if not force_reason:
                    raise GateFailed(gate, summary)
                log.warning("quality gate failed but --force was given: %s", force_reason)
                manifest["forced"] = force_reason
                store.write_manifest(manifest)
        index.point_alias(job.name, collection)
        summary["retired_versions"] = apply_retention(job, index, job.index.keep_versions)
        summary["status"] = "ok"
        log.info("invariant holds: %d input rows = %d indexed + %d quarantined + %d duplicates; %d points = %d vector rows",
                 summary["input_rows"], summary["indexed"] - summary["duplicates"], summary["quarantined"],
                 summary["duplicates"], summary["points"], summary["vector_rows"])
        _publish(job, summary)
        return summary
    finally:
        if pool is not None:
            pool.shutdown()
        _POOLS.pop(key, None)
        _INDEXES.pop(key, None)
        index.close()
        if owns_ray:
            import ray

            ray.shutdown()


class InvariantBroken(RuntimeError):
    """The counts do not add up: a bug, never a user error; the run is not committed."""


def _check_invariant(summary: dict[str, Any]) -> None:
    # Cross-shard duplicates sit inside `indexed` (their rows were embedded, then resolved to one point each).
    if summary["input_rows"] != summary["indexed"] + summary["quarantined"] or summary["points"] != summary["vector_rows"]:
        raise InvariantBroken(
            f"counts do not add up: input_rows={summary['input_rows']} indexed={summary['indexed']} "
            f"quarantined={summary['quarantined']} duplicates={summary['duplicates']} "
            f"points={summary['points']} vector_rows={summary['vector_rows']}"
        )


def _summary(job: JobConfig, plan: RunPlan, results: list[dict[str, Any]], fresh: list[dict[str, Any]],
             failures: list[dict[str, str]], started: float, actors: int, encode_started: float,
             embed_done: float) -> dict[str, Any]:
    """The run's summary, built from shard results: totals describe the version (every shard), work counts
    (encoded, tokens, truncation, docs/s) describe this run only (the shards it embedded)."""
    indexed = sum(r["rows"] for r in results)
    encoded = sum(r.get("encoded", r["rows"]) for r in fresh)
    quarantined = sum(r["quarantined"] for r in results)
    now = time.perf_counter()
    return {
        "alias": job.name,
        "collection": plan.collection,
        "mode": plan.mode,
        "status": "running",
        "model": results[0]["model"] if results else job.model.name,
        "dim": plan.dim,
        "input_rows": sum(r["input_rows"] for r in results),
        "indexed": indexed,
        "encoded": encoded,
        "reused": sum(r.get("reused", 0) for r in fresh),
        "deleted": 0,
        "quarantined": quarantined,
        "quarantine": join(VectorStore(job.output.uri, plan.collection).root, "quarantine") if quarantined else None,
        "duplicates": 0,
        "vector_rows": sum(r.get("vector_rows", r["rows"]) for r in results),
        "tokens": sum(r["tokens"] for r in fresh),
        "truncated_docs": sum(r["truncated_docs"] for r in fresh),
        "dropped_tokens": sum(r["dropped_tokens"] for r in fresh),
        "seconds": round(now - started, 3),
        "startup_s": round(encode_started - started, 3),
        "docs_per_s": round(encoded / max(now - encode_started, 1e-9), 2) if fresh else None,
        # Read -> encode -> Parquet only (upserts run alongside and may finish later): bench/e2e.py's figure.
        "embed_docs_per_s": round(encoded / max(embed_done - encode_started, 1e-9), 2) if fresh else None,
        "shards_total": len(plan.shards),
        "shards_done": len(results),
        "shards_skipped": len(plan.indexed),
        "shards_embedded": len(fresh),
        "shards_failed": len(failures),
        "failures": failures,
        "actors": actors,
        "actors_used": len({(r.get("node"), r.get("pid")) for r in fresh}),
        "shards_by_node": dict(Counter(r.get("node") for r in fresh)),
        "points": None,
        "output": VectorStore(job.output.uri, plan.collection).root,
        "index": job.index.url or f"local:{job.index.path}",
    }


def _publish(job: JobConfig, summary: dict[str, Any]) -> None:
    """Artifacts with stable keys, so the Prefect UI shows the latest run of each job in one place."""
    key = f"reembed-{job.name.lower().replace('_', '-').replace('.', '-')}"
    rows = [{"metric": k, "value": str(v)} for k, v in summary.items() if k not in ("failures", "shards_by_node")]
    try:
        create_table_artifact(rows, key=f"{key}-summary", description=f"reembed run of {job.name}")
        create_markdown_artifact(
            f"**{summary['indexed']}** docs indexed into `{summary['collection']}` "
            f"(alias `{summary['alias']}`) at {summary['docs_per_s']} docs/s",
            key=f"{key}-headline",
        )
    except Exception as exc:  # artifacts are a convenience; never fail a finished run over them
        logger.warning("could not publish Prefect artifacts: %s", exc)
