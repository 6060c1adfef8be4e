"""Operator commands never damage the live version: reindex builds beside and swaps, rollback and retention
respect the quality gate. Real Parquet parts, real engines (Qdrant Edge and local mode), no Ray or Prefect.

A version's store is written here by hand (parts + manifest, as a run commits them) and indexed the way a run
indexes it; then the command runs on it.
"""

from __future__ import annotations

import threading
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pytest

from conftest import no_encoding
from reembed.flows.config import load_job
from reembed.flows.versions import (GateRefused, ReindexFailed, apply_retention, list_versions, physicals,
                                    query_model, reindex, rollback)
from reembed.indexing.index import IndexSettings, open_index
from reembed.indexing.records import GateResult, Manifest, ManifestPart, part_schema, point_id
from reembed.indexing.upload import upsert_part
from reembed.indexing.vector_store import VectorStore, text_sha256, vectors_to_arrow

DIM = 8
VERSION = "unit-0123456789ab"


def _job(tmp_path, engine: str):
    (tmp_path / "job.yaml").write_text(
        f"name: unit\ncorpus: {{uri: corpus.jsonl}}\noutput: {{uri: vectors}}\nindex: {{path: qdrant, engine: {engine}}}\n")
    return load_job(tmp_path / "job.yaml")


def _commit(job, version: str = VERSION, parts: int = 2, rows: int = 20, seed: int = 0, gate: bool | None = None,
            finished_at: str | None = None, live: bool = True, gated_against: str = "x",
            model_settings: dict | None = None) -> tuple[VectorStore, np.ndarray]:
    """A committed vector set of ``parts`` parts of ``rows`` rows, indexed (and live, unless a blocked backfill
    or ``live=False``), as a run leaves it; ``gate`` is its quality gate's verdict (None: no gate)."""
    store = VectorStore(job.output.uri, version, job.output.storage_options)
    rng = np.random.default_rng(seed)
    all_vectors, manifest_parts = [], []
    for p in range(parts):
        ids = [f"d{p}-{i}" for i in range(rows)]
        vectors = rng.normal(size=(rows, DIM)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        all_vectors.append(vectors)
        table = pa.table({"doc_id": ids, "vector": vectors_to_arrow(vectors),
                          "text_sha256": [text_sha256(i) for i in ids], "model": ["m"] * rows, "text": ids,
                          "source_row": list(range(1, rows + 1))}, schema=part_schema(DIM, chunked=False))
        uri = store.write_part(f"s{p}", table, {}, f"fp{p}")
        manifest_parts.append(ManifestPart(shard_id=f"s{p}", part_uri=uri, source=f"f{p}.jsonl"))
    verdict = None if gate is None else GateResult(metric="ndcg@10", new=version, live=gated_against, new_score=0.5,
                                                   live_score=0.6, tolerance=0.01 if gate else 0.0, passed=gate)
    store.write_manifest(Manifest(collection=version, alias=job.name, model="m", dim=DIM, parts=manifest_parts,
                                  shards=[p.shard_id for p in manifest_parts], vector_rows=parts * rows,
                                  input_rows=parts * rows, gate=verdict, model_settings=model_settings,
                                  score=verdict.new_score if verdict else None,
                                  finished_at=finished_at or datetime.now(timezone.utc).isoformat()))
    with open_index(job.index) as index:
        index.ensure_collection(version, DIM)
        for part in manifest_parts:
            upsert_part(index, store, version, part.part_uri)
        index.finish_bulk_load(version)
        if live and gate is not False:
            index.point_alias(job.name, version)
    return store, np.concatenate(all_vectors)


def _top(index, vectors: np.ndarray, k: int = 5) -> list[list[str]]:
    return [[h["doc_id"] for h in index.search("unit", v, k)] for v in vectors]


@pytest.mark.parametrize("engine", ["edge", "local"])
def test_reindex_over_a_corrupt_part_leaves_the_live_collection_untouched(tmp_path, engine) -> None:
    job = _job(tmp_path, engine)
    store, vectors = _commit(job)
    with open_index(job.index) as index:
        before = _top(index, vectors[::7])
    second = store.current_parts()[1]
    with open(second, "wb") as fh:
        fh.write(b"garbage\n")
    with open_index(job.index) as index:
        with pytest.raises(ReindexFailed) as caught:
            reindex(job, index, None)
        message = str(caught.value)
        assert f"at part {second}" in message and "the live collection is untouched" in message
        assert f"{VERSION}-r2 was dropped" in message
        assert index.alias_target("unit") == VERSION and index.count("unit") == 40
        assert physicals(index, VERSION) == [VERSION]  # the half-built rebuild is gone
        assert _top(index, vectors[::7]) == before


@pytest.mark.parametrize("engine", ["edge", "local"])
def test_reindex_swaps_while_searches_go_on(tmp_path, engine) -> None:
    job = _job(tmp_path, engine)
    _, vectors = _commit(job)
    k = 10
    counts: list[int] = []
    errors: list[BaseException] = []
    stop = threading.Event()
    searched = threading.Event()

    def reader() -> None:
        with open_index(job.index) as index:
            while not stop.is_set():
                try:
                    counts.append(len(index.search("unit", vectors[len(counts) % len(vectors)], k)))
                except BaseException as exc:  # any failure is what this test looks for
                    errors.append(exc)
                searched.set()

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        assert searched.wait(60)
        with open_index(job.index) as index, no_encoding():
            first = reindex(job, index, None)
            second = reindex(job, index, None)
        counted = len(counts)
        assert searched.wait(60)
        while len(counts) < counted + 3 and not errors:  # searches after both swaps as well
            searched.clear()
            assert searched.wait(60)
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not errors, errors[:3]
    assert counts and set(counts) == {k}
    assert (first.physical, first.previous) == (f"{VERSION}-r2", VERSION)
    assert (second.physical, second.previous) == (f"{VERSION}-r3", f"{VERSION}-r2")
    assert first.live and second.live and second.points == second.upserted == 40
    with open_index(job.index) as index:
        assert physicals(index, VERSION) == [f"{VERSION}-r3"]  # each old generation went after its swap
        assert index.alias_target("unit") == f"{VERSION}-r3" and index.count("unit") == 40
        assert index.resolve(VERSION) == f"{VERSION}-r3" and index.count(VERSION) == 40  # the version's name follows
        (info,) = list_versions(job, index)
        assert info.live and info.physical == f"{VERSION}-r3" and info.points == 40


@pytest.mark.parametrize("engine", ["edge", "local"])
def test_reindex_of_an_older_version_moves_no_alias_and_rollback_reaches_it(tmp_path, engine) -> None:
    job = _job(tmp_path, engine)
    old = "unit-00000000000a"
    _commit(job, old, seed=1)
    _commit(job, VERSION, seed=2)  # newer and live
    with open_index(job.index) as index:
        result = reindex(job, index, old)
        assert result.physical == f"{old}-r2" and not result.live
        assert index.alias_target("unit") == VERSION
        assert rollback(job, index, None).collection == old
        assert index.alias_target("unit") == f"{old}-r2"  # the alias names the physical collection
        assert [v.collection for v in list_versions(job, index) if v.live] == [old]


@pytest.mark.parametrize("engine", ["edge", "local"])
def test_reindex_drops_what_an_interrupted_rebuild_left(tmp_path, engine) -> None:
    job = _job(tmp_path, engine)
    _commit(job)
    with open_index(job.index) as index:
        index.ensure_collection(f"{VERSION}-r2", DIM)  # a rebuild killed before its swap
        index.upsert(f"{VERSION}-r2", [point_id("half")], np.ones((1, DIM), np.float32), [{"doc_id": "half"}])
        result = reindex(job, index, None)
        assert result.physical == f"{VERSION}-r2" and index.count("unit") == 40
        assert physicals(index, VERSION) == [f"{VERSION}-r2"]


@pytest.mark.parametrize("engine", ["edge", "local"])
def test_aliases_resolve_move_together_and_go_with_their_collection(tmp_path, engine) -> None:
    settings = IndexSettings(engine=engine, path=str(tmp_path / "index"))
    with open_index(settings) as index:
        index.ensure_collection("v", DIM)
        index.ensure_collection("v-r2", DIM)
        assert index.collections() == ["v", "v-r2"] and index.resolve("v") == "v" and index.resolve("x") is None
        index.point_aliases({"docs": "v", "w": "v-r2"})
        assert index.aliases() == {"docs": "v", "w": "v-r2"}
        index.point_aliases({"docs": "w"})  # an alias's target resolves to the physical collection
        assert index.alias_target("docs") == "v-r2" and index.resolve("w") == "v-r2" and index.exists("w")
        index.upsert("w", [point_id("a")], np.ones((1, DIM), np.float32), [{"doc_id": "a"}])
        assert index.count("v-r2") == 1 and index.dim("w") == DIM
        index.remove_alias("w")
        assert not index.exists("w") and index.aliases() == {"docs": "v-r2"}
        index.drop("v-r2")
        assert index.collections() == ["v"] and index.aliases() == {}  # aliases go with their collection
        with pytest.raises(Exception, match="missing collection"):
            index.point_aliases({"docs": "nothing"})


def _name(i: int) -> str:
    return f"unit-{i:012x}"


@pytest.mark.parametrize("engine", ["edge", "local"])
def test_rollback_skips_a_gate_failed_version_and_needs_force_to_name_it(tmp_path, engine) -> None:
    job = _job(tmp_path, engine)
    _commit(job, _name(1), finished_at="2026-01-01T00:00:00+00:00")  # good, ungated
    _commit(job, _name(2), gate=False, finished_at="2026-01-02T00:00:00+00:00")  # a blocked backfill
    _commit(job, _name(3), gate=True, finished_at="2026-01-03T00:00:00+00:00")  # passed, live
    with open_index(job.index) as index:
        assert [(v.collection, v.gate, v.live) for v in list_versions(job, index)] == [
            (_name(3), "passed", True), (_name(2), "failed", False), (_name(1), "none", False)]
        result = rollback(job, index, None)
        assert (result.collection, result.previous, result.forced) == (_name(1), _name(3), None)
        with pytest.raises(GateRefused, match="failed its quality gate; roll back to it only with --force"):
            rollback(job, index, _name(2))
        assert index.alias_target("unit") == _name(1)
        result = rollback(job, index, _name(2), force_reason="gate set too tight")
        assert result.forced == "gate set too tight" and index.alias_target("unit") == _name(2)
        forced = {v.collection: v.gate for v in list_versions(job, index)}[_name(2)]
        assert forced == "forced"  # recorded in its manifest: it now serves by an operator's decision
    assert "rollback: gate set too tight" in (tmp_path / "vectors" / _name(2) / "current.json").read_text()


@pytest.mark.parametrize("engine", ["edge", "local"])
def test_retention_does_not_count_blocked_backfills(tmp_path, engine) -> None:
    job = _job(tmp_path, engine)
    _commit(job, _name(1), gate=True, finished_at="2026-01-01T00:00:00+00:00")
    _commit(job, _name(2), gate=True, finished_at="2026-01-02T00:00:00+00:00")  # live
    for i in (3, 4, 5):  # three blocked backfills, newer than the live version
        _commit(job, _name(i), gate=False, finished_at=f"2026-01-0{i}T00:00:00+00:00")
    with open_index(job.index) as index:
        assert index.alias_target("unit") == _name(2)
        retired = apply_retention(job, index, keep=2)
        assert sorted(retired) == [_name(3), _name(4)]  # the latest attempt stays for an operator to look at
        left = [(v.collection, v.gate) for v in list_versions(job, index)]
        assert left == [(_name(5), "failed"), (_name(2), "passed"), (_name(1), "passed")]
        assert all(not index.exists(_name(i)) for i in (3, 4)) and index.count(_name(1)) == 40
    assert not (tmp_path / "vectors" / _name(3)).exists() and (tmp_path / "vectors" / _name(1) / "current.json").exists()


@pytest.mark.parametrize("engine", ["edge", "local"])
def test_retention_keeps_the_version_that_served_before_the_run(tmp_path, engine) -> None:
    """After a rollback to the oldest version, the next backfill must not delete it: it is what served until
    that run moved the alias, and the first thing an operator rolls back to if the new one disappoints."""
    job = _job(tmp_path, engine)
    for i in (1, 2, 3):
        _commit(job, _name(i), gate=True, finished_at=f"2026-01-0{i}T00:00:00+00:00")
    with open_index(job.index) as index:
        rollback(job, index, _name(1))
    _commit(job, _name(4), gate=True, finished_at="2026-01-04T00:00:00+00:00")  # the next backfill goes live
    with open_index(job.index) as index:
        assert index.alias_target("unit") == _name(4)
        retired = apply_retention(job, index, keep=2, previous=_name(1))
        assert retired == [_name(2)]  # neither among the newest 2 that could serve nor the one that served before
        assert [v.collection for v in list_versions(job, index)] == [_name(4), _name(3), _name(1)]
        assert apply_retention(job, index, keep=2) == [_name(1)]  # a later run, with another version before it


def _moved_job(tmp_path, engine: str, output: str, index: str):
    return load_job(tmp_path / "job.yaml", [f"output.uri={output}", f"index.path={index}", f"index.engine={engine}"])


@pytest.mark.parametrize("engine", ["edge", "local"])
def test_a_moved_store_keeps_its_parts_and_the_clean_up_keeps_what_the_manifest_names(tmp_path, engine) -> None:
    import shutil

    job = _job(tmp_path, engine)
    store, vectors = _commit(job)
    stored = (tmp_path / "vectors" / VERSION / "current.json").read_text()
    assert str(tmp_path) not in stored and '"vectors/part-s0-fp0.parquet"' in stored  # names relative to the version
    shutil.move(tmp_path / "vectors", tmp_path / "elsewhere")
    shutil.move(tmp_path / "qdrant", tmp_path / "index-elsewhere")
    moved = _moved_job(tmp_path, engine, f"file://{tmp_path / 'elsewhere'}/", str(tmp_path / "index-elsewhere"))
    here = VectorStore(moved.output.uri, VERSION, moved.output.storage_options)
    manifest = here.read_manifest()
    assert [p.part_uri for p in manifest.parts] == [here.part_uri(f"s{i}", f"fp{i}") for i in (0, 1)]
    stray = tmp_path / "elsewhere" / VERSION / "vectors" / "part-s9-old.parquet"
    stray.write_bytes(b"an older input's part")
    assert not manifest.parts[0].part_uri.startswith("file://")
    respelled = manifest.model_copy(update={"parts": [  # the same files, the root spelled another way
        p.model_copy(update={"part_uri": f"file://{p.part_uri}"}) for p in manifest.parts]})
    assert here.remove_unreferenced(respelled) == 1 and not stray.exists()
    assert sorted(f.name for f in (tmp_path / "elsewhere" / VERSION / "vectors").iterdir()) == [
        "part-s0-fp0.parquet", "part-s1-fp1.parquet"]
    with open_index(moved.index) as index:
        assert index.count("unit") == 40
        result = reindex(moved, index, None)  # every part read from the new place
        assert result.points == 40 and result.source == f"{tmp_path / 'elsewhere'}/{VERSION}"


def test_an_old_manifest_with_absolute_uris_still_loads_after_a_move(tmp_path, caplog) -> None:
    import json
    import shutil

    job = _job(tmp_path, "edge")
    store, _ = _commit(job)
    old = tmp_path / "vectors" / VERSION / "current.json"
    raw = json.loads(old.read_text())
    for part in raw["parts"]:  # as reembed wrote manifests before they named parts relatively
        part["part_uri"] = str(tmp_path / "vectors" / VERSION / part["part_uri"])
    old.write_text(json.dumps(raw))
    assert VectorStore(job.output.uri, VERSION).read_manifest().parts[0].part_uri == str(
        tmp_path / "vectors" / VERSION / "vectors" / "part-s0-fp0.parquet")  # unmoved: used where it is
    shutil.move(tmp_path / "vectors", tmp_path / "moved")
    here = VectorStore(str(tmp_path / "moved"), VERSION)
    with caplog.at_level("WARNING"):
        parts = here.current_parts()
    assert parts == [str(tmp_path / "moved" / VERSION / "vectors" / f"part-s{i}-fp{i}.parquet") for i in (0, 1)]
    assert "the store was moved or copied" in caplog.text and str(tmp_path / "vectors") in caplog.text
    assert here.read_all(["doc_id"]).num_rows == 40
    assert here.remove_unreferenced(here.read_manifest()) == 0


def test_a_missing_part_says_what_is_missing_and_why_it_may_be(tmp_path) -> None:
    job = _job(tmp_path, "edge")
    store, _ = _commit(job)
    part = store.current_parts()[0]
    (tmp_path / "vectors" / VERSION / "vectors" / "part-s0-fp0.parquet").unlink()
    with pytest.raises(FileNotFoundError, match=f"Parquet part {part} of version {VERSION} is missing.*moved or copied"):
        store.read_part(part)


def test_a_damaged_alias_file_says_how_to_repair_it_and_rollback_repairs_it(tmp_path) -> None:
    """A torn aliases.json is a clear error naming the file, the collections and the repair; `rollback
    VERSION` sets it aside, writes a new one and the job serves again."""
    from reembed.indexing.index import AliasFileDamaged

    job = _job(tmp_path, "edge")
    _commit(job, _name(1), finished_at="2026-01-01T00:00:00+00:00")
    _commit(job, _name(2), finished_at="2026-01-02T00:00:00+00:00")
    aliases = tmp_path / "qdrant" / "aliases.json"
    aliases.write_text('{"unit": "unit-0000')  # torn mid-write, as by a disk that lied about a flush
    with open_index(job.index) as index:
        with pytest.raises(AliasFileDamaged) as damaged:
            list_versions(job, index)
        message = str(damaged.value)
        assert str(aliases) in message and "reembed rollback JOB VERSION" in message
        assert _name(1) in message and _name(2) in message  # the versions it can be pointed at
        with pytest.raises(AliasFileDamaged):
            rollback(job, index, None)  # the default target needs the live version: name one
        result = rollback(job, index, _name(2))
        assert result.collection == _name(2) and index.alias_target("unit") == _name(2)
        assert [(v.collection, v.live) for v in list_versions(job, index)] == [(_name(2), True), (_name(1), False)]
    (aside,) = (tmp_path / "qdrant").glob("aliases.json.damaged-*")
    assert aside.read_text() == '{"unit": "unit-0000'


@pytest.mark.parametrize("engine", ["edge", "local"])
def test_a_first_version_shows_the_score_the_gate_that_replaced_it_measured(tmp_path, engine) -> None:
    """A first version is never gated itself (nothing live to compare with); the backfill gated against it
    scored it as the live one, and `reembed versions` shows that score beside the candidate's own."""
    job = _job(tmp_path, engine)
    _commit(job, finished_at="2026-12-01T00:00:00+00:00")
    _commit(job, version="unit-bbbbbbbbbbbb", seed=1, gate=True, gated_against=VERSION,
            finished_at="2026-12-02T00:00:00+00:00")
    with open_index(job.index) as index:
        versions = {v.collection: v for v in list_versions(job, index)}
    assert versions["unit-bbbbbbbbbbbb"].score == 0.5 and versions["unit-bbbbbbbbbbbb"].live
    assert versions[VERSION].score == 0.6 and not versions[VERSION].live


def test_queries_are_encoded_with_the_model_of_the_version_searched(tmp_path) -> None:
    """After a tuned backfill (or a rollback) the job file's model is not the one that built the live vectors:
    search and eval take the served version's model from its manifest, and keep how this machine runs it."""
    job = _job(tmp_path, "edge")
    job.model.device = "cpu"
    tuned = {**job.model.model_dump(mode="json"), "name": str(tmp_path / "tuned" / "model"), "device": "auto",
             "query_prompt": "query: "}
    _commit(job, finished_at="2026-12-01T00:00:00+00:00")  # records no model: the job's is all there is
    _commit(job, version="unit-bbbbbbbbbbbb", seed=1, model_settings=tuned, finished_at="2026-12-02T00:00:00+00:00")
    with open_index(job.index) as index:
        live = query_model(job, index, "unit")
        assert live.name == tuned["name"] and live.query_prompt == "query: " and live.device == "cpu"
        assert query_model(job, index, VERSION) == job.model  # a version searched by name: its own (none recorded)
        assert query_model(job, index, "unit-bbbbbbbbbbbb") == live
