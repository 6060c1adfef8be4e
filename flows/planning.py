"""What a run would do, worked out without encoding anything and without starting Ray or Prefect.

``reembed plan`` prints it; ``reembed run`` uses it to finish a run that has nothing to do in seconds, and the
flow uses it as its first step. A plan says which shards exist, which are already done (their commit marker
matches the input and the model), which version they belong to and whether the run builds a new version
(a backfill), refreshes the live one, resumes a run that stopped, or has nothing to do.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from pydantic import BaseModel, Field

from reembed.flows.config import JobConfig
from reembed.flows.phases import Phases
from reembed.indexing.corpus import (Shard, check_columns, file_fingerprint, limit_shards, list_files, plan_shards,
                             shard_fingerprint)
from reembed.indexing.index import IndexError_
from reembed.indexing.records import Manifest, Mode, RunSummary, ShardMarker, ShardRow
from reembed.indexing.shard_memo import StoredShardMemo
from reembed.indexing.storage import StorageError, filesystem, protocol_of
from reembed.indexing.vector_store import VectorStore
from reembed.workers.model_loader import load_profile, resolve_model_path

logger = logging.getLogger(__name__)

def preflight(job: JobConfig) -> None:
    """Fail fast, before any Prefect or Ray start-up, on what no retry can fix.

    The first files' columns (JSON lines: keys of a bounded sample of rows) must include the id, every
    template field and every payload column: a wrong key otherwise quarantines every row or renders an empty
    field into every document, and looks like success.
    """
    files = list_files(job.corpus)
    for uri in files[:PREFLIGHT_FILES]:
        check_columns(uri, job.corpus)
    resolve_model_path(job.model.name, job.model.revision, job.model.storage_options)
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


class RunPlan(BaseModel):
    """The shards of a run and which of them earlier runs already did; made once (by the CLI, or by the
    flow's first task when the flow is started some other way) and handed to the flow."""

    collection: str
    dim: int
    model_fingerprint: str
    shards: list[Shard]
    input_fps: dict[str, str]
    indexed: dict[str, ShardMarker] = Field(default_factory=dict)  # marker matches, points upserted
    written: dict[str, ShardMarker] = Field(default_factory=dict)  # marker matches, Parquet only
    live: str | None = None  # the collection behind the alias now
    manifest: Manifest | None = None  # the committed manifest of ``collection``, if any
    interrupted: bool = False  # an earlier run wrote to ``collection`` and never committed (its writing marker)
    phases: dict[str, float] = Field(default_factory=dict)  # seconds planning spent in each step (flows.phases)
    trial: bool = False
    limit: int | None = None  # trial runs: the first N input rows

    @property
    def todo(self) -> list[Shard]:
        return [s for s in self.shards if s.shard_id not in self.indexed and s.shard_id not in self.written]

    def committed_parts(self) -> dict[str, str]:
        return {p.shard_id: p.part_uri for p in (self.manifest.parts if self.manifest else [])}

    @property
    def mode(self) -> Mode:
        if self.trial:
            return "trial"
        committed = self.committed_parts()
        done = {**self.indexed, **self.written}
        uncommitted = [s for s, m in done.items() if committed.get(s) != m.part_uri]
        if (not self.todo and not self.written and not uncommitted and not self.interrupted
                and self.live == self.collection and set(committed) == {s.shard_id for s in self.shards}):
            return "up-to-date"
        if uncommitted or self.interrupted:
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
    """Plan shards and classify them against their commit markers; ``live`` is the alias's collection.

    What it reads is what the commit protocol needs and no more, so that planning an unchanged corpus costs
    O(files), not O(rows): the input listing (with each file's size and ETag or modification time; big
    line-scanned files' shards come from the job's shard memo when the file is unchanged), one marker per
    shard, the manifest and the writing marker. It never opens the index or reads a Parquet part."""
    phases = Phases()
    with phases.timed("listing"):  # the input listing, shards (scanned or remembered), fingerprints
        if limit is not None:
            shards = limit_shards(job.corpus, limit, job.runtime.shard_rows)
        else:
            memo = StoredShardMemo(job.output.uri, job.name, job.output.storage_options)
            shards = plan_shards(job.corpus, int(job.runtime.shard_size_mb * 1024 * 1024), job.runtime.shard_rows,
                                 min_shards(job), memo)
        file_fps: dict[str, str] = {}
        for shard in shards:
            if shard.uri not in file_fps:
                file_fps[shard.uri] = file_fingerprint(shard.uri, job.corpus)
        input_fps = {s.shard_id: shard_fingerprint(s, file_fps[s.uri], job.corpus) for s in shards}
    with phases.timed("model"):
        dim = load_profile(job.model).dim
    trial = limit is not None
    collection = job.collection_name(dim, trial=trial)
    model_fp = job.fingerprint(dim)
    store = VectorStore(job.output.uri, collection, job.output.storage_options)
    with phases.timed("manifest"):  # the commit record and the absence of an interrupted write
        manifest, interrupted = store.read_manifest(), store.writing() is not None
    plan = RunPlan(collection=collection, dim=dim, model_fingerprint=model_fp, shards=shards, input_fps=input_fps,
                   live=live, manifest=manifest, interrupted=interrupted, trial=trial, limit=limit)
    with phases.timed("markers"):
        for shard in shards:
            marker = store.read_marker(shard.shard_id)
            fp = input_fps[shard.shard_id]
            if not marker or marker.input_fingerprint != fp or marker.model_fingerprint != model_fp:
                continue
            (plan.indexed if marker.stage == "indexed" else plan.written)[shard.shard_id] = marker
    plan.phases = phases.as_dict()
    return plan


def plan_job(job: JobConfig, limit: int | None = None) -> RunPlan:
    """The plan of the job's next run, against the collection its alias serves (checked to still exist)."""
    phases = Phases()
    with phases.timed("index_check"):
        live = live_collection(job)
    plan = plan_run(job, limit, live)
    plan.phases = {**phases.as_dict(), **plan.phases}
    return plan


class LiveCollectionMissing(IndexError_):
    """The job's alias names a collection the index no longer has: nothing may be planned against it (a
    refresh would edit a collection that is not there, and a no-op would call the job up to date)."""


def live_collection(job: JobConfig) -> str | None:
    """The version the job's alias serves (a rebuilt generation counts as its version), checked to exist.

    The check is the cheap one (the collection's folder and meta file on edge, ``collection_exists`` on a
    server): it loads no index shard. A collection that has gone missing stops the run with how to rebuild it
    from Parquet, the source of truth."""
    from reembed.flows.versions import live_version
    from reembed.indexing.index import open_index

    with open_index(job.index) as index:
        version = live_version(index, job.name)
        if version is not None and not index.exists(job.name):
            raise LiveCollectionMissing(
                f"the alias {job.name!r} points at {index.alias_target(job.name)!r}, which is missing from "
                f"{index.where}; its vectors are in Parquet under {job.output.uri}: rebuild it with "
                f"`reembed reindex JOB` (nothing is re-encoded), then run again")
        return version


def up_to_date_summary(job: JobConfig, plan: RunPlan, seconds: float) -> RunSummary:
    """The summary of a run with nothing to do: this run's numbers only (nothing encoded, its own seconds),
    the version's totals from its manifest. The point count is the manifest's vector rows: a commit writes the
    manifest only after the collection was checked to hold exactly them, and nothing writes to a committed
    collection without first leaving the writing marker that stops a plan from being up to date."""
    manifest = plan.manifest
    assert manifest is not None  # up-to-date means committed
    points = manifest.vector_rows
    return RunSummary(
        alias=job.name, collection=plan.collection, status="up-to-date", mode="up-to-date", model=manifest.model,
        dim=plan.dim, input_rows=manifest.input_rows, indexed=manifest.input_rows - manifest.quarantined,
        quarantined=manifest.quarantined, duplicates=manifest.duplicates, vector_rows=manifest.vector_rows,
        seconds=round(seconds, 3), shards_total=len(plan.shards), shards_done=len(plan.shards),
        shards_skipped=len(plan.shards), points=points, output=VectorStore(job.output.uri, plan.collection).root,
        index=job.index.where, shards=[ShardRow.of(plan.indexed[s.shard_id], "skipped") for s in plan.shards],
        phases=plan.phases,
        message=f"nothing to do: {job.name} is up to date ({len(plan.shards)} shard(s) unchanged, "
                f"{points} points in {plan.collection})",
    )
