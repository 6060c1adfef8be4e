"""Versions of a job's vectors: list them, move the alias back, rebuild a collection from Parquet.

A version is ``<name>-<fingerprint>``: its Parquet vector set under the output URI and one Qdrant collection.
Parquet is the source of truth, so versions are found from the run manifests (``current.json``) even when
Qdrant lost them. A reindex builds a new generation of the version beside the one serving it
(``<version>-r<N>``, ``reembed.indexing.index.physical_name``), checks it against Parquet, and only then moves
the aliases to it in one update and drops the old generation: searches never see a partial collection, and a
reindex that fails leaves everything as it was.
"""

from __future__ import annotations

import logging
import re

import numpy as np

from reembed.flows.config import ConfigError, JobConfig
from reembed.flows.failpoints import failpoint
from reembed.indexing.index import IndexError_, VectorIndex, generation_of, physical_name, version_of
from reembed.indexing.records import Manifest, ReindexResult, RollbackResult, StatusInfo, VersionInfo, point_id
from reembed.indexing.upload import upsert_part
from reembed.indexing.storage import filesystem, full_uri, join, read_json
from reembed.indexing.vector_store import VectorStore, arrow_to_vectors
from reembed.workers.remote_model import is_remote
from reembed.workers.settings import ModelSettings

logger = logging.getLogger(__name__)

SAMPLE_POINTS = 64  # vectors a reindex reads back from the rebuilt collection and compares with Parquet


class ReindexFailed(RuntimeError):
    """A rebuild did not produce the version's vector set; it was dropped and nothing live changed."""


class GateRefused(ConfigError):
    """A rollback named a version that failed its quality gate, without ``--force REASON``."""


def live_version(index: VectorIndex, alias: str) -> str | None:
    """The version the alias serves (its target without a rebuild generation), or None without an alias."""
    target = index.alias_target(alias)
    return version_of(target) if target else None


def physicals(index: VectorIndex, version: str) -> list[str]:
    """Every physical collection of ``version`` in the index: the first build and any rebuilt generation."""
    return [c for c in index.collections() if version_of(c) == version]


def drop_version(index: VectorIndex, version: str) -> None:
    """Remove a version from the index: each of its physical collections and its version alias."""
    for collection in physicals(index, version):
        index.drop(collection)
    index.remove_alias(version)


# What makes a model's vectors what they are; the rest (device, dtype, batch budget, threads, attention kernel)
# is how this machine runs it, and stays the job's.
MODEL_IDENTITY = ("name", "revision", "pooling", "normalize", "max_seq_length", "truncate_dim", "query_prompt",
                  "document_prompt")


def query_model(job: JobConfig, index: VectorIndex, name: str) -> ModelSettings:
    """The model to encode queries with for a search of ``name`` (the alias or a version): the one that built
    the version it serves, from that version's manifest. The job file's model may be another one: after a tuned
    or rolled-back version went live, or a backfill of a new model that the gate blocked, a query encoded with
    it would search vectors of a different model and rank nonsense without an error. The job's own model is
    used when the version records none (or is not in the index)."""
    physical = index.alias_target(name) or index.resolve(name)
    manifest = (VectorStore(job.output.uri, version_of(physical), job.output.storage_options).read_manifest()
                if physical else None)
    if manifest is None or not manifest.model_settings:
        return job.model
    built = ModelSettings(**manifest.model_settings)
    model = job.model.model_copy(update={k: getattr(built, k) for k in MODEL_IDENTITY})
    if model.storage_options is None and is_remote(model.name):  # a tuned model on the job's output store
        model = model.model_copy(update={"storage_options": job.output.storage_options.with_env_defaults()})
    if model != job.model:
        logger.info("%s serves %s, built with model %s: queries are encoded with it, not with the job's %s",
                    name, version_of(physical), built.name, job.model.name)
    return model


