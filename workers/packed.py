"""Padding-free ("packed") forward pass for BERT-family encoders.

A padded batch spends the dense layers, which hold almost all of the FLOPs, on pad slots. Here a batch is
one ``[total_tokens, hidden]`` matrix plus cumulative sequence offsets (``cu_seqlens``), as in flash
attention's varlen interface and text-embeddings-inference's backends: every matmul, LayerNorm and
activation touches real tokens only, and only attention needs to know where one sequence ends.

Attention runs as PyTorch's variable-length flash attention (``torch.nn.attention.varlen.varlen_attn``) on
CUDA in float16/bfloat16, and otherwise as padded ``scaled_dot_product_attention`` with a key mask (the
padded copy then exists only inside attention). The module reuses the Hugging Face model's own parameters
(query/key/value are concatenated into one matrix), so it loads nothing and follows the same weights;
tests compare it with the Hugging Face forward on every supported family.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

# model_type -> first position id (RoBERTa-style models count positions from padding_idx + 1).
_FAMILIES = {"bert": None, "roberta": "padding", "xlm-roberta": "padding", "camembert": "padding"}


def varlen_kernel() -> object | None:
    """PyTorch's varlen flash-attention function, where this torch has it."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def unsupported_reason(model: torch.nn.Module) -> str | None:
    """Why the packed path cannot run this model (None when it can)."""
    cfg = model.config
    if cfg.model_type not in _FAMILIES:
        return f"model_type {cfg.model_type!r} is not a BERT-family encoder ({', '.join(sorted(_FAMILIES))})"
    if getattr(cfg, "position_embedding_type", "absolute") not in (None, "absolute"):
        return f"position_embedding_type {cfg.position_embedding_type!r} (only absolute positions are packed)"
    if getattr(cfg, "is_decoder", False) or getattr(cfg, "add_cross_attention", False):
        return "decoder or cross-attention configuration"
    try:
        layer = model.encoder.layer[0]
        parts = (model.embeddings.word_embeddings, model.embeddings.position_embeddings,
                 model.embeddings.token_type_embeddings, model.embeddings.LayerNorm,
                 layer.attention.self.query, layer.attention.self.key, layer.attention.self.value,
                 layer.attention.output.dense, layer.attention.output.LayerNorm, layer.intermediate.dense,
                 layer.intermediate.intermediate_act_fn, layer.output.dense, layer.output.LayerNorm)
    except AttributeError as exc:
        return f"unexpected module layout ({exc})"
    if any(p is None for p in parts):
        return "unexpected module layout"
    return None


@dataclass
class PackedBatch:
    """One batch without padding: tokens of all sequences back to back."""

    input_ids: torch.Tensor  # [T] int64
    position_ids: torch.Tensor  # [T] int64, restarting at each sequence
    cu_seqlens: torch.Tensor  # [B + 1] int32, offsets of each sequence in the T axis
    scatter_index: torch.Tensor  # [T] int64, slot of each token in a right-padded [B * max_len] layout
    lengths: list[int]

    @property
    def max_len(self) -> int:
        return max(self.lengths)

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "PackedBatch":
        return PackedBatch(fn(self.input_ids), fn(self.position_ids), fn(self.cu_seqlens), fn(self.scatter_index),
                           self.lengths)

    def to(self, device: torch.device, non_blocking: bool = False) -> "PackedBatch":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "PackedBatch":
        return self._map(torch.Tensor.pin_memory)

    def token_mask(self) -> torch.Tensor:
        """[B, max_len] bool, True on real tokens of the right-padded layout."""
        mask = torch.zeros(len(self.lengths) * self.max_len, dtype=torch.bool, device=self.scatter_index.device)
        mask[self.scatter_index] = True
        return mask.view(len(self.lengths), self.max_len)


def pack(seqs: list[list[int]], position_offset: int = 0) -> PackedBatch:
    """Concatenate token id lists into a PackedBatch (host tensors)."""
    lengths = [len(s) for s in seqs]
    width = max(lengths)
    lens = np.asarray(lengths, dtype=np.int64)
    starts = np.zeros(len(seqs) + 1, dtype=np.int64)
    np.cumsum(lens, out=starts[1:])
    total = int(starts[-1])
    # numpy from an iterator: several times faster than torch.tensor on a nested list, and this runs
    # in the tokenizer thread, where holding the GIL delays the main thread's kernel launches.
    ids = np.fromiter(itertools.chain.from_iterable(seqs), dtype=np.int64, count=total)
    within = np.arange(total, dtype=np.int64) - np.repeat(starts[:-1], lens)
    slots = np.repeat(np.arange(len(seqs), dtype=np.int64) * width, lens) + within
    return PackedBatch(
        input_ids=torch.from_numpy(ids),
        position_ids=torch.from_numpy(within + position_offset),
        cu_seqlens=torch.from_numpy(starts.astype(np.int32)),
        scatter_index=torch.from_numpy(slots),
        lengths=lengths,
    )


