"""A re-run of an unchanged corpus reads what the commit protocol needs (the input listing, shard markers, the
manifest, the alias, the writing marker) and nothing that grows with the corpus: no index shard loaded, no
Parquet part read, no corpus file scanned. And it never calls a job up to date whose live collection is gone.

The committed version is written here by hand, as a run leaves it (parts, indexed markers, manifest, the
collection, the alias), against the real plan of a real corpus and a tiny model; the commands run in-process
(``reembed run`` answers a no-op without Prefect or Ray, so no flow is needed to check it).
"""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import cli_in_process, last_json, no_encoding
from reembed.flows.config import load_job
from reembed.flows.planning import plan_run
from reembed.indexing import corpus, edge_index
from reembed.indexing.corpus import read_shard
from reembed.indexing.edge_index import EdgeIndex
from reembed.indexing.index import open_index
from reembed.indexing.qdrant_index import QdrantIndex
from reembed.indexing.records import Manifest, ManifestPart, ShardMarker, part_schema
from reembed.indexing.shard_memo import StoredShardMemo
from reembed.indexing.upload import upsert_part
from reembed.indexing.vector_store import VectorStore, text_sha256, vectors_to_arrow

DOCS = 60


@pytest.fixture(scope="module")
def model(tiny_bert) -> str:
    return str(tiny_bert)


def _write_corpus(path, docs: int = DOCS, extra: str = "") -> None:
    with path.open("w", encoding="utf-8") as fh:
        for i in range(docs):
            fh.write(json.dumps({"id": f"d{i}", "text": f"document {i} about bread and tides{extra}"}) + "\n")


def _job(tmp_path, model: str, engine: str):
    _write_corpus(tmp_path / "corpus.jsonl")
    (tmp_path / "job.yaml").write_text(
        f"name: noop\ncorpus: {{uri: corpus.jsonl}}\nmodel: {{name: '{model}'}}\noutput: {{uri: vectors}}\n"
        f"index: {{path: qdrant, engine: {engine}}}\nruntime: {{shard_rows: 20, num_actors: 1}}\n")
    return tmp_path / "job.yaml", load_job(tmp_path / "job.yaml")


