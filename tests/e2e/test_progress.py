"""Progress over documents, not shards: a big file on two actors reports as it goes, from inside its shards."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import tiny_models
from conftest import SCIFACT, last_json, run_cli


@pytest.fixture(scope="module")
def progress_model(tmp_path_factory) -> Path:
    """A random BERT big enough that one SciFact shard takes several seconds to encode on one CPU thread."""
    return tiny_models.bert(tmp_path_factory.mktemp("progress-model"), "mean", hidden=128, layers=4,
                            max_seq_length=256)


def test_one_8mb_file_uses_both_actors_with_progress_inside_shards(tmp_path, progress_model, ray_address) -> None:
    """The console script on the session's Ray (both its CPUs, the parked actors released first)."""
    if not (SCIFACT / "corpus.jsonl").exists():
        pytest.skip("SciFact not found")
    folder = tmp_path / "scifact"
    folder.mkdir()
    (folder / "job.yaml").write_text(
        f"name: sf\ncorpus: {{uri: {SCIFACT / 'corpus.jsonl'}, id: _id, text: '{{title}} {{text}}'}}\n"
        f"model: {{name: {progress_model}}}\nruntime: {{num_actors: 2, progress_seconds: 1}}\n")
    res = run_cli("run", str(folder / "job.yaml"), "--json", "--set", f"runtime.ray_address={ray_address}",
                  timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = last_json(res.stdout)
    assert summary["input_rows"] == 5183 and summary["shards_total"] >= 2 and summary["actors_used"] == 2
    lines = [line for line in res.stderr.splitlines() if "progress: " in line]
    assert len(lines) >= 3, res.stderr[-3000:]
    done = [int(re.search(r"progress: (\d+)/", line).group(1)) for line in lines]
    assert done == sorted(done), lines  # the count only moves forward
    # docs move, report after report, while no shard has finished yet: actors report from inside a shard as
    # they go (every progress_seconds), not only at its end
    inside = {d for d, line in zip(done, lines) if "shards 0/" in line and d > 0}
    assert len(inside) >= 2, lines
    assert re.search(r"progress: 5183/5183 docs \(100.0%\)", lines[-1]), lines[-1]
