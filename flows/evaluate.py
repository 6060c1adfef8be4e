"""``reembed eval``: retrieval quality against the live alias, and pair similarity, as the benchmarks compute them.

Retrieval follows BEIR/MTEB: every query with judgements is embedded with the model's query prompt, the top
1000 hits come from the live alias (chunks collapsed to their best-scoring document), and nDCG@10, recall@100
and MRR@10 are computed by pytrec_eval. Similarity follows MTEB STS: Spearman and Pearson of the cosine of the
two sentences' embeddings against the gold scores.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np
from scipy.stats import pearsonr, spearmanr

from reembed.flows.config import ConfigError, JobConfig
from reembed.indexing.index import VectorIndex
from reembed.workers.encoder import Encoder

logger = logging.getLogger(__name__)

PairsFormat = Literal["auto", "stsb", "sick", "jsonl"]


def read_queries(path: str | Path) -> dict[str, str]:
    """BEIR queries.jsonl (``_id``, ``text``) or a TSV of ``id<TAB>text``."""
    path = Path(path)
    queries: dict[str, str] = {}
    with path.open(encoding="utf-8") as fh:
        if path.suffix in (".tsv", ".txt"):
            for row in csv.reader(fh, delimiter="\t"):
                if len(row) >= 2:
                    queries[row[0]] = row[1]
        else:
            for n, line in enumerate(fh, start=1):
                if line.strip():
                    try:
                        rec = json.loads(line)
                        queries[str(rec.get("_id", rec.get("id")))] = rec["text"]
                    except (ValueError, KeyError) as exc:
                        raise ConfigError(f"{path}: row {n}: not a query object with _id and text ({exc})") from None
    return queries


def read_qrels(path: str | Path, duplicates: list[tuple[str, str]] | None = None) -> dict[str, dict[str, int]]:
    """BEIR qrels TSV (``query-id corpus-id score``, header optional, CRLF tolerated). A (query, document) judged
    twice keeps its last grade; ``duplicates``, when given, collects such pairs."""
    qrels: dict[str, dict[str, int]] = {}
    with Path(path).open(encoding="utf-8", newline="") as fh:
        for n, row in enumerate(csv.reader(fh, delimiter="\t"), start=1):
            row = [c.strip() for c in row]
            if not row or (n == 1 and not row[-1].lstrip("-").isdigit()):
                continue
            if len(row) < 3:
                raise ConfigError(f"{path}: row {n}: expected query-id, corpus-id, score")
            judged = qrels.setdefault(row[0], {})
            if duplicates is not None and row[1] in judged:
                duplicates.append((row[0], row[1]))
            judged[row[1]] = int(row[2])
    return qrels


def read_pairs(path: str | Path, fmt: PairsFormat = "auto") -> tuple[list[str], list[str], np.ndarray]:
    """Sentence pairs with gold scores from STS Benchmark TSV, SICK, or JSON lines."""
    path = Path(path)
    if fmt == "auto":
        if path.suffix in (".jsonl", ".json"):
            fmt = "jsonl"
        else:
            with path.open(encoding="utf-8") as fh:
                first = fh.readline()
            fmt = "sick" if first.startswith("pair_ID") else "stsb"
    a: list[str] = []
    b: list[str] = []
    gold: list[float] = []
    with path.open(encoding="utf-8", newline="") as fh:
        if fmt == "jsonl":
            for line in fh:
                if line.strip():
                    rec = json.loads(line)
                    a.append(rec["sentence1"])
                    b.append(rec["sentence2"])
                    gold.append(float(rec.get("label", rec.get("score"))))
        elif fmt == "sick":
            for rec in csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE):
                a.append(rec["sentence_A"])
                b.append(rec["sentence_B"])
                gold.append(float(rec["relatedness_score"]))
        else:  # STS Benchmark: genre, file, year, id, score, s1, s2 [, extra...]; quoting off
            for row in csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE):
                if len(row) >= 7:
                    gold.append(float(row[4]))
                    a.append(row[5])
                    b.append(row[6])
    if not gold:
        raise ConfigError(f"{path}: no sentence pairs read (format {fmt})")
    return a, b, np.asarray(gold, dtype=np.float64)


def evaluate_pairs(encoder: Encoder, path: str | Path, fmt: PairsFormat = "auto") -> dict[str, Any]:
    """Spearman and Pearson of each pair's cosine against its gold score. Each distinct sentence is encoded
    once: pair sets reuse sentences (SICK-R's 9,927 pairs hold 6,077 distinct ones in 19,854 slots), and a
    sentence's vector does not depend on which pair it came from."""
    a, b, gold = read_pairs(path, fmt)
    distinct = list(dict.fromkeys([*a, *b]))
    slot = {text: i for i, text in enumerate(distinct)}
    vectors, _ = encoder.encode(distinct, kind="query")
    # Cosines in float64: close-together cosines (a weak model) make Pearson amplify float32 rounding.
    va = vectors[[slot[t] for t in a]].astype(np.float64)
    vb = vectors[[slot[t] for t in b]].astype(np.float64)
    na = va / np.linalg.norm(va, axis=1, keepdims=True).clip(min=1e-12)
    nb = vb / np.linalg.norm(vb, axis=1, keepdims=True).clip(min=1e-12)
    cos = (na * nb).sum(axis=1)
    return {
        "spearman": float(spearmanr(cos, gold).statistic),
        "pearson": float(pearsonr(cos, gold).statistic),
        "pairs": int(len(gold)),
    }


def search_run(index: VectorIndex, alias: str, vectors: np.ndarray, ids: list[str], depth: int,
               chunked: bool = False) -> dict[str, dict[str, float]]:
    """Top-``depth`` documents per query, chunks collapsed to their best score."""
    run: dict[str, dict[str, float]] = {}
    for qid, vec in zip(ids, vectors):
        docs: dict[str, float] = {}
        for hit in index.search(alias, vec, depth, collapse=chunked):
            doc = str(hit.get("doc_id"))
            docs[doc] = max(docs.get(doc, -1e9), hit["score"])
        run[qid] = docs
    return run


def evaluate_retrieval(job: JobConfig, encoder: Encoder, index: VectorIndex, alias: str, queries_path: str | Path,
                       qrels_path: str | Path, depth: int = 1000, chunked: bool | None = None) -> dict[str, Any]:
    import pytrec_eval

    queries = read_queries(queries_path)
    qrels = read_qrels(qrels_path)
    missing = [q for q in qrels if q not in queries]
    if missing:
        raise ConfigError(f"{qrels_path}: {len(missing)} judged query id(s) not in {queries_path}, e.g. {missing[:3]}")
    ids = sorted(qrels)
    vectors, _ = encoder.encode([queries[q] for q in ids], kind="query")
    run = search_run(index, alias, vectors, ids, depth, chunked=job.chunking is not None if chunked is None else chunked)
    top10 = {q: dict(sorted(d.items(), key=lambda kv: -kv[1])[:10]) for q, d in run.items()}
    per_query = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.100"}).evaluate(run)
    mrr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(top10)
    n = len(ids)
    return {
        "ndcg@10": sum(v["ndcg_cut_10"] for v in per_query.values()) / n,
        "recall@100": sum(v["recall_100"] for v in per_query.values()) / n,
        "mrr@10": sum(v["recip_rank"] for v in mrr.values()) / n,
        "queries": n,
        "depth": depth,
        "alias": alias,
        "collection": index.alias_target(alias),
    }
