"""The embedding worker, called in-process on a tiny model (no Ray, no Prefect): which rows of a re-embedded
shard differ from the committed version, so that a refresh upserts only those."""

from __future__ import annotations

import json

import numpy as np

from reembed.indexing.corpus import CorpusSettings, Shard
from reembed.indexing.records import ShardTask
from reembed.workers.embed_worker import EmbedWorker, _changed_ranges
from reembed.workers.settings import ModelSettings


def _write(path, docs) -> None:
    path.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")


def _task(corpus, tmp_path, fingerprint: str, reuse: list[str], since: str | None) -> ShardTask:
    settings = CorpusSettings(uri=str(corpus), payload=["lang"])
    return ShardTask(shard=Shard("s1", str(corpus), "jsonl"), corpus=settings, output_uri=str(tmp_path / "out"),
                     collection="unit-1", model_fingerprint="mf", input_fingerprint=fingerprint, reuse_uris=reuse,
                     reuse_since=since, progress_seconds=60)


def test_changed_ranges_are_compact_runs() -> None:
    assert _changed_ranges(np.array([], bool)) == []
    assert _changed_ranges(np.array([0, 1, 1, 0, 1], bool)) == [(1, 3), (4, 5)]
    assert _changed_ranges(np.ones(4, bool)) == [(0, 4)]


def test_only_rows_that_differ_from_the_committed_part_are_marked_changed(tmp_path, tiny_bert) -> None:
    worker = EmbedWorker(ModelSettings(name=str(tiny_bert)), cpu_threads=1)
    corpus = tmp_path / "corpus.jsonl"
    docs = [{"id": f"d{i}", "text": f"document number {i} about tides", "lang": "en"} for i in range(8)]
    _write(corpus, docs)
    first = worker.process_shard(_task(corpus, tmp_path, "fp1", [], None))
    assert first.encoded == 8 and first.changed_rows is None  # nothing to compare with: every row is upserted

    docs[2]["text"] += " (revised)"  # new text: encoded again
    docs[5]["lang"] = "fr"  # same text, new payload: vector reused, point rewritten
    docs.append({"id": "d8", "text": "a new document", "lang": "en"})  # a new row
    _write(corpus, docs)
    second = worker.process_shard(_task(corpus, tmp_path, "fp2", [first.part_uri], "t1"))
    assert second.encoded == 2 and second.reused == 7
    assert second.changed_rows == [(2, 3), (5, 6), (8, 9)] and second.changed_since == "t1"

    _write(corpus, [{"id": "top", "text": "a document inserted at the top", "lang": "en"}, *docs])
    third = worker.process_shard(_task(corpus, tmp_path, "fp3", [second.part_uri], "t2"))
    assert third.encoded == 1 and third.reused == 9
    assert third.changed_rows == [(0, 10)]  # every row moved down one: its source_row, in the payload, changed


def _part_vectors(uri: str) -> dict[str, np.ndarray]:
    import pyarrow.parquet as pq

    from reembed.indexing.vector_store import arrow_to_vectors

    table = pq.read_table(uri, columns=["doc_id", "vector"])
    return dict(zip(table.column("doc_id").to_pylist(), arrow_to_vectors(table.column("vector"))))


def test_reused_and_fresh_vectors_land_on_their_own_documents(tmp_path, tiny_bert) -> None:
    """Each row of a re-embedded part carries its own document's vector: the stored one when its text is
    unchanged (the first old part that has it with that text wins), a fresh one otherwise."""
    worker = EmbedWorker(ModelSettings(name=str(tiny_bert)), cpu_threads=1)
    corpus = tmp_path / "corpus.jsonl"
    docs = [{"id": f"d{i}", "text": f"document number {i} about bread", "lang": "en"} for i in range(6)]
    _write(corpus, docs)
    first = worker.process_shard(_task(corpus, tmp_path, "fp1", [], None))
    docs[3]["text"] = "a rewritten third document"
    docs.insert(0, {"id": "new", "text": "a brand new first document", "lang": "en"})
    _write(corpus, docs)
    second = worker.process_shard(_task(corpus, tmp_path, "fp2", [first.part_uri], "t1"))
    assert second.encoded == 2 and second.reused == 5
    old, new = _part_vectors(first.part_uri), _part_vectors(second.part_uri)
    for doc in ("d0", "d1", "d2", "d4", "d5"):
        assert np.array_equal(new[doc], old[doc]), doc
    fresh, _ = worker.encoder.encode(["a brand new first document", "a rewritten third document"])
    assert np.allclose(new["new"], fresh[0], atol=1e-6) and np.allclose(new["d3"], fresh[1], atol=1e-6)

    # An old part holding other vectors for d0-d2, d4, d5 with the same texts (the first part, vectors
    # negated): whichever part is listed first wins; d3 matches only in the second part (its text changed).
    import pyarrow.parquet as pq

    from reembed.indexing.vector_store import vectors_to_arrow

    table = pq.read_table(first.part_uri)
    flipped = table.set_column(table.schema.get_field_index("vector"), "vector",
                               vectors_to_arrow(-np.stack(list(old.values()))))
    other = str(tmp_path / "other.parquet")
    pq.write_table(flipped, other)
    for n, (order, winner) in enumerate((([second.part_uri, other], new), ([other, second.part_uri], None))):
        third = worker.process_shard(_task(corpus, tmp_path, f"fp-order-{n}", order, "t2"))
        assert third.encoded == 0 and third.reused == 7
        got = _part_vectors(third.part_uri)
        for doc, vector in got.items():
            expected = new[doc] if winner is not None or doc in ("new", "d3") else -old[doc]
            assert np.array_equal(vector, expected), (order, doc)


