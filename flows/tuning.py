"""`reembed tune`: fine-tune the job's model contrastively on the team's own relevance data.

The loop this closes: measure (`reembed eval`), fine-tune when the model falls short, backfill with the tuned
model (`reembed run` on the job variant written here: a new version beside the live one, the quality gate
deciding), keep monitoring. Training is sentence-transformers' `SentenceTransformerTrainer` with
`MultipleNegativesRankingLoss` (InfoNCE over in-batch negatives, plus mined hard negatives when asked), on
(query, relevant document) pairs whose texts are built exactly as a run builds them: the job's template over
its own corpus, the model's query and document prompts applied as at encode time.

Where it trains: in this process, or, when the job names a Ray cluster (``runtime.ray_address``), as a Ray
Train job there (a TorchTrainer, one worker per GPU); both run `fit_model`, so the model is the same.

What `tune` reads: the job's corpus, the queries and the qrels it is given (the training judgements). A part of
those queries is held out to pick the epoch (or a dev qrels file is given); test qrels are never its input.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
import tempfile
import time
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Callable, Literal

import yaml

from reembed.flows.config import ConfigError, JobConfig
from reembed.flows.evaluate import read_qrels, read_queries
from reembed.indexing.corpus import plan_shards, read_shard
from reembed.indexing.records import FitResult, FitSpec, TuneDataReport, TuneReport
from reembed.indexing.storage import filesystem, join
from reembed.workers.remote_model import is_remote, upload_model

logger = logging.getLogger(__name__)

Negatives = Literal["none", "bm25", "dense"]
DENSE_SKIP = 3  # dense negatives skip the live collection's first hits: unlabelled positives sit there
CARD = "reembed_tune.json"


def _sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def corpus_texts(job: JobConfig) -> dict[str, str]:
    """Every accepted document of the job's corpus, its text rendered with the job's template (as a run does)."""
    texts: dict[str, str] = {}
    for shard in plan_shards(job.corpus, 1 << 40):
        rows = read_shard(shard, job.corpus)
        texts.update(zip(rows.ids, rows.texts))
    return texts


def training_pairs(queries: dict[str, str], qrels: dict[str, dict[str, int]], docs: dict[str, str],
                   duplicates: int = 0) -> tuple[list[tuple[str, str]], TuneDataReport]:
    """(query id, doc id) pairs to train on, and what was left out and why: judged queries missing from the
    queries file or with empty text, relevant documents absent from the corpus, pairs judged twice (counted
    while reading the qrels: ``duplicates``)."""
    report = TuneDataReport(duplicate_pairs=duplicates)
    pairs: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for qid, judged in qrels.items():
        if qid not in queries:
            report.queries_not_in_file += 1
            continue
        if not queries[qid].strip():
            report.empty_queries += 1
            continue
        relevant = [d for d, grade in judged.items() if grade > 0]
        kept = [d for d in relevant if d in docs and docs[d].strip()]
        report.pairs_without_document += len(relevant) - len(kept)
        if not kept:
            report.queries_without_document += 1
            continue
        for doc in kept:
            if (qid, doc) in seen:
                report.duplicate_pairs += 1
                continue
            seen.add((qid, doc))
            pairs.append((qid, doc))
    report.pairs = len(pairs)
    report.queries = len({q for q, _ in pairs})
    return pairs, report


def bm25_negatives(pairs: list[tuple[str, str]], queries: dict[str, str], docs: dict[str, str],
                   qrels: dict[str, dict[str, int]], seed: int) -> dict[str, str]:
    """One hard negative per training query: its top BM25 hit that is not judged relevant (bm25s)."""
    import bm25s

    ids = sorted(docs)
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize([docs[d] for d in ids], stopwords="en", show_progress=False), show_progress=False)
    wanted = sorted({q for q, _ in pairs})
    hits, _ = retriever.retrieve(bm25s.tokenize([queries[q] for q in wanted], stopwords="en", show_progress=False),
                                 k=min(10, len(ids)), show_progress=False)
    negatives: dict[str, str] = {}
    for qid, row in zip(wanted, hits):
        for index in row:
            doc = ids[int(index)]
            if qrels.get(qid, {}).get(doc, 0) <= 0:
                negatives[qid] = doc
                break
    return negatives


def dense_negatives(job: JobConfig, pairs: list[tuple[str, str]], queries: dict[str, str], docs: dict[str, str],
                    qrels: dict[str, dict[str, int]], skip: int = DENSE_SKIP) -> dict[str, str]:
    """One hard negative per training query from the live collection (the model being tuned, as deployed):
    its best hit after the first ``skip`` ranks that is not judged relevant. Reads the alias, never qrels
    other than the training ones it is given."""
    from reembed.flows.evaluate import search_run
    from reembed.flows.versions import query_model
    from reembed.indexing.index import open_index
    from reembed.workers.encoder import Encoder

    wanted = sorted({q for q, _ in pairs})
    with open_index(job.index) as index:
        if index.alias_target(job.name) is None:
            raise ConfigError(f"--negatives dense mines the live collection, and alias {job.name!r} does not exist "
                              f"in {index.where}: run the job first, or use --negatives bm25")
        vectors, _ = Encoder(query_model(job, index, job.name)).encode([queries[q] for q in wanted], kind="query")
        run = search_run(index, job.name, vectors, wanted, skip + 20, chunked=job.chunking is not None)
    negatives: dict[str, str] = {}
    for qid in wanted:
        ranked = sorted(run.get(qid, {}).items(), key=lambda kv: -kv[1])[skip:]
        for doc, _ in ranked:
            if qrels.get(qid, {}).get(doc, 0) <= 0 and doc in docs:
                negatives[qid] = doc
                break
    return negatives


def _split(pairs: list[tuple[str, str]], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    query_ids = sorted({q for q, _ in pairs})
    random.Random(seed).shuffle(query_ids)
    n_val = max(1, round(len(query_ids) * val_fraction))
    if len(query_ids) - n_val < 1:
        raise ConfigError(f"{len(query_ids)} usable training quer(ies): too few to hold {n_val} out for validation")
    return query_ids[n_val:], query_ids[:n_val]


def tune(job: JobConfig, job_file: str | Path, queries_path: str | Path, qrels_path: str | Path, out: str | Path,
         negatives: Negatives = "none", epochs: int = 1, batch_size: int = 32, learning_rate: float = 5e-5,
         warmup_ratio: float = 0.1, val_fraction: float = 0.1, dev_qrels: str | Path | None = None,
         seed: int = 42) -> TuneReport:
    """Fine-tune ``job``'s model on (query, relevant document) pairs; return what was done, with the tuned
    model folder (a sentence-transformers folder with its model card) and a job variant that uses it."""
    started = time.perf_counter()
    missing = [m for m in ("sentence_transformers", "datasets", "accelerate", "bm25s") if find_spec(m) is None]
    if missing:  # checked first: a missing extra fails before any work, not after the corpus was read
        raise ConfigError(f"reembed tune needs its extra ({', '.join(missing)} missing): "
                          "pip install 'reembed[tune]' (or bash infra/install.sh --test)")
    if not 0 <= warmup_ratio < 1:
        raise ConfigError(f"warm-up is a fraction of the steps, 0 <= ratio < 1, not {warmup_ratio}")
    remote = is_remote(str(out))  # an object store: train in a local folder, then copy the model up
    work = Path(tempfile.mkdtemp(prefix="reembed-tune-")) if remote else Path(out)
    try:
        return _tune(job, job_file, queries_path, qrels_path, str(out), work, negatives, epochs, batch_size,
                     learning_rate, warmup_ratio, val_fraction, dev_qrels, seed, started)
    finally:
        if remote:
            shutil.rmtree(work, ignore_errors=True)


def _tune(job: JobConfig, job_file: str | Path, queries_path: str | Path, qrels_path: str | Path, out: str,
          work: Path, negatives: Negatives, epochs: int, batch_size: int, learning_rate: float, warmup_ratio: float,
          val_fraction: float, dev_qrels: str | Path | None, seed: int, started: float) -> TuneReport:
    from reembed.workers.model_loader import load_profile

    remote = is_remote(out)
    queries = read_queries(queries_path)
    duplicates: list[tuple[str, str]] = []
    qrels = read_qrels(qrels_path, duplicates)
    docs = corpus_texts(job)
    pairs, report = training_pairs(queries, qrels, docs, len(duplicates))
    for reason, count in report.model_dump().items():
        if count and reason not in ("pairs", "queries"):
            logger.warning("training data: %d %s left out", count, reason.replace("_", " "))
    if not pairs:
        raise ConfigError(f"{qrels_path}: no (query, relevant document) pair whose query is in {queries_path} and "
                          f"whose document is in the job's corpus; see the counts above")
    if dev_qrels is not None:
        dev = read_qrels(dev_qrels)
        train_q, val_q = sorted({q for q, _ in pairs} - set(dev)), sorted(q for q in dev if q in queries)
        val_judged = {q: {d for d, g in dev[q].items() if g > 0 and d in docs} for q in val_q}
    else:
        train_q, val_q = _split(pairs, val_fraction, seed)
        val_judged = {q: {d for d, g in qrels[q].items() if g > 0 and d in docs} for q in val_q}
    train_set = set(train_q)
    train_pairs = [(q, d) for q, d in pairs if q in train_set]
    profile = load_profile(job.model)
    mined = (bm25_negatives(train_pairs, queries, docs, qrels, seed) if negatives == "bm25" else
             dense_negatives(job, train_pairs, queries, docs, qrels) if negatives == "dense" else {})
    if negatives != "none":
        logger.info("%s hard negatives for %d of %d training queries", negatives, len(mined), len(train_q))
    columns: dict[str, list[str]] = {"anchor": [queries[q] for q, _ in train_pairs],
                                     "positive": [docs[d] for _, d in train_pairs]}
    if negatives != "none":
        keep = [i for i, (q, _) in enumerate(train_pairs) if q in mined]
        columns = {"anchor": [columns["anchor"][i] for i in keep], "positive": [columns["positive"][i] for i in keep],
                   "negative": [docs[mined[train_pairs[i][0]]] for i in keep]}
    spec = FitSpec(
        model_path=str(profile.path), max_seq_length=profile.max_seq_length,
        query_prompt=profile.query_prompt or None, document_prompt=profile.document_prompt or None,
        columns=columns, val_queries={q: queries[q] for q in val_q}, val_corpus=docs,
        val_relevant={q: sorted(v) for q, v in val_judged.items()}, epochs=epochs, batch_size=batch_size,
        learning_rate=learning_rate, warmup_ratio=warmup_ratio, seed=seed)
    model_dir = work / "model"
    on_ray = job.runtime.ray_address is not None
    fit = fit_on_ray(job, spec, model_dir, work / "ray-train") if on_ray else fit_model(spec, model_dir, work / "checkpoints")
    seconds = round(time.perf_counter() - started, 1)
    job_file = Path(job_file)
    variant = (job_file.resolve().parent / f"{job_file.stem}.tuned-{seed}.yaml") if remote else (work / "job.yaml")
    result = TuneReport(
        model_path=join(out, "model") if remote else str(model_dir.resolve()), base_model=job.model.name,
        base_revision=job.model.revision, job_variant=str(variant.resolve()), train_pairs=len(columns["anchor"]),
        train_queries=len(train_q), val_queries=len(val_q), negatives=negatives,
        hard_negatives=len(mined), epochs=epochs, best_epoch=fit.best_epoch,
        val_metric="ndcg@10", val_score=round(fit.best_score, 6), base_val_score=round(fit.base_score, 6),
        val_scores=[round(v, 6) for v in fit.scores], loss="MultipleNegativesRankingLoss",
        batch_size=batch_size, learning_rate=learning_rate, warmup_ratio=warmup_ratio, seed=seed,
        data={"queries": {"path": str(Path(queries_path).resolve()), "sha256": _sha256(queries_path)},
              "qrels": {"path": str(Path(qrels_path).resolve()), "sha256": _sha256(qrels_path)},
              **({"dev_qrels": {"path": str(Path(dev_qrels).resolve()), "sha256": _sha256(dev_qrels)}}
                 if dev_qrels else {})},
        data_report=report, seconds=seconds, trained_on="ray-train" if on_ray else "in-process",
        workers=fit.workers, device=fit.device)
    if result.val_score < result.base_val_score:
        logger.warning("the tuned model scores below the base model on validation (nDCG@10 %.4f < %.4f): check the "
                       "judgements; a backfill with it is likely to be blocked by the quality gate", result.val_score,
                       result.base_val_score)
    (model_dir / CARD).write_text(json.dumps(result.model_dump(mode="json"), indent=2) + "\n")
    _write_variant(job, job_file, variant, result.model_path)
    if remote:  # where every node of a cluster reads it; the variant stays beside the job file (a copy goes up)
        upload_model(model_dir, result.model_path, job.output.storage_options)
        fs, path = filesystem(join(out, "job.yaml"), job.output.storage_options)
        fs.pipe_file(path, variant.read_bytes())
    logger.info("tuned %s on %d pairs (%s negatives) in %.0f s: validation nDCG@10 %.4f -> %.4f; model %s",
                job.model.name, result.train_pairs, negatives, seconds, fit.base_score, result.val_score, model_dir)
    return result


def fit_model(spec: FitSpec, model_dir: Path, checkpoints: Path, device: str = "cpu",
              prepare: Callable[[Any], Any] | None = None) -> FitResult:
    """Train ``spec`` with sentence-transformers' trainer and save the best epoch's model (by validation
    nDCG@10) to ``model_dir``. The same code runs in-process and inside each Ray Train worker, where torch's
    process group is already set up and the trainer's distributed data loading follows it (``prepare``: Ray's
    ``prepare_trainer`` there)."""
    import torch
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.base.sampler import BatchSamplers
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from transformers import set_seed

    set_seed(spec.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    model = SentenceTransformer(spec.model_path, device=device)
    if spec.max_seq_length:
        model.max_seq_length = spec.max_seq_length
    evaluator = InformationRetrievalEvaluator(
        queries=spec.val_queries, corpus=spec.val_corpus,
        relevant_docs={q: set(d) for q, d in spec.val_relevant.items()}, name="val",
        query_prompt=spec.query_prompt, corpus_prompt=spec.document_prompt,
        ndcg_at_k=[10], mrr_at_k=[10], accuracy_at_k=[1], precision_recall_at_k=[100], map_at_k=[10],
        show_progress_bar=False, batch_size=64, write_csv=False)
    base_score = float(evaluator(model)[evaluator.primary_metric])  # e.g. val_cosine_ndcg@10
    metric = f"eval_{evaluator.primary_metric}"
    prompts = {k: v for k, v in (("anchor", spec.query_prompt), ("positive", spec.document_prompt),
                                 ("negative", spec.document_prompt)) if v and k in spec.columns}
    args = SentenceTransformerTrainingArguments(
        output_dir=str(checkpoints), num_train_epochs=spec.epochs, per_device_train_batch_size=spec.batch_size,
        learning_rate=spec.learning_rate, warmup_steps=spec.warmup_ratio, seed=spec.seed, data_seed=spec.seed,
        batch_sampler=BatchSamplers.NO_DUPLICATES, eval_strategy="epoch", save_strategy="epoch",
        load_best_model_at_end=True, metric_for_best_model=metric, greater_is_better=True, save_total_limit=1,
        logging_steps=10, report_to=[], use_cpu=device == "cpu", dataloader_num_workers=0,
        prompts=prompts or None, disable_tqdm=True)
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=Dataset.from_dict(spec.columns),
                                         loss=MultipleNegativesRankingLoss(model), evaluator=evaluator)
    if prepare is not None:
        trainer = prepare(trainer)
    trainer.train()
    history = [h for h in trainer.state.log_history if metric in h]
    best = max(history, key=lambda h: h[metric]) if history else {metric: base_score, "epoch": 0}
    if trainer.is_world_process_zero():
        trainer.model.save(str(model_dir))
    shutil.rmtree(checkpoints, ignore_errors=True)
    return FitResult(base_score=base_score, scores=[float(h[metric]) for h in history],
                     best_epoch=float(best.get("epoch", 0)), best_score=float(best[metric]), device=device,
                     workers=max(1, trainer.args.world_size))


def _ray_train_worker(config: dict) -> None:
    """One Ray Train worker: train, and (rank 0) hand the model back as the run's checkpoint."""
    import tempfile

    import ray.train
    from ray.train.huggingface.transformers import prepare_trainer
    from ray.train.torch import get_device

    spec = FitSpec(**config["spec"])
    with tempfile.TemporaryDirectory(prefix="reembed-tune-") as tmp:
        fit = fit_model(spec, Path(tmp) / "model", Path(tmp) / "checkpoints", str(get_device()), prepare_trainer)
        rank0 = ray.train.get_context().get_world_rank() == 0
        checkpoint = ray.train.Checkpoint.from_directory(tmp) if rank0 else None
        ray.train.report({"fit": fit.model_dump_json()}, checkpoint=checkpoint)


