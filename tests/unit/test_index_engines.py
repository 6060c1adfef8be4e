"""One contract, both embedded engines: Qdrant Edge and qdrant-client's local mode answer every call the same way."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from reembed.indexing.index import IndexError_, IndexSettings, open_index
from reembed.indexing.records import point_id

DIM = 8


def _data(n: int, seed: int = 0) -> tuple[list[str], np.ndarray, list[dict]]:
    vectors = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    docs = [f"d{i // 2}" for i in range(n)]  # two chunks per document
    ids = [point_id(d, i % 2) for i, d in enumerate(docs)]
    return ids, vectors, [{"doc_id": d, "chunk_index": i % 2, "text": f"text {i}"} for i, d in enumerate(docs)]


@pytest.mark.parametrize("engine", ["edge", "local"])
def test_engine_contract(tmp_path, engine) -> None:
    settings = IndexSettings(engine=engine, path=str(tmp_path / "index"), upsert_batch=7)
    ids, vectors, payloads = _data(40)
    with open_index(settings) as index:
        assert index.where == f"{engine}:{tmp_path / 'index'}"
        assert not index.exists("v1") and index.alias_target("docs") is None
        index.ensure_collection("v1", DIM, ["text"])
        index.ensure_collection("v1", DIM)  # idempotent
        with pytest.raises(IndexError_, match="holds 8-dim vectors but the model makes 4-dim"):
            index.ensure_collection("v1", 4)
        assert index.exists("v1") and index.dim("v1") == DIM
        assert index.upsert("v1", ids, vectors, payloads) == 40
        index.upsert("v1", ids[:5], vectors[:5], payloads[:5])  # re-upserting the same ids adds nothing
        assert index.count("v1") == 40 and sorted(index.point_ids("v1")) == sorted(ids)
        (p,) = index.retrieve("v1", [ids[3]])
        assert p.id == ids[3] and p.payload["doc_id"] == "d1" and np.allclose(p.vector, vectors[3], atol=1e-6)
        assert {q.payload["doc_id"] for q in index.scroll("v1", ["doc_id"])} == {f"d{i}" for i in range(20)}
        assert all(set(q.payload) == {"doc_id"} and q.vector is None for q in index.scroll("v1", ["doc_id"]))

        assert index.finish_bulk_load("v1") == "green"
        hits = index.search("v1", vectors[10], 5)
        assert hits[0]["id"] == ids[10] and hits[0]["score"] == pytest.approx(1.0, abs=1e-5)
        assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
        docs = index.search("v1", vectors[10], 5, collapse=True)
        assert len(docs) == 5 and len({h["doc_id"] for h in docs}) == 5 and docs[0]["doc_id"] == "d5"

        index.point_alias("docs", "v1")
        assert index.alias_target("docs") == "v1" and index.search("docs", vectors[0], 1)[0]["id"] == ids[0]
        index.ensure_collection("v2", DIM)
        index.upsert("v2", ids[:4], vectors[:4], payloads[:4])
        index.point_alias("docs", "v2")  # the move: readers see v1, then v2, never nothing
        assert index.alias_target("docs") == "v2" and index.count("docs") == 4

        index.delete_points("v1", ids[:10])
        assert index.count("v1") == 30 and ids[0] not in index.point_ids("v1")

    with open_index(settings) as index:  # everything above is on disk
        assert index.count("v1") == 30 and index.alias_target("docs") == "v2" and index.count("v2") == 4
        index.drop("v1")
        assert not index.exists("v1") and index.alias_target("docs") == "v2"


def test_edge_shard_in_use_elsewhere_is_a_clear_error(tmp_path) -> None:
    settings = IndexSettings(engine="edge", path=str(tmp_path / "index"))
    with open_index(settings) as index:
        index.ensure_collection("v1", DIM)  # this process now holds the shard's WAL
        code = (f"from reembed.indexing.index import IndexSettings, open_index\n"
                f"open_index(IndexSettings(engine='edge', path={str(tmp_path / 'index')!r})).count('v1')\n")
        other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert other.returncode != 0
    assert "is in use by another process" in other.stderr and "WouldBlock" in other.stderr


def test_engine_settings_are_checked() -> None:
    assert IndexSettings().resolved_engine == "edge"
    assert IndexSettings(url="http://127.0.0.1:6333").resolved_engine == "server"
    with pytest.raises(ValueError, match="needs index.url"):
        IndexSettings(engine="server")
    with pytest.raises(ValueError, match="takes index.path, not index.url"):
        IndexSettings(engine="edge", url="http://127.0.0.1:6333")


def test_edge_builds_the_index_one_segment_at_a_time(tmp_path) -> None:
    """A bulk load optimizes every ``segment_points`` points, so no build ever spans the whole load."""
    settings = IndexSettings(engine="edge", path=str(tmp_path / "index"), segment_points=1000, upsert_batch=250)
    ids, vectors, payloads = _data(2600)
    with open_index(settings) as index:
        index.ensure_collection("v1", DIM)
        index.upsert("v1", ids, vectors, payloads)
        info = index.shard_info("v1")
        assert info.indexed_vectors_count >= 2000, info  # two full segments built while the load went on
        index.finish_bulk_load("v1")
        info = index.shard_info("v1")
        assert info.indexed_vectors_count == 2600 and info.segments_count >= 3, info  # merges stay under the cap
        assert index.search("v1", vectors[2500], 1)[0]["id"] == ids[2500]


def test_edge_alias_moves_from_two_processes_are_never_lost(tmp_path) -> None:
    """Two jobs sharing index.path move their own aliases at the same time: every move lands (the alias file
    is read, changed and rewritten under a lock, through a temporary file of each writer's own)."""
    settings = IndexSettings(engine="edge", path=str(tmp_path / "index"))
    with open_index(settings) as index:
        for name in ("a1", "a2", "b1", "b2"):
            index.ensure_collection(name, DIM)
    code = ("import sys\n"
            "from reembed.indexing.index import IndexSettings\n"
            "from reembed.indexing.edge_index import EdgeIndex\n"
            f"index = EdgeIndex(IndexSettings(engine='edge', path={str(tmp_path / 'index')!r}))\n"
            "job = sys.argv[1]\n"
            "for i in range(150):\n"
            "    index.point_aliases({job: f'{job}{i % 2 + 1}', f'{job}-v{i}': f'{job}1'})\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, job], stderr=subprocess.PIPE, text=True)
             for job in ("a", "b")]
    reads = 0
    while any(proc.poll() is None for proc in procs):  # meanwhile, the file always parses
        try:
            json.loads((tmp_path / "index" / "aliases.json").read_text())
            reads += 1
        except FileNotFoundError:
            pass
    for proc in procs:
        assert proc.wait(timeout=300) == 0, proc.stderr.read()[-2000:]
    assert reads > 0
    with open_index(settings) as index:
        aliases = index.aliases()
    assert aliases["a"] == "a2" and aliases["b"] == "b2"  # each job's last move
    assert all(f"{job}-v{i}" in aliases for job in "ab" for i in range(150)), len(aliases)  # no move lost
    assert not list((tmp_path / "index").glob("*.tmp"))