def test_chunked_documents_reuse_their_stored_chunks(tmp_path, tiny_bert) -> None:
    """With chunking, an unchanged document reuses every stored chunk (vector and span); a changed one is
    chunked and encoded again."""
    from reembed.workers.settings import ChunkingSettings

    worker = EmbedWorker(ModelSettings(name=str(tiny_bert)), cpu_threads=1)
    corpus = tmp_path / "corpus.jsonl"
    long = " ".join(["the quick brown fox jumps over the lazy dog"] * 6)
    docs = [{"id": f"d{i}", "text": f"{long} number {i}", "lang": "en"} for i in range(4)]
    _write(corpus, docs)
    chunking = ChunkingSettings(max_tokens=12, overlap=2)
    first = worker.process_shard(_task(corpus, tmp_path, "fp1", [], None).model_copy(update={"chunking": chunking}))
    assert first.vector_rows > first.rows == 4  # several chunks per document
    docs[1]["text"] = "a short replacement"
    _write(corpus, docs)
    second = worker.process_shard(_task(corpus, tmp_path, "fp2", [first.part_uri], "t1").model_copy(
        update={"chunking": chunking}))
    assert second.encoded == 1 and second.reused == 3

    import pyarrow.parquet as pq

    def chunks(uri: str) -> dict[tuple[str, int], tuple[int, int, list[float]]]:
        t = pq.read_table(uri, columns=["doc_id", "chunk_index", "char_start", "char_end", "vector"]).to_pylist()
        return {(r["doc_id"], r["chunk_index"]): (r["char_start"], r["char_end"], r["vector"]) for r in t}

    old, new = chunks(first.part_uri), chunks(second.part_uri)
    assert {k: v for k, v in new.items() if k[0] != "d1"} == {k: v for k, v in old.items() if k[0] != "d1"}
    changed = [k for k in new if k[0] == "d1"]
    assert changed and all(new[k] != old.get(k) for k in changed)  # chunked and encoded again


def test_an_actor_writes_nothing_once_its_run_lost_the_lease(tmp_path, tiny_bert) -> None:
    """A driver SIGKILLed on a cluster leaves its actors working until Ray notices; the run that took the job
    over must not find their output (a "written" marker over its own "indexed" one) afterwards."""
    import pytest

    from reembed.flows.operations.lease import LeaseLost as DriverLeaseLost
    from reembed.indexing.fence import LeaseLost
    from reembed.indexing.records import LeaseFence
    from reembed.indexing.storage import write_json

    worker = EmbedWorker(ModelSettings(name=str(tiny_bert)), cpu_threads=1)
    corpus = tmp_path / "corpus.jsonl"
    _write(corpus, [{"id": f"d{i}", "text": f"document {i}", "lang": "en"} for i in range(4)])
    lease = tmp_path / "out" / "_leases" / "unit.json"
    write_json(str(lease), {"token": "first", "holder": "host:1", "command": "reembed run"})
    fence = LeaseFence(uri=str(lease), token="first", job="unit")
    ours = worker.process_shard(_task(corpus, tmp_path, "fp1", [], None).model_copy(update={"lease": fence}))
    assert ours.encoded == 4  # still the run's lease: written as usual

    write_json(str(lease), {"token": "second", "holder": "host:2", "command": "reembed run"})  # taken over
    stale = _task(corpus, tmp_path, "fp2", [], None).model_copy(update={"lease": fence})
    with pytest.raises(LeaseLost, match="lease lost to host:2: .* taken over by reembed run on host:2"):
        worker.process_shard(stale)
    assert DriverLeaseLost is LeaseLost  # the flow's handling (no retry, the run stops) applies to it
    store_files = sorted(p.name for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert any("fp1" in name for name in store_files), store_files  # parts are named by input fingerprint
    assert not any("fp2" in name for name in store_files), store_files  # and there is none of the stale shard
    marker = json.loads(next((tmp_path / "out").rglob("shards/s1.json")).read_text())
    assert marker["input_fingerprint"] == "fp1"  # the marker is still the one written under the lease
