"""The padding-free forward and the pipelined encode loop give the Hugging Face / sentence-transformers vectors.

On this CPU the packed path runs its padded-attention fallback; the dense layers, embeddings, position ids
and the pack/unpack indexing are the same code the GPU's varlen path runs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tiny_models
from reembed.workers.encoder import Encoder
from reembed.workers.packed import pack
from reembed.workers.settings import ModelSettings

LONG = "A vector database finds the nearest neighbours of an embedding, quickly, even for very long inputs " * 3
TEXTS = tiny_models.ENGLISH[:8] + ["short", LONG, "Honeybees dance.", "x"] + tiny_models.ENGLISH[3:9]


def _min_cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).min())


def test_pack_layout() -> None:
    batch = pack([[5, 6, 7], [8], [9, 10]], position_offset=2)
    assert batch.input_ids.tolist() == [5, 6, 7, 8, 9, 10]
    assert batch.position_ids.tolist() == [2, 3, 4, 2, 2, 3]
    assert batch.cu_seqlens.tolist() == [0, 3, 4, 6] and batch.cu_seqlens.dtype == torch.int32
    assert batch.scatter_index.tolist() == [0, 1, 2, 3, 6, 7]  # right-padded [3 x 3] slots
    assert batch.max_len == 3


@pytest.mark.parametrize("pooling", ["cls", "mean", "max"])
def test_packed_bert_equals_padded_and_st(tmp_path, pooling) -> None:
    st_dir = tiny_models.bert(tmp_path, pooling)
    padded = Encoder(ModelSettings(name=str(st_dir), attention="padded"))
    # A tiny budget and block size: many batches and several tokenizer blocks, run ahead in a thread.
    packed = Encoder(ModelSettings(name=str(st_dir), attention="packed", max_batch_tokens=48, tokenize_ahead=True))
    packed.block_docs = 5
    assert packed.attention == "packed-sdpa" and padded.attention == "padded-sdpa"
    ours, stats = packed.encode(TEXTS)
    ref, ref_stats = padded.encode(TEXTS)
    assert _min_cos(ours, ref) >= 0.99999
    assert stats.batches > 3 and stats.tokens == ref_stats.tokens
    assert stats.padded_tokens == stats.tokens  # dense layers see real tokens only
    assert stats.truncated_rows == [TEXTS.index(LONG)] and stats.dropped_tokens == ref_stats.dropped_tokens

    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(st_dir), device="cpu").encode(TEXTS, normalize_embeddings=True, batch_size=1)
    assert _min_cos(ours, st) >= 0.9999


def test_packed_xlmr_positions(tmp_path) -> None:
    """RoBERTa-family positions start at padding_idx + 1; a wrong offset would change every vector."""
    st_dir = tiny_models.xlmr_japanese(tmp_path)
    texts = tiny_models.JAPANESE[:8] + ["日本語とEnglishが混ざった文。"]
    packed = Encoder(ModelSettings(name=str(st_dir), attention="packed", max_batch_tokens=64))
    assert packed.packed.position_offset == 2
    ours, _ = packed.encode(texts)
    ref, _ = Encoder(ModelSettings(name=str(st_dir), attention="padded")).encode(texts)
    assert _min_cos(ours, ref) >= 0.99999


def test_packed_minilm_on_scifact(scifact_docs) -> None:
    texts = [(r["title"] + " " + r["text"]).strip() for r in scifact_docs[:48]]
    texts += ["a", "Short query about bread?"]
    packed = Encoder(ModelSettings(attention="packed", max_batch_tokens=4096))
    ours, stats = packed.encode(texts)
    ref, _ = Encoder(ModelSettings(attention="padded")).encode(texts)
    assert _min_cos(ours, ref) >= 0.99999
    assert stats.truncated_docs > 0


def test_decoder_cannot_be_packed(tmp_path) -> None:
    st_dir = tiny_models.qwen2_decoder(tmp_path, "left")
    with pytest.raises(ValueError, match="cannot run packed: model_type 'qwen2'"):
        Encoder(ModelSettings(name=str(st_dir), attention="packed"))
    assert Encoder(ModelSettings(name=str(st_dir))).attention == "padded-sdpa"


def test_tokenize_ahead_raises_producer_errors(tmp_path) -> None:
    st_dir = tiny_models.bert(tmp_path, "mean")
    encoder = Encoder(ModelSettings(name=str(st_dir), tokenize_ahead=True, max_batch_tokens=48))
    encoder.block_docs = 4
    with pytest.raises(AttributeError):  # raised in the tokenizer thread, re-raised here
        encoder.encode(TEXTS[:6] + [None] + TEXTS[:3])  # type: ignore[list-item]
    ours, _ = encoder.encode(TEXTS)  # the encoder is still usable afterwards
    assert ours.shape == (len(TEXTS), encoder.dim)


def _reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k):
    """Attention within each packed sequence, by torch's documented varlen contract (the flash kernel has no CPU
    build): [T, heads, head_dim] inputs with a contiguous last dimension (what flash attention checks), int32
    offsets on the same device, python-int maxima."""
    assert q.dim() == 3 and all(t.stride(-1) == 1 for t in (q, k, v)) and q.shape == k.shape == v.shape
    assert cu_q.dtype == torch.int32 and cu_q.device == q.device and torch.equal(cu_q, cu_k)
    assert isinstance(max_q, int) and max_q == max_k == int((cu_q[1:] - cu_q[:-1]).max())
    spans = zip(cu_q[:-1].tolist(), cu_q[1:].tolist())
    return torch.cat([F.scaled_dot_product_attention(*(t[s:e].transpose(0, 1) for t in (q, k, v))).transpose(0, 1)
                      for s, e in spans])


def _contiguous_only_varlen(q, k, v, cu_q, cu_k, max_q, max_k):
    """A kernel build that refuses strided q/k/v views."""
    if not all(t.is_contiguous() for t in (q, k, v)):
        raise RuntimeError("q, k and v must be contiguous")
    return _reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k)


def _leaky_varlen(q, k, v, cu_q, cu_k, max_q, max_k):
    """A broken kernel: attends across sequence boundaries."""
    return F.scaled_dot_product_attention(*(t.transpose(0, 1) for t in (q, k, v))).transpose(0, 1)


def test_varlen_branch_packs_and_unpacks_like_padded(tmp_path) -> None:
    """The code around the varlen call (q/k/v split, offsets, reshape), run with a per-sequence reference kernel."""
    st_dir = tiny_models.bert(tmp_path, "mean")
    encoder = Encoder(ModelSettings(name=str(st_dir), attention="packed", max_batch_tokens=64))
    encoder.packed.varlen = _reference_varlen
    assert encoder.packed.varlen_failure() is None
    ours, _ = encoder.encode(TEXTS)
    ref, _ = Encoder(ModelSettings(name=str(st_dir), attention="padded")).encode(TEXTS)
    assert _min_cos(ours, ref) >= 0.99999


def test_varlen_start_up_check_catches_failing_and_wrong_kernels(tmp_path) -> None:
    """A kernel that raises (here the real one: no CPU build, as on a GPU older than Ampere) or that mixes
    sequences is reported at start-up, so the encoder uses padded attention instead."""
    from transformers import AutoModel

    from reembed.workers.packed import PackedEncoder

    model = AutoModel.from_pretrained(str(tiny_models.bert(tmp_path, "mean"))).eval()
    packed = PackedEncoder(model, use_varlen=True)
    assert packed.varlen is not None
    assert packed.varlen_failure().startswith("NotImplementedError: Could not run 'aten::_flash_attention_forward'")
    packed.varlen = _leaky_varlen
    assert "differs from padded attention" in packed.varlen_failure()
    packed.varlen = _contiguous_only_varlen  # falls back to copying q/k/v, still varlen
    assert packed.varlen_failure() is None and packed.contiguous_qkv


@pytest.mark.parametrize("family", ["bert", "xlmr", "qwen2", "minilm"])
def test_fast_tokenize_equals_the_hugging_face_call(tmp_path, family, scifact_docs) -> None:
    """Encoder.tokenize (Rust encode_batch_fast, no BatchEncoding) gives the ids and truncation counts of the
    Hugging Face tokenizer's own call, which sentence-transformers makes."""
    name = {"bert": lambda: tiny_models.bert(tmp_path, "mean"), "xlmr": lambda: tiny_models.xlmr_japanese(tmp_path),
            "qwen2": lambda: tiny_models.qwen2_decoder(tmp_path, "left"), "minilm": lambda: None}[family]()
    encoder = Encoder(ModelSettings(**({"name": str(name)} if name else {})))
    texts = TEXTS + tiny_models.JAPANESE[:4] + [(r["title"] + " " + r["text"]) for r in scifact_docs[:24]]
    ids, stats = encoder.tokenize(texts, "query: ")
    ref = encoder.tokenizer(encoder._prepare(texts, "query: "), truncation=True,  # prompt + sentence-transformers' strip
                            max_length=encoder.profile.max_seq_length, return_overflowing_tokens=True,
                            return_special_tokens_mask=True)
    first: dict[int, list[int]] = {}
    dropped = 0
    for row, sample in enumerate(ref["overflow_to_sample_mapping"]):
        if sample in first:
            dropped += len(ref["input_ids"][row]) - sum(ref["special_tokens_mask"][row])
        else:
            first[sample] = ref["input_ids"][row]
    assert ids == [first[i] for i in range(len(texts))]
    assert stats.truncated_rows == sorted({s for s in ref["overflow_to_sample_mapping"]
                                           if ref["overflow_to_sample_mapping"].count(s) > 1})
    assert stats.dropped_tokens == dropped and stats.truncated_docs > 0
