"""The fault matrix: a run SIGKILLed at each step of its commit (``REEMBED_FAILPOINTS``, a testing aid), and a
reindex killed during its swap. After every kill the alias serves a complete version (its point count equals
that version's manifest), the run log shows the killed run as ``interrupted``, and a re-run converges to
exactly a clean build: the same point ids, equal vectors, no duplicates, nothing lost. On Qdrant Edge and on
qdrant-client's local mode.

The killed runs are console-script subprocesses (only a process can be SIGKILLed) that join the session's
Ray; the runs that build, check and repair run in this process."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, cli_in_process, last_json, run_cli
from reembed.flows.config import load_job
from reembed.flows.failpoints import ENV
from reembed.flows.operations.run_log import RunLog
from reembed.indexing.index import open_index, version_of
from reembed.indexing.vector_store import VectorStore

BACKFILL = ("--set", "model.pooling=cls")  # a new model fingerprint: a new version beside the live one


def _job(folder: Path, engine: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "examples" / "sample" / "corpus.jsonl", folder / "corpus.jsonl")
    (folder / "job.yaml").write_text(
        "name: faulty\ncorpus: {uri: corpus.jsonl, id: id, text: '{title} {text}', payload: [title]}\n"
        f"output: {{uri: vectors}}\nindex: {{engine: {engine}, path: qdrant}}\nruntime: {{shard_rows: 20}}\n")
    return folder / "job.yaml"


def _points(job_path: Path) -> dict[str, tuple[str, np.ndarray]]:
    job = load_job(job_path)
    with open_index(job.index) as index:
        return {p.id: (p.payload["doc_id"], np.asarray(p.vector, dtype=np.float32))
                for p in index.scroll(job.name, ["doc_id"], with_vectors=True)}


def _serving(job_path: Path) -> tuple[str, int, int]:
    """(the version behind the alias, its point count, its manifest's vector rows)."""
    job = load_job(job_path)
    with open_index(job.index) as index:
        physical = index.alias_target(job.name)
        assert physical is not None, "the alias is gone"
        points = index.count(physical)
    manifest = VectorStore(job.output.uri, version_of(physical)).read_manifest()
    assert manifest is not None, f"{physical} serves with no manifest"
    return version_of(physical), points, manifest.vector_rows


@pytest.fixture(scope="module", params=["edge", "local"])
def base(request, tmp_path_factory, ray_session):
    """A committed version (v1), and the clean build of the backfill (v2) every killed run must end up equal to."""
    root = tmp_path_factory.mktemp(f"faults-{request.param}")
    job = _job(root / "base", request.param)
    assert cli_in_process("run", str(job)).returncode == 0
    shutil.copytree(root / "base", root / "clean")
    clean = cli_in_process("run", str(root / "clean" / "job.yaml"), *BACKFILL, "--json")
    assert clean.returncode == 0, clean.stderr[-3000:]
    return root / "base", last_json(clean.stdout)["collection"], _points(root / "clean" / "job.yaml")


def _copy(base_folder: Path, tmp_path: Path) -> Path:
    shutil.copytree(base_folder, tmp_path / "run")
    return tmp_path / "run" / "job.yaml"


def _assert_clean(job_path: Path, reference: dict[str, tuple[str, np.ndarray]]) -> None:
    got = _points(job_path)
    assert sorted(got) == sorted(reference)  # the same point ids: nothing lost, nothing extra
    assert len({doc for doc, _ in got.values()}) == len(got) == 40  # one point per document
    worst = min(float(np.dot(got[k][1], reference[k][1])) for k in got)
    assert worst >= 0.99999, worst


@pytest.mark.parametrize("point", ["upsert", "after-deletes", "after-manifest", "after-alias"])
def test_a_backfill_killed_at_each_commit_step_converges(base, point, tmp_path, ray_address) -> None:
    base_folder, v2, reference = base
    job_path = _copy(base_folder, tmp_path)
    v1, _, _ = _serving(job_path)
    killed = run_cli("run", str(job_path), *BACKFILL,
                     env={ENV: point, "REEMBED_RUNTIME__RAY_ADDRESS": ray_address})
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert f"failpoint {point}: SIGKILL" in killed.stderr
    serving, points, manifest_rows = _serving(job_path)
    assert serving == (v2 if point == "after-alias" else v1)  # the alias moves only once v2 is committed
    assert points == manifest_rows == 40  # and what it serves is complete
    record = RunLog(str(job_path.parent / "vectors"), "faulty").records()[-1]
    assert record.status == "interrupted"

    again = cli_in_process("run", str(job_path), *BACKFILL, "--json")
    assert again.returncode == 0, again.stderr[-3000:]
    assert last_json(again.stdout)["status"] in ("ok", "up-to-date")
    assert _serving(job_path) == (v2, 40, 40)
    _assert_clean(job_path, reference)


def test_a_reindex_killed_during_its_swap_leaves_a_complete_collection_serving(base, tmp_path) -> None:
    """Killed after the alias moved to the rebuild and before the old collection was dropped: the alias serves
    the rebuild, complete; the next reindex drops the leftover and leaves one collection for the version."""
    base_folder, _, _ = base
    job_path = _copy(base_folder, tmp_path)
    v1, _, _ = _serving(job_path)
    before = _points(job_path)
    killed = run_cli("reindex", str(job_path), env={ENV: "reindex-swap"})
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert "failpoint reindex-swap: SIGKILL" in killed.stderr
    job = load_job(job_path)
    with open_index(job.index) as index:
        assert index.alias_target("faulty") == f"{v1}-r2" and index.exists(v1)  # swapped, old not yet dropped
    assert _serving(job_path) == (v1, 40, 40)

    again = cli_in_process("reindex", str(job_path), "--json")
    assert again.returncode == 0, again.stderr[-3000:]
    with open_index(job.index) as index:
        assert index.alias_target("faulty") == f"{v1}-r3"
        assert sorted(c for c in index.collections() if version_of(c) == v1) == [f"{v1}-r3"]
    assert _serving(job_path) == (v1, 40, 40)
    _assert_clean(job_path, before)
