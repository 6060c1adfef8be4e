"""The model backend: texts in, L2-normalised float32 vectors out.

Stages follow sentence-transformers (tokenize -> token embeddings -> pooling -> normalize) so outputs match
it, but batches are cut by a token budget over length-sorted texts (text-embeddings-inference style), which
keeps padding small and the batch as large as memory allows. This class knows nothing of Ray, Prefect or
storage: it is the one narrow interface between orchestration and the model.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from reembed.workers.model_loader import ModelProfile, load_profile
from reembed.workers.packed import PackedBatch, PackedEncoder, pack, unsupported_reason, varlen_kernel
from reembed.workers.pooling import pool
from reembed.workers.settings import ModelSettings

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_FLUSH_ROWS = 32768  # vectors kept on the device before one copy back to the host


@dataclass
class EncodeStats:
    """What one ``encode`` call did; summed over shards into the run summary."""

    docs: int = 0
    tokens: int = 0
    padded_tokens: int = 0
    truncated_docs: int = 0
    dropped_tokens: int = 0
    batches: int = 0
    seconds: float = 0.0
    truncated_rows: list[int] = field(default_factory=list)


def pick_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("model.device is 'cuda' but torch sees no CUDA device (is a CPU build of torch installed?)")
    return torch.device(requested)


class Encoder:
    """Load a model once, then encode many batches of text with it."""

    def __init__(self, settings: ModelSettings | None = None, *, cpu_threads: int | None = None) -> None:
        from transformers import AutoModel, AutoTokenizer
        from transformers.tokenization_utils_base import PaddingStrategy, TruncationStrategy
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

        self.settings = settings or ModelSettings()
        self.profile: ModelProfile = load_profile(self.settings)
        self.device = pick_device(self.settings.device)
        threads = self.settings.cpu_threads or cpu_threads
        if self.device.type == "cpu":
            if threads:
                torch.set_num_threads(int(threads))
        else:
            _parallel_tokenizer(threads)
        dtype_name = self.settings.dtype
        if dtype_name == "auto":
            dtype_name = "float16" if self.device.type == "cuda" else "float32"
        self.dtype = _DTYPES[dtype_name]
        # On cpu a small batch keeps the activations in cache (measured on 2 AVX2 cores: 2048 tokens ran MiniLM
        # ~1.5x faster than 16384); on a GPU a large one fills the device.
        self.max_batch_tokens = self.settings.max_batch_tokens or (65536 if self.device.type == "cuda" else 2048)
        self.tokenizer = AutoTokenizer.from_pretrained(self.profile.path, use_fast=True)
        if not getattr(self.tokenizer, "is_fast", False):
            raise RuntimeError(f"model {self.profile.model_id!r} has no fast (Rust) tokenizer; reembed needs one")
        self._truncation = {"padding_strategy": PaddingStrategy.DO_NOT_PAD,
                            "truncation_strategy": TruncationStrategy.LONGEST_FIRST,
                            "max_length": self.profile.max_seq_length, "stride": 0, "pad_to_multiple_of": None,
                            "padding_side": None}
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        self.left_padding = getattr(self.tokenizer, "padding_side", "right") == "left"
        self.model = AutoModel.from_pretrained(self.profile.path, dtype=self.dtype)
        self.model.to(self.device).eval()
        self.use_token_type_ids = "token_type_ids" in getattr(self.tokenizer, "model_input_names", [])
        self.accepts_position_ids = "position_ids" in inspect.signature(self.model.forward).parameters
        hidden = int(getattr(self.model.config, "hidden_size", 0) or 0)
        self.dim = self.profile.truncate_dim or hidden
        self._prompt_len_cache: dict[str, int] = {}
        # A fast tokenizer is not safe to call from two threads at once (truncation settings are shared
        # state), and a GPU actor encodes two shards at a time; tokenizer calls take turns.
        self._tokenizer_lock = threading.Lock()
        self.attention_fallback: str | None = None  # why a faster attention was tried and not used
        self.packed, self.attention = self._pick_attention()
        self.tokenize_ahead = True if self.settings.tokenize_ahead is None else self.settings.tokenize_ahead
        # Texts tokenized (and length-sorted) together: big enough for tight batches, small enough that the
        # model starts while the rest of a shard is still being tokenized.
        self.block_docs = max(256, self.max_batch_tokens // 32)
        logger.info(
            "loaded %s from %s on %s/%s: pooling=%s max_seq_length=%d dim=%d attention=%s",
            self.profile.model_id, self.profile.path, self.device, dtype_name,
            self.profile.pooling, self.profile.max_seq_length, self.dim, self.attention,
        )

    def _pick_attention(self) -> tuple[PackedEncoder | None, str]:
        """The packed forward where it pays (or was asked for), else Hugging Face's padded one.

        ``auto`` packs only where varlen flash attention runs (cuda, float16/bfloat16): there padding is pure
        waste. Elsewhere packed attention needs a padded copy per layer, which on cpu costs about what the
        dense layers save on length-sorted batches, so the Hugging Face forward (sentence-transformers' own
        code path) stays the default.
        """
        wanted = self.settings.attention
        if wanted == "padded":
            return None, "padded-sdpa"
        reason = unsupported_reason(self.model)
        varlen = self.device.type == "cuda" and self.dtype in (torch.float16, torch.bfloat16) and varlen_kernel() is not None
        if reason:
            if wanted == "packed":
                raise ValueError(f"model.attention is 'packed' but {self.profile.model_id!r} cannot run packed: {reason}")
            if varlen:
                logger.info("padded batches for %s: %s", self.profile.model_id, reason)
            return None, "padded-sdpa"
        if wanted == "auto" and not varlen:
            return None, "padded-sdpa"
        packed = PackedEncoder(self.model, use_varlen=varlen)
        failure = packed.varlen_failure() if packed.varlen is not None else None
        if failure:
            self.attention_fallback = f"varlen flash attention failed its start-up check on {self.device}: {failure}"
            logger.warning("%s; using padded attention", self.attention_fallback)
            if wanted == "auto":
                return None, "padded-sdpa"
            packed.varlen = None
        return packed, "packed-varlen" if packed.varlen is not None else "packed-sdpa"

    def _prepare(self, texts: list[str], prompt: str) -> list[str]:
        prepared = [prompt + t for t in texts] if prompt else list(texts)
        prepared = [t.strip() for t in prepared]
        if self.profile.do_lower_case:
            prepared = [t.lower() for t in prepared]
        return prepared

    def _prompt_length(self, prompt: str) -> int:
        """Tokens the prompt occupies at the start of a sequence (sentence-transformers' rule: minus the end token)."""
        if prompt not in self._prompt_len_cache:
            with self._tokenizer_lock:
                ids = self.tokenizer([prompt.strip()], truncation=True,
                                     max_length=self.profile.max_seq_length)["input_ids"][0]
            self._prompt_len_cache[prompt] = len(ids) - 1
        return self._prompt_len_cache[prompt]

    def tokenize(self, texts: list[str], prompt: str = "") -> tuple[list[list[int]], EncodeStats]:
        """Token ids per text (truncated to max_seq_length) and counts of what truncation dropped.

        Calls the Rust tokenizer the way the Hugging Face tokenizer's ``__call__`` does (same truncation and
        special-token settings, set through its own ``set_truncation_and_padding``), but through
        ``encode_batch_fast`` where it exists (no character offsets, which nothing here uses) and without
        building a BatchEncoding: on a GPU this loop, not the model, bounds small models' throughput.
        """
        stats = EncodeStats(docs=len(texts))
        if not texts:
            return [], stats
        prepared = self._prepare(texts, prompt)
        tok = self.tokenizer
        backend = tok.backend_tokenizer
        with self._tokenizer_lock:
            tok.set_truncation_and_padding(**self._truncation)
            split = bool(getattr(tok, "split_special_tokens", False))
            if backend.encode_special_tokens != split:
                backend.encode_special_tokens = split
            encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
            encodings = encode(prepared, add_special_tokens=True)
        ids = [e.ids for e in encodings]
        for row, e in enumerate(encodings):
            if e.overflowing:
                stats.truncated_rows.append(row)
                stats.dropped_tokens += sum(len(o.ids) - sum(o.special_tokens_mask) for o in e.overflowing)
        stats.truncated_docs = len(stats.truncated_rows)
        return ids, stats

    def chunk_spans(self, texts: list[str], max_tokens: int, overlap: int) -> list[list[tuple[int, int]]]:
        """Character spans of token windows per text; a text that fits is one span covering all of it."""
        if overlap >= max_tokens:
            raise ValueError(f"chunking.overlap ({overlap}) must be smaller than chunking.max_tokens ({max_tokens})")
        room = self.profile.max_seq_length - self.tokenizer.num_special_tokens_to_add() - (
            self._prompt_length(self.profile.document_prompt) if self.profile.document_prompt else 0)
        size = max(1, min(max_tokens, room))
        step = max(1, size - min(overlap, size - 1))
        with self._tokenizer_lock:
            enc = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True,
                                 return_attention_mask=False, return_token_type_ids=False)
        spans: list[list[tuple[int, int]]] = []
        for text, offsets in zip(texts, enc["offset_mapping"]):
            if len(offsets) <= size:
                spans.append([(0, len(text))])
                continue
            doc_spans = []
            for start in range(0, len(offsets), step):
                window = offsets[start : start + size]
                doc_spans.append((window[0][0], window[-1][1]))
                if start + size >= len(offsets):
                    break
            spans.append(doc_spans)
        return spans

    def plan_batches(self, lengths: list[int]) -> list[list[int]]:
        """Indices grouped into batches that fit the token budget, longest first.

        Packed batches count real tokens; padded ones count the padded rectangle (rows x longest row).
        """
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        batches: list[list[int]] = []
        current: list[int] = []
        width = total = 0
        for i in order:
            new_width = max(width, lengths[i])
            cost = total + lengths[i] if self.packed else new_width * (len(current) + 1)
            if current and cost > self.max_batch_tokens:
                batches.append(current)
                current, width, total = [], 0, 0
                new_width = lengths[i]
            current.append(i)
            width = new_width
            total += lengths[i]
        if current:
            batches.append(current)
        return batches

    def _collate(self, seqs: list[list[int]]) -> dict[str, torch.Tensor]:
        width = max(len(s) for s in seqs)
        ids = np.full((len(seqs), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(seqs), width), dtype=np.int64)
        for row, seq in enumerate(seqs):
            if self.left_padding:
                ids[row, width - len(seq):] = seq
                mask[row, width - len(seq):] = 1
            else:
                ids[row, : len(seq)] = seq
                mask[row, : len(seq)] = 1
        features = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
        if self.use_token_type_ids:
            features["token_type_ids"] = torch.zeros_like(features["input_ids"])
        if self.left_padding and self.accepts_position_ids:
            # Left padding shifts a decoder's default positions by the pad count, so a vector would depend on its
            # batch-mates; positions from the mask make every row equal its unpadded encoding.
            features["position_ids"] = (features["attention_mask"].cumsum(dim=1) - 1).clamp(min=0)
        return features

    def _host_batch(self, seqs: list[list[int]]) -> PackedBatch | dict[str, torch.Tensor]:
        """Host tensors for one batch, in pinned memory on cuda so the copy to the GPU is asynchronous."""
        if self.packed is not None:
            batch = pack(seqs, self.packed.position_offset)
            return batch.pin_memory() if self.device.type == "cuda" else batch
        features = self._collate(seqs)
        if self.device.type == "cuda":
            features = {k: v.pin_memory() for k, v in features.items()}
        return features

    def _produce(self, texts: list[str], prompt: str, stats: EncodeStats) -> Iterator[tuple[np.ndarray, Any, int]]:
        """Tokenize block by block, plan each block's batches, and yield (input positions, host batch, tokens)."""
        for offset in range(0, len(texts), self.block_docs):
            ids, block = self.tokenize(texts[offset : offset + self.block_docs], prompt)
            stats.truncated_rows.extend(offset + r for r in block.truncated_rows)
            stats.truncated_docs += block.truncated_docs
            stats.dropped_tokens += block.dropped_tokens
            for batch in self.plan_batches([len(s) for s in ids]):
                seqs = [ids[i] for i in batch]
                tokens = sum(len(s) for s in seqs)
                stats.batches += 1
                stats.tokens += tokens
                stats.padded_tokens += tokens if self.packed is not None else max(len(s) for s in seqs) * len(seqs)
                yield offset + np.asarray(batch, dtype=np.int64), self._host_batch(seqs), tokens

    @torch.inference_mode()
    def _forward(self, batch: PackedBatch | dict[str, torch.Tensor], prompt_length: int) -> torch.Tensor:
        if isinstance(batch, PackedBatch):
            packed = batch.to(self.device, non_blocking=True)
            features = self.packed.padded(self.packed(packed), packed)
            left_padded = False
        else:
            features = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            out = self.model(**features)
            features["token_embeddings"] = out[0] if isinstance(out, tuple) else out.last_hidden_state
            left_padded = self.left_padding
        if prompt_length and not self.profile.include_prompt:
            mask = features["attention_mask"].clone()
            if left_padded:
                starts = mask.shape[1] - mask.sum(dim=1)
                cols = torch.arange(mask.shape[1], device=mask.device).unsqueeze(0)
                mask[(cols >= starts.unsqueeze(1)) & (cols < (starts + prompt_length).unsqueeze(1))] = 0
            else:
                mask[:, :prompt_length] = 0
            features["attention_mask"] = mask
        emb = pool(self.profile.pooling, features).float()
        if self.profile.truncate_dim:
            emb = emb[:, : self.profile.truncate_dim]
        if self.profile.normalize:
            emb = torch.nn.functional.normalize(emb, p=2, dim=1)
        return emb

    def encode(self, texts: list[str], *, prompt: str | None = None, kind: str = "document",
               progress: Callable[[int], None] | None = None,
               observe: Callable[[int, float, int], None] | None = None) -> tuple[np.ndarray, EncodeStats]:
        """Encode texts as documents (default) or queries; returns [n, dim] float32 in input order.

        Vectors stay on the device until a flush, so the host never waits for the GPU between batches
        while the next batches are tokenized (in a background thread with ``tokenize_ahead``).
        ``progress`` is called after every batch with the number of texts encoded so far (on a GPU, queued
        for the device: the count runs ahead of the kernels by at most the queue); callers throttle it.
        ``observe`` hears each batch as (tokens, seconds of its forward pass, tokenized batches still queued):
        the actor's metrics, kept out of this class so that it stays free of Ray.
        """
        if prompt is None:
            prompt = self.profile.query_prompt if kind == "query" else self.profile.document_prompt
        start = time.perf_counter()
        stats = EncodeStats(docs=len(texts))
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        prompt_length = self._prompt_length(prompt) if prompt else 0
        batches = self._produce(texts, prompt, stats)
        pending: list[tuple[np.ndarray, torch.Tensor]] = []
        rows = done = 0
        # The producer tokenizes a whole block before it yields that block's batches; 16 queued batches (a few
        # MB of host memory) keep a BERT-base-sized GPU busy while it does.
        with _ahead(batches, depth=16) if self.tokenize_ahead else contextlib.nullcontext(_Stream(batches)) as stream:
            for index, batch, tokens in stream:
                began = time.perf_counter()
                pending.append((index, self._forward(batch, prompt_length)))
                if observe is not None:
                    observe(tokens, time.perf_counter() - began, stream.queued())
                rows += len(index)
                done += len(index)
                if progress is not None:
                    progress(done)
                if rows >= _FLUSH_ROWS:
                    _flush(pending, out)
                    pending, rows = [], 0
        _flush(pending, out)  # truncated_rows is already in order: blocks run in order, each sorted
        stats.seconds = time.perf_counter() - start
        return out, stats


