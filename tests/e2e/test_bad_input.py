"""Bad input never crashes a run silently nor disappears: every row is indexed or quarantined with its reason."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from conftest import cli_in_process, run_cli
from reembed.flows.config import load_job
from reembed.flows.run_flow import run_job
from reembed.indexing.vector_store import VectorStore



def _corpus(folder: Path) -> None:
    folder.mkdir(parents=True)
    lines = [
        json.dumps({"id": "a1", "text": "A good document about tides."}),
        json.dumps({"id": "a2", "text": ""}),  # empty text
        json.dumps({"id": "a3", "text": "   \t "}),  # whitespace text
        json.dumps({"id": None, "text": "null id"}),
        json.dumps({"text": "missing id"}),
        json.dumps({"id": "a1", "text": "duplicate within the file"}),
        "{malformed json",
        json.dumps({"id": "a8", "text": "x" * 1_100_000}),  # over the 1 MB default
        json.dumps({"id": "a9", "text": "Another good document about bees."}),
    ]
    (folder / "a.jsonl").write_bytes(("\n".join(lines) + "\n").encode() + b'{"id": "a10", "text": "caf\xe9"}\n')
    (folder / "b.jsonl").write_text(
        json.dumps({"id": "a9", "text": "a duplicate across files"}) + "\n"
        + json.dumps({"id": "b1", "text": "Good document in file b."}) + "\n")
    pq.write_table(pa.Table.from_pylist([{"id": "c1", "text": "parquet row"}]), folder / "c.parquet")
    (folder / "d.parquet").write_bytes((folder / "c.parquet").read_bytes()[:40])  # truncated Parquet
    (folder / "e.jsonl.gz").write_bytes(gzip.compress(b'{"id": "e1", "text": "gz"}\n' * 50)[:30])  # truncated gzip


def test_every_bad_row_quarantined_and_counts_add_up(tmp_path, ray_session) -> None:
    _corpus(tmp_path / "corpus")
    # 10 of 15 inputs are bad on purpose: the quarantine guard would rightly stop this run, so it is relaxed
    (tmp_path / "job.yaml").write_text("name: bad\ncorpus: {uri: corpus}\nguards: {max_quarantined_fraction: 1}\n")
    job = load_job(tmp_path / "job.yaml")
    summary = run_job(job)
    store = VectorStore(job.output.uri, summary.collection)
    quarantine = [json.loads(line) for p in sorted(Path(store.root, "quarantine").glob("*.jsonl"))
                  for line in p.read_text().splitlines()]
    reasons = {(Path(q["file"]).name, q["row"]): q["reason"] for q in quarantine}
    assert reasons[("a.jsonl", 2)] == "empty text" and reasons[("a.jsonl", 3)] == "empty text"
    assert reasons[("a.jsonl", 4)].startswith("missing id") and reasons[("a.jsonl", 5)].startswith("missing id")
    assert reasons[("a.jsonl", 6)].startswith("duplicate id 'a1'")
    assert reasons[("a.jsonl", 7)].startswith("malformed JSON")
    assert reasons[("a.jsonl", 8)].startswith("text over 1000000 bytes")
    assert reasons[("a.jsonl", 10)].startswith("invalid UTF-8")
    assert reasons[("b.jsonl", 1)].startswith("duplicate id 'a9'")
    assert reasons[("d.parquet", None)].startswith("unreadable file")
    assert reasons[("e.jsonl.gz", None)].startswith("unreadable file")
    assert len(quarantine) == 11
    # 10 + 2 + 1 rows in readable files, 2 unreadable files counted once each
    assert summary.input_rows == 15
    assert summary.indexed == 5 and summary.duplicates == 1  # a1, a9, b1, c1 + the cross-file a9
    assert summary.quarantined == 10
    assert summary.input_rows == summary.indexed + summary.quarantined
    assert summary.points == summary.vector_rows == 4
    assert summary.quarantine == str(Path(store.root) / "quarantine")


def test_quarantine_guard_on_a_first_run(tmp_path, ray_session) -> None:
    """Without the relaxed guard the same corpus stops before the alias is created, and says where to look."""
    _corpus(tmp_path / "corpus")
    (tmp_path / "job.yaml").write_text("name: bad\ncorpus: {uri: corpus}\n")
    res = cli_in_process("run", str(tmp_path / "job.yaml"))
    assert res.returncode == 1, res.stderr[-3000:]
    error = next(line for line in res.stderr.splitlines() if line.startswith("error:"))
    assert "10 of 15 input rows quarantined (66.7%)" in error and "no alias was created" in error
    assert "quarantined rows are in " in error and "first reasons: " in error


def test_fail_policy_and_job_level_errors(tmp_path) -> None:
    _corpus(tmp_path / "corpus")
    (tmp_path / "job.yaml").write_text("name: bad\ncorpus: {uri: corpus/a.jsonl, on_bad_rows: fail}\n")
    res = run_cli("run", str(tmp_path / "job.yaml"))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "a.jsonl: row 2: empty text" in res.stderr
    (tmp_path / "job2.yaml").write_text("name: bad\ncorpus: {uri: corpus/c.parquet, text: '{body}'}\n")
    res = run_cli("run", str(tmp_path / "job2.yaml"))
    assert res.returncode == 2 and "corpus.text names 'body'" in res.stderr and "c.parquet" in res.stderr
    assert "columns found: ['id', 'text']" in res.stderr
