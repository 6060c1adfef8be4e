"""What a run would do, worked out without encoding anything and without starting Ray or Prefect.

``reembed plan`` prints it; ``reembed run`` uses it to finish a run that has nothing to do in seconds, and the
flow uses it as its first step. A plan says which shards exist, which are already done (their commit marker
matches the input and the model), which version they belong to and whether the run builds a new version
(a backfill), refreshes the live one, resumes a run that stopped, or has nothing to do.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Literal

from flows.config import JobConfig
from indexing.corpus import (Shard, check_columns, file_fingerprint, limit_shards, list_files, plan_shards,
                             shard_fingerprint)
from indexing.storage import StorageError, filesystem, protocol_of
from indexing.vector_store import VectorStore
from workers.model_loader import load_profile, resolve_model_path

logger = logging.getLogger(__name__)

Mode = Literal["new-version", "refresh", "resume", "up-to-date", "trial"]


def preflight(job: JobConfig) -> None:
    """Fail fast, before any Prefect or Ray start-up, on what no retry can fix.

    The first files' columns (JSON lines: keys of a bounded sample of rows) must include the id, every
    template field and every payload column: a wrong key otherwise quarantines every row or renders an empty
    field into every document, and looks like success.
    """
    files = list_files(job.corpus)
    for uri in files[:PREFLIGHT_FILES]:
        check_columns(uri, job.corpus)
    resolve_model_path(job.model.name, job.model.revision)
    fs, path = filesystem(job.output.uri, job.output.storage_options)
    if protocol_of(job.output.uri) in ("s3", "s3a"):
        bucket = path.split("/", 1)[0]
        try:
            if not fs.exists(bucket):
                raise StorageError(f"output bucket {bucket!r} does not exist ({job.output.uri})")
        except PermissionError as exc:
            raise StorageError(f"access denied to output {job.output.uri}: {exc}") from None


PREFLIGHT_FILES = 8  # corpus files whose columns preflight samples


def expected_actors(job: JobConfig) -> int:
    """Actors the run will most likely get, known before Ray starts: ``runtime.num_actors``, else the local
    CPUs over ``cpus_per_actor`` for a local Ray, else 8 for a cluster (its size is unknown until connected)."""
    rt = job.runtime
    if rt.num_actors:
        return rt.num_actors
    if rt.ray_address is None:
        return max(1, int((os.cpu_count() or 1) // rt.cpus_per_actor))
    return 8


def min_shards(job: JobConfig) -> int:
    """Enough shards that every actor has work and a slow shard does not leave the others idle at the end."""
    rt = job.runtime
    return rt.min_shards or 2 * expected_actors(job) * (rt.shards_per_actor or 1)


@dataclass
class RunPlan:
    """The shards of a run and which of them earlier runs already did."""

    collection: str
    dim: int
    model_fingerprint: str
    shards: list[Shard]
    input_fps: dict[str, str]
    indexed: dict[str, dict[str, Any]] = field(default_factory=dict)  # marker matches, points upserted
    written: dict[str, dict[str, Any]] = field(default_factory=dict)  # marker matches, Parquet only
    live: str | None = None  # the collection behind the alias now
    manifest: dict[str, Any] | None = None  # the committed manifest of ``collection``, if any
    trial: bool = False

    @property
    def todo(self) -> list[Shard]:
        return [s for s in self.shards if s.shard_id not in self.indexed and s.shard_id not in self.written]

    def committed_parts(self) -> dict[str, str]:
        return {p["shard_id"]: p["part_uri"] for p in (self.manifest or {}).get("parts", [])}

    @property
    def mode(self) -> Mode:
        if self.trial:
            return "trial"
        committed = self.committed_parts()
        done = {**self.indexed, **self.written}
        uncommitted = [s for s, m in done.items() if committed.get(s) != m.get("part_uri")]
        if (not self.todo and not self.written and not uncommitted and self.live == self.collection
                and set(committed) == {s.shard_id for s in self.shards}):
            return "up-to-date"
        if uncommitted:
            return "resume"
        return "refresh" if self.live == self.collection else "new-version"

    def describe(self, job: JobConfig) -> dict[str, Any]:
        """The plan as ``reembed plan --json`` prints it (secrets masked by their SecretStr fields)."""
        return {
            "alias": job.name,
            "collection": self.collection,
            "live_collection": self.live,
            "mode": self.mode,
            "backfill": self.mode in ("new-version", "resume") and self.live not in (None, self.collection),
            "shards_total": len(self.shards),
            "shards_done": len(self.indexed),
            "shards_written": len(self.written),
            "shards_todo": len(self.todo),
            "rows_known": sum(s.rows_hint or 0 for s in self.shards),
            "shards": [{"shard_id": s.shard_id, "uri": s.uri, "format": s.format, "start": s.start, "end": s.end,
                        "first_row": s.first_row, "rows": s.rows_hint, "limit": s.limit,
                        "state": "indexed" if s.shard_id in self.indexed else
                        "written" if s.shard_id in self.written else "todo"} for s in self.shards],
            "job": job.model_dump(mode="json"),
        }


def plan_run(job: JobConfig, limit: int | None = None, live: str | None = None) -> RunPlan:
    """Plan shards and classify them against their commit markers; ``live`` is the alias's collection."""
    if limit is not None:
        shards = limit_shards(job.corpus, limit, job.runtime.shard_rows)
    else:
        shards = plan_shards(job.corpus, int(job.runtime.shard_size_mb * 1024 * 1024), job.runtime.shard_rows,
                             min_shards(job))
    dim = load_profile(job.model).dim
    trial = limit is not None
    collection = job.collection_name(dim, trial=trial)
    model_fp = job.fingerprint(dim)
    store = VectorStore(job.output.uri, collection, job.output.storage_options)
    plan = RunPlan(collection=collection, dim=dim, model_fingerprint=model_fp, shards=shards, input_fps={},
                   live=live, manifest=store.read_manifest(), trial=trial)
    file_fps: dict[str, str] = {}
    for shard in shards:
        if shard.uri not in file_fps:
            file_fps[shard.uri] = file_fingerprint(shard.uri, job.corpus)
        fp = shard_fingerprint(shard, file_fps[shard.uri], job.corpus)
        plan.input_fps[shard.shard_id] = fp
        marker = store.read_marker(shard.shard_id)
        if not marker or marker.get("input_fingerprint") != fp or marker.get("model_fingerprint") != model_fp:
            continue
        (plan.indexed if marker.get("stage") == "indexed" else plan.written)[shard.shard_id] = marker
    return plan


