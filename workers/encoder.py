"""The model backend: texts in, L2-normalised float32 vectors out.

Stages follow sentence-transformers (tokenize -> token embeddings -> pooling -> normalize) so outputs match
it, but batches are cut by a token budget over length-sorted texts (text-embeddings-inference style), which
keeps padding small and the batch as large as memory allows. This class knows nothing of Ray, Prefect or
storage: it is the one narrow interface between orchestration and the model.
"""

from __future__ import annotations

import inspect
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from workers.model_loader import ModelProfile, load_profile
from workers.pooling import pool
from workers.settings import ModelSettings

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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

    def add(self, other: "EncodeStats") -> None:
        for name in ("docs", "tokens", "padded_tokens", "truncated_docs", "dropped_tokens", "batches", "seconds"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


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
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

        self.settings = settings or ModelSettings()
        self.profile: ModelProfile = load_profile(self.settings)
        self.device = pick_device(self.settings.device)
        if self.device.type == "cpu":
            threads = self.settings.cpu_threads or cpu_threads
            if threads:
                torch.set_num_threads(int(threads))
        dtype_name = self.settings.dtype
        if dtype_name == "auto":
            dtype_name = "float16" if self.device.type == "cuda" else "float32"
        self.dtype = _DTYPES[dtype_name]
        self.max_batch_tokens = self.settings.max_batch_tokens or (65536 if self.device.type == "cuda" else 16384)
        self.tokenizer = AutoTokenizer.from_pretrained(self.profile.path, use_fast=True)
        if not getattr(self.tokenizer, "is_fast", False):
            raise RuntimeError(f"model {self.profile.model_id!r} has no fast (Rust) tokenizer; reembed needs one")
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
        logger.info(
            "loaded %s from %s on %s/%s: pooling=%s max_seq_length=%d dim=%d",
            self.profile.model_id, self.profile.path, self.device, dtype_name,
            self.profile.pooling, self.profile.max_seq_length, self.dim,
        )

    def _prepare(self, texts: list[str], prompt: str) -> list[str]:
        prepared = [prompt + t for t in texts] if prompt else list(texts)
        prepared = [t.strip() for t in prepared]
        if self.profile.do_lower_case:
            prepared = [t.lower() for t in prepared]
        return prepared

    def _prompt_length(self, prompt: str) -> int:
        """Tokens the prompt occupies at the start of a sequence (sentence-transformers' rule: minus the end token)."""
        if prompt not in self._prompt_len_cache:
            ids = self.tokenizer([prompt.strip()], truncation=True, max_length=self.profile.max_seq_length)["input_ids"][0]
            self._prompt_len_cache[prompt] = len(ids) - 1
        return self._prompt_len_cache[prompt]

    def tokenize(self, texts: list[str], prompt: str = "") -> tuple[list[list[int]], EncodeStats]:
        """Token ids per text (truncated to max_seq_length) and counts of what truncation dropped."""
        stats = EncodeStats(docs=len(texts))
        if not texts:
            return [], stats
        enc = self.tokenizer(
            self._prepare(texts, prompt),
            truncation=True,
            max_length=self.profile.max_seq_length,
            return_overflowing_tokens=True,
            return_special_tokens_mask=True,
            return_attention_mask=False,
            return_token_type_ids=False,
            padding=False,
        )
        mapping = enc.get("overflow_to_sample_mapping")
        if mapping is None:
            mapping = list(range(len(enc["input_ids"])))
        ids: list[list[int] | None] = [None] * len(texts)
        for row, sample in enumerate(mapping):
            if ids[sample] is None:
                ids[sample] = enc["input_ids"][row]
            else:
                real = len(enc["input_ids"][row]) - sum(enc["special_tokens_mask"][row])
                if sample not in stats.truncated_rows:
                    stats.truncated_rows.append(sample)
                stats.dropped_tokens += real
        stats.truncated_docs = len(stats.truncated_rows)
        return ids, stats  # type: ignore[return-value]

    def chunk_spans(self, texts: list[str], max_tokens: int, overlap: int) -> list[list[tuple[int, int]]]:
        """Character spans of token windows per text; a text that fits is one span covering all of it."""
        if overlap >= max_tokens:
            raise ValueError(f"chunking.overlap ({overlap}) must be smaller than chunking.max_tokens ({max_tokens})")
        room = self.profile.max_seq_length - self.tokenizer.num_special_tokens_to_add() - (
            self._prompt_length(self.profile.document_prompt) if self.profile.document_prompt else 0)
        size = max(1, min(max_tokens, room))
        step = max(1, size - min(overlap, size - 1))
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
        """Indices grouped into batches whose padded size fits the token budget, longest first."""
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        batches: list[list[int]] = []
        current: list[int] = []
        width = 0
        for i in order:
            new_width = max(width, lengths[i])
            if current and new_width * (len(current) + 1) > self.max_batch_tokens:
                batches.append(current)
                current, width = [], 0
                new_width = lengths[i]
            current.append(i)
            width = new_width
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

    @torch.inference_mode()
    def _forward(self, seqs: list[list[int]], prompt_length: int) -> torch.Tensor:
        features = {k: v.to(self.device, non_blocking=True) for k, v in self._collate(seqs).items()}
        out = self.model(**{k: v for k, v in features.items() if k != "token_embeddings"})
        features["token_embeddings"] = out[0] if isinstance(out, tuple) else out.last_hidden_state
        if prompt_length and not self.profile.include_prompt:
            mask = features["attention_mask"].clone()
            if self.left_padding:
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

    def encode(self, texts: list[str], *, prompt: str | None = None, kind: str = "document") -> tuple[np.ndarray, EncodeStats]:
        """Encode texts as documents (default) or queries; returns [n, dim] float32 in input order."""
        if prompt is None:
            prompt = self.profile.query_prompt if kind == "query" else self.profile.document_prompt
        start = time.perf_counter()
        ids, stats = self.tokenize(texts, prompt)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        prompt_length = self._prompt_length(prompt) if prompt else 0
        lengths = [len(s) for s in ids]
        for batch in self.plan_batches(lengths):
            seqs = [ids[i] for i in batch]
            emb = self._forward(seqs, prompt_length)
            out[np.asarray(batch)] = emb.cpu().numpy()
            stats.batches += 1
            stats.tokens += sum(len(s) for s in seqs)
            stats.padded_tokens += max(len(s) for s in seqs) * len(seqs)
        stats.seconds = time.perf_counter() - start
        return out, stats
