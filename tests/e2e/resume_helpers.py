"""What the resume tests share: the job they run, how a run is started and SIGKILLed, how the index and the
vectors are compared. The reference run the killed runs must end up equal to is ``kill_reference``
(tests/conftest.py, built once per session)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from conftest import ROOT, process_tree, reembed_cli
from reembed.indexing.index import open_index
from reembed.indexing.vector_store import VectorStore, arrow_to_vectors


def _vectors(job) -> dict[str, np.ndarray]:
    with open_index(job.index) as index:
        collection = index.alias_target(job.name)
    table = VectorStore(job.output.uri, collection, job.output.storage_options).read_all(["doc_id", "vector"])
    return dict(zip(table.column("doc_id").to_pylist(), arrow_to_vectors(table.column("vector"))))


def _points(job) -> dict[str, str]:
    with open_index(job.index) as index:
        return {p.id: p.payload["doc_id"] for p in index.scroll(job.name, ["doc_id"])}


def _assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    worst = min(float(np.dot(a[k], b[k])) for k in a)
    assert worst >= 0.99999, worst


def _job(folder: Path, name: str, extra: str = "") -> Path:
    (folder / "job.yaml").write_text(
        f"name: {name}\ncorpus: {{uri: corpus.jsonl, id: _id, text: '{{title}} {{text}}'}}\n"
        f"runtime: {{shard_rows: 25}}\n{extra}"
    )
    return folder / "job.yaml"


def _indexed(job) -> dict[str, tuple[str, np.ndarray]]:
    """Every point's payload and vector, read back from the index."""
    with open_index(job.index) as index:
        return {p.id: (json.dumps(p.payload, sort_keys=True), np.asarray(p.vector, dtype=np.float32))
                for p in index.scroll(job.name, ["doc_id", "text_sha256", "model", "text", "source_row", "title"],
                                      with_vectors=True)}


def _descendants(pid: int) -> list[int]:
    return process_tree(pid)[1:]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _start(job: Path, *sets: str, ray_address: str | None = None) -> subprocess.Popen:
    """`reembed run` in a subprocess (its own session, so it can be SIGKILLed with what it started). With
    ``ray_address`` it joins the session's Ray instead of starting a local one (seconds of CPU less per run):
    the embedding actors parked by earlier in-process runs are released first, or its own would wait for CPUs.
    A killed driver's actors there go on until Ray notices, which the lease fence makes harmless: they find
    another run's lease and write nothing."""
    if ray_address is not None:
        from reembed.flows.ray_pool import release_parked_actors

        release_parked_actors()
        sets = (*sets, "--set", f"runtime.ray_address={ray_address}")
    return subprocess.Popen([*reembed_cli(), "run", str(job), "--json", *sets], cwd=ROOT, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the flow process and everything it started (its temporary Prefect server, its local Ray)."""
    pids = _descendants(proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


def _markers(job) -> dict[str, dict]:
    """The shard markers as stored, each part resolved under the store's root (markers name it relatively)."""
    store = VectorStore(job.output.uri, job.collection_name(384))
    fs_root = Path(store.root) / "shards"
    markers = {p.stem: json.loads(p.read_text()) for p in fs_root.glob("*.json")} if fs_root.exists() else {}
    return {k: {**m, "part_uri": store.locate(m["part_uri"])} for k, m in markers.items()}


def _kill_when(proc: subprocess.Popen, ready: Callable[[], bool], poll_s: float = 0.05, what: str = "run",
               deadline_s: float = 300) -> None:
    """SIGKILL the run and what it started once ``ready()`` holds (or at the deadline); a run that had already
    ended tested nothing, which fails the test with the run's output."""
    deadline = time.time() + deadline_s
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(poll_s)
    finished_before_kill = proc.poll() is not None
    _kill_group(proc)
    assert not finished_before_kill, (f"the {what} ended before the kill: the trial tested nothing",
                                      proc.stdout.read()[-3000:])


def _wait_for(path: Path, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while not path.exists():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)
