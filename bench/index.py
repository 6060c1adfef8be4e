"""Index engines on real embeddings: Qdrant Edge against qdrant-client's local mode, in one run.

SciFact's corpus and queries are embedded once with the bundled all-MiniLM-L6-v2 (cached under ``--cache``),
the corpus vectors are tiled with a little noise up to ``--points``, and each engine, in a process of its own
(so its peak RSS is its own), upserts them through reembed's index interface, finishes its index, and
answers every query. Reported per engine:

- ``upserts_per_s``: points over the time spent upserting alone. Qdrant Edge builds HNSW during the load
  (every ``index.segment_points`` points) as well as once after it; each build is timed (``optimize()``) and
  left out of the upsert time, so the figure compares writes with writes;
- ``build_s``: every HNSW build, during the load and after it (local mode builds nothing);
- ``searchable_s``: from the first upsert until the index is finished and a first search has answered, the
  search whose recall is reported: what a user waits for a fresh collection;
- search p50/p95 ms, recall@10 against exact (numpy) search on the same vectors, peak RSS and disk.

The last line is one JSON object when ``--json``:
``{"edge": {...}, "local": {...}, "edge_vs_local_upserts": ratio}`` (of ``upserts_per_s``).

    .venv/bin/python bench/index.py --points 100000 --json
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.encode import SCIFACT  # noqa: E402

K = 10


def embed_scifact(cache: Path, scifact: Path) -> tuple[np.ndarray, np.ndarray]:
    """Corpus and query vectors of SciFact, computed once and cached as .npy."""
    docs_npy, queries_npy = cache / "scifact-docs.npy", cache / "scifact-queries.npy"
    if docs_npy.exists() and queries_npy.exists():
        return np.load(docs_npy), np.load(queries_npy)
    from reembed.workers.encoder import Encoder

    encoder = Encoder()
    docs = [json.loads(line) for line in (scifact / "corpus.jsonl").open(encoding="utf-8")]
    queries = [json.loads(line)["text"] for line in (scifact / "queries.jsonl").open(encoding="utf-8")]
    started = time.perf_counter()
    doc_vectors, _ = encoder.encode([f"{d['title']} {d['text']}" for d in docs])
    query_vectors, _ = encoder.encode(queries, kind="query")
    print(f"embedded {len(docs)} docs and {len(queries)} queries in {time.perf_counter() - started:.0f} s",
          file=sys.stderr)
    cache.mkdir(parents=True, exist_ok=True)
    np.save(docs_npy, doc_vectors.astype(np.float32))
    np.save(queries_npy, query_vectors.astype(np.float32))
    return doc_vectors, query_vectors


def tile(base: np.ndarray, n: int, noise: float = 0.05, seed: int = 0) -> np.ndarray:
    """``n`` unit vectors: the real ones, then noisy copies of them (near-duplicates, like a real corpus has)."""
    rng = np.random.default_rng(seed)
    reps = -(-n // len(base))
    out = np.concatenate([base] * reps)[:n].copy()
    out[len(base):] += rng.normal(scale=noise, size=out[len(base):].shape).astype(np.float32)
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out.astype(np.float32)


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM). Not ``ru_maxrss``: on Linux it survives exec, so a worker started by a
    parent that embedded SciFact would report the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def exact_top_k(queries: np.ndarray, vectors: np.ndarray, block: int = 64) -> np.ndarray:
    """The true top-K of each query by brute force, a block of queries at a time so the bench's own score
    matrix does not dwarf the engine in the process's peak RSS."""
    out = np.empty((len(queries), K), dtype=np.int64)
    for start in range(0, len(queries), block):
        scores = queries[start:start + block] @ vectors.T
        top = np.argpartition(-scores, K, axis=1)[:, :K]
        order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
        out[start:start + block] = np.take_along_axis(top, order, axis=1)
    return out