class PackedEncoder(torch.nn.Module):
    """The forward pass of a BERT-family ``AutoModel`` over a PackedBatch; returns [T, hidden]."""

    def __init__(self, model: torch.nn.Module, use_varlen: bool) -> None:
        super().__init__()
        reason = unsupported_reason(model)
        if reason:
            raise ValueError(f"packed attention cannot run this model: {reason}")
        cfg = model.config
        self.emb = model.embeddings
        self.heads = int(cfg.num_attention_heads)
        self.hidden = int(cfg.hidden_size)
        self.head_dim = self.hidden // self.heads
        self.position_offset = (int(cfg.pad_token_id) + 1) if _FAMILIES[cfg.model_type] == "padding" else 0
        self.layers = []
        for layer in model.encoder.layer:
            sa = layer.attention.self
            qkv_w = torch.cat([sa.query.weight, sa.key.weight, sa.value.weight]).detach()
            qkv_b = torch.cat([sa.query.bias, sa.key.bias, sa.value.bias]).detach()
            self.layers.append((qkv_w, qkv_b, layer.attention.output.dense, layer.attention.output.LayerNorm,
                                layer.intermediate.dense, layer.intermediate.intermediate_act_fn,
                                layer.output.dense, layer.output.LayerNorm))
        self.varlen = varlen_kernel() if use_varlen else None
        self.contiguous_qkv = False  # set by the start-up check if this kernel build refuses strided q/k/v
        if use_varlen and self.varlen is None:
            raise RuntimeError("this torch has no torch.nn.attention.varlen.varlen_attn (needs torch >= 2.9)")
        if self.varlen is not None and (self.head_dim % 8 or self.head_dim > 256):
            logger.info("head size %d is not one flash attention takes; packed batches use padded attention",
                        self.head_dim)
            self.varlen = None

    def _attention(self, qkv: torch.Tensor, batch: PackedBatch, key_mask: torch.Tensor | None) -> torch.Tensor:
        if self.varlen is not None:
            return self._varlen_attention(qkv, batch)
        return self._padded_attention(qkv, batch, key_mask)

    def _varlen_attention(self, qkv: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        # q, k and v are strided views into the fused projection ([T, 3, heads, head_dim]), as flash-attn's own
        # qkv-packed varlen function passes them: the kernel needs only the last dimension contiguous, and three
        # copies per layer would cost about as much memory traffic as the attention itself.
        total = qkv.shape[0]
        q, k, v = qkv.view(total, 3, self.heads, self.head_dim).unbind(1)
        if self.contiguous_qkv:
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out = self.varlen(q, k, v, batch.cu_seqlens, batch.cu_seqlens, batch.max_len, batch.max_len)
        return out.reshape(total, self.hidden)

    def _padded_attention(self, qkv: torch.Tensor, batch: PackedBatch, key_mask: torch.Tensor | None) -> torch.Tensor:
        """Only attention sees pad slots; keys beyond a sequence's end are masked out."""
        n, width = len(batch.lengths), batch.max_len
        padded = qkv.new_zeros(n * width, 3, self.heads, self.head_dim)
        padded[batch.scatter_index] = qkv.view(-1, 3, self.heads, self.head_dim)
        q, k, v = padded.view(n, width, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        return out.transpose(1, 2).reshape(n * width, self.hidden)[batch.scatter_index]

    @torch.inference_mode()
    def varlen_failure(self) -> str | None:
        """Run varlen attention once on a small batch and compare it with padded attention; why not, or None.

        Flash attention needs a recent GPU (Ampere or newer) and a torch build that ships the kernel. Where
        either is missing the call raises at the first batch, and a kernel that runs but disagrees would
        silently change every vector; this check runs at start-up so the encoder can use padded attention
        instead of failing a shard or writing wrong vectors. Strided q/k/v views are tried first, copies if
        this kernel build refuses them.
        """
        if self.varlen is None:
            return "varlen attention is not enabled"
        weight = self.layers[0][0]
        batch = pack([[0] * n for n in (7, 3, 300, 129)]).to(weight.device)  # short and multi-tile sequences
        generator = torch.Generator(device="cpu").manual_seed(0)
        qkv = torch.randn(len(batch.input_ids), 3 * self.hidden, generator=generator).to(weight.device, weight.dtype)
        got, error = None, None
        for contiguous in (False, True):
            self.contiguous_qkv = contiguous
            try:
                got = self._varlen_attention(qkv, batch)
                break
            except Exception as exc:  # noqa: BLE001 - any failure of the kernel means: do not use it this way
                error = exc
        if got is None:
            self.contiguous_qkv = False
            first_line = (str(error).splitlines() or [""])[0][:300]
            return f"{type(error).__name__}: {first_line}".rstrip(": ")
        if self.contiguous_qkv:
            logger.info("varlen attention refused strided q/k/v (%s); copying them per layer", error)
        mask = batch.token_mask().view(len(batch.lengths), 1, 1, batch.max_len)
        want = self._padded_attention(qkv, batch, mask)
        cos = F.cosine_similarity(got.float(), want.float(), dim=1).min().item()
        if not cos >= 0.999:
            return f"its output differs from padded attention (min cosine {cos:.4f})"
        return None

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        emb = self.emb
        x = emb.word_embeddings(batch.input_ids) + emb.token_type_embeddings.weight[0]
        x = emb.LayerNorm(x + emb.position_embeddings(batch.position_ids))
        # The padded-attention fallback masks keys past each sequence's end: one mask for all layers.
        key_mask = None
        if self.varlen is None and min(batch.lengths) != batch.max_len:
            key_mask = batch.token_mask().view(len(batch.lengths), 1, 1, batch.max_len)
        for qkv_w, qkv_b, attn_out, ln1, inter, act, out, ln2 in self.layers:
            a = self._attention(F.linear(x, qkv_w, qkv_b), batch, key_mask)
            x = ln1(attn_out(a) + x)
            x = ln2(out(act(inter(x))) + x)
        return x

    def padded(self, hidden: torch.Tensor, batch: PackedBatch) -> dict[str, torch.Tensor]:
        """Right-padded ``token_embeddings`` and ``attention_mask`` for the pooling stage."""
        n, width = len(batch.lengths), batch.max_len
        tokens = hidden.new_zeros(n * width, hidden.shape[1])
        tokens[batch.scatter_index] = hidden
        return {"token_embeddings": tokens.view(n, width, -1), "attention_mask": batch.token_mask().long()}
