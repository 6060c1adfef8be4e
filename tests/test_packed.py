"""The padding-free forward and the pipelined encode loop give the Hugging Face / sentence-transformers vectors.

On this CPU the packed path runs its padded-attention fallback; the dense layers, embeddings, position ids
and the pack/unpack indexing are the same code the GPU's varlen path runs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tiny_models
from workers.encoder import Encoder
from workers.packed import pack
from workers.settings import ModelSettings

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
