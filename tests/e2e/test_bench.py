"""Smoke tests of the benchmarks on CPU: they run, report every field, and agree with sentence-transformers.

No timing is asserted (speed claims live in docs/benchmarks.md); only that the numbers exist, are sane
and that the outputs are the model's.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT, SCIFACT

pytestmark = pytest.mark.skipif(not (SCIFACT / "corpus.jsonl").exists(), reason="SciFact not found")

ENCODE_KEYS = {"docs_per_s", "tokens_per_s", "st_b128_docs_per_s", "st_best_docs_per_s", "ratio_st_b128",
               "ratio_st_best", "mfu", "padding_pct", "gpu_busy_pct", "max_cos_diff"}


def _run(*args: str) -> dict:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_encode_bench_smoke() -> None:
    result = _run("bench/encode.py", "--device", "cpu", "--models", "minilm,bert-base", "--limit", "8",
                  "--st-batches", "4,128", "--json")
    assert set(result) == {"minilm", "bert-base"}
    for name, r in result.items():
        assert ENCODE_KEYS <= set(r), name
        assert r["docs"] == 8 and r["gpu_busy_pct"] is None
        assert r["docs_per_s"] > 0 and r["tokens_per_s"] > r["docs_per_s"]
        # MFU divides by a matmul peak measured once at start; a busy moment then inflates it, so only an
        # order-of-magnitude error (a unit slip) is caught here
        assert 0 < r["mfu"] < 20 and 0 <= r["padding_pct"] < 100
        # both sides are rounded (ratio to 3 decimals): compare within that rounding
        assert r["ratio_st_b128"] == pytest.approx(r["docs_per_s"] / r["st_b128_docs_per_s"], rel=0.01, abs=2e-3)
        assert r["max_cos_diff"] < 1e-4, name  # float32 on CPU: the same vectors as sentence-transformers


def test_e2e_bench_smoke() -> None:
    result = _run("bench/e2e.py", "--device", "cpu", "--limit", "16", "--shard-rows", "4", "--flow", "--json")
    assert result["docs"] == 16 and result["shards"] == 4
    assert result["encode_only_docs_per_s"] > 0 and result["worker_docs_per_s"] > 0
    assert result["worker_encode_s"] > 0 and result["upsert_points_per_s"] > 0
    assert result["flow"]["encoded"] == 16 and result["flow"]["embed_docs_per_s"] > 0


INDEX_KEYS = {"points", "upserts_per_s", "upsert_s", "load_s", "build_s", "build_during_load_s", "searchable_s",
              "search_p50_ms", "search_p95_ms", "recall_at_10", "rss_mb", "disk_mb"}


def test_index_bench_smoke(tmp_path) -> None:
    """Both engines through bench/index.py on cached stand-in embeddings (so no SciFact encoding here); edge
    builds HNSW twice during the load (every 1,000 points), and those builds are timed apart from the upserts."""
    import numpy as np

    rng = np.random.default_rng(0)
    for name, n in (("scifact-docs.npy", 400), ("scifact-queries.npy", 30)):
        v = rng.normal(size=(n, 384)).astype(np.float32)
        np.save(tmp_path / name, v / np.linalg.norm(v, axis=1, keepdims=True))
    result = _run("bench/index.py", "--points", "2400", "--segment-points", "1000", "--cache", str(tmp_path),
                  "--json")
    assert set(result) == {"edge", "local", "edge_vs_local_upserts"}
    for engine in ("edge", "local"):
        r = result[engine]
        assert INDEX_KEYS <= set(r) and r["points"] == 2400 and r["upserts_per_s"] > 0, engine
        assert r["recall_at_10"] >= 0.95 and 0 < r["search_p50_ms"] <= r["search_p95_ms"], (engine, r)
        assert r["upsert_s"] == pytest.approx(r["load_s"] - r["build_during_load_s"], abs=0.02), (engine, r)
        assert r["upserts_per_s"] == pytest.approx(r["points"] / r["upsert_s"], rel=0.05), (engine, r)
        assert r["searchable_s"] >= r["load_s"] and r["build_s"] >= r["build_during_load_s"], (engine, r)
    edge, local = result["edge"], result["local"]
    assert edge["build_during_load_s"] > 0 and edge["build_s"] >= edge["build_during_load_s"], edge
    assert local["build_s"] == local["build_during_load_s"] == 0, local
    assert result["edge_vs_local_upserts"] == pytest.approx(
        result["edge"]["upserts_per_s"] / result["local"]["upserts_per_s"], rel=0.01)
