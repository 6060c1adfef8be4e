"""Pooling stages, named and computed as sentence-transformers' ``Pooling`` module does.

Each takes the ``features`` dict (``token_embeddings`` [B, T, H], ``attention_mask`` [B, T]) and returns
``sentence_embedding`` [B, H]. Sequences may be padded on either side.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def _mask(features: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    emb = features["token_embeddings"]
    mask = features["attention_mask"].unsqueeze(-1).to(emb.dtype)
    return emb, mask


def cls_pooling(features: dict[str, torch.Tensor]) -> torch.Tensor:
    """First token of each row (BERT's [CLS]); padding sits on the right for these models."""
    return features["token_embeddings"][:, 0]


def mean_pooling(features: dict[str, torch.Tensor]) -> torch.Tensor:
    emb, mask = _mask(features)
    summed = (emb * mask).sum(dim=1)
    counts = mask.sum(dim=1).clamp(min=1e-9)
    return summed / counts


def mean_sqrt_len_pooling(features: dict[str, torch.Tensor]) -> torch.Tensor:
    emb, mask = _mask(features)
    summed = (emb * mask).sum(dim=1)
    counts = mask.sum(dim=1).clamp(min=1e-9)
    return summed / torch.sqrt(counts)


def weighted_mean_pooling(features: dict[str, torch.Tensor]) -> torch.Tensor:
    """Position-weighted mean (SGPT): token i of the unpadded sequence weighs i + 1."""
    emb, mask = _mask(features)
    positions = torch.cumsum(features["attention_mask"], dim=1).unsqueeze(-1).to(emb.dtype)
    weights = positions * mask
    return (emb * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


def max_pooling(features: dict[str, torch.Tensor]) -> torch.Tensor:
    emb, mask = _mask(features)
    masked = emb.masked_fill(mask == 0, -1e9)
    return masked.max(dim=1).values


def lasttoken_pooling(features: dict[str, torch.Tensor]) -> torch.Tensor:
    """Last real token of each row, correct for left and right padding (decoder models)."""
    emb = features["token_embeddings"]
    mask = features["attention_mask"]
    seq_len = mask.shape[1]
    values, flipped_idx = mask.flip(1).max(dim=1)
    flipped_idx = torch.where(values == 0, torch.zeros_like(flipped_idx), flipped_idx)
    last = seq_len - 1 - flipped_idx
    return emb[torch.arange(emb.shape[0], device=emb.device), last]


POOLERS: dict[str, Callable[[dict[str, torch.Tensor]], torch.Tensor]] = {
    "cls": cls_pooling,
    "mean": mean_pooling,
    "max": max_pooling,
    "lasttoken": lasttoken_pooling,
    "weightedmean": weighted_mean_pooling,
    "mean_sqrt_len_tokens": mean_sqrt_len_pooling,
}


def pool(mode: str, features: dict[str, torch.Tensor]) -> torch.Tensor:
    """Run the named pooling stage, writing ``sentence_embedding`` into ``features``."""
    try:
        pooler = POOLERS[mode]
    except KeyError:
        raise ValueError(f"unknown pooling mode {mode!r}; choose one of {sorted(POOLERS)}") from None
    features["sentence_embedding"] = pooler(features)
    return features["sentence_embedding"]
