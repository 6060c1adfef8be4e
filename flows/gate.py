"""The quality gate: a new version goes live only if it scores at least the live one minus a tolerance.

Both versions are evaluated on the same queries (or pairs), each with its own model, read back from its run
manifest, so a backfill with a new model is compared fairly against what users search today.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from reembed.flows.config import JobConfig
from reembed.indexing.records import GateResult, Manifest, RunSummary
from reembed.workers.settings import ModelSettings

if TYPE_CHECKING:
    from reembed.indexing.index import VectorIndex

logger = logging.getLogger(__name__)


class GateFailed(RuntimeError):
    """The new version scored worse than the live one beyond the tolerance; the alias was not moved."""

    def __init__(self, result: GateResult, summary: RunSummary) -> None:
        self.result = result
        self.summary = summary
        super().__init__(
            f"quality gate blocked the swap: {result.metric} new {result.new_score:.4f} ({result.new}) < "
            f"live {result.live_score:.4f} ({result.live}) - tolerance {result.tolerance}; "
            f"the alias stays on {result.live} (use --force REASON to override)"
        )


def _score(job: JobConfig, model: ModelSettings, index: "VectorIndex", collection: str, chunked: bool) -> float:
    # torch, transformers and scipy load here, only for jobs with a gate: a run without one starts seconds sooner
    from reembed.flows.evaluate import evaluate_pairs, evaluate_retrieval
    from reembed.workers.encoder import Encoder

    gate = job.gate
    assert gate is not None
    encoder = Encoder(model)
    if gate.pairs:
        metrics = evaluate_pairs(encoder, gate.pairs)
    else:
        metrics = evaluate_retrieval(job, encoder, index, collection, gate.queries, gate.qrels, chunked=chunked)
    metric = gate.resolved_metric()
    if metric not in metrics:
        raise ValueError(f"gate.metric {metric!r} is not one of {sorted(k for k in metrics if '@' in k or k in ('spearman', 'pearson'))}")
    return float(metrics[metric])


def check_gate(job: JobConfig, index: "VectorIndex", new: str, live: str, live_manifest: Manifest | None) -> GateResult:
    """Scores of the new and live versions and whether the new one may go live."""
    gate = job.gate
    assert gate is not None
    new_score = _score(job, job.model, index, new, job.chunking is not None)
    if live_manifest is None or not live_manifest.model_settings:
        logger.warning("live version %s records no model settings; the gate cannot score it and lets %s through",
                       live, new)
        return GateResult(metric=gate.resolved_metric(), new=new, live=live, new_score=new_score, live_score=None,
                          tolerance=gate.tolerance, passed=True)
    live_score = _score(job, ModelSettings(**live_manifest.model_settings), index, live, live_manifest.chunked)
    return GateResult(metric=gate.resolved_metric(), new=new, live=live, new_score=new_score, live_score=live_score,
                      tolerance=gate.tolerance, passed=new_score >= live_score - gate.tolerance)