def fit_on_ray(job: JobConfig, spec: FitSpec, model_dir: Path, storage: Path) -> FitResult:
    """Train as a Ray Train job on the job's Ray cluster (``runtime.ray_address``): a TorchTrainer with one
    worker per GPU the cluster has (one CPU worker where it has none), the best model copied back to
    ``model_dir``. ``storage`` holds Ray Train's checkpoints; on a multi-node cluster it must be a folder every
    node sees."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from reembed.flows.ray_pool import init_ray

    started = init_ray(job)
    try:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        workers = max(1, gpus)
        logger.info("training as a Ray Train job on %s: %d worker(s), %s", job.runtime.ray_address, workers,
                    "one GPU each" if gpus else "CPU")
        storage.mkdir(parents=True, exist_ok=True)
        trainer = TorchTrainer(
            _ray_train_worker, train_loop_config={"spec": spec.model_dump(mode="json")},
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpus > 0),
            run_config=RunConfig(name=f"reembed-tune-{spec.seed}-{int(time.time())}",
                                 storage_path=str(storage.resolve())))
        result = trainer.fit()
        if result.checkpoint is None:
            raise RuntimeError(f"the Ray Train job reported no model: {result.error or 'no checkpoint'}")
        with result.checkpoint.as_directory() as folder:
            shutil.copytree(Path(folder) / "model", model_dir, dirs_exist_ok=True)
        fit = FitResult.model_validate_json(result.metrics["fit"])
    finally:
        if started:
            ray.shutdown()
    shutil.rmtree(storage, ignore_errors=True)
    return fit


def _write_variant(job: JobConfig, job_file: str | Path, target: Path, model_path: str) -> None:
    """The job file with ``model.name`` pointing at the tuned folder, so `reembed run` on it is an ordinary
    backfill of the same corpus into the same output and index. Where the job's corpus, output and index are
    come from the job as loaded (relative paths resolved against the job file's folder, defaults and ``--set``
    included): the variant lives in another folder, and a default such as ``./reembed-data`` would otherwise
    point its backfill at an empty store beside it, with nothing live to gate against."""
    raw = yaml.safe_load(Path(job_file).read_text()) or {}
    for section, key, value in (("corpus", "uri", job.corpus.uri), ("output", "uri", job.output.uri),
                                ("index", "path", job.index.path)):
        raw[section] = {**(raw.get(section) or {}), key: value}
    if job.gate is not None:
        raw["gate"] = {**(raw.get("gate") or {}),
                       **{k: v for k in ("queries", "qrels", "pairs") if (v := getattr(job.gate, k))}}
    raw["model"] = {**(raw.get("model") or {}), "name": model_path}
    target.write_text("# written by `reembed tune`: the job with its tuned model\n" + yaml.safe_dump(raw, sort_keys=False))
