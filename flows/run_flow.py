"""The Prefect flow behind ``reembed run``: plan shards, fan them out to Ray actors, upsert, commit.

Tasks pass shard descriptions and URIs, never tables or vectors: actors read their shard from storage and
write Parquet back; the upsert task reads that Parquet part into Qdrant. The run manifest (``current.json``)
and the alias move are written last, so a run that dies midway leaves the previous state searchable.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import Counter
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
from flows.versions import apply_retention
from flows.ray_pool import ActorPool, init_ray
from indexing.corpus import Shard, check_columns, file_fingerprint, list_files, plan_shards, shard_fingerprint
from indexing.qdrant_index import IndexError_, QdrantIndex, point_id
from indexing.storage import StorageError, filesystem, protocol_of
from indexing.vector_store import VectorStore
from workers.model_loader import load_profile, resolve_model_path

logger = logging.getLogger(__name__)

_POOLS: dict[str, ActorPool] = {}
_INDEXES: dict[str, tuple[QdrantIndex, threading.Lock]] = {}


class RunFailed(RuntimeError):
    """Some shards failed after their retries; the others completed and are reported."""

    def __init__(self, summary: dict[str, Any]) -> None:
        self.summary = summary
        failed = summary.get("failures", [])
        super().__init__(f"{len(failed)} shard(s) failed: " + "; ".join(f"{f['shard']}: {f['error']}" for f in failed))


def preflight(job: JobConfig) -> None:
    """Fail fast, before any Prefect or Ray start-up, on what no retry can fix."""
    files = list_files(job.corpus)
    check_columns(files[0], job.corpus)
    resolve_model_path(job.model.name, job.model.revision)
    fs, path = filesystem(job.output.uri, job.output.storage_options)
    if protocol_of(job.output.uri) in ("s3", "s3a"):
        bucket = path.split("/", 1)[0]
        try:
            if not fs.exists(bucket):
                raise StorageError(f"output bucket {bucket!r} does not exist ({job.output.uri})")
        except PermissionError as exc:
            raise StorageError(f"access denied to output {job.output.uri}: {exc}") from None


@task(name="plan-shards", retries=2, retry_delay_seconds=[2, 10], cache_policy=NO_CACHE,
      retry_condition_fn=retry_unless_job_level)
def plan_task(job: JobConfig) -> list[Shard]:
    return plan_shards(job.corpus, int(job.runtime.shard_size_mb * 1024 * 1024), job.runtime.shard_rows)


@task(name="embed-shard", retries=2, retry_delay_seconds=[2, 10], cache_policy=NO_CACHE,
      retry_condition_fn=retry_unless_job_level,
      task_run_name="embed-{shard.shard_id}")
def embed_task(pool_key: str, shard: Shard, job: JobConfig, collection: str, fingerprint: str,
               input_fp: str, reuse_uris: list[str]) -> dict[str, Any]:
    return _POOLS[pool_key].process_shard(
        shard, job.corpus, job.output.uri, collection, job.output.storage_options, fingerprint, job.chunking,
        reuse_uris, input_fp,
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


def _classify(job: JobConfig, store: VectorStore, shards: list[Shard], model_fp: str
              ) -> tuple[dict[str, str], dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """Input fingerprints per shard, and which shards are already indexed or at least written."""
    file_fps: dict[str, str] = {}
    input_fps: dict[str, str] = {}
    indexed: dict[str, dict[str, Any]] = {}
    written: dict[str, dict[str, Any]] = {}
    for shard in shards:
        if shard.uri not in file_fps:
            file_fps[shard.uri] = file_fingerprint(shard.uri, job.corpus)
        fp = shard_fingerprint(shard, file_fps[shard.uri], job.corpus)
        input_fps[shard.shard_id] = fp
        marker = store.read_marker(shard.shard_id)
        if not marker or marker.get("input_fingerprint") != fp or marker.get("model_fingerprint") != model_fp:
            continue
        (indexed if marker.get("stage") == "indexed" else written)[shard.shard_id] = marker
    return input_fps, indexed, written


def _reuse_sources(store: VectorStore, previous: dict[str, Any] | None) -> dict[str, list[str]]:
    """Committed parts of the previous run, by source file: where unchanged documents' vectors can come from."""
    by_source: dict[str, list[str]] = {}
    for shard_id in (previous or {}).get("shards", []):
        marker = store.read_marker(shard_id)
        if marker and marker.get("source"):
            by_source.setdefault(marker["source"], []).append(store.part_uri(shard_id))
    return by_source