def live_collection(job: JobConfig) -> str | None:
    from indexing.qdrant_index import QdrantIndex

    with QdrantIndex(job.index) as index:
        return index.alias_target(job.name)


def up_to_date_summary(job: JobConfig, plan: RunPlan, points: int, seconds: float) -> dict[str, Any]:
    """The summary of a run with nothing to do: this run's numbers only (nothing encoded, its own seconds),
    the version's totals from its manifest."""
    manifest = plan.manifest or {}
    input_rows = int(manifest.get("input_rows", 0))
    quarantined = int(manifest.get("quarantined", 0))
    return {
        "alias": job.name, "collection": plan.collection, "status": "up-to-date", "mode": "up-to-date",
        "model": manifest.get("model"), "dim": plan.dim,
        "input_rows": input_rows, "indexed": input_rows - quarantined,
        "encoded": 0, "reused": 0, "deleted": 0, "quarantined": quarantined,
        "quarantine": None, "duplicates": int(manifest.get("duplicates", 0)),
        "vector_rows": manifest.get("vector_rows"), "tokens": 0, "truncated_docs": 0, "dropped_tokens": 0,
        "seconds": round(seconds, 3), "docs_per_s": None, "embed_docs_per_s": None,
        "shards_total": len(plan.shards), "shards_skipped": len(plan.shards), "shards_embedded": 0,
        "shards_failed": 0, "failures": [], "actors": 0, "points": points,
        "output": VectorStore(job.output.uri, plan.collection).root,
        "index": job.index.url or f"local:{job.index.path}",
        "message": f"nothing to do: {job.name} is up to date ({len(plan.shards)} shard(s) unchanged, "
                   f"{points} points in {plan.collection})",
    }
