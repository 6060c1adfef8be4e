"""The fine-tuning loop on full SciFact: base model, `reembed tune`, the backfill through the gate, the result.

In one work folder, all through the console script: (1) `reembed run` of SciFact's 5,183 documents with the
bundled all-MiniLM-L6-v2 and `reembed eval` of the live alias on the **test** qrels (the baseline, measured in
this run); (2) `reembed tune` on the **train** qrels with the chosen hard negatives (it never sees the test
qrels); (3) `reembed run` of the job variant it writes, with a quality gate on the test qrels, so the alias moves
only if the tuned model is no worse; (4) `reembed eval` of the live alias again. Prints base and tuned nDCG@10 and
recall@100, the gain in points, whether the gate passed, and the seconds of each step (the tune's is the figure
issue 17 bounds at 20 minutes on 2 CPU cores).

    .venv/bin/python bench/tune.py --negatives none [--epochs N] [--learning-rate LR] [--work /tmp/tune-bench] [--json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCIFACT = ROOT.parent / "shared" / "datasets" / "scifact"


def _cli(*args: str) -> tuple[dict, float]:
    started = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "reembed.flows.cli", *args, "--json"], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if res.returncode not in (0, 1):
        sys.exit(f"reembed {args[0]} failed ({res.returncode}):\n{res.stderr[-4000:]}")
    lines = [ln for ln in res.stdout.strip().splitlines() if ln.startswith("{")]
    return (json.loads(lines[-1]) if lines else {"exit": res.returncode, "stderr": res.stderr[-2000:]}), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--negatives", choices=["none", "bm25", "dense"], default="none")
    parser.add_argument("--epochs", type=int, default=None, help="default: tune's own")
    parser.add_argument("--learning-rate", default=None, help="default: tune's own")
    parser.add_argument("--work", default="/tmp/reembed-tune-bench", help="kept between runs: the base run is reused")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not (SCIFACT / "corpus.jsonl").exists():
        sys.exit(f"SciFact not found at {SCIFACT}")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    job = work / "job.yaml"
    gate = (f"gate: {{queries: {SCIFACT / 'queries.jsonl'}, qrels: {SCIFACT / 'qrels' / 'test.tsv'}, "
            "metric: ndcg@10, tolerance: 0.0}\n")
    job.write_text(f"name: scifact\ncorpus: {{uri: {SCIFACT / 'corpus.jsonl'}, id: _id, text: '{{title}} {{text}}'}}\n"
                   f"model: {{name: all-MiniLM-L6-v2}}\noutput: {{uri: {work / 'vectors'}}}\n"
                   f"index: {{path: {work / 'qdrant'}}}\n" + gate)
    test = ["--queries", str(SCIFACT / "queries.jsonl"), "--qrels", str(SCIFACT / "qrels" / "test.tsv")]
    steps: dict[str, float] = {}
    base_run, steps["base_run_s"] = _cli("run", str(job))
    base, steps["base_eval_s"] = _cli("eval", str(job), *test)
    out = work / f"tuned-{args.negatives}-{args.epochs or 'default'}-{args.learning_rate or 'default'}"
    if base_run.get("collection") != base.get("collection"):
        sys.exit(f"the live alias is not the base model's version ({base.get('collection')}): "
                 f"`reembed rollback {job}` to it, or use a new --work folder")
    tuned, steps["tune_s"] = _cli("tune", str(job), "--queries", str(SCIFACT / "queries.jsonl"), "--qrels",
                                  str(SCIFACT / "qrels" / "train.tsv"), "--negatives", args.negatives,
                                  *(["--epochs", str(args.epochs)] if args.epochs else []),
                                  *(["--learning-rate", args.learning_rate] if args.learning_rate else []),
                                  "--out", str(out))
    backfill, steps["backfill_s"] = _cli("run", tuned["job_variant"])
    after, steps["after_eval_s"] = _cli("eval", str(job), *test)  # queries encoded by the live (tuned) model
    result = {
        "negatives": args.negatives, "epochs": tuned["epochs"], "learning_rate": tuned["learning_rate"],
        "train_pairs": tuned["train_pairs"], "tuned_collection": after.get("collection"),
        "val_score": tuned["val_score"], "base_val_score": tuned["base_val_score"],
        "base_ndcg@10": round(base["ndcg@10"], 4), "tuned_ndcg@10": round(after["ndcg@10"], 4),
        "gain_points": round(100 * (after["ndcg@10"] - base["ndcg@10"]), 2),
        "base_recall@100": round(base["recall@100"], 4), "tuned_recall@100": round(after["recall@100"], 4),
        "gate": (backfill.get("gate") or {}).get("passed"), "backfill_status": backfill.get("status"),
        "tune_seconds_in_card": tuned["seconds"], **{k: round(v, 1) for k, v in steps.items()},
        "base_run_status": base_run.get("status"),
    }
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>22}  {value}")
    if after.get("collection") != base.get("collection"):  # the base live again: the next run reuses this folder
        res = subprocess.run([sys.executable, "-m", "reembed.flows.cli", "rollback", str(job), base["collection"]],
                             capture_output=True, text=True)
        if res.returncode != 0:
            print(f"could not make the base live again: {res.stderr.strip()[-500:]}", file=sys.stderr)


if __name__ == "__main__":
    main()