def _reconcile(index: QdrantIndex, store: VectorStore, collection: str, results: list[dict[str, Any]]
               ) -> tuple[int, int, int]:
    """Make the collection equal the current vector set: one point per (doc, chunk), first shard wins.

    Returns (vector rows, duplicate rows resolved, points deleted). Deleting every point that is not in the
    current set also removes documents that vanished from the corpus, and leftovers of a run that died.
    """
    expected: dict[str, tuple[str, int]] = {}
    first_seen: dict[str, tuple[str, int]] = {}
    duplicates: list[dict[str, Any]] = []
    duplicate_ids: set[str] = set()
    for result in results:
        table = store.read_part(result["part_uri"], None)
        cols = table.column_names
        doc_ids = table.column("doc_id").to_pylist()
        chunks = table.column("chunk_index").to_pylist() if "chunk_index" in cols else [None] * len(doc_ids)
        source_rows = table.column("source_row").to_pylist()
        for row, (doc_id, chunk) in enumerate(zip(doc_ids, chunks)):
            pid = point_id(doc_id, chunk)
            if pid in expected:
                duplicate_ids.add(pid)
                if chunk in (None, 0):  # count documents, not their chunks
                    src, src_row = first_seen[pid]
                    duplicates.append({"file": result["source"], "row": source_rows[row], "doc_id": doc_id,
                                       "reason": f"duplicate id {doc_id!r} (kept the one in {src} row {src_row})"})
                continue
            expected[pid] = (result["part_uri"], row)
            first_seen[pid] = (result["source"], source_rows[row])
    if duplicate_ids:  # re-upsert the winners so the outcome does not depend on which shard finished last
        by_part: dict[str, list[int]] = {}
        for pid in duplicate_ids:
            part, row = expected[pid]
            by_part.setdefault(part, []).append(row)
        for part, rows in by_part.items():
            index.upsert_rows(collection, store, part, rows)
    stale = [pid for pid in index.point_ids(collection) if pid not in expected]
    index.delete_points(collection, stale)
    store.write_quarantine("cross-shard-duplicates", duplicates)
    return len(expected), len(duplicates), len(stale)