def _commit(job) -> tuple[str, int]:
    """The version a clean run of ``job`` leaves: a part and an indexed marker per planned shard, the manifest,
    the collection filled from the parts and the alias on it."""
    plan = plan_run(job)
    store = VectorStore(job.output.uri, plan.collection, job.output.storage_options)
    rng = np.random.default_rng(0)
    parts = []
    for shard in plan.shards:
        rows = read_shard(shard, job.corpus)
        vectors = rng.normal(size=(len(rows.ids), plan.dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        table = pa.table({"doc_id": rows.ids, "vector": vectors_to_arrow(vectors),
                          "text_sha256": [text_sha256(t) for t in rows.texts], "model": ["m"] * len(rows.ids),
                          "text": rows.texts, "source_row": rows.rows}, schema=part_schema(plan.dim, chunked=False))
        fp = plan.input_fps[shard.shard_id]
        uri = store.write_part(shard.shard_id, table, {}, fp)
        store.write_marker(ShardMarker(
            shard_id=shard.shard_id, source=shard.uri, model="m", model_fingerprint=plan.model_fingerprint,
            input_fingerprint=fp, dim=plan.dim, rows=len(rows.ids), vector_rows=len(rows.ids),
            input_rows=rows.input_rows, quarantined=0, part_uri=uri, stage="indexed", points=len(rows.ids)))
        parts.append(ManifestPart(shard_id=shard.shard_id, part_uri=uri, source=shard.uri))
    store.write_manifest(Manifest(collection=plan.collection, alias=job.name, model="m", dim=plan.dim,
                                  fingerprint=plan.model_fingerprint, shards=[p.shard_id for p in parts],
                                  parts=parts, vector_rows=DOCS, input_rows=DOCS,
                                  finished_at=datetime.now(timezone.utc).isoformat()))
    with open_index(job.index) as index:
        index.ensure_collection(plan.collection, plan.dim)
        for part in parts:
            upsert_part(index, store, plan.collection, part.part_uri)
        index.finish_bulk_load(plan.collection)
        index.point_alias(job.name, plan.collection)
    return plan.collection, len(plan.shards)


class _Spies:
    """Every index shard loaded, point count asked, Parquet file read and corpus file scanned in the block."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.loaded: list[str] = []
        self.counted: list[str] = []
        self.parquet: list[str] = []
        self.scanned: int = 0
        acquire, scan = edge_index._acquire, corpus._scan_records

        def spy_acquire(folder, *args, **kwargs):
            self.loaded.append(str(folder))
            return acquire(folder, *args, **kwargs)

        def spy_scan(*args, **kwargs):
            self.scanned += 1
            return scan(*args, **kwargs)

        def spy_count(original):
            def count(index, name):
                self.counted.append(name)
                return original(index, name)
            return count

        def spy_parquet(original):
            def read(source, *args, **kwargs):
                self.parquet.append(str(getattr(source, "path", source)))
                return original(source, *args, **kwargs)
            return read

        monkeypatch.setattr(edge_index, "_acquire", spy_acquire)
        monkeypatch.setattr(corpus, "_scan_records", spy_scan)
        for engine in (EdgeIndex, QdrantIndex):
            monkeypatch.setattr(engine, "count", spy_count(engine.count))
        for name in ("read_table", "ParquetFile", "read_schema", "read_metadata"):
            monkeypatch.setattr(pq, name, spy_parquet(getattr(pq, name)))

    def parts_read(self, store_root: str) -> list[str]:
        return [p for p in self.parquet if "/vectors/" in p and p.startswith(store_root.split("://")[-1])]


@pytest.mark.parametrize("engine", ["edge", "local"])
def test_a_noop_rerun_loads_no_index_shard_reads_no_part_and_scans_no_file(tmp_path, model, engine,
                                                                           monkeypatch) -> None:
    job_path, job = _job(tmp_path, model, engine)
    collection, shards = _commit(job)
    assert shards == 3  # 60 rows cut at 20: the file is scanned for its record boundaries
    first = cli_in_process("run", str(job_path), "--json")  # plans the file once more: the memo learns its shards
    assert first.returncode == 0, first.stderr[-2000:]

    spies = _Spies(monkeypatch)
    with no_encoding():
        res = cli_in_process("run", str(job_path), "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    summary = last_json(res.stdout)
    assert summary["status"] == "up-to-date" and summary["collection"] == collection
    assert summary["points"] == DOCS and summary["encoded"] == 0 and summary["shards_skipped"] == shards
    assert set(summary["phases"]) == {"preflight", "index_check", "listing", "model", "manifest", "markers"}
    store = VectorStore(job.output.uri, collection)
    assert spies.loaded == [] and spies.counted == []  # the point count is the manifest's
    assert spies.parts_read(store.root) == [], spies.parquet
    assert spies.scanned == 0  # the unchanged file's shards came from the memo

    _write_corpus(tmp_path / "corpus.jsonl", extra=" (revised)")  # same rows, new content: scanned again
    plan = last_json(cli_in_process("plan", str(job_path), "--json").stdout)
    assert spies.scanned == 1 and plan["mode"] == "refresh" and plan["shards_todo"] == shards


def test_a_live_collection_gone_missing_stops_the_rerun_until_it_is_rebuilt(tmp_path, model) -> None:
    job_path, job = _job(tmp_path, model, "edge")
    collection, _ = _commit(job)
    shutil.rmtree(tmp_path / "qdrant" / "collections" / collection)  # the folder lost, the alias left on it

    res = cli_in_process("run", str(job_path), "--json")
    assert res.returncode == 2, res.stdout[-2000:]
    assert f"the alias 'noop' points at '{collection}', which is missing" in res.stderr
    assert "reembed reindex JOB" in res.stderr and "up to date" not in res.stderr
    plan = cli_in_process("plan", str(job_path), "--json")
    assert plan.returncode == 2 and "which is missing" in plan.stderr
    history = last_json(cli_in_process("history", str(job_path), "--json").stdout)
    assert history[0]["status"] == "failed" and "missing" in history[0]["error"]

    with no_encoding():
        rebuilt = cli_in_process("reindex", str(job_path), "--json")  # from Parquet, nothing encoded
    assert rebuilt.returncode == 0, rebuilt.stderr[-2000:]
    again = last_json(cli_in_process("run", str(job_path), "--json").stdout)
    assert again["status"] == "up-to-date" and again["points"] == DOCS


def test_a_lost_index_or_an_interrupted_write_is_never_up_to_date(tmp_path, model) -> None:
    job_path, job = _job(tmp_path, model, "edge")
    collection, _ = _commit(job)
    assert last_json(cli_in_process("plan", str(job_path), "--json").stdout)["mode"] == "up-to-date"

    store = VectorStore(job.output.uri, collection)
    store.mark_writing({"collection": collection, "started_at": "2026-12-04T00:00:00+00:00"})
    interrupted = last_json(cli_in_process("plan", str(job_path), "--json").stdout)
    assert interrupted["mode"] == "resume"  # the collection may differ from its manifest: compared in full
    store.clear_writing()

    shutil.rmtree(tmp_path / "qdrant")  # the whole index lost, alias and all
    lost = last_json(cli_in_process("plan", str(job_path), "--json").stdout)
    assert lost["mode"] == "new-version" and lost["live_collection"] is None
    with no_encoding():
        assert cli_in_process("reindex", str(job_path)).returncode == 0  # no alias left: the rebuild serves
    assert last_json(cli_in_process("plan", str(job_path), "--json").stdout)["mode"] == "up-to-date"


def test_the_shard_memo_survives_damage_and_forgets_old_plans(tmp_path) -> None:
    path = tmp_path / "big.jsonl"
    _write_corpus(path, 30)
    settings = corpus.CorpusSettings(uri=str(path))
    memo = StoredShardMemo(str(tmp_path / "out"), "job")
    scans = corpus.plan_shards(settings, 1 << 30, 10)
    assert corpus.plan_shards(settings, 1 << 30, 10, memo=memo) == scans  # learnt
    uri = scans[0].uri
    with open(memo.document(uri).split("://")[-1], "w") as fh:
        fh.write("{not json")
    assert corpus.plan_shards(settings, 1 << 30, 10, memo=memo) == scans  # damaged: scanned again, rewritten
    for rows in (2, 3, 4, 5, 6):
        corpus.plan_shards(settings, 1 << 30, rows, memo=memo)
    kept = json.loads(open(memo.document(uri).split("://")[-1]).read())["plans"]
    assert len(kept) == 4 and memo.get(uri, corpus.scan_key(uri, "jsonl", corpus.file_fingerprint(uri, settings),
                                                            1 << 30, 6)) is not None