def _parallel_tokenizer(threads: int | None) -> None:
    """Let the Rust tokenizer split each block over several threads: on a GPU the model waits for text.

    ``tokenizers`` reads TOKENIZERS_PARALLELISM on every call (reembed's Ray actors start with it off, right
    for CPU actors whose cores belong to torch) and RAYON_NUM_THREADS once, when its thread pool starts; so
    this runs before the process first tokenizes, and ``threads`` is what Ray gave the actor.
    """
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    if threads:
        os.environ.setdefault("RAYON_NUM_THREADS", str(int(threads)))


def _flush(pending: list[tuple[np.ndarray, torch.Tensor]], out: np.ndarray) -> None:
    """One device-to-host copy for many batches' vectors, scattered back to input order."""
    if pending:
        out[np.concatenate([i for i, _ in pending])] = torch.cat([e for _, e in pending]).cpu().numpy()


_DONE = object()


class _Stream:
    """Batches as the encode loop reads them, and how many are tokenized and waiting (the queue's depth)."""

    def __init__(self, items: Iterator[Any], buffer: queue.Queue | None = None) -> None:
        self.items = items
        self.buffer = buffer

    def __iter__(self) -> Iterator[Any]:
        return self.items

    def queued(self) -> int:
        return self.buffer.qsize() if self.buffer is not None else 0


@contextlib.contextmanager
def _ahead(items: Iterator[Any], depth: int) -> Iterator[_Stream]:
    """Run a generator in a background thread, at most ``depth`` items ahead of its consumer.

    The Rust tokenizer releases the GIL, so tokenizing and collating the next batches overlaps the model's
    forward pass. An exception in the producer is raised in the consumer; leaving the block early stops it.
    """
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                buffer.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_DONE)
        except BaseException as exc:  # handed to the consumer, which raises it
            put(exc)

    thread = threading.Thread(target=run, name="reembed-tokenize", daemon=True)
    thread.start()

    def consume() -> Iterator[Any]:
        while True:
            item = buffer.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    try:
        yield _Stream(consume(), buffer)
    finally:
        stop.set()
        thread.join()
