"""``runtime.keep_actors``: a run's embedding actors stay loaded for the next in-process run that needs the same
resources, load another model (or a model folder rewritten in place) in their own process, are replaced when the
resources differ, and are killed without the setting."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

import tiny_models
from conftest import write_jsonl
from resume_helpers import _vectors
from reembed.flows import ray_pool
from reembed.flows.config import load_job
from reembed.flows.run_flow import run_job

DOCS = [{"id": f"d{i}", "text": f"Document {i} is about bread, tides and bees number {i}."} for i in range(8)]


def _job(folder: Path, model: Path, keep: bool, name: str = "keep", sets: tuple[str, ...] = ()) -> object:
    write_jsonl(folder / "corpus.jsonl", DOCS)
    (folder / "job.yaml").write_text(
        f"name: {name}\ncorpus: {{uri: corpus.jsonl}}\nmodel: {{name: '{model}'}}\n"
        f"runtime: {{shard_rows: 4, keep_actors: {str(keep).lower()}}}\n")
    return load_job(folder / "job.yaml", list(sets))


def _parked() -> list:
    """What each parked actor reports: its pid and the model it holds (the pool's key for its settings and files)."""
    import ray

    parked = ray_pool._parked
    assert parked is not None, "no actors were kept"
    return ray.get([a.ready.remote() for a in parked.actors], timeout=60)


def _parked_pids() -> list[int]:
    return sorted(i.pid for i in _parked())


def _parked_keys() -> list[str | None]:
    return [i.model_key for i in _parked()]


def _gone(pids: list[int], deadline_s: float = 60) -> bool:
    """True once none of ``pids`` is a live process (ray.kill is asynchronous)."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        alive = []
        for pid in pids:
            try:
                os.kill(pid, 0)
                alive.append(pid)
            except ProcessLookupError:
                pass
        if not alive:
            return True
        time.sleep(0.2)
    return False


@pytest.fixture
def clean_slate(ray_session, monkeypatch):
    """No actors parked before or after (other tests' would otherwise be adopted or evicted here), and the job
    file's keep_actors not overridden by the session's environment twin."""
    monkeypatch.delenv("REEMBED_RUNTIME__KEEP_ACTORS", raising=False)
    ray_pool.release_parked_actors()
    yield ray_session
    ray_pool.release_parked_actors()


def test_kept_actors_serve_the_next_run_and_make_way_for_others(tmp_path, tiny_bert, clean_slate) -> None:
    ray = clean_slate
    first_job = _job(tmp_path / "a", tiny_bert, keep=True)
    first = run_job(first_job)
    assert first.points == len(DOCS)
    kept = _parked_pids()
    assert len(kept) == 2  # two shards on the session Ray's two CPUs
    assert ray.available_resources().get("CPU", 0) == 0  # parked actors keep what they asked for

    again = run_job(_job(tmp_path / "b", tiny_bert, keep=True, name="keep-b"))  # another job, same model
    assert again.points == len(DOCS) and again.encoded == len(DOCS)
    assert _parked_pids() == kept  # the same processes did the work: nothing was started

    _job(tmp_path / "b1", tiny_bert, keep=True, name="keep-b1")
    one = run_job(load_job(tmp_path / "b1" / "job.yaml", ["runtime.num_actors=1"]))  # a number asked for: exactly it
    assert one.actors == 1 and one.points == len(DOCS)
    single = _parked_pids()
    assert len(single) == 1 and not set(single) & set(kept) and _gone(kept)
    kept = single

    other = tiny_models.bert(tmp_path / "other-model", "cls")  # another model: the parked actor loads it in place
    c = _job(tmp_path / "c", other, keep=True, name="keep-c", sets=("runtime.num_actors=1",))
    run_job(c)
    assert _parked_pids() == kept  # the same process: torch and transformers were not imported again
    held = _parked_keys()
    assert held == [ray_pool.model_key(c)]

    weights = next(other.rglob("model.safetensors"))  # the same folder rewritten in place: loaded again
    os.utime(weights, ns=(time.time_ns(), time.time_ns()))
    d = _job(tmp_path / "d", other, keep=True, name="keep-d", sets=("runtime.num_actors=1",))
    run_job(d)
    assert _parked_pids() == kept and _parked_keys() == [ray_pool.model_key(d)] != held

    # what the reloaded actor wrote is the other model's vectors: equal to a fresh actor's, not the first model's
    assert ray_pool.release_parked_actors() == 1 and _gone(kept)
    e = _job(tmp_path / "e", other, keep=True, name="keep-e", sets=("runtime.num_actors=1",))
    run_job(e)
    assert not set(_parked_pids()) & set(kept)
    reloaded, fresh, first_model = _vectors(d), _vectors(e), _vectors(first_job)
    assert reloaded.keys() == fresh.keys() == first_model.keys()
    for doc in fresh:
        assert np.allclose(reloaded[doc], fresh[doc], atol=1e-6)
    assert not all(np.allclose(first_model[doc], fresh[doc], atol=1e-3) for doc in fresh)

    last = _parked_pids()
    assert ray_pool.release_parked_actors() == len(last) == 1 and ray_pool._parked is None and _gone(last)
    end = time.monotonic() + 60  # Ray returns the CPUs once it sees the actors gone
    while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < end:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == 2


def test_without_keep_actors_the_actors_end_with_the_run(tmp_path, tiny_bert, clean_slate) -> None:
    from reembed.flows import run_flow

    seen: list[list[int]] = []
    original = run_flow.ActorPool.__init__

    def record(self, *args, **kwargs):  # the pids of the actors this run started
        original(self, *args, **kwargs)
        seen.append([i.pid for i in self.infos])

    run_flow.ActorPool.__init__ = record
    try:
        summary = run_job(_job(tmp_path / "a", tiny_bert, keep=False))
    finally:
        run_flow.ActorPool.__init__ = original
    assert summary.points == len(DOCS) and ray_pool._parked is None
    assert len(seen) == 1 and _gone(seen[0])
