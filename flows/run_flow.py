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
from flows.errors import retry_unless_job_level
from flows.ray_pool import ActorPool, init_ray
from indexing.corpus import Shard, list_files, plan_shards
from indexing.qdrant_index import QdrantIndex
from indexing.storage import StorageError, filesystem, protocol_of
from indexing.vector_store import VectorStore
from workers.model_loader import resolve_model_path

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
    list_files(job.corpus)
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
def embed_task(pool_key: str, shard: Shard, job: JobConfig, collection: str, fingerprint: str) -> dict[str, Any]:
    return _POOLS[pool_key].process_shard(
        shard, job.corpus, job.output.uri, collection, job.output.storage_options, fingerprint, job.chunking
    )


@task(name="upsert-shard", retries=3, retry_delay_seconds=[1, 5, 15], cache_policy=NO_CACHE,
      retry_condition_fn=retry_unless_job_level,
      task_run_name="upsert-{result[shard_id]}")
def upsert_task(index_key: str, result: dict[str, Any], job: JobConfig, collection: str) -> int:
    index, lock = _INDEXES[index_key]
    store = VectorStore(job.output.uri, collection, job.output.storage_options)
    with lock:
        points = index.upsert_part(collection, store, result["part_uri"])
    store.write_marker(result["shard_id"], {**result, "stage": "indexed", "points": points})
    return points


@flow(name="reembed-run", task_runner=ThreadPoolTaskRunner(max_workers=8), validate_parameters=False)
def run_job(job: JobConfig) -> dict[str, Any]:
    """Embed the job's corpus into Parquet and its Qdrant collection, then point the alias at it."""
    log = get_run_logger()
    started = time.perf_counter()
    shards: list[Shard] = plan_task(job)
    log.info("planned %d shard(s) from %s", len(shards), job.corpus.uri)
    key = uuid.uuid4().hex
    owns_ray = init_ray(job)
    pool = ActorPool(job, max_actors=len(shards))
    _POOLS[key] = pool
    encode_started = time.perf_counter()
    collection = job.collection_name(pool.dim)
    index = QdrantIndex(job.index)
    _INDEXES[key] = (index, threading.Lock())
    try:
        index.ensure_collection(collection, pool.dim, job.corpus.payload)
        embeds = [embed_task.submit(key, s, job, collection, job.fingerprint(pool.dim)) for s in shards]
        upserts = []
        results: list[dict[str, Any]] = []
        failures: list[dict[str, str]] = []
        docs = 0
        for done, future in enumerate(as_completed(embeds), start=1):
            try:
                result = future.result()
            except Exception as exc:
                failures.append({"shard": "?", "error": f"{type(exc).__name__}: {exc}"})
                log.error("shard failed after retries: %s", exc)
                continue
            results.append(result)
            docs += result["rows"]
            upserts.append(upsert_task.submit(key, result, job, collection))
            elapsed = time.perf_counter() - encode_started
            log.info("shards %d/%d embedded | %d docs | %.1f docs/s | shard %s on node %s",
                     done, len(shards), docs, docs / max(elapsed, 1e-9), result["shard_id"], (result["node"] or "")[:8])
        points_written = 0
        for future in upserts:
            try:
                points_written += future.result()
            except Exception as exc:
                failures.append({"shard": "upsert", "error": f"{type(exc).__name__}: {exc}"})
        seconds = time.perf_counter() - started
        store = VectorStore(job.output.uri, collection, job.output.storage_options)
        summary = _summarise(job, collection, index, shards, results, failures, seconds, pool)
        summary["startup_s"] = round(encode_started - started, 3)
        summary["docs_per_s"] = round(summary["indexed"] / max(time.perf_counter() - encode_started, 1e-9), 2)
        if failures:
            raise RunFailed(summary)
        store.write_manifest({
            "collection": collection, "alias": job.name, "model": pool.model_id, "dim": pool.dim,
            "fingerprint": job.fingerprint(pool.dim), "shards": sorted(r["shard_id"] for r in results),
            "vector_rows": summary["vector_rows"], "input_rows": summary["input_rows"],
            "chunked": job.chunking is not None,
            "quarantined": summary["quarantined"], "finished_at": datetime.now(timezone.utc).isoformat(),
        })
        index.point_alias(job.name, collection)
        summary["points"] = index.count(collection)
        _publish(job, summary)
        return summary
    finally:
        pool.shutdown()
        _POOLS.pop(key, None)
        _INDEXES.pop(key, None)
        index.close()
        if owns_ray:
            import ray

            ray.shutdown()


def _summarise(job: JobConfig, collection: str, index: QdrantIndex, shards: list[Shard],
               results: list[dict[str, Any]], failures: list[dict[str, str]], seconds: float,
               pool: ActorPool) -> dict[str, Any]:
    indexed = sum(r["rows"] for r in results)
    return {
        "alias": job.name,
        "collection": collection,
        "model": pool.model_id,
        "dim": pool.dim,
        "input_rows": sum(r["input_rows"] for r in results),
        "indexed": indexed,
        "vector_rows": sum(r["vector_rows"] for r in results),
        "quarantined": sum(r["quarantined"] for r in results),
        "tokens": sum(r["tokens"] for r in results),
        "truncated_docs": sum(r["truncated_docs"] for r in results),
        "dropped_tokens": sum(r["dropped_tokens"] for r in results),
        "seconds": round(seconds, 3),
        "docs_per_s": round(indexed / max(seconds, 1e-9), 2),
        "shards_total": len(shards),
        "shards_done": len(results),
        "shards_failed": len(shards) - len(results),
        "failures": failures,
        "actors": len(pool.actors),
        "shards_by_node": dict(Counter(r["node"] for r in results)),
        "points": index.count(collection),
        "output": VectorStore(job.output.uri, collection).root,
        "index": index.where,
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