def list_versions(job: JobConfig, index: VectorIndex | None, live: str | None = None) -> list[VersionInfo]:
    """Every version with a committed vector set, newest first, with its point count and whether it is live.

    Without an index (a dashboard while a run holds the embedded one) the versions come from the manifests
    alone: no point counts, and ``live`` names the version the caller believes live (the run log's)."""
    fs, root = filesystem(job.output.uri, job.output.storage_options)
    pattern = re.compile(rf"^{re.escape(job.name)}-[0-9a-f]{{12}}$")
    if index is not None:
        live = live_version(index, job.name)
    versions = []
    measured: dict[str, tuple[str, float]] = {}  # version -> (when, score) a later gate measured it at as the live one
    for manifest_path in fs.glob(f"{root.rstrip('/')}/{job.name}-*/current.json"):
        collection = manifest_path.rstrip("/").split("/")[-2]
        if not pattern.match(collection):
            continue
        uri = full_uri(fs, manifest_path)
        manifest = Manifest.from_json(read_json(uri, job.output.storage_options), uri)
        if manifest is None:
            continue
        gate = manifest.gate
        if gate is not None and gate.live_score is not None:
            when = manifest.finished_at or ""
            if version_of(gate.live) not in measured or when > measured[version_of(gate.live)][0]:
                measured[version_of(gate.live)] = (when, gate.live_score)
        physical = index.resolve(collection) if index is not None else None
        versions.append(VersionInfo(
            collection=collection, physical=physical, model=manifest.model, dim=manifest.dim,
            live=collection == live, points=index.count(physical) if physical and index is not None else None,
            vector_rows=manifest.vector_rows, score=manifest.score, finished_at=manifest.finished_at,
            in_index=physical is not None, gate=manifest.gate_status,
        ))
    for version in versions:  # a first version is never gated itself; the gate that replaced it scored it
        if version.score is None and version.collection in measured:
            version.score = measured[version.collection][1]
    versions.sort(key=lambda v: v.finished_at or "", reverse=True)
    return versions


def job_status(job: JobConfig, index: VectorIndex) -> StatusInfo:
    """What the job has written (the live version's manifest) and indexed (the collection behind its alias),
    with the run log's last run and last success: `reembed status` and the dashboard show this."""
    from datetime import datetime, timezone

    from reembed.flows.operations.run_log import RunLog

    physical = index.alias_target(job.name)
    points = index.count(physical) if physical else 0
    collection = version_of(physical) if physical else None
    store = VectorStore(job.output.uri, collection, job.output.storage_options) if collection else None
    manifest = store.read_manifest() if store is not None else None
    last, success = RunLog(job.output.uri, job.name, job.output.storage_options).latest()
    return StatusInfo(
        alias=job.name, collection=collection, physical=physical, points=points,
        vector_rows=manifest.vector_rows if manifest else 0, dim=manifest and manifest.dim,
        model=manifest and manifest.model, shards=len(manifest.shards) if manifest else 0,
        input_rows=manifest and manifest.input_rows, quarantined=manifest and manifest.quarantined,
        finished_at=manifest and manifest.finished_at,
        output=store.root if store is not None else None,
        index=job.index.where,
        in_sync=collection is not None and manifest is not None and points == manifest.vector_rows,
        last_run_status=last.status if last else None,
        last_run_at=last.finished_at if last else None,
        last_success_at=success.finished_at if success else None,
        last_success_age_s=round((datetime.now(timezone.utc) - success.finished_at).total_seconds(), 1)
        if success else None,
    )


def retained(versions: list[VersionInfo], keep: int, previous: str | None = None) -> list[VersionInfo]:
    """The versions retention keeps, of ``versions`` (newest first): the newest ``keep`` that could serve (gate
    passed, forced or not applied), the live one, the one that served before the run that just moved the alias
    (``previous``: what an operator rolls back to after a bad backfill, even when it is older than ``keep``
    newer versions, as after a rollback), and the newest version of all when its gate failed (the latest
    backfill attempt, for an operator to look at or force). Gate-failed versions never count towards ``keep``,
    so blocked backfills cannot push the last good versions out."""
    kept = [v for v in versions if v.servable][:keep]
    kept += [v for v in versions if (v.live or v.collection == previous) and v not in kept]
    if versions and not versions[0].servable and versions[0] not in kept:
        kept.append(versions[0])
    return kept


def apply_retention(job: JobConfig, index: VectorIndex, keep: int, previous: str | None = None) -> list[str]:
    """Delete the collections and vector sets of the versions ``retained`` does not keep; never the live one,
    nor ``previous`` (the version live before this run moved the alias)."""
    versions = list_versions(job, index)
    kept = {v.collection for v in retained(versions, keep, previous)}
    retired = []
    for version in versions:
        if version.collection in kept or version.live:
            continue
        drop_version(index, version.collection)
        fs, root = filesystem(VectorStore(job.output.uri, version.collection).root, job.output.storage_options)
        fs.rm(root, recursive=True)
        retired.append(version.collection)
        logger.info("retention: deleted version %s (gate %s; keeping the newest %d that could serve)",
                    version.collection, version.gate, keep)
    return retired


