"""The commit steps and the decisions around them, called directly: no Ray, no Prefect server.

Real Parquet parts on disk and a real Qdrant (local mode); the flow's task functions run through ``.fn``.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
from prefect.states import Failed
from pydantic import ValidationError

from reembed.flows.config import ConfigError, load_job
from reembed.flows.errors import retry_unless_job_level
from reembed.flows.planning import RunPlan
from reembed.flows.run_flow import (InvariantBroken, Reconciled, RunSession, invariant_task, reconcile_task,
                                    vector_set_task)
from reembed.flows.versions import rollback_target
from reembed.indexing.corpus import CorpusError, Shard
from reembed.indexing.index import IndexError_
from reembed.indexing.records import Manifest, ManifestPart, ShardMarker, VersionInfo, part_schema, point_id
from reembed.indexing.upload import upsert_part
from reembed.indexing.vector_store import VectorStore, text_sha256, vectors_to_arrow

DIM = 4


def _job(tmp_path, engine: str = "edge"):
    (tmp_path / "job.yaml").write_text(
        f"name: unit\ncorpus: {{uri: corpus.jsonl}}\noutput: {{uri: vectors}}\nindex: {{path: qdrant, engine: {engine}}}\n")
    return load_job(tmp_path / "job.yaml")


def _marker(store: VectorStore, shard_id: str, ids: list[str], seed: int, source: str) -> ShardMarker:
    """A shard's Parquet part with random unit vectors, and its indexed marker."""
    vectors = np.random.default_rng(seed).normal(size=(len(ids), DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    schema = part_schema(DIM, chunked=False)
    table = pa.table({"doc_id": ids, "vector": vectors_to_arrow(vectors), "text_sha256": [text_sha256(i) for i in ids],
                      "model": ["m"] * len(ids), "text": ids, "source_row": list(range(1, len(ids) + 1))}, schema=schema)
    uri = store.write_part(shard_id, table, {}, f"fp-{shard_id}")
    return ShardMarker(shard_id=shard_id, source=source, model="m", model_fingerprint="mf", dim=DIM, rows=len(ids),
                       vector_rows=len(ids), input_rows=len(ids), quarantined=0, part_uri=uri, stage="indexed",
                       points=len(ids))


def _plan(**kw) -> RunPlan:
    shards = [Shard("a", "a.jsonl", "jsonl"), Shard("b", "b.jsonl", "jsonl")]
    return RunPlan(collection="unit-000000000001", dim=DIM, model_fingerprint="mf", shards=shards,
                   input_fps={"a": "fp-a", "b": "fp-b"}, **kw)


@pytest.mark.parametrize("engine", ["edge", "local"])
def test_reconcile_keeps_the_first_shard_deletes_stale_and_checks_the_invariant(tmp_path, engine) -> None:
    job = _job(tmp_path, engine)
    plan = _plan()
    with RunSession(job, plan) as run:
        a = _marker(run.store, "a", ["d1", "d2", "d3"], 1, "a.jsonl")
        b = _marker(run.store, "b", ["d3", "d4"], 2, "b.jsonl")  # d3 again, with another vector
        run.index.ensure_collection(plan.collection, DIM)
        upsert_part(run.index, run.store, plan.collection, a.part_uri)
        upsert_part(run.index, run.store, plan.collection, b.part_uri)  # b finished last: its d3 overwrote a's
        run.index.upsert(plan.collection, [point_id("gone")], np.ones((1, DIM), np.float32), [{"doc_id": "gone"}])

        vector_set = vector_set_task.fn(run, [a, b])
        # No manifest and no earlier writes, but the count is one too many: the ids are compared in full.
        assert vector_set.stale == [point_id("gone")] and vector_set.full_scan
        assert vector_set.rewrite == {a.part_uri: [2]} and vector_set.size == 4  # a's d3 is re-upserted
        assert vector_set.duplicates == [{"file": "b.jsonl", "row": 1, "doc_id": "d3",
                                          "reason": "duplicate id 'd3' (kept the one in a.jsonl row 3)"}]
        reconciled = reconcile_task.fn(run, vector_set)
        assert reconciled.deleted == 1 and reconciled.points == 4 and reconciled.index_status == "green"
        (d3,) = run.index.retrieve(plan.collection, [point_id("d3")])
        first = run.store.read_part(a.part_uri).column("vector").to_pylist()[2]
        assert np.allclose(d3.vector, first)  # the first shard in plan order wins, whoever finished last
        quarantined = [json.loads(line) for line in open(reconciled.extra_quarantine, encoding="utf-8")]
        assert [q["doc_id"] for q in quarantined] == ["d3"]

        invariant_task.fn([a, b], vector_set, reconciled)  # 5 rows = 5 indexed + 0 quarantined; 4 points
        with pytest.raises(InvariantBroken, match="points=3 vector_rows=4"):
            invariant_task.fn([a, b], vector_set, Reconciled(deleted=1, points=3, index_status="green",
                                                             extra_quarantine=None))
        short = a.model_copy(update={"input_rows": 4})  # a row neither indexed nor quarantined
        with pytest.raises(InvariantBroken, match="input_rows=6 indexed=5 quarantined=0"):
            invariant_task.fn([short, b], vector_set, reconciled)


@pytest.mark.parametrize("engine", ["edge", "local"])
def test_refresh_finds_stale_points_from_the_replaced_parts_and_falls_back_to_a_full_compare(tmp_path,
                                                                                              engine) -> None:
    """A refresh of a committed collection reads only the parts it replaced to find deletes; a collection an
    earlier run left half-written (or one whose count does not add up) is compared id by id and healed."""
    job = _job(tmp_path, engine)
    with RunSession(job, _plan()) as run:  # commit a version: a = d1..d3, b = d4 d5
        a = _marker(run.store, "a", ["d1", "d2", "d3"], 1, "a.jsonl")
        b = _marker(run.store, "b", ["d4", "d5"], 2, "b.jsonl")
        run.index.ensure_collection(run.plan.collection, DIM)
        for m in (a, b):
            upsert_part(run.index, run.store, run.plan.collection, m.part_uri)
        manifest = Manifest(collection=run.plan.collection, alias="unit", dim=DIM, vector_rows=5, finished_at="t1",
                            parts=[ManifestPart(shard_id=m.shard_id, part_uri=m.part_uri, source=m.source)
                                   for m in (a, b)])
        run.store.write_manifest(manifest)
        b2 = _marker(run.store, "b2", ["d4", "d6"], 3, "b.jsonl")  # b's file changed: d5 went, d6 came
    refresh = _plan(manifest=manifest, live="unit-000000000001", indexed={"a": a})

    with RunSession(job, refresh) as run:
        assert run.clean_since == "t1"
        upsert_part(run.index, run.store, run.plan.collection, b2.part_uri)  # this run's upsert
        vector_set = vector_set_task.fn(run, [a, b2])
        assert vector_set.stale == [point_id("d5")] and not vector_set.full_scan and vector_set.size == 5
        run.index.upsert(run.plan.collection, [point_id("ghost")], np.ones((1, DIM), np.float32), [{"doc_id": "x"}])
        vector_set = vector_set_task.fn(run, [a, b2])  # one point more than the parts explain
        assert sorted(vector_set.stale) == sorted([point_id("d5"), point_id("ghost")]) and vector_set.full_scan

    with RunSession(job, refresh) as run:  # a run that wrote to the collection and died: nothing is assumed
        run.mark_writing()
        run.index.delete_points(run.plan.collection, [point_id("d1")])
    with RunSession(job, refresh) as run:
        assert run.dirty and run.clean_since is None
        vector_set = vector_set_task.fn(run, [a, b2])
        assert vector_set.full_scan and vector_set.rewrite == {a.part_uri: [0]}  # d1 is missing: re-upserted
        reconciled = reconcile_task.fn(run, vector_set)
        assert reconciled.points == 5 and reconciled.deleted == 2
        assert {p.payload["doc_id"] for p in run.index.scroll(run.plan.collection, ["doc_id"])} == \
            {"d1", "d2", "d3", "d4", "d6"}


def test_classify_runs_against_markers_and_the_manifest(tmp_path) -> None:
    store = VectorStore(str(tmp_path), "unit-000000000001")
    a = _marker(store, "a", ["d1"], 1, "a.jsonl")
    b = _marker(store, "b", ["d2"], 2, "b.jsonl")
    manifest = Manifest(collection="unit-000000000001", alias="unit", dim=DIM, vector_rows=2,
                        parts=[ManifestPart(shard_id=m.shard_id, part_uri=m.part_uri, source=m.source) for m in (a, b)])
    assert _plan().mode == "new-version"
    assert _plan(live="unit-000000000000").mode == "new-version"  # a backfill beside the live version
    assert _plan(indexed={"a": a}).mode == "resume"  # a shard done that no manifest names yet
    assert _plan(written={"a": a.model_copy(update={"stage": "written"})}).mode == "resume"
    done = {"a": a, "b": b}
    assert _plan(indexed=done, manifest=manifest, live="unit-000000000001").mode == "up-to-date"
    assert _plan(indexed=done, manifest=manifest, live="unit-000000000000").mode == "new-version"
    assert _plan(indexed={"a": a}, manifest=manifest, live="unit-000000000001").mode == "refresh"  # b changed
    assert _plan(indexed=done, manifest=manifest, live="unit-000000000001", trial=True).mode == "trial"
    moved = b.model_copy(update={"part_uri": store.part_uri("b", "fp-new")})  # b re-embedded, not yet committed
    assert _plan(indexed={"a": a, "b": moved}, manifest=manifest, live="unit-000000000001").mode == "resume"


def _version(name: str, finished: str, live: bool = False, in_index: bool = True) -> VersionInfo:
    return VersionInfo(collection=name, model="m", dim=DIM, live=live, points=1, vector_rows=1, score=None,
                       finished_at=finished, in_index=in_index)


def test_rollback_picks_the_newest_older_version_still_in_qdrant(tmp_path) -> None:
    job = _job(tmp_path)
    versions = [_version("unit-4", "2026-04"), _version("unit-3", "2026-03", live=True),
                _version("unit-2", "2026-02", in_index=False), _version("unit-1", "2026-01")]
    assert rollback_target(job, versions, None).collection == "unit-1"  # unit-2 is only in Parquet
    assert rollback_target(job, versions, "unit-4").collection == "unit-4"  # a named newer one is fine
    with pytest.raises(IndexError_, match="reembed reindex JOB unit-2"):
        rollback_target(job, versions, "unit-2")
    with pytest.raises(ConfigError, match="not found"):
        rollback_target(job, versions, "unit-9")
    with pytest.raises(ConfigError, match="no earlier version"):
        rollback_target(job, versions[:2], None)


def test_job_level_errors_are_not_retried() -> None:
    assert not retry_unless_job_level(None, None, Failed(data=CorpusError("column 'id' not found")))
    assert not retry_unless_job_level(None, None, Failed(data=ConfigError("bad key")))
    assert not retry_unless_job_level(None, None, Failed(data=IndexError_("dimension mismatch")))
    assert retry_unless_job_level(None, None, Failed(data=ConnectionError("reset by peer")))
    assert retry_unless_job_level(None, None, Failed(data=TimeoutError()))


def test_stored_records_read_back_tolerantly(tmp_path) -> None:
    store = VectorStore(str(tmp_path), "unit-000000000001")
    marker = _marker(store, "a", ["d1"], 1, "a.jsonl")
    store.write_marker(marker)
    assert store.read_marker("a") == marker
    raw = json.loads(open(store.marker_uri("a")).read())
    assert raw["part_uri"] == "vectors/part-a-fp-a.parquet"  # stored relative to the version's folder
    stored = marker.model_copy(update={"part_uri": raw["part_uri"]})
    assert ShardMarker.from_json({**raw, "written_by": "a newer reembed"}) == stored  # unknown keys: ignored
    assert ShardMarker.from_json({**raw, "stage": "half-done"}) is None  # damaged: redo the shard, do not crash
    assert ShardMarker.from_json(None) is None
    with pytest.raises(ValidationError, match="typo_field"):  # built in code, a wrong key fails where it is made
        ShardMarker(**raw, typo_field=1)


def test_stored_records_are_replaced_whole_even_by_writers_at_once(tmp_path) -> None:
    """Manifests and markers on a local disk go through one temporary file per writer, fsynced, then renamed:
    writers at once never tear or empty the file, and leave no temporary files behind."""
    import threading

    from reembed.indexing.storage import read_json, write_json

    target = str(tmp_path / "current.json")
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        try:
            for i in range(40):
                write_json(target, {"writer": n, "i": i, "pad": "x" * 4096})
        except BaseException as exc:  # any failure is what this test looks for
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    final = read_json(target)
    assert final["i"] == 39 and final["pad"] == "x" * 4096
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current.json"]


def test_the_per_shard_table_says_what_this_run_did_to_every_shard() -> None:
    """Plan order; an earlier run's work is not counted as this run's; a failed upsert marks its shard failed;
    a shard that never produced a result is still listed, as failed."""
    from reembed.flows.operations.artifacts import shard_table
    from reembed.flows.run_flow import Embedded, shard_rows
    from reembed.indexing.records import ShardFailure

    def result(shard_id: str, **kw) -> ShardMarker:
        return ShardMarker(shard_id=shard_id, source=f"{shard_id}.jsonl", model="m", model_fingerprint="mf", dim=DIM,
                           rows=9, vector_rows=9, input_rows=10, quarantined=1, encoded=6, reused=3, seconds=1.23456,
                           host="h", pid=7, part_uri=f"{shard_id}.parquet", stage="indexed", **kw)

    shards = [Shard(s, f"{s}.jsonl", "jsonl", rows_hint=10) for s in "abcde"]
    plan = RunPlan(collection="unit-000000000001", dim=DIM, model_fingerprint="mf", shards=shards,
                   input_fps={s.shard_id: "fp" for s in shards}, indexed={"a": result("a")},
                   written={"b": result("b", points=None).model_copy(update={"stage": "written"})})
    embedded = Embedded(fresh=[result("c"), result("d")],
                        failures=[ShardFailure(shard="upsert d", error="boom"), ShardFailure(shard="e", error="oom")])
    rows = shard_table(shard_rows(plan, embedded))
    assert [(r["shard"], r["outcome"], r["encoded"], r["reused"], r["seconds"], r["actor"], r["error"])
            for r in rows] == [("a", "skipped", 0, 0, 0.0, None, None), ("b", "upserted", 0, 0, 0.0, None, None),
                               ("c", "embedded", 6, 3, 1.235, "h:7", None), ("d", "failed", 6, 3, 1.235, "h:7", "boom"),
                               ("e", "failed", 0, 0, 0.0, None, "oom")]
    assert [r["rows"] for r in rows] == [10] * 5 and [r["quarantined"] for r in rows] == [1, 1, 1, 1, None]


def test_the_summary_table_carries_the_guards_and_the_gate() -> None:
    from datetime import datetime, timezone

    from reembed.flows.operations.artifacts import gate_table, summary_rows
    from reembed.flows.operations.run_log import RunRecord
    from reembed.indexing.records import GateResult, GuardCheck, GuardReport, RunSummary

    gate = GateResult(metric="ndcg@10", new="v2", live="v1", new_score=0.5, live_score=0.61, tolerance=0.02,
                      passed=False)
    guards = GuardReport(checks=[GuardCheck(name="max_deleted_fraction", value=0.5, limit=0.2, detail="20 of 40 "
                                            "live points would be removed (50.0%) > guards.max_deleted_fraction "
                                            "20.0%", passed=False),
                                 GuardCheck(name="not_empty", value=40.0, limit=1.0, detail="-", passed=True)])
    summary = RunSummary(alias="j", collection="v2", mode="new-version", status="blocked", model="m", dim=DIM,
                         input_rows=40, indexed=40, seconds=1.0, shards_total=2, output="o", index="edge:q",
                         guards=guards, gate=gate)
    now = datetime.now(timezone.utc)
    record = RunRecord(run_id="r", job="j", trigger="cli", status="blocked", started_at=now, finished_at=now,
                       seconds=1.0, host="h")
    rows = summary_rows(record, summary)
    assert {"metric": "status", "value": "blocked"} in rows
    assert {"metric": "guard max_deleted_fraction", "value": "failed: 20 of 40 live points would be removed "
            "(50.0%) > guards.max_deleted_fraction 20.0%"} in rows
    assert {"metric": "guard not_empty", "value": "passed: 40 (limit 1)"} in rows
    assert rows[-1] == {"metric": "gate", "value": "failed: ndcg@10 0.5000 vs live 0.6100"}
    assert not any(r["metric"] in ("guards", "gate_result", "shards") for r in rows)
    assert [(r["version"], r["collection"], r["score"], r["passed"]) for r in gate_table(gate)] == [
        ("candidate", "v2", 0.5, False), ("live", "v1", 0.61, False)]


def test_a_store_that_stayed_away_is_named_in_one_line() -> None:
    """An upsert talks to two stores: the line says which one did not answer (from the exception's chain)."""
    import httpx

    from reembed.flows.run_flow import _store_gone

    try:
        try:
            raise ConnectionRefusedError(111, "Connection refused")
        except ConnectionRefusedError as refused:
            raise httpx.ConnectError("All connection attempts failed") from refused
    except httpx.ConnectError as exc:
        qdrant = str(_store_gone(exc, "the upsert of shard s1", None))
    assert qdrant.startswith("the Qdrant server did not answer: the upsert of shard s1 failed after its retries")

    class EndpointConnectionError(Exception):  # botocore's name
        pass

    s3 = str(_store_gone(EndpointConnectionError('Could not connect to "http://127.0.0.1:9/b"'), "shard s2", None))
    assert s3.startswith("the object store did not answer: shard s2") and "Re-run the job once the store is back" in s3
