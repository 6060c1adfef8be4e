"""Job file loading: layering of file, env vars and --set; path resolution; clear errors; secrets hidden."""

from __future__ import annotations

from pathlib import Path

import pytest

from reembed.flows.config import ConfigError, load_job

JOB = """
name: demo
corpus:
  uri: data/corpus.jsonl
  id: _id
  text: "{title} {text}"
  storage_options: {key: AKIAEXAMPLE, secret: very-secret-value}
output:
  uri: s3://bucket/vectors
runtime:
  shard_rows: 100
"""


@pytest.fixture()
def job_file(tmp_path: Path) -> Path:
    path = tmp_path / "jobs" / "job.yaml"
    path.parent.mkdir()
    path.write_text(JOB)
    return path


def test_file_env_and_set_layering(job_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REEMBED_RUNTIME__SHARD_ROWS", "50")
    monkeypatch.setenv("REEMBED_RUNTIME__NUM_ACTORS", "4")
    monkeypatch.setenv("REEMBED_MODEL__NORMALIZE", "false")
    job = load_job(job_file, ["runtime.num_actors=3", "corpus.id=doc"])
    assert job.runtime.shard_rows == 50  # env beats the file
    assert job.runtime.num_actors == 3  # --set beats env
    assert job.model.normalize is False
    assert job.corpus.id == "doc"
    assert job.corpus.text == "{title} {text}"


def test_relative_paths_resolve_against_job_folder(job_file: Path) -> None:
    job = load_job(job_file)
    assert job.corpus.uri == str(job_file.parent / "data" / "corpus.jsonl")
    assert job.index.path == str(job_file.parent / "reembed-data" / "qdrant")
    assert job.output.uri == "s3://bucket/vectors"  # remote URIs stay as written


def test_secrets_never_printed(job_file: Path) -> None:
    job = load_job(job_file)
    text = repr(job) + str(job) + job.model_dump_json()
    assert "very-secret-value" not in text and "AKIAEXAMPLE" not in text
    opts = job.corpus.storage_options.fsspec_kwargs("s3")
    assert opts["secret"] == "very-secret-value"


def test_a_model_on_object_storage_is_read_with_the_outputs_options(job_file: Path, monkeypatch) -> None:
    """`reembed tune` writes a model under an s3:// output; its variant names it, and the actors that load it
    (on any node) get the output's endpoint and credentials with the model settings, never through a manifest."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAOUTPUT")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "output-secret")
    job = load_job(job_file, ["model.name=s3://bucket/vectors/_tuned/demo-42/model"])
    options = job.model.storage_options
    assert options is not None and options.endpoint_url == "http://127.0.0.1:9"
    assert options.fsspec_kwargs("s3")["secret"] == "output-secret"
    own = load_job(job_file, ["model.name=s3://other/model", "model.storage_options.endpoint_url=http://127.0.0.1:8"])
    assert own.model.storage_options.endpoint_url == "http://127.0.0.1:8"  # its own, when given
    assert load_job(job_file).model.storage_options is None  # a bundled or local model needs none
    assert "output-secret" not in job.model_dump_json() and "output-secret" not in repr(job)


def test_errors_name_the_key(job_file: Path) -> None:
    with pytest.raises(ConfigError, match="runtime.num_actors"):
        load_job(job_file, ["runtime.num_actors=zero"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_job(job_file, ["runtime.num_actors"])
    with pytest.raises(ConfigError, match="not found"):
        load_job(job_file.parent / "missing.yaml")
    with pytest.raises(ConfigError, match="corpus.unknown"):
        load_job(job_file, ["corpus.unknown=1"])
    with pytest.raises(ConfigError, match="reserved"):
        load_job(job_file, ["corpus.payload=[vector]"])


def test_collection_name_follows_what_shapes_vectors(job_file: Path) -> None:
    a = load_job(job_file)
    b = load_job(job_file, ["model.pooling=cls"])
    c = load_job(job_file, ["runtime.num_actors=2"])
    assert a.collection_name(384) != b.collection_name(384)
    assert a.collection_name(384) == c.collection_name(384)
    assert a.collection_name(384).startswith("demo-")