def rollback_target(job: JobConfig, versions: list[VersionInfo], version: str | None,
                    force_reason: str | None = None) -> VersionInfo:
    """The version a rollback moves the alias to: ``version``, or the newest one older than the live one that
    Qdrant still holds and that did not fail its quality gate (a version only in Parquet needs ``reembed
    reindex`` first; a gate-failed one is reached only by naming it, with ``force_reason``)."""
    live = next((v for v in versions if v.live), None)
    if version is None:
        older = [v for v in versions if live is None or (v.finished_at or "") < (live.finished_at or "")]
        older = [v for v in older if v.in_index and not v.live]
        good = [v for v in older if v.servable]
        if not good:
            failed = ", ".join(v.collection for v in older)
            hint = (f" (older versions that failed their quality gate: {failed}; name one with --force REASON "
                    f"to serve it anyway)") if older else ""
            raise ConfigError(f"no earlier version of {job.name!r} to roll back to{hint}; `reembed versions` "
                              f"lists them")
        return good[0]
    target = next((v for v in versions if v.collection == version), None)
    if target is None:
        raise ConfigError(f"version {version!r} not found; `reembed versions` lists them")
    if not target.in_index:
        raise IndexError_(f"version {version!r} is not in Qdrant; run `reembed reindex JOB {version}` first")
    if not target.servable and not force_reason:
        raise GateRefused(f"version {version!r} failed its quality gate; roll back to it only with "
                          f"--force REASON (the reason is recorded in its manifest)")
    return target


def rollback(job: JobConfig, index: VectorIndex, version: str | None, force_reason: str | None = None) -> RollbackResult:
    """Point the alias at ``version``, or at the newest servable version older than the live one.

    Naming ``version`` also repairs a damaged Qdrant Edge alias file: it is set aside and a new one written
    with this alias (other aliases it held are pointed again by rolling their jobs back the same way)."""
    if version is not None:
        aside = index.set_aside_damaged_aliases()
        if aside:
            logger.warning("the alias file was damaged and is kept as %s; a new one starts with %s -> %s; point "
                           "every other job sharing index.path again with `reembed rollback JOB VERSION`", aside,
                           job.name, version)
    versions = list_versions(job, index)
    live = next((v.collection for v in versions if v.live), None)
    target = rollback_target(job, versions, version, force_reason)
    forced = None
    if not target.servable:
        forced = force_reason
        store = VectorStore(job.output.uri, target.collection, job.output.storage_options)
        manifest = store.read_manifest()
        if manifest is not None:  # recorded before the alias moves: the manifest says why a failed version serves
            store.write_manifest(manifest.model_copy(update={"forced": f"rollback: {force_reason}"}))
        logger.warning("rolling back to %s, which failed its quality gate: %s", target.collection, force_reason)
    index.point_alias(job.name, target.collection)
    logger.info("alias %s now points at %s (was %s)", job.name, target.collection, live)
    return RollbackResult(alias=job.name, collection=target.collection, previous=live, forced=forced)


