"""Configuration mistakes end in one `error:` line and exit 2 before Ray or Prefect start.

A wrong id key, a misspelled template field or environment variable, and `--set` values with braces or
colons: each used to run to the end looking like success, crash with a traceback, or be silently ignored.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import ROOT, last_json, run_cli
from reembed.flows.config import ConfigError, check_env, load_job, override_value
from reembed.indexing.corpus import CorpusError, CorpusSettings, check_columns, limit_shards, plan_shards

SAMPLE = ROOT / "examples" / "sample" / "job.yaml"


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def _assert_one_error(res, *needles: str) -> str:
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    assert "Traceback" not in res.stderr
    errors = _error_lines(res.stderr)
    assert len(errors) == 1, res.stderr[-2000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


@pytest.fixture()
def sets(tmp_path: Path) -> list[str]:
    return ["--set", f"output.uri={tmp_path / 'v'}", "--set", f"index.path={tmp_path / 'q'}"]


def test_wrong_id_key_names_the_keys_found(sets: list[str]) -> None:
    res = run_cli("run", str(SAMPLE), "--set", "corpus.id=_id", *sets)
    line = _assert_one_error(res, "corpus.id names '_id'", "did you mean 'id'?", "columns found:", "'title'")
    assert "corpus.jsonl" in line and "first 40 row(s)" in line


def test_misspelled_template_field(sets: list[str]) -> None:
    res = run_cli("run", str(SAMPLE), "--set", "corpus.text={titel} {text}", *sets)
    _assert_one_error(res, "corpus.text names 'titel'", "did you mean 'title'?")


def test_misspelled_env_variable(sets: list[str]) -> None:
    res = run_cli("run", str(SAMPLE), *sets, env={"REEMBED_MODLE__NAME": "x"})
    _assert_one_error(res, "REEMBED_MODLE__NAME", "did you mean REEMBED_MODEL__NAME?")
    res = run_cli("plan", str(SAMPLE), *sets, env={"REEMBED_RUNTIME__NUM_ACTRS": "2"})
    _assert_one_error(res, "REEMBED_RUNTIME__NUM_ACTRS", "REEMBED_RUNTIME__NUM_ACTORS")


def test_set_values_with_braces_and_colons_are_strings(sets: list[str]) -> None:
    res = run_cli("plan", str(SAMPLE), "--set", "corpus.text={title} {text}", "--set", "name=sample",
                  "--set", "model.query_prompt=query: ", *sets, "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    job = last_json(res.stdout)["job"]
    assert job["corpus"]["text"] == "{title} {text}" and job["model"]["query_prompt"] == "query: "
    res = run_cli("plan", str(SAMPLE), "--set", "runtime.num_actors={oops}", *sets)
    _assert_one_error(res, "--set 'runtime.num_actors={oops}'", "runtime.num_actors")


def test_override_value_types() -> None:
    assert override_value("2") == 2 and override_value("0.5") == 0.5
    assert override_value("true") is True and override_value("null") is None
    assert override_value("[title, topic]") == ["title", "topic"]
    for raw in ("{title} {text}", "a: b", "{x: 1}", "http://h:6333", "2024-01-01", "[unclosed"):
        assert override_value(raw) == raw


def test_env_errors_and_blame(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    check_env({"REEMBED_MODEL__NAME": "x", "REEMBED_SEARCH_K": "5", "REEMBED_CORPUS__STORAGE_OPTIONS__KEY": "k"})
    with pytest.raises(ConfigError, match="did you mean REEMBED_GUARDS__MAX_DELETED_FRACTION"):
        check_env({"REEMBED_GUARDS__MAX_DELETE_FRACTION": "0.5"})
    job = tmp_path / "job.yaml"
    job.write_text("name: j\ncorpus: {uri: c.jsonl}\nruntime: {num_actors: zero}\n")
    with pytest.raises(ConfigError, match=r"job.yaml: runtime.num_actors"):
        load_job(job)
    monkeypatch.setenv("REEMBED_RUNTIME__SHARD_ROWS", "many")
    with pytest.raises(ConfigError, match="environment variable REEMBED_RUNTIME__SHARD_ROWS: runtime.shard_rows"):
        load_job(job, ["runtime.num_actors=2"])


def _write(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"_id": f"d{i}", "title": f"t{i}", "body": f"text {i}"} for i in range(300)]
    rows[250]["extra"] = "only late"
    jsonl = folder / "c.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    gz = folder / "c.jsonl.gz"
    gz.write_bytes(gzip.compress(jsonl.read_bytes()))
    pq_path = folder / "c.parquet"
    pq.write_table(pa.Table.from_pylist(rows[:10]), pq_path)
    csv = folder / "c.csv"
    csv.write_text("_id,title,body\n" + "".join(f"d{i},t{i},text {i}\n" for i in range(10)))
    return {"jsonl": jsonl, "gz": gz, "parquet": pq_path, "csv": csv}


@pytest.mark.parametrize("fmt", ["jsonl", "gz", "parquet", "csv"])
def test_check_columns_every_format(tmp_path: Path, fmt: str) -> None:
    path = _write(tmp_path)[fmt]
    good = CorpusSettings(uri=str(path), id="_id", text="{title} {body}")
    check_columns(str(path), good)
    with pytest.raises(CorpusError, match=r"corpus.id names 'id' \(did you mean '_id'\?\)"):
        check_columns(str(path), good.model_copy(update={"id": "id"}))
    with pytest.raises(CorpusError, match=r"corpus.text names 'bdy' \(did you mean 'body'\?\)"):
        check_columns(str(path), good.model_copy(update={"text": "{title} {bdy}"}))
    with pytest.raises(CorpusError, match="corpus.payload names 'topic'"):
        check_columns(str(path), good.model_copy(update={"payload": ["topic"]}))


def test_sample_is_bounded(tmp_path: Path) -> None:
    path = _write(tmp_path)["jsonl"]
    settings = CorpusSettings(uri=str(path), id="_id", text="{extra}")
    with pytest.raises(CorpusError, match="first 200 row"):
        check_columns(str(path), settings)


def test_small_file_cut_for_parallelism_and_limit(tmp_path: Path) -> None:
    path = tmp_path / "big.jsonl"
    path.write_text("".join(json.dumps({"id": f"d{i}", "text": "x" * 500}) + "\n" for i in range(2000)))
    settings = CorpusSettings(uri=str(path))
    assert len(plan_shards(settings, 64 << 20, None, min_shards=1)) == 1
    shards = plan_shards(settings, 64 << 20, None, min_shards=4)
    assert len(shards) == 4 and sum(s.rows_hint for s in shards) == 2000
    assert shards[0].first_row == 1 and shards[1].first_row == 1 + shards[0].rows_hint
    tiny = tmp_path / "tiny.jsonl"
    tiny.write_text(json.dumps({"id": "a", "text": "b"}) + "\n")
    assert len(plan_shards(CorpusSettings(uri=str(tiny)), 64 << 20, None, min_shards=8)) == 1  # 64 KiB floor
    limited = limit_shards(settings, 250, 100)
    assert [s.rows_hint for s in limited] == [100, 100, 50] and limited[-1].limit == 50
    assert limited[-1].shard_id != plan_shards(settings, 1 << 62, 100)[2].shard_id
