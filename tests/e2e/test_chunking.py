"""Long documents: truncation is counted; with chunking on, the tail of a long document is findable."""

from __future__ import annotations

from conftest import cli_in_process, last_json, write_jsonl
from reembed.flows.config import load_job

FILLER = " ".join(["The committee reviewed quarterly budgets, staffing plans and office logistics in detail."] * 40)
TAIL = "Finally, the appendix explains how octopuses open screw-top jars with their arms."


def test_long_document_truncated_then_chunked(tmp_path, ray_session) -> None:
    docs = [{"id": "long", "text": FILLER + " " + TAIL}] + [
        {"id": f"d{i}", "text": t} for i, t in enumerate(
            ["Bread rises because of yeast.", "Tides follow the Moon.", "Bees dance to share directions."])]
    write_jsonl(tmp_path / "corpus.jsonl", docs)
    (tmp_path / "job.yaml").write_text("name: longdocs\ncorpus: {uri: corpus.jsonl}\n")
    job = str(tmp_path / "job.yaml")

    plain = cli_in_process("run", job, "--json")
    assert plain.returncode == 0, plain.stderr[-3000:]
    s = last_json(plain.stdout)
    assert s["truncated_docs"] == 1 and s["dropped_tokens"] > 0 and s["points"] == 4

    chunked = cli_in_process("run", job, "--set", "chunking.max_tokens=64", "--set", "chunking.overlap=8", "--json")
    assert chunked.returncode == 0, chunked.stderr[-3000:]
    c = last_json(chunked.stdout)
    assert c["collection"] != s["collection"]  # chunking shapes vectors: a new version
    assert c["truncated_docs"] == 0 and c["indexed"] == 4 and c["vector_rows"] == c["points"] > 4

    query = "how do octopuses open jars"
    found = cli_in_process("search", job, query, "-k", "2", "--set", "chunking.max_tokens=64",
                           "--set", "chunking.overlap=8", "--json")
    hits = last_json(found.stdout)
    assert hits[0]["doc_id"] == "long" and hits[0]["chunk_index"] > 0
    assert "octopuses" in docs[0]["text"][hits[0]["char_start"]:hits[0]["char_end"]]
    assert len({h["doc_id"] for h in hits}) == len(hits)  # collapsed: one row per document
    assert load_job(job, ["chunking.max_tokens=64"]).chunking.overlap == 0