def reindex(job: JobConfig, index: VectorIndex, version: str | None, activate: bool | None = None) -> ReindexResult:
    """Rebuild a version's collection from its Parquet vector set, beside the one serving it; encodes nothing.

    ``version`` defaults to the live version, else the newest committed one. The new generation is filled from
    every current part, made searchable, and checked: its point count against the manifest's vector rows and a
    sample of vectors read back against Parquet. Only then do the job's alias (when it served the version, when
    ``activate`` is true, or by default when no alias exists yet, as after losing Qdrant) and the version's
    name move to it, in one alias update, and the old generation goes. Any failure drops the new generation and
    raises ``ReindexFailed`` naming the part and the reason; the live collection is untouched.
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
    live_target = index.alias_target(job.name)
    current = live_target if live_target and version_of(live_target) == version else index.resolve(version)
    in_use = set(index.aliases().values()) | {current}
    for leftover in physicals(index, version):  # a rebuild that died before its swap
        if leftover not in in_use:
            logger.warning("dropping %s, left by a reindex that did not finish", leftover)
            index.drop(leftover)
    if current is None:
        index.remove_alias(version)  # a version alias left pointing at a collection that is gone
    new = physical_name(version, generation_of(current) + 1 if current else 1)
    parts = store.current_parts(manifest)
    written = _build(job, index, store, manifest, parts, version, new, current)
    moves = {}
    serving = current is not None and live_target == current  # the alias must follow: its collection goes
    if serving or activate or (activate is None and live_target is None):
        moves[job.name] = new
    version_is_alias = new != version and current != version
    if version_is_alias:
        moves[version] = new
    if moves:
        index.point_aliases(moves)  # one alias update: searches go from the old generation to the new one
    failpoint("reindex-swap")
    if current is not None and current != new:
        index.drop(current)
    if new != version and not version_is_alias:
        index.point_alias(version, new)  # the first build's name is free only now that it is dropped
    logger.info("rebuilt %s as %s from %d part(s): %d points%s", version, new, len(parts),
                written, f", alias {job.name} moved to it" if job.name in moves else "")
    return ReindexResult(collection=version, physical=new, previous=current, points=index.count(new),
                         upserted=written, live=live_version(index, job.name) == version,
                         source=join(job.output.uri, version))


def _build(job: JobConfig, index: VectorIndex, store: VectorStore, manifest: Manifest, parts: list[str],
           version: str, new: str, current: str | None) -> int:
    """Fill ``new`` from the version's parts and check it; on any failure drop it and raise ``ReindexFailed``."""
    where = "the live collection is untouched" if current else "nothing was changed"
    part = None
    try:
        index.ensure_collection(new, manifest.dim, job.corpus.payload)
        written = 0
        for part in parts:
            written += upsert_part(index, store, new, part)
        part = None
        index.finish_bulk_load(new)
        points = index.count(new)
        if points != manifest.vector_rows:
            raise ReindexFailed(f"{points} points rebuilt but the manifest lists {manifest.vector_rows} vector rows")
        _check_sample(index, store, new, parts, manifest.chunked)
        return written
    except BaseException as exc:
        try:
            index.drop(new)
        except Exception as drop_exc:  # the rebuild is not live either way; say what is left behind
            logger.warning("could not drop the failed rebuild %s: %s", new, drop_exc)
        if not isinstance(exc, Exception):
            raise
        reason = str(exc) if isinstance(exc, ReindexFailed) else f"{type(exc).__name__}: {exc}"
        at = f" at part {part}" if part else ""
        raise ReindexFailed(f"reindex of {version} failed{at}: {reason}; the rebuild {new} was dropped and "
                            f"{where}") from exc


def _check_sample(index: VectorIndex, store: VectorStore, collection: str, parts: list[str], chunked: bool) -> None:
    """Read back up to ``SAMPLE_POINTS`` points spread over the parts and compare them with Parquet (only the
    id and vector columns are read again: text and payload are not part of the check)."""
    per_part = max(1, SAMPLE_POINTS // max(1, len(parts)))
    columns = ["doc_id", "vector", *(["chunk_index"] if chunked else [])]
    for part in parts:
        table = store.read_part(part, columns)
        if table.num_rows == 0:
            continue
        rows = np.unique(np.linspace(0, table.num_rows - 1, min(per_part, table.num_rows)).astype(int)).tolist()
        sample = table.take(rows)
        chunks = sample.column("chunk_index").to_pylist() if "chunk_index" in sample.column_names else None
        ids = [point_id(d, chunks[i] if chunks else None) for i, d in enumerate(sample.column("doc_id").to_pylist())]
        got = {p.id: p for p in index.retrieve(collection, ids)}
        expected = arrow_to_vectors(sample.column("vector"))
        for i, pid in enumerate(ids):
            point = got.get(pid)
            if point is None or point.vector is None:
                raise ReindexFailed(f"point of row {rows[i]} of part {part} is missing after the rebuild")
            a, b = point.vector, expected[i]
            cosine = float(np.dot(a, b) / max(float(np.linalg.norm(a) * np.linalg.norm(b)), 1e-12))
            if cosine < 0.9999:
                raise ReindexFailed(f"vector of row {rows[i]} of part {part} reads back different from Parquet "
                                    f"(cosine {cosine:.6f})")
