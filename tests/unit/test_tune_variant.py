"""The job variant `reembed tune` writes: the same job with the tuned model, in another folder."""

from __future__ import annotations

from pathlib import Path

from reembed.flows.config import load_job
from reembed.flows.tuning import _write_variant


def test_the_variant_backfills_into_the_jobs_own_store_and_index(tmp_path: Path) -> None:
    """A job that relies on the default output and index (relative to its folder) and a relative gate: the
    variant, written elsewhere, still names the job's corpus, store, index and judgements, not folders of its
    own beside it (where its backfill would find nothing live to gate against)."""
    (tmp_path / "corpus.jsonl").write_text('{"id": "a", "text": "x"}\n')
    (tmp_path / "q.jsonl").write_text('{"_id": "q", "text": "x"}\n')
    (tmp_path / "qrels.tsv").write_text("q\ta\t1\n")
    job_file = tmp_path / "job.yaml"
    job_file.write_text("name: docs\ncorpus: {uri: corpus.jsonl}\ngate: {queries: q.jsonl, qrels: qrels.tsv}\n")
    job = load_job(job_file, ["runtime.num_actors=1"])
    model = tmp_path / "tuned" / "model"
    model.mkdir(parents=True)
    _write_variant(job, job_file, tmp_path / "tuned" / "job.yaml", str(model))
    variant = load_job(tmp_path / "tuned" / "job.yaml")
    assert variant.name == "docs" and variant.model.name == str(model)
    assert (variant.corpus.uri, variant.output.uri, variant.index.path) == (job.corpus.uri, job.output.uri,
                                                                             job.index.path)
    assert Path(variant.output.uri).parent.parent == tmp_path  # ./reembed-data/vectors of the job's folder
    assert (variant.gate.queries, variant.gate.qrels) == (str(tmp_path / "q.jsonl"), str(tmp_path / "qrels.tsv"))
