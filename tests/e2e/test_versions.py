"""Versions side by side, rollback of the alias, and reindex from Parquet without encoding."""

from __future__ import annotations

import shutil

import pytest

from conftest import ROOT, cli_in_process, last_json, no_encoding
from reembed.flows.config import ConfigError, load_job
from reembed.flows.run_flow import run_job
from reembed.flows.versions import list_versions, reindex, rollback
from reembed.indexing.index import open_index
from reembed.workers.encoder import Encoder

SAMPLE = ROOT / "examples" / "sample" / "job.yaml"


def _top(job, queries: list[str], k: int = 10) -> list[list[str]]:
    vectors, _ = Encoder(job.model).encode(queries, kind="query")
    with open_index(job.index) as index:
        return [[h["doc_id"] for h in index.search(job.name, v, k)] for v in vectors]


@pytest.mark.parametrize("engine", ["edge", "local"])
def test_versions_rollback_and_reindex(tmp_path, ray_session, engine) -> None:
    sets = [f"output.uri={tmp_path / 'v'}", f"index.path={tmp_path / 'q'}", f"index.engine={engine}"]
    mean_job = load_job(SAMPLE, sets)
    cls_job = load_job(SAMPLE, [*sets, "model.pooling=cls"])
    first = run_job(mean_job)
    second = run_job(cls_job)
    assert first.collection != second.collection
    with open_index(mean_job.index) as index:
        versions = list_versions(mean_job, index)
        assert [v.collection for v in versions] == [second.collection, first.collection]
        assert [v.live for v in versions] == [True, False]
        assert all(v.points == 40 for v in versions)
        assert rollback(mean_job, index, None).collection == first.collection
        assert index.alias_target("sample") == first.collection
        with pytest.raises(ConfigError, match="version 'sample-000000000000' not found"):
            rollback(mean_job, index, "sample-000000000000")
    queries = ["why does bread rise", "what makes the tides", "how do bees talk", "桜"]
    before = _top(mean_job, queries)

    shutil.rmtree(tmp_path / "q")  # lose Qdrant entirely: Parquet is the source of truth
    with open_index(mean_job.index) as index:
        with no_encoding():  # a reindex that loaded the model to encode would trip here
            result = reindex(mean_job, index, first.collection)
        assert result.upserted == result.points == 40 and result.live and result.physical == first.collection
    assert _top(mean_job, queries) == before


def test_versions_cli_json(tmp_path, ray_session) -> None:
    sets = ["--set", f"output.uri={tmp_path / 'v'}", "--set", f"index.path={tmp_path / 'q'}"]
    assert cli_in_process("run", str(SAMPLE), *sets).returncode == 0
    res = cli_in_process("versions", str(SAMPLE), *sets, "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    rows = last_json(res.stdout)
    assert len(rows) == 1 and rows[0]["live"] and rows[0]["points"] == 40
    assert set(rows[0]) >= {"collection", "model", "live", "points", "score"}
    res = cli_in_process("rollback", str(SAMPLE), *sets)
    assert res.returncode == 2 and "no earlier version" in res.stderr
    res = cli_in_process("reindex", str(SAMPLE), *sets, "--json")
    assert res.returncode == 0 and last_json(res.stdout)["points"] == 40
    rebuilt = last_json(res.stdout)
    assert rebuilt["physical"] == f"{rows[0]['collection']}-r2" and rebuilt["previous"] == rows[0]["collection"]
    res = cli_in_process("status", str(SAMPLE), *sets, "--json")
    assert last_json(res.stdout)["physical"] == rebuilt["physical"] and last_json(res.stdout)["in_sync"]

    # A corrupt Parquet part: the rebuild stops with one error line naming it; what users search is unchanged.
    before = cli_in_process("search", str(SAMPLE), "why does bread rise", *sets, "--json")
    part = sorted((tmp_path / "v").glob("sample-*/vectors/part-*.parquet"))[-1]
    part.write_bytes(b"garbage\n")
    res = cli_in_process("reindex", str(SAMPLE), *sets)
    assert res.returncode == 1, res.stderr[-2000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(part) in errors[0] and "the live collection is untouched" in errors[0], errors
    assert "Traceback" not in res.stderr
    after = cli_in_process("search", str(SAMPLE), "why does bread rise", *sets, "--json")
    assert before.returncode == after.returncode == 0 and last_json(after.stdout) == last_json(before.stdout)
    res = cli_in_process("versions", str(SAMPLE), *sets, "--json")
    assert [(v["physical"], v["points"]) for v in last_json(res.stdout)] == [(rebuilt["physical"], 40)]


def test_retention_keeps_the_newest_versions(tmp_path, ray_session) -> None:
    sets = [f"output.uri={tmp_path / 'v'}", f"index.path={tmp_path / 'q'}", "index.keep_versions=2"]
    made = [run_job(load_job(SAMPLE, [*sets, f"model.max_seq_length={n}"])).collection for n in (128, 192, 256)]
    job = load_job(SAMPLE, sets)
    with open_index(job.index) as index:
        left = [v.collection for v in list_versions(job, index)]
        assert left == [made[2], made[1]]
        assert not index.exists(made[0]) and index.exists(made[1]) and index.exists(made[2])
        assert index.count(made[2]) == 40
    assert not (tmp_path / "v" / made[0]).exists()
    assert (tmp_path / "v" / made[1] / "current.json").exists()


def test_search_loop_sees_no_error_through_a_backfill_and_swap(tmp_path, ray_session) -> None:
    """Backfill to a model of another dimension (384 -> 256) behind a pairs gate while a reader keeps searching."""
    import threading

    import numpy as np

    from conftest import DATASETS

    pairs = DATASETS / "stsbenchmark" / "sts-test.csv"
    if not pairs.exists():
        pytest.skip(f"STS Benchmark not found at {pairs}")
    gate = f"gate.pairs={pairs}"
    sets = [f"output.uri={tmp_path / 'v'}", f"index.path={tmp_path / 'q'}", gate, "gate.tolerance=0.05"]
    old_job = load_job(SAMPLE, sets)
    new_job = load_job(SAMPLE, [*sets, "model.truncate_dim=256"])
    old = run_job(old_job)
    query = "why does bread rise"
    vectors = {384: Encoder(old_job.model).encode([query], kind="query")[0][0],
               256: Encoder(new_job.model).encode([query], kind="query")[0][0]}
    seen: list[str] = []
    errors: list[BaseException] = []
    empty = 0
    stop = threading.Event()

    def reader() -> None:
        nonlocal empty
        with open_index(old_job.index) as index:
            while not stop.is_set():
                try:
                    target = index.alias_target("sample")
                    dim = index.dim(target)
                    hits = index.search(target, np.asarray(vectors[dim]), 5)
                    empty += not hits
                    if not seen or seen[-1] != target:
                        seen.append(target)
                except BaseException as exc:  # any failure is what this test is looking for
                    errors.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        new = run_job(new_job)
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not errors, errors[:3]
    assert empty == 0
    assert new.gate.passed and new.dim == 256
    assert seen == [old.collection, new.collection]
