"""The benchmark file readers: SICK, JSON lines, STS Benchmark TSV with stray quotes, BEIR qrels with CRLF."""

from __future__ import annotations

import json

import numpy as np
import pytest

from reembed.flows.evaluate import read_pairs, read_qrels


def test_pair_and_qrels_readers(tmp_path) -> None:
    sick = tmp_path / "sick.txt"
    sick.write_text("pair_ID\tsentence_A\tsentence_B\trelatedness_score\tentailment_judgment\n1\ta b\ta c\t4.5\tX\n")
    assert read_pairs(sick) == (["a b"], ["a c"], pytest.approx([4.5]))
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(json.dumps({"sentence1": "猫", "sentence2": "犬", "label": 1.2}, ensure_ascii=False) + "\n")
    assert read_pairs(jsonl)[0] == ["猫"]
    stsb = tmp_path / "sts.csv"
    stsb.write_text('main\tf\t2012\t1\t3.0\the said "hi\tshe said\textra\n')
    assert read_pairs(stsb)[0] == ['he said "hi']
    qrels = tmp_path / "q.tsv"
    qrels.write_bytes(b"query-id\tcorpus-id\tscore\r\n1\td1\t1\r\n1\td2\t1\r\n")
    assert read_qrels(qrels) == {"1": {"d1": 1, "d2": 1}}


def test_pair_scores_encode_each_distinct_sentence_once(tmp_path, tiny_bert) -> None:
    """A sentence shared by several pairs is encoded once, and the scores equal scoring every slot from it."""
    from scipy.stats import pearsonr, spearmanr

    from reembed.flows.evaluate import evaluate_pairs
    from reembed.workers.encoder import Encoder
    from reembed.workers.settings import ModelSettings

    pairs = [("a dog runs", "a cat sleeps", 1.0), ("a dog runs", "a dog is running", 4.8),
             ("two men talk", "a cat sleeps", 0.5), ("a cat sleeps", "a kitten naps", 4.1),
             ("two men talk", "people chat", 3.9)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"sentence1": s1, "sentence2": s2, "label": g}) + "\n" for s1, s2, g in pairs))
    encoder = Encoder(ModelSettings(name=str(tiny_bert)))
    seen: list[tuple[list[str], np.ndarray]] = []
    original = encoder.encode

    def recording(texts, **kwargs):
        vectors, info = original(texts, **kwargs)
        seen.append((list(texts), vectors))
        return vectors, info

    encoder.encode = recording
    metrics = evaluate_pairs(encoder, path)
    assert metrics["pairs"] == 5
    ((texts, rows),) = seen
    assert sorted(texts) == sorted({t for s1, s2, _ in pairs for t in (s1, s2)})  # 7 distinct of 10 slots
    # The reference scores every slot from the very vectors the evaluation got: two encodings of one batch are
    # not bitwise equal on CPU, and this tiny model's cosines are so close together that Pearson turns 1e-7
    # of float32 noise into ~2e-6 (both sides compute cosines in float64).
    by_text = dict(zip(texts, rows))
    va = np.stack([by_text[p[0]] for p in pairs]).astype(np.float64)
    vb = np.stack([by_text[p[1]] for p in pairs]).astype(np.float64)
    cos = (va * vb).sum(1) / np.linalg.norm(va, axis=1) / np.linalg.norm(vb, axis=1)
    gold = [p[2] for p in pairs]
    assert metrics["spearman"] == pytest.approx(float(spearmanr(cos, gold).statistic), abs=1e-6)
    assert metrics["pearson"] == pytest.approx(float(pearsonr(cos, gold).statistic), abs=1e-6)
    # Encoding each side as its own batch (other padding) agrees to float32 noise.
    sa, _ = original([p[0] for p in pairs], kind="query")
    sb, _ = original([p[1] for p in pairs], kind="query")
    slot_cos = (sa * sb).sum(1) / np.linalg.norm(sa, axis=1) / np.linalg.norm(sb, axis=1)
    assert metrics["pearson"] == pytest.approx(float(pearsonr(slot_cos, gold).statistic), abs=1e-4)
