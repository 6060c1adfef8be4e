"""Every pooling mode equals sentence-transformers on tiny random models (float32, CPU), on any batch layout."""

from __future__ import annotations

import numpy as np
import pytest

import tiny_models
from reembed.workers.encoder import Encoder
from reembed.workers.settings import ModelSettings

TEXTS = [
    "Vaccines train the immune system.",
    "short",
    "A vector database finds the nearest neighbours of an embedding, quickly, even for very long inputs " * 3,
    "Honeybees dance.",
    "Bread rises because yeast releases carbon dioxide in the dough.",
]


def _reference(st_dir, texts, prompt_name=None):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(st_dir), device="cpu")
    # batch_size=1: no padding at all, the model's own view of each text.
    return st.encode(texts, normalize_embeddings=True, batch_size=1, prompt_name=prompt_name)


def _assert_close(ours: np.ndarray, ref: np.ndarray) -> None:
    cos = (ours * ref).sum(axis=1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(ref, axis=1))
    assert cos.min() >= 0.9999, cos


@pytest.mark.parametrize("pooling", ["cls", "mean", "max", "lasttoken", "weightedmean"])
def test_bert_pooling_modes(tmp_path, pooling) -> None:
    st_dir = tiny_models.bert(tmp_path, pooling)
    encoder = Encoder(ModelSettings(name=str(st_dir)))
    assert encoder.profile.pooling == pooling and encoder.profile.max_seq_length == 24
    ours, stats = encoder.encode(TEXTS)
    _assert_close(ours, _reference(st_dir, TEXTS))
    assert stats.truncated_docs == 1 and stats.dropped_tokens > 0  # the long text, counted not hidden


def test_pooling_override_beats_model_config(tmp_path) -> None:
    st_dir = tiny_models.bert(tmp_path, "mean")
    # The reference wraps the very same weights and tokenizer (tokenizer training may order ties differently).
    cls_dir = tiny_models.save_st(tmp_path / "bert-hf", tmp_path / "ref-cls", "cls", 24)
    ours, _ = Encoder(ModelSettings(name=str(st_dir), pooling="cls")).encode(TEXTS)
    _assert_close(ours, _reference(cls_dir, TEXTS))


def test_xlmr_unigram_japanese(tmp_path) -> None:
    st_dir = tiny_models.xlmr_japanese(tmp_path)
    texts = tiny_models.JAPANESE[:8] + ["日本語とEnglishが混ざった文。"]
    encoder = Encoder(ModelSettings(name=str(st_dir)))
    ours, _ = encoder.encode(texts)
    _assert_close(ours, _reference(st_dir, texts))


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_decoder_lasttoken_with_instruction_prompt(tmp_path, padding_side) -> None:
    st_dir = tiny_models.qwen2_decoder(tmp_path, padding_side)
    encoder = Encoder(ModelSettings(name=str(st_dir)))
    assert encoder.profile.pooling == "lasttoken"
    assert encoder.profile.query_prompt.startswith("Instruct:")
    ours, _ = encoder.encode(TEXTS, kind="query")
    _assert_close(ours, _reference(st_dir, TEXTS, prompt_name="query"))
    docs, _ = encoder.encode(TEXTS)
    _assert_close(docs, _reference(st_dir, TEXTS))


def test_normalize_off_and_truncate_dim(tmp_path) -> None:
    st_dir = tiny_models.bert(tmp_path, "mean")
    raw, _ = Encoder(ModelSettings(name=str(st_dir), normalize=False)).encode(TEXTS)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0)
    cut, _ = Encoder(ModelSettings(name=str(st_dir), truncate_dim=8)).encode(TEXTS)
    assert cut.shape == (len(TEXTS), 8)
    expected = raw[:, :8] / np.linalg.norm(raw[:, :8], axis=1, keepdims=True)
    np.testing.assert_allclose(cut, expected, atol=1e-5)


def test_batch_layout_does_not_change_vectors(tmp_path) -> None:
    st_dir = tiny_models.qwen2_decoder(tmp_path, "left")
    whole, _ = Encoder(ModelSettings(name=str(st_dir))).encode(TEXTS)
    tiny_budget, _ = Encoder(ModelSettings(name=str(st_dir), max_batch_tokens=16)).encode(TEXTS)
    np.testing.assert_allclose(whole, tiny_budget, atol=1e-5)
