"""What an embedding actor tells Prometheus about itself, through Ray's metrics (``ray.util.metrics``).

Prometheus' guidance for long-running workers is to scrape them: each Ray node's metrics agent serves what its
actors record on the node's metrics export port (``ray start --metrics-export-port``), with a ``ray_`` prefix
and Ray's own labels (``WorkerId``, ``NodeAddress``, ``SessionName``), so one series per actor. A counter
outlives its actor in the agent's export, so the sum over actors of ``ray_reembed_actor_tokens_total`` is
what the run encoded even after the pool is gone.

Outside a Ray worker (tests, ``reembed search``, the CLI's local encoder) there is nowhere to report to, and
``actor_metrics`` returns None.
"""

from __future__ import annotations

import logging
import time
from typing import Any

logger = logging.getLogger(__name__)

# Seconds of one batch's forward pass: from a few ms (a small GPU batch) to tens of seconds (a long-context
# model on a CPU core).
ENCODE_SECONDS_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
GPU_SAMPLE_SECONDS = 5.0  # NVML is asked at most this often


class ActorMetrics:
    """The counters, histogram and gauges of one embedding actor, labelled with its model."""

    def __init__(self, model_id: str, device: Any = None) -> None:
        from ray.util.metrics import Counter, Gauge, Histogram

        self.tags = {"model": model_id}
        keys = ("model",)
        self.documents = Counter("reembed_actor_documents_total", tag_keys=keys,
                                 description="Documents this actor encoded (reused and quarantined ones excluded).")
        self.tokens = Counter("reembed_actor_tokens_total", tag_keys=keys,
                              description="Tokens this actor fed the model, special tokens included.")
        self.batches = Counter("reembed_actor_batches_total", tag_keys=keys,
                               description="Batches this actor ran through the model.")
        self.encode_seconds = Histogram("reembed_actor_encode_seconds", boundaries=ENCODE_SECONDS_BUCKETS,
                                        tag_keys=keys, description="Seconds of one batch's forward pass on the host "
                                        "(on a GPU: until the kernels are queued, or the device made it wait).")
        self.queue = Gauge("reembed_actor_tokenize_queue_depth", tag_keys=keys,
                           description="Tokenized batches waiting for the model (0: the model waits for text).")
        self.gpu = None
        self.device = device
        self._gpu_at = 0.0
        if device is not None and getattr(device, "type", None) == "cuda":
            self.gpu = Gauge("reembed_actor_gpu_busy_ratio", tag_keys=keys,
                             description="Share of the last sample period the actor's GPU was busy (NVML), 0-1.")

    def batch(self, tokens: int, seconds: float, queued: int) -> None:
        """One batch went through the model: ``tokens`` in it, ``seconds`` in the forward pass, ``queued``
        tokenized batches waiting behind it."""
        self.tokens.inc(tokens, tags=self.tags)
        self.batches.inc(1, tags=self.tags)
        self.encode_seconds.observe(seconds, tags=self.tags)
        self.queue.set(queued, tags=self.tags)
        if self.gpu is not None and time.monotonic() - self._gpu_at >= GPU_SAMPLE_SECONDS:
            self._gpu_at = time.monotonic()
            self._sample_gpu()

    def encoded(self, documents: int) -> None:
        """A shard is written: ``documents`` of it were encoded (the rest reused or quarantined)."""
        if documents:
            self.documents.inc(documents, tags=self.tags)

    def _sample_gpu(self) -> None:
        import torch

        try:
            busy = torch.cuda.utilization(self.device)
        except Exception as exc:  # no NVML binding (nvidia-ml-py) or no driver access: stop asking
            logger.info("no GPU utilisation for the actor metrics: %s", exc)
            self.gpu = None
            return
        self.gpu.set(busy / 100.0, tags=self.tags)


def actor_metrics(model_id: str, device: Any = None) -> ActorMetrics | None:
    """Metrics for an actor, or None outside a Ray worker process (nothing would export them)."""
    try:
        import ray
    except ImportError:
        return None
    if not ray.is_initialized() or ray.get_runtime_context().worker.mode != ray.WORKER_MODE:
        return None
    return ActorMetrics(model_id, device)
