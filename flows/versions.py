"""Versions of a job's vectors: list them, move the alias back, rebuild a collection from Parquet.

A version is one collection ``<name>-<fingerprint>`` and its Parquet vector set under the output URI. Parquet is
the source of truth, so versions are found from the run manifests (``current.json``) even when Qdrant lost them.
"""

from __future__ import annotations

import logging
import re

from reembed.flows.config import ConfigError, JobConfig
from reembed.indexing.index import IndexError_, VectorIndex
from reembed.indexing.records import Manifest, ReindexResult, RollbackResult, VersionInfo
from reembed.indexing.upload import upsert_part
from reembed.indexing.storage import filesystem, full_uri, join, read_json
from reembed.indexing.vector_store import VectorStore

logger = logging.getLogger(__name__)


def list_versions(job: JobConfig, index: VectorIndex) -> list[VersionInfo]:
    """Every version with a committed vector set, newest first, with its point count and whether it is live."""
    fs, root = filesystem(job.output.uri, job.output.storage_options)
    pattern = re.compile(rf"^{re.escape(job.name)}-[0-9a-f]{{12}}$")
    live = index.alias_target(job.name)
    versions = []
    for manifest_path in fs.glob(f"{root.rstrip('/')}/{job.name}-*/current.json"):
        collection = manifest_path.rstrip("/").split("/")[-2]
        if not pattern.match(collection):
            continue
        uri = full_uri(fs, manifest_path)
        manifest = Manifest.from_json(read_json(uri, job.output.storage_options), uri)
        if manifest is None:
            continue
        exists = index.exists(collection)
        versions.append(VersionInfo(
            collection=collection, model=manifest.model, dim=manifest.dim, live=collection == live,
            points=index.count(collection) if exists else None, vector_rows=manifest.vector_rows,
            score=manifest.score, finished_at=manifest.finished_at, in_index=exists,
        ))
    versions.sort(key=lambda v: v.finished_at or "", reverse=True)
    return versions


def apply_retention(job: JobConfig, index: VectorIndex, keep: int) -> list[str]:
    """Delete collections and vector sets of versions beyond the newest ``keep``; never the live one."""
    retired = []
    for version in list_versions(job, index)[keep:]:
        if version.live:
            continue
        if version.in_index:
            index.drop(version.collection)
        fs, root = filesystem(VectorStore(job.output.uri, version.collection).root, job.output.storage_options)
        fs.rm(root, recursive=True)
        retired.append(version.collection)
        logger.info("retention: deleted version %s (keeping the newest %d)", version.collection, keep)
    return retired


def rollback_target(job: JobConfig, versions: list[VersionInfo], version: str | None) -> VersionInfo:
    """The version a rollback moves the alias to: ``version``, or the newest one older than the live one that
    Qdrant still holds (a version only in Parquet needs ``reembed reindex`` first)."""
    live = next((v for v in versions if v.live), None)
    if version is None:
        older = [v for v in versions if live is None or (v.finished_at or "") < (live.finished_at or "")]
        older = [v for v in older if v.in_index and not v.live]
        if not older:
            raise ConfigError(f"no earlier version of {job.name!r} to roll back to; `reembed versions` lists them")
        return older[0]
    target = next((v for v in versions if v.collection == version), None)
    if target is None:
        raise ConfigError(f"version {version!r} not found; `reembed versions` lists them")
    if not target.in_index:
        raise IndexError_(f"version {version!r} is not in Qdrant; run `reembed reindex JOB {version}` first")
    return target


def rollback(job: JobConfig, index: VectorIndex, version: str | None) -> RollbackResult:
    """Point the alias at ``version``, or at the newest version older than the live one."""
    versions = list_versions(job, index)
    live = next((v.collection for v in versions if v.live), None)
    target = rollback_target(job, versions, version)
    index.point_alias(job.name, target.collection)
    logger.info("alias %s now points at %s (was %s)", job.name, target.collection, live)
    return RollbackResult(alias=job.name, collection=target.collection, previous=live)


def reindex(job: JobConfig, index: VectorIndex, version: str | None, activate: bool | None = None) -> ReindexResult:
    """Rebuild a collection from its Parquet vector set; encodes nothing.

    ``version`` defaults to the live version, else the newest committed one. The collection is recreated, every
    current part upserted, and the point count checked against the manifest. The alias moves to it when
    ``activate`` is true, or (default) when no alias exists yet, as after losing Qdrant.
    """
    versions = list_versions(job, index)
    if version is None:
        chosen = next((v for v in versions if v.live), versions[0] if versions else None)
        if chosen is None:
            raise ConfigError(f"no committed vector set for {job.name!r} under {job.output.uri}")
        version = chosen.collection
    elif not any(v.collection == version for v in versions):
        raise ConfigError(f"version {version!r} has no committed vector set under {job.output.uri}")
    store = VectorStore(job.output.uri, version, job.output.storage_options)
    manifest = store.read_manifest()
    assert manifest is not None  # list_versions found it
    if index.exists(version):
        index.drop(version)
    index.ensure_collection(version, manifest.dim, job.corpus.payload)
    written = sum(upsert_part(index, store, version, part) for part in store.current_parts(manifest))
    points = index.count(version)
    if points != manifest.vector_rows:
        raise IndexError_(f"reindexed {version}: {points} points but the manifest lists {manifest.vector_rows} rows")
    had_alias = index.alias_target(job.name) is not None
    if activate or (activate is None and not had_alias):
        index.point_alias(job.name, version)
    return ReindexResult(collection=version, points=points, upserted=written,
                         live=index.alias_target(job.name) == version, source=join(job.output.uri, version))

