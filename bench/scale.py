"""Refresh cost at scale: a full run, a no-op re-run and a 0.1%-changed re-run of a large synthetic corpus.

A tiny random BERT (built from a config, as the tests do) keeps the encoder from dominating, so the figures
show what reembed itself costs: planning, reading, Parquet, the index, the reconcile. Each run is the real
``reembed run`` in a fresh process; its driver's peak RSS is read from inside that process. Process start-up
(imports, Prefect's temporary server, Ray) is reported as its own figure, and the three run times leave it out:
``work = planning + summary seconds - flow start-up`` for runs that start the flow (start-up being Prefect,
Ray and the actors loading the model), the whole CLI time for a no-op (it plans and answers without a flow).
Each run's ``phases`` (``RunSummary.phases``: planning's listing, markers, manifest and index check; the
actors' read, reuse, encode and write summed over actors; the driver's upsert, vector set, reconcile and
manifest write) show where its seconds went, so a regression shows where it is.

    .venv/bin/python bench/scale.py --docs 1000000 --json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

WORDS = ("alpha beta gamma delta river mountain yeast bread tide moon bee dance solar panel memory sleep vector "
         "database neighbour embedding quick brown fox lazy dog plate tectonic volcano").split()

# Runs the CLI in this process and writes its peak RSS (this process only: the driver) where the bench reads it.
DRIVER = ("import atexit, resource, sys\n"
          "rss_file = sys.argv.pop(1)\n"
          "atexit.register(lambda: open(rss_file, 'w').write(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)))\n"
          "from reembed.flows.cli import main\n"
          "sys.argv[0] = 'reembed'\n"
          "main()\n")


def write_corpus(path: Path, n: int, changed: set[int] | None = None, seed: int = 0) -> None:
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as fh:
        for i in range(n):
            words = " ".join(rng.choice(WORDS) for _ in range(12))
            if changed and i in changed:
                words += " revised"
            fh.write(json.dumps({"id": f"doc-{i}", "text": f"document {i}: {words}"}) + "\n")


def run(job: Path, work: Path, label: str) -> dict:
    rss_file = work / f"{label}.rss"
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(rss_file), "run", str(job), "--json"],
                          capture_output=True, text=True, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{label} run failed:\n{proc.stderr[-3000:]}")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    flow_startup = summary.get("startup_s") or 0.0
    if summary["status"] == "up-to-date":  # planned and answered without starting the flow
        work_s = summary["seconds"]
    else:  # the CLI's planning, then the flow less its start-up
        work_s = (summary.get("plan_s") or 0.0) + summary["seconds"] - flow_startup
    result = {"wall_s": round(wall, 2), "work_s": round(work_s, 2), "startup_s": round(wall - work_s, 2),
              "status": summary["status"], "encoded": summary["encoded"], "reused": summary["reused"],
              "upserted": summary.get("upserted", 0),
              "deleted": summary["deleted"], "points": summary["points"],
              "driver_rss_mb": round(int(rss_file.read_text()) / 1024, 1), "phases": summary.get("phases", {})}
    print(f"{label}: {result}", file=sys.stderr)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=1_000_000, help="documents in the synthetic corpus")
    parser.add_argument("--changed", type=float, default=0.001, help="fraction of documents changed for the third run")
    parser.add_argument("--engine", default="edge", help="index.engine for the runs")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the corpus, vectors and index here")
    parser.add_argument("--json", action="store_true", help="end with one JSON object on the last line")
    args = parser.parse_args()

    import tiny_models

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        model = tiny_models.bert(work, "mean", hidden=32, layers=2, max_seq_length=32)
        corpus = work / "corpus.jsonl"
        write_corpus(corpus, args.docs)
        job = work / "job.yaml"
        job.write_text(f"name: scale\ncorpus: {{uri: {corpus}}}\nmodel: {{name: '{model}'}}\n"
                       f"output: {{uri: {work / 'vectors'}}}\nindex: {{engine: {args.engine}, path: {work / 'index'}}}\n")
        full = run(job, work, "full")
        noop = run(job, work, "noop")
        changed = set(random.Random(1).sample(range(args.docs), max(1, int(args.docs * args.changed))))
        write_corpus(corpus, args.docs, changed)
        refresh = run(job, work, "changed")
        assert refresh["encoded"] == len(changed) and refresh["points"] == args.docs, refresh
        assert refresh["upserted"] == len(changed), refresh  # edited in place: only the changed points are written
        result = {
            "docs": args.docs, "changed_docs": len(changed), "engine": args.engine,
            "full_s": full["work_s"], "noop_s": noop["work_s"], "changed_s": refresh["work_s"],
            "startup_s": full["startup_s"],
            "noop_vs_full": round(noop["work_s"] / full["work_s"], 4),
            "changed_vs_full": round(refresh["work_s"] / full["work_s"], 4),
            "peak_rss_mb": max(r["driver_rss_mb"] for r in (full, noop, refresh)),
            "runs": {"full": full, "noop": noop, "changed": refresh},
        }
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"{args.docs} docs: full {result['full_s']} s, no-op {result['noop_s']} s ({result['noop_vs_full']:.2%}), "
          f"{args.changed:.1%} changed {result['changed_s']} s ({result['changed_vs_full']:.2%}), start-up {result['startup_s']} s, "
          f"driver peak RSS {result['peak_rss_mb']} MB", file=sys.stderr)
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
