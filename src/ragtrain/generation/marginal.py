"""RAG's marginal likelihood losses: the answer's probability summed over retrieved passages.

Pure tensor functions (Lewis et al. 2020, eqs. 1-2). Inputs, for B questions with k passages and
answers of up to T tokens:

- ``doc_logp`` # (B, k): log p(z | x), the retriever's log-softmax over the k passages;
- ``token_logp`` # (B, k, T): log p(y_t | x, z, y_<t) of the answer's tokens with passage z alone;
- ``mask`` # (B, T): True at the answer's real tokens (the same tokens under every passage).

Both losses are normalised per answer token, like the generator's own loss
(``-Σ log p(y_t) / n_tokens``), so with k = 1 both equal it exactly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

MarginalLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _check(doc_logp: torch.Tensor, token_logp: torch.Tensor, mask: torch.Tensor) -> None:
    b, k = doc_logp.shape
    if token_logp.shape[:2] != (b, k) or mask.shape != (b, token_logp.shape[2]):
        raise ValueError(f"shapes: doc_logp {tuple(doc_logp.shape)}, token_logp "
                         f"{tuple(token_logp.shape)}, mask {tuple(mask.shape)}; expected "
                         "(B, k), (B, k, T), (B, T)")


def rag_sequence_loss(doc_logp: torch.Tensor, token_logp: torch.Tensor,
                      mask: torch.Tensor) -> torch.Tensor:
    """RAG-Sequence: ``-Σ_b log Σ_z p(z|x_b) Π_t p(y_t|x_b,z,y_<t) / Σ_b |y_b|``.

    One passage generates the whole answer: per-passage sequence log-likelihoods are summed over
    tokens first, then marginalised over passages.
    """
    _check(doc_logp, token_logp, mask)
    m = mask.to(torch.float32)[:, None, :]  # (B, 1, T)
    seq = (token_logp.float() * m).sum(-1)  # (B, k): log p(y | x, z)
    per_question = torch.logsumexp(doc_logp.float() + seq, -1)  # (B,): log p(y | x)
    return -per_question.sum() / m.sum().clamp(min=1)


def rag_token_loss(doc_logp: torch.Tensor, token_logp: torch.Tensor,
                   mask: torch.Tensor) -> torch.Tensor:
    """RAG-Token: ``-Σ_b Σ_t log Σ_z p(z|x_b) p(y_t|x_b,z,y_<t) / Σ_b |y_b|``.

    Each token may come from a different passage: marginalised per token, then summed.
    """
    _check(doc_logp, token_logp, mask)
    m = mask.to(torch.float32)  # (B, T)
    per_token = torch.logsumexp(doc_logp.float()[:, :, None] + token_logp.float(), 1)  # (B, T)
    return -(per_token * m).sum() / m.sum().clamp(min=1)


MARGINALS: dict[str, MarginalLoss] = {"sequence": rag_sequence_loss, "token": rag_token_loss}


def get_marginal(name: str) -> MarginalLoss:
    """The marginal loss called ``name`` (``joint.marginal``)."""
    if name not in MARGINALS:
        raise ValueError(f"marginal {name!r}: expected one of {sorted(MARGINALS)}")
    return MARGINALS[name]