@flow(name="reembed-run", task_runner=ThreadPoolTaskRunner(max_workers=8), validate_parameters=False)
def run_job(job: JobConfig, force_reason: str | None = None) -> dict[str, Any]:
    """Embed the job's corpus into Parquet and its Qdrant collection, then point the alias at it.

    Shards whose commit marker matches their input and the model are skipped; documents whose text is
    unchanged reuse their stored vectors; points not in the new vector set are deleted at the end.
    """
    log = get_run_logger()
    started = time.perf_counter()
    shards: list[Shard] = plan_task(job)
    dim = load_profile(job.model).dim
    collection = job.collection_name(dim)
    model_fp = job.fingerprint(dim)
    store = VectorStore(job.output.uri, collection, job.output.storage_options)
    input_fps, indexed, written = _classify(job, store, shards, model_fp)
    todo = [s for s in shards if s.shard_id not in indexed and s.shard_id not in written]
    log.info("planned %d shard(s) from %s: %d already indexed, %d written but not indexed, %d to embed",
             len(shards), job.corpus.uri, len(indexed), len(written), len(todo))
    reuse = _reuse_sources(store, store.read_manifest())
    key = uuid.uuid4().hex
    owns_ray = False
    pool: ActorPool | None = None
    index = QdrantIndex(job.index)
    _INDEXES[key] = (index, threading.Lock())
    try:
        index.ensure_collection(collection, dim, job.corpus.payload)
        results: list[dict[str, Any]] = list(indexed.values())
        failures: list[dict[str, str]] = []
        upserts = [upsert_task.submit(key, marker, job, collection) for marker in written.values()]
        encode_started = time.perf_counter()
        if todo:
            owns_ray = init_ray(job)
            pool = ActorPool(job, max_actors=len(todo))
            if pool.dim != dim:
                raise IndexError_(f"model makes {pool.dim}-dim vectors but its config says {dim}")
            _POOLS[key] = pool
            encode_started = time.perf_counter()
            embeds = {s.shard_id: embed_task.submit(key, s, job, collection, model_fp, input_fps[s.shard_id],
                                                     reuse.get(s.uri, [])) for s in todo}
            docs = 0
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
                docs += result["rows"]
                upserts.append(upsert_task.submit(key, result, job, collection))
                elapsed = time.perf_counter() - encode_started
                log.info("shards %d/%d embedded | %d docs (%d encoded, %d reused) | %.1f docs/s | shard %s on node %s",
                         done + len(indexed) + len(written), len(shards), docs, result["encoded"], result["reused"],
                         docs / max(elapsed, 1e-9), shard_id, (result["node"] or "")[:8])
        embed_done = time.perf_counter()
        for future in upserts:
            try:
                future.result()
            except Exception as exc:
                failures.append({"shard": "upsert", "error": f"{type(exc).__name__}: {exc}"})
        for shard_id in list(written) + [s.shard_id for s in todo]:
            marker = store.read_marker(shard_id)
            if marker and marker.get("stage") == "indexed" and marker.get("input_fingerprint") == input_fps[shard_id]:
                if marker not in results:
                    results.append(marker)
        order = {s.shard_id: i for i, s in enumerate(shards)}
        results.sort(key=lambda r: order[r["shard_id"]])
        fresh = {s.shard_id for s in todo}
        summary = _summarise(job, collection, shards, results, failures, time.perf_counter() - started,
                             len(pool.actors) if pool else 0, fresh)
        summary["shards_skipped"] = len(indexed)
        summary["startup_s"] = round(encode_started - started, 3)
        if failures:
            summary["points"] = index.count(collection)
            raise RunFailed(summary)
        vector_rows, duplicates, deleted = _reconcile(index, store, collection, results)
        summary["index_status"] = index.finish_bulk_load(collection)
        summary.update(vector_rows=vector_rows, duplicates=duplicates, deleted=deleted,
                       points=index.count(collection))
        summary["docs_per_s"] = round(summary["encoded"] / max(time.perf_counter() - encode_started, 1e-9), 2)
        # Read -> encode -> Parquet only (upserts run alongside and may finish later): bench/e2e.py's figure.
        summary["embed_docs_per_s"] = round(summary["encoded"] / max(embed_done - encode_started, 1e-9), 2)
        _check_invariant(summary)
        manifest = {
            "collection": collection, "alias": job.name, "model": summary["model"], "dim": dim,
            "model_settings": job.model.model_dump(mode="json"),
            "fingerprint": model_fp, "shards": [r["shard_id"] for r in results],
            "vector_rows": vector_rows, "input_rows": summary["input_rows"], "chunked": job.chunking is not None,
            "quarantined": summary["quarantined"], "duplicates": duplicates,
            "finished_at": datetime.now(timezone.utc).isoformat(),
        }
        store.write_manifest(manifest)
        live = index.alias_target(job.name)
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
        log.info("invariant holds: %d input rows = %d indexed + %d quarantined + %d duplicates; %d points = %d vector rows",
                 summary["input_rows"], summary["indexed"] - duplicates, summary["quarantined"], duplicates,
                 summary["points"], vector_rows)
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


def _summarise(job: JobConfig, collection: str, shards: list[Shard], results: list[dict[str, Any]],
               failures: list[dict[str, str]], seconds: float, actors: int, fresh: set[str]) -> dict[str, Any]:
    indexed = sum(r["rows"] for r in results)
    encoded = sum(r.get("encoded", r["rows"]) for r in results if r["shard_id"] in fresh)
    return {
        "alias": job.name,
        "collection": collection,
        "model": results[0]["model"] if results else job.model.name,
        "dim": results[0]["dim"] if results else None,
        "input_rows": sum(r["input_rows"] for r in results),
        "indexed": indexed,
        "encoded": encoded,
        "reused": indexed - encoded,
        "deleted": 0,
        "quarantined": sum(r["quarantined"] for r in results),
        "duplicates": 0,
        "vector_rows": sum(r.get("vector_rows", r["rows"]) for r in results),
        "tokens": sum(r["tokens"] for r in results),
        "truncated_docs": sum(r["truncated_docs"] for r in results),
        "dropped_tokens": sum(r["dropped_tokens"] for r in results),
        "seconds": round(seconds, 3),
        "docs_per_s": 0.0,
        "shards_total": len(shards),
        "shards_done": len(results),
        "shards_skipped": 0,
        "shards_failed": len(shards) - len(results),
        "failures": failures,
        "actors": actors,
        "shards_by_node": dict(Counter(r.get("node") for r in results)),
        "points": None,
        "output": VectorStore(job.output.uri, collection).root,
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
