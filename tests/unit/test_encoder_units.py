"""The encoder's pure parts: chunk windows and token-budget batches (tiny or bundled models, no Ray, no Prefect)."""

from __future__ import annotations

import pytest

from reembed.workers.encoder import Encoder
from reembed.workers.settings import ModelSettings

FILLER = " ".join(["The committee reviewed quarterly budgets, staffing plans and office logistics in detail."] * 40)
TAIL = "Finally, the appendix explains how octopuses open screw-top jars with their arms."


def test_chunk_spans_cover_the_text_with_overlap() -> None:
    enc = Encoder(ModelSettings())
    text = FILLER + " " + TAIL
    (spans,) = enc.chunk_spans([text], max_tokens=64, overlap=16)
    assert len(spans) > 5 and spans[0][0] == 0 and spans[-1][1] == len(text)
    assert all(b[0] < a[1] for a, b in zip(spans, spans[1:]))  # consecutive windows overlap
    assert enc.chunk_spans(["short text"], 64, 16) == [[(0, 10)]]
    with pytest.raises(ValueError, match="overlap"):
        enc.chunk_spans([text], 16, 16)


EXPECTED_BATCHES = {
    # packed batches count real tokens: 60 + 40 fills a budget of 100 exactly
    "packed": [[150], [90], [60, 40], [33, 25, 18, 12, 7, 5], [3, 1]],
    # padded ones count the rectangle (rows x longest row): 60 and 40 cannot share, 4 x 25 can
    "padded": [[150], [90], [60], [40, 33], [25, 18, 12, 7], [5, 3, 1]],
}


@pytest.mark.parametrize("attention", ["packed", "padded"])
def test_batches_fit_the_token_budget_longest_first(tiny_bert, attention) -> None:
    model = tiny_bert
    enc = Encoder(ModelSettings(name=str(model), attention=attention, max_batch_tokens=100))
    assert (enc.packed is not None) == (attention == "packed")
    lengths = [5, 40, 7, 33, 12, 90, 1, 18, 60, 25, 3, 150]
    batches = enc.plan_batches(lengths)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))  # every row exactly once
    assert [[lengths[i] for i in b] for b in batches] == EXPECTED_BATCHES[attention]


@pytest.mark.parametrize("ahead", [True, False])
def test_encode_tells_its_observer_every_batch(tiny_bert, ahead) -> None:
    """The hook the actor metrics hang on: one call per batch, whose tokens add up to the encode's own count."""
    from reembed.workers.actor_metrics import actor_metrics

    enc = Encoder(ModelSettings(name=str(tiny_bert), max_batch_tokens=64, tokenize_ahead=ahead))
    seen: list[tuple[int, float, int]] = []
    texts = [" ".join(["word"] * (n % 17 + 1)) for n in range(60)]
    _, stats = enc.encode(texts, observe=lambda *batch: seen.append(batch))
    assert len(seen) == stats.batches > 1
    assert sum(tokens for tokens, _, _ in seen) == stats.tokens
    assert all(seconds >= 0 and 0 <= queued <= 16 for _, seconds, queued in seen)
    assert actor_metrics(enc.profile.model_id) is None  # not a Ray actor: nothing to report to
