"""Retriever losses: pure functions of embeddings (the model runs elsewhere)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def in_batch_nll_loss(q: torch.Tensor, p: torch.Tensor, targets: torch.Tensor,
                      temperature: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Contrastive loss with in-batch (and hard) negatives, as in DPR / MNRL.

    q: (B, d) query embeddings; p: (P, d) passage embeddings, the batch's positives and hard
    negatives; targets: (B,) column of each query's positive. With unit vectors,
    ``L = -mean_i log softmax(q_i . p / temperature)[targets_i]``. ``mask`` (B, P) True drops a
    column for that query: another column that is also gold for it (a false negative).
    """
    scores = (q @ p.T).float() / temperature  # (B, P)
    if mask is not None:
        scores = scores.masked_fill(mask, float("-inf"))
    return F.cross_entropy(scores, targets)


def cosine_loss(q: torch.Tensor, p_gold: torch.Tensor) -> torch.Tensor:
    """``L = mean(1 - cos(e_q, e_gold))``: pulls pairs together but never pushes anything apart,
    so alone it can collapse (every embedding the same gives L = 0); see the retriever notes."""
    return (1 - F.cosine_similarity(q.float(), p_gold.float(), dim=-1)).mean()


def false_negative_mask(gold: Sequence[set[str]], columns: Sequence[str],
                        targets: Sequence[int]) -> torch.Tensor:
    """(B, P) True where column j is gold for query i but is not its target."""
    m = torch.zeros((len(gold), len(columns)), dtype=torch.bool)
    for i, g in enumerate(gold):
        for j, pid in enumerate(columns):
            if pid in g and j != targets[i]:
                m[i, j] = True
    return m
