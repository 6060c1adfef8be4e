"""The embedding worker, called in-process on a tiny model (no Ray, no Prefect): which rows of a re-embedded
shard differ from the committed version, so that a refresh upserts only those."""

from __future__ import annotations

import json

import numpy as np

import tiny_models
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


def test_only_rows_that_differ_from_the_committed_part_are_marked_changed(tmp_path) -> None:
    worker = EmbedWorker(ModelSettings(name=str(tiny_models.bert(tmp_path, "mean"))), cpu_threads=1)
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
