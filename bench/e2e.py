"""End-to-end benchmark: how much of the encoder's rate survives reading shards and writing Parquet.

    python bench/e2e.py --device cuda|cpu --limit N --shard-rows R [--flow] [--json]

On the same SciFact documents, written once as a JSONL corpus, it measures in one process:

- encode-only: ``Encoder.encode`` over all texts (the ceiling);
- worker: ``EmbedWorker.process_shard`` over every planned shard, run the way a Ray actor runs it
  (``--shards-per-actor`` threads, default 2 on cuda and 1 on cpu): read -> tokenize -> encode -> Parquet
  part + marker, with the read / encode / write split;
- upsert: the written parts into a Qdrant local-mode collection, reported separately;
- ``--flow`` (needs Ray and Prefect): the real ``reembed run`` command on the same corpus, a fresh process,
  reporting its ``embed_docs_per_s`` (read -> Parquet) and ``docs_per_s`` (to the last upsert).

It prints the ratios to encode-only and asserts no timing. Without ``--flow`` it needs only torch,
transformers, pyarrow, qdrant-client and reembed's own modules: no Ray, no Prefect.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.encode import SCIFACT, parse_with_data, sync  # noqa: E402
from reembed.indexing.corpus import CorpusSettings, plan_shards  # noqa: E402
from reembed.indexing.records import ShardTask  # noqa: E402
from reembed.indexing.storage import StorageOptions  # noqa: E402
from reembed.indexing.vector_store import VectorStore  # noqa: E402
from reembed.workers.embed_worker import EmbedWorker  # noqa: E402
from reembed.workers.settings import ModelSettings  # noqa: E402


def write_corpus(path: Path, limit: int, scifact: Path = SCIFACT) -> list[str]:
    """SciFact documents as a JSONL corpus with reembed's default columns; returns the rendered texts."""
    texts = []
    with (scifact / "corpus.jsonl").open(encoding="utf-8") as src, path.open("w", encoding="utf-8") as dst:
        for line in src:
            if len(texts) >= limit:
                break
            row = json.loads(line)
            text = f"{row['title']} {row['text']}"
            dst.write(json.dumps({"id": str(row["_id"]), "text": text}) + "\n")
            texts.append(text)
    return texts


def bench_worker(worker: EmbedWorker, corpus: CorpusSettings, out: Path, shard_rows: int, slots: int) -> dict:
    shards = plan_shards(corpus, 1 << 40, shard_rows)
    store_uri = str(out / "vectors")
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=slots) as pool:
        tasks = [ShardTask(shard=s, corpus=corpus, output_uri=store_uri, collection="bench",
                           storage_options=StorageOptions(), model_fingerprint="bench-fp", input_fingerprint="bench")
                 for s in shards]
        results = list(pool.map(worker.process_shard, tasks))
    seconds = time.perf_counter() - start
    rows = sum(r.rows for r in results)
    read = sum(r.read_s for r in results)
    encode = sum(r.encode_s for r in results)
    return {
        "shards": len(shards),
        "rows": rows,
        "seconds": seconds,
        "docs_per_s": rows / seconds,
        "read_s": read,
        "encode_s": encode,
        "write_s": sum(r.seconds for r in results) - read - encode,
        "parts": [r.part_uri for r in results],
        "store_uri": store_uri,
    }


def bench_upsert(parts: list[str], store_uri: str, dim: int, qdrant_path: Path) -> dict:
    from reembed.indexing.index import IndexSettings, open_index
    from reembed.indexing.upload import upsert_part

    store = VectorStore(store_uri, "bench")
    with open_index(IndexSettings(path=str(qdrant_path))) as index:
        index.ensure_collection("bench", dim)
        start = time.perf_counter()
        points = sum(upsert_part(index, store, "bench", uri) for uri in parts)
        status = index.finish_bulk_load("bench")
        seconds = time.perf_counter() - start
    return {"points": points, "seconds": seconds, "points_per_s": points / seconds, "status": status}


