"""The benchmark file readers: SICK, JSON lines, STS Benchmark TSV with stray quotes, BEIR qrels with CRLF."""

from __future__ import annotations

import json

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
