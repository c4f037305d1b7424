"""Retriever losses: pure functions of embeddings (the model runs elsewhere), looked up by name.

``retriever.loss`` names an entry of ``LOSSES``; the trainer looks it up there and never branches
on the name. A new loss is a function ``(q, p, targets, temperature, mask) -> Tensor`` decorated
with ``@register_loss("name")`` (and its name added to ``RetrieverConfig.loss``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# (q (B, d), p (P, d), targets (B,), temperature, mask (B, P) or None) -> scalar loss
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float, torch.Tensor | None],
                  torch.Tensor]


@dataclass(frozen=True)
class Loss:
    """A registered loss and which passage columns it scores."""

    fn: LossFn
    # True: the columns are the batch's passages then its hard negatives, with false negatives
    # masked; False: the batch's passages alone (no negatives are encoded).
    uses_negatives: bool
    # True: the trainer also passes ``teacher=`` (B, P) reranker logits, NaN where unscored,
    # plus ``weight=`` and ``teacher_temperature=`` (retriever.distill_*)
    uses_teacher: bool = False


LOSSES: dict[str, Loss] = {}


def register_loss(name: str, *, uses_negatives: bool = True,
                  uses_teacher: bool = False) -> Callable[[LossFn], LossFn]:
    """Decorator: make ``fn`` the loss that ``retriever.loss: name`` selects."""
    def add(fn: LossFn) -> LossFn:
        if name in LOSSES:
            raise ValueError(f"loss {name!r} is already registered")
        LOSSES[name] = Loss(fn, uses_negatives, uses_teacher)
        return fn
    return add


def get_loss(name: str) -> Loss:
    """The loss registered as ``name``; a ValueError naming the known ones otherwise."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"retriever.loss: unknown loss {name!r} (known: "
                         f"{', '.join(sorted(LOSSES))})") from None


@register_loss("in_batch_nll")
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


def teacher_kl(scores: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``mean_i KL(softmax(teacher_i) || softmax(scores_i))`` over the columns the teacher scored.

    scores, teacher: (B, P) logits; teacher is NaN where it did not score a column (another
    question's passage), and those columns leave both softmaxes. Rows the teacher scored at
    fewer than two columns carry no ranking signal and are left out (0 when none is left).
    """
    scored = ~torch.isnan(teacher)
    rows = scored.sum(dim=1) >= 2
    if not bool(rows.any()):
        return scores.sum() * 0.0  # keeps the graph: a zero gradient, not an error
    s = scores.float()[rows].masked_fill(~scored[rows], float("-inf"))
    t = teacher.float()[rows].masked_fill(~scored[rows], float("-inf"))
    log_p_t = F.log_softmax(t, dim=1)
    log_p_s = F.log_softmax(s, dim=1)
    keep = scored[rows]
    kl = torch.where(keep, log_p_t.exp() * (log_p_t - log_p_s), torch.zeros_like(log_p_s))
    return kl.sum(dim=1).mean()


@register_loss("distill", uses_teacher=True)
def distill_loss(q: torch.Tensor, p: torch.Tensor, targets: torch.Tensor,
                 temperature: float, mask: torch.Tensor | None = None, *,
                 teacher: torch.Tensor, weight: float = 1.0,
                 teacher_temperature: float = 1.0) -> torch.Tensor:
    """Distillation from a cross-encoder (Tevatron's / FlagEmbedding's recipe): the contrastive
    ``in_batch_nll_loss`` plus ``weight x teacher_kl`` between the reranker's softmax
    (logits / teacher_temperature) and the bi-encoder's (q . p / temperature) over each
    question's teacher-scored candidates: its gold passage and its hard negatives."""
    nll = in_batch_nll_loss(q, p, targets, temperature, mask)
    if weight == 0:
        return nll
    scores = (q @ p.T).float() / temperature
    return nll + weight * teacher_kl(scores, teacher / teacher_temperature)


def cosine_loss(q: torch.Tensor, p_gold: torch.Tensor) -> torch.Tensor:
    """``L = mean(1 - cos(e_q, e_gold))``: pulls pairs together but never pushes anything apart,
    so alone it can collapse (every embedding the same gives L = 0); see the retriever notes."""
    return (1 - F.cosine_similarity(q.float(), p_gold.float(), dim=-1)).mean()


@register_loss("cosine", uses_negatives=False)
def cosine_target_loss(q: torch.Tensor, p: torch.Tensor, targets: torch.Tensor,
                       temperature: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``cosine_loss`` of each query with its target column; temperature and mask unused."""
    return cosine_loss(q, p[targets])


def false_negative_mask(gold: Sequence[set[str]], columns: Sequence[str],
                        targets: Sequence[int]) -> torch.Tensor:
    """(B, P) True where column j is gold for query i but is not its target."""
    m = torch.zeros((len(gold), len(columns)), dtype=torch.bool)
    for i, g in enumerate(gold):
        for j, pid in enumerate(columns):
            if pid in g and j != targets[i]:
                m[i, j] = True
    return m


def listwise_softmax_ce(scores: torch.Tensor, targets: torch.Tensor,
                        mask: torch.Tensor | None = None) -> torch.Tensor:
    """Listwise softmax cross-entropy of a reranker over each question's candidate list.

    scores: (Q, N) one relevance logit per (question, candidate) pair; targets: (Q,) the column
    of each question's gold passage. ``L = -mean_i log softmax(scores_i)[targets_i]``, the
    softmax taken over that question's N candidates only (as DPR's reader selector and
    sentence-transformers' CrossEncoder ListNetLoss with a one-hot target). ``mask`` (Q, N) True
    drops a column: a padding slot where a question has fewer candidates. The scores are cast
    to float before the softmax (safe under bf16).
    """
    if scores.ndim != 2 or targets.shape != scores.shape[:1]:
        raise ValueError(f"listwise_softmax_ce: expected scores (Q, N) and targets (Q,), got "
                         f"{tuple(scores.shape)} and {tuple(targets.shape)}")
    s = scores.float()  # (Q, N)
    if mask is not None:
        s = s.masked_fill(mask, float("-inf"))
    return F.cross_entropy(s, targets)