def bench_flow(corpus_path: Path, out: Path, device: str, shard_rows: int, model: str) -> dict:
    """The real `reembed run` in a fresh process on the same corpus."""
    job = out / "job.yaml"
    job.write_text(
        "name: bench-e2e\n"
        f"corpus: {{uri: {corpus_path}}}\n"
        f"model: {{name: {json.dumps(model)}, device: {device}}}\n"
        f"output: {{uri: {out / 'flow-vectors'}}}\n"
        f"index: {{path: {out / 'flow-qdrant'}}}\n"
        f"runtime: {{shard_rows: {shard_rows}}}\n",
        encoding="utf-8",
    )
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_HOME": str(out / "prefect")}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "reembed.flows.cli", "run", str(job), "--json"], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"reembed run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    return {key: summary[key] for key in ("encoded", "embed_docs_per_s", "docs_per_s", "startup_s", "seconds",
                                           "actors")} | {"wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--limit", type=int, default=None, help="documents (default: all 5183 on cuda, 256 on cpu)")
    parser.add_argument("--shard-rows", type=int, default=None, help="rows per shard (default: limit / 8)")
    parser.add_argument("--shards-per-actor", type=int, default=None,
                        help="shards processed at once, as runtime.shards_per_actor (default: 2 cuda, 1 cpu)")
    parser.add_argument("--flow", action="store_true", help="also time the real `reembed run` (needs Ray, Prefect)")
    parser.add_argument("--json", action="store_true", help="last line: one JSON object")
    args = parse_with_data(parser)
    model = str(args.minilm.resolve()) if args.minilm else "all-MiniLM-L6-v2"
    limit = args.limit or (5183 if args.device == "cuda" else 256)
    shard_rows = args.shard_rows or max(1, limit // 8)
    slots = args.shards_per_actor or (2 if args.device == "cuda" else 1)

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        corpus_path = out / "corpus.jsonl"
        texts = write_corpus(corpus_path, limit, args.scifact)
        worker = EmbedWorker(ModelSettings(name=model, device=args.device))
        encoder = worker.encoder
        encoder.encode(texts[:64])  # warm-up: kernels, allocator
        start = time.perf_counter()
        encoder.encode(texts)
        sync(args.device)
        encode_rate = len(texts) / (time.perf_counter() - start)

        corpus = CorpusSettings(uri=str(corpus_path))
        work = bench_worker(worker, corpus, out, shard_rows, slots)
        upsert = bench_upsert(work["parts"], work["store_uri"], worker.dim, out / "qdrant")
        result = {
            "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
            "docs": len(texts),
            "shards": work["shards"],
            "shards_per_actor": slots,
            "attention": encoder.attention,
            "attention_fallback": encoder.attention_fallback,
            "encode_only_docs_per_s": round(encode_rate, 2),
            "worker_docs_per_s": round(work["docs_per_s"], 2),
            "ratio_worker_to_encode": round(work["docs_per_s"] / encode_rate, 3),
            "worker_read_s": round(work["read_s"], 3),
            "worker_encode_s": round(work["encode_s"], 3),
            "worker_write_s": round(work["write_s"], 3),
            "upsert_points_per_s": round(upsert["points_per_s"], 1),
            "upsert_s": round(upsert["seconds"], 3),
        }
        del worker, encoder
        if args.flow:
            flow = bench_flow(corpus_path, out, args.device, shard_rows, model)
            result["flow"] = flow
            result["ratio_flow_embed_to_encode"] = round(flow["embed_docs_per_s"] / encode_rate, 3)
            result["ratio_flow_total_to_encode"] = round(flow["docs_per_s"] / encode_rate, 3)

    print(f"{result['device']}: {result['docs']} SciFact docs in {result['shards']} shards | encode-only "
          f"{result['encode_only_docs_per_s']} docs/s | worker (read+encode+Parquet, {slots} at once) "
          f"{result['worker_docs_per_s']} docs/s = x{result['ratio_worker_to_encode']} "
          f"[read {result['worker_read_s']}s encode {result['worker_encode_s']}s write {result['worker_write_s']}s] | "
          f"Qdrant upsert {result['upsert_points_per_s']} points/s", file=sys.stderr)
    if args.flow:
        f = result["flow"]
        print(f"reembed run: read->Parquet {f['embed_docs_per_s']} docs/s = x{result['ratio_flow_embed_to_encode']}, "
              f"to last upsert {f['docs_per_s']} docs/s = x{result['ratio_flow_total_to_encode']} "
              f"(start-up {f['startup_s']}s, process wall {f['wall_s']:.1f}s)", file=sys.stderr)
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