def run_engine(engine: str, vectors_path: Path, queries_path: Path, folder: Path, batch: int,
               max_queries: int | None = None, segment_points: int | None = None) -> dict:
    """One engine, in this process: upsert, build, search (the first ``max_queries`` queries, or all); figures
    as a dict."""
    from reembed.indexing.index import IndexSettings, open_index
    from reembed.indexing.records import point_id

    vectors = np.load(vectors_path)
    queries = np.load(queries_path)[:max_queries]
    ids = [point_id(f"doc-{i}") for i in range(len(vectors))]
    payloads = [{"doc_id": f"doc-{i}"} for i in range(len(vectors))]
    settings = IndexSettings(engine=engine, path=str(folder), upsert_batch=batch,
                             **({"segment_points": segment_points} if segment_points else {}))
    with open_index(settings) as index:
        index.ensure_collection("bench", vectors.shape[1])
        builds = getattr(index, "build_seconds", {})  # Edge's optimize() calls; local mode builds nothing
        first_upsert = time.perf_counter()
        for start in range(0, len(ids), batch * 8):
            end = start + batch * 8
            index.upsert("bench", ids[start:end], vectors[start:end], payloads[start:end])
        load_s = time.perf_counter() - first_upsert
        built_during_load = builds.get("bench", 0.0)
        index.finish_bulk_load("bench")
        index.search("bench", queries[0], K)
        searchable_s = time.perf_counter() - first_upsert
        build_s = builds.get("bench", 0.0)
        upsert_s = load_s - built_during_load
        assert index.count("bench") == len(ids)
        exact = exact_top_k(queries, vectors)
        position = {pid: i for i, pid in enumerate(ids)}
        latencies, recalls = [], []
        for q, truth in zip(queries, exact):
            started = time.perf_counter()
            hits = index.search("bench", q, K)
            latencies.append((time.perf_counter() - started) * 1000)
            recalls.append(len({position[h["id"]] for h in hits} & set(truth.tolist())) / K)
    disk = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    return {
        "points": len(ids),
        "upsert_s": round(upsert_s, 4),  # 4 places: a 0.06 s load rounded to 0.01 s is 8% off
        "upserts_per_s": round(len(ids) / upsert_s, 1),
        "load_s": round(load_s, 4),  # the upsert loop as a whole, builds during it included
        "build_s": round(build_s, 4),
        "build_during_load_s": round(built_during_load, 4),
        "searchable_s": round(searchable_s, 4),
        "search_p50_ms": round(float(np.percentile(latencies, 50)), 3),
        "search_p95_ms": round(float(np.percentile(latencies, 95)), 3),
        "recall_at_10": round(float(np.mean(recalls)), 4),
        "queries": len(queries),
        "rss_mb": peak_rss_mb(),
        "disk_mb": round(disk / 2**20, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, default=100_000, help="vectors upserted into each engine")
    parser.add_argument("--engines", default="edge,local", help="comma-separated: edge, local")
    parser.add_argument("--batch", type=int, default=256, help="points per upsert request")
    parser.add_argument("--scifact", type=Path, default=SCIFACT, help="SciFact folder (corpus.jsonl, queries.jsonl)")
    parser.add_argument("--cache", type=Path, default=ROOT / "reembed-data" / "bench-cache",
                        help="where the SciFact embeddings are cached between runs")
    parser.add_argument("--local-queries", type=int, default=300,
                        help="queries local mode answers (it searches by brute force: ~0.5 s each at 100k points); "
                             "edge answers every query")
    parser.add_argument("--segment-points", type=int, default=None,
                        help="edge: index.segment_points (build HNSW every this many points during the load) "
                             "[default: the job default, 100000]")
    parser.add_argument("--json", action="store_true", help="end with one JSON object on the last line")
    parser.add_argument("--max-queries", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker", nargs=3, metavar=("ENGINE", "VECTORS", "QUERIES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        engine, vectors, queries = args.worker
        folder = Path(tempfile.mkdtemp(prefix=f"bench-index-{engine}-"))
        try:
            print(json.dumps(run_engine(engine, Path(vectors), Path(queries), folder, args.batch, args.max_queries,
                                        args.segment_points)))
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return

    docs, queries = embed_scifact(args.cache, args.scifact)
    work = Path(tempfile.mkdtemp(prefix="bench-index-"))
    try:
        np.save(work / "vectors.npy", tile(docs, args.points))
        np.save(work / "queries.npy", queries)
        results: dict = {}
        for engine in args.engines.split(","):
            limit = ["--max-queries", str(args.local_queries)] if engine == "local" else []
            if args.segment_points:
                limit += ["--segment-points", str(args.segment_points)]
            proc = subprocess.run([sys.executable, __file__, "--batch", str(args.batch), *limit, "--worker", engine,
                                   str(work / "vectors.npy"), str(work / "queries.npy")],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"{engine} failed:\n{proc.stderr[-3000:]}")
            results[engine] = json.loads(proc.stdout.strip().splitlines()[-1])
            r = results[engine]
            print(f"{engine:>5}: {r['points']} points, {r['upserts_per_s']:.0f} upserts/s (upserts alone), build "
                  f"{r['build_s']:.1f} s ({r['build_during_load_s']:.1f} s of it during the load), searchable after "
                  f"{r['searchable_s']:.1f} s, "
                  f"search p50 {r['search_p50_ms']:.2f} ms p95 {r['search_p95_ms']:.2f} ms, recall@10 "
                  f"{r['recall_at_10']:.4f}, RSS {r['rss_mb']:.0f} MB, disk {r['disk_mb']:.0f} MB", file=sys.stderr)
        if "edge" in results and "local" in results:
            results["edge_vs_local_upserts"] = round(results["edge"]["upserts_per_s"]
                                                     / results["local"]["upserts_per_s"], 3)
            print(f"edge upserts {results['edge_vs_local_upserts']}x local mode's", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
