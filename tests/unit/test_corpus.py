"""Shard planning and reading: every input row lands in exactly one shard, bad rows are rejected with reasons."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from reembed.indexing.corpus import CorpusError, CorpusSettings, plan_shards, read_shard


def _docs(n: int) -> list[dict]:
    return [{"id": f"d{i}", "title": f"title {i}", "text": f"body of document {i} " + "x" * (i % 7)} for i in range(n)]


def _read_all(settings: CorpusSettings, shard_bytes: int, shard_rows: int | None):
    shards = plan_shards(settings, shard_bytes, shard_rows)
    ids, rows, rejected = [], [], []
    for shard in shards:
        r = read_shard(shard, settings)
        ids += r.ids
        rows += r.rows
        rejected += r.rejected
    return shards, ids, rows, rejected


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.gz", "csv", "parquet"])
def test_every_row_in_exactly_one_shard(tmp_path: Path, fmt: str) -> None:
    docs = _docs(103)
    path = tmp_path / f"c.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    elif fmt == "jsonl.gz":
        path.write_bytes(gzip.compress("".join(json.dumps(d) + "\n" for d in docs).encode()))
    elif fmt == "csv":
        with path.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=["id", "title", "text"])
            w.writeheader()
            for d in docs:
                w.writerow({**d, "text": d["text"] + ', with "quotes"\nand a newline'})
    else:
        pq.write_table(pa.Table.from_pylist(docs), path, row_group_size=10)
    settings = CorpusSettings(uri=str(path), text="{title} {text}")
    shards, ids, rows, rejected = _read_all(settings, 1 << 30, 25)
    assert not rejected
    assert sorted(ids) == sorted(d["id"] for d in docs)
    assert len(ids) == len(set(ids))
    assert rows == list(range(1, 104))
    if fmt != "jsonl.gz":  # gzip streams cannot be split
        assert len(shards) >= 4


def test_byte_target_splits_big_files(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in _docs(500)))
    settings = CorpusSettings(uri=str(path))
    shards, ids, _, _ = _read_all(settings, 4096, None)
    assert len(shards) > 3 and len(ids) == 500


def test_directory_and_glob(tmp_path: Path) -> None:
    for i in range(3):
        (tmp_path / f"part{i}.jsonl").write_text("".join(json.dumps({**d, "id": f"{i}-{d['id']}"}) + "\n" for d in _docs(5)))
    (tmp_path / "_SUCCESS").write_text("")
    assert len(plan_shards(CorpusSettings(uri=str(tmp_path)), 1 << 30)) == 3
    assert len(plan_shards(CorpusSettings(uri=str(tmp_path / "part[01].jsonl")), 1 << 30)) == 2


def test_bad_rows_rejected_with_file_row_and_reason(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    lines = [
        json.dumps({"id": "ok1", "text": "fine"}),
        json.dumps({"id": "", "text": "no id"}),
        json.dumps({"text": "missing id"}),
        json.dumps({"id": "e", "text": "   "}),
        "{not json",
        json.dumps({"id": "ok1", "text": "duplicate"}),
        json.dumps({"id": "big", "text": "y" * 2000}),
        json.dumps({"id": "notext", "other": 1}),
    ]
    path.write_bytes(("\n".join(lines) + "\n").encode() + b'{"id": "bin", "text": "\xff\xfe"}\n')
    settings = CorpusSettings(uri=str(path), max_text_bytes=1000)
    (shard,) = plan_shards(settings, 1 << 30)
    out = read_shard(shard, settings)
    assert out.ids == ["ok1"]
    reasons = {r["row"]: r["reason"] for r in out.rejected}
    assert reasons[2].startswith("missing id") and reasons[3].startswith("missing id")
    assert reasons[4] == "empty text"
    assert reasons[5].startswith("malformed JSON")
    assert reasons[6].startswith("duplicate id 'ok1' (first at row 1)")
    assert reasons[7].startswith("text over 1000 bytes")
    assert reasons[8].startswith("missing text column")
    assert reasons[9].startswith("invalid UTF-8")
    assert all(r["file"] == str(path) for r in out.rejected)
    assert out.input_rows == 9


def test_job_level_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="no corpus files"):
        plan_shards(CorpusSettings(uri=str(tmp_path / "nope.jsonl")), 1 << 30)
    path = tmp_path / "c.parquet"
    pq.write_table(pa.Table.from_pylist(_docs(3)), path)
    settings = CorpusSettings(uri=str(path), text="{body}")
    (shard,) = plan_shards(settings, 1 << 30)
    with pytest.raises(CorpusError, match=r"missing column\(s\) \['body'\]"):
        read_shard(shard, settings)
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(path.read_bytes()[:50])
    with pytest.raises(CorpusError, match="broken.parquet"):
        plan_shards(CorpusSettings(uri=str(broken), on_bad_rows="fail"), 1 << 30)
    quarantining = CorpusSettings(uri=str(broken))  # the default policy reports the file instead
    (shard,) = plan_shards(quarantining, 1 << 30)
    out = read_shard(shard, quarantining)
    assert out.ids == [] and out.input_rows == 1
    assert out.rejected[0]["row"] is None and out.rejected[0]["reason"].startswith("unreadable file")


def test_json_lines_read_as_json_reads_them(tmp_path: Path) -> None:
    """The fast JSON path (orjson) gives exactly what json gives: long integer ids stay exact, lines orjson
    refuses (NaN, a number past a double) are read by json, and what json rejects is rejected with json's
    reason. A lone surrogate, which json reads but no UTF-8 writer can write, is rejected with its reason
    instead of failing the shard."""
    lines = [
        b'{"id": 123456789012345678901234567890, "text": "a long integer id"}',
        b'{"id": "nan", "text": "not a number", "score": NaN}',
        b'{"id": "sur", "text": "lone \\ud800 surrogate"}',
        b'{"id": "inf", "text": "huge", "score": 1e400}',
        b'{"id": "dup", "text": "first", "text": "last key wins"}',
        b'{"id": 7, "text": "plain \\u00e9 line", "score": 1.0000000000000002}',
        b'[1, 2]',
        b'{"id": "cut", "text": ',
        b'\xef\xbb\xbf{"id": "bom", "text": "a byte order mark"}',
    ]
    path = tmp_path / "tricky.jsonl"
    path.write_bytes(b"\r\n".join(lines) + b"\n")
    settings = CorpusSettings(uri=str(path), payload=["score"])
    (shard,) = plan_shards(settings, 1 << 30)
    out = read_shard(shard, settings)
    expected = []
    for raw in lines:
        try:
            rec = json.loads(raw.decode("utf-8"))
        except ValueError:
            continue
        if isinstance(rec, dict) and rec["id"] != "sur":
            expected.append((str(rec["id"]), rec["text"], rec.get("score")))
    got = list(zip(out.ids, out.texts, out.payload["score"]))
    assert [g[:2] for g in got] == [e[:2] for e in expected]
    assert got[0][0] == "123456789012345678901234567890"
    assert str(got[1][2]) == "nan" and got[2][2] == float("inf") and got[4][2] == 1.0000000000000002
    reasons = {r["row"]: r["reason"] for r in out.rejected}
    assert reasons[3].startswith("not valid Unicode: a lone surrogate")
    assert reasons[7] == "malformed JSON: expected a JSON object, got list"
    assert reasons[8].startswith("malformed JSON") and reasons[9].startswith("malformed JSON")
    assert out.input_rows == len(lines)


def test_a_short_read_is_an_error_not_fewer_rows(tmp_path: Path) -> None:
    """A byte range that reads short (the file shortened since planning, or a read cut off mid-way) is never
    parsed as a shard with fewer rows: locally it is an unreadable file, quarantined with the reason."""
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in _docs(500)))
    settings = CorpusSettings(uri=str(path))
    shards = plan_shards(settings, 4096, None)
    last = shards[-1]
    assert last.start is not None and last.end is not None
    with path.open("r+b") as fh:
        fh.truncate(last.end - 10)
    out = read_shard(last, settings)
    assert out.ids == [] and len(out.rejected) == 1
    assert f"read {last.end - 10 - last.start} of the {last.end - last.start} bytes" in out.rejected[0]["reason"]
    with pytest.raises(CorpusError, match="bytes at offset"):
        read_shard(last, settings.model_copy(update={"on_bad_rows": "fail"}))


def test_store_failures_are_told_from_bad_files() -> None:
    """What an outage raises is retried (transient), what a bad or missing file raises is the file's fault."""
    from reembed.indexing.storage import transient, unreachable

    class EndpointConnectionError(Exception):  # botocore's, by name: storage.py imports no AWS library
        pass

    wrapped = RuntimeError("read failed")
    wrapped.__cause__ = ConnectionRefusedError(111, "refused")
    assert unreachable(EndpointConnectionError("http://127.0.0.1:9/x")) and unreachable(wrapped)
    assert unreachable(TimeoutError()) and not unreachable(ValueError("bad json"))
    assert transient("s3://bucket/c.jsonl", OSError(5, "Input/output error"))  # a 5xx the store answered
    assert not transient("s3://bucket/c.jsonl", PermissionError("AccessDenied"))
    assert not transient("s3://bucket/c.jsonl", FileNotFoundError("NoSuchKey"))
    assert not transient("/data/c.jsonl", OSError(5, "Input/output error"))  # a local disk error is the file's
    assert transient("/data/c.jsonl", ConnectionResetError())
