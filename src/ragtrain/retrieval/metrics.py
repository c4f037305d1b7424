"""Retrieval metrics (pure): recall@k, MRR@k, nDCG@k by gold passage id, and answer recall@k.

Ranks start at 1. Recall@k for a k larger than a question's ranked list is recall within what
was retrieved (the list is not padded), so ``recall_at_100`` over 20 retrieved passages equals
``recall_at_20``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from ragtrain.errors import RetrievalError
from ragtrain.evaluation.answers import contains_tokens, normalize_answer
from ragtrain.retrieval.checks import check_int


def answer_in_passage(answers: Sequence[str], passage: str) -> bool:
    """True if any answer's normalised tokens occur contiguously in the normalised passage.

    Token-level, as DPR's has_answer: "art" does not match "party". An answer that normalises
    to nothing (e.g. "the") matches no passage.
    """
    tokens = normalize_answer(passage).split()
    for answer in answers:
        sub = normalize_answer(answer).split()
        if sub and contains_tokens(tokens, sub):
            return True
    return False


def _add_hits(row: dict[str, Any], sums: dict[str, float], metric: str, rank: int | None,
              ks: Sequence[int]) -> None:
    """Record ``{metric}_at_{k}`` (1-based ``rank`` <= k) on the row and add it to the sums."""
    for k in ks:
        hit = rank is not None and rank <= k
        row[f"{metric}_at_{k}"] = hit
        sums[f"{metric}_at_{k}"] += hit


def evaluate_retrieval(
    ranked_ids: Sequence[Sequence[str]],
    gold_ids: Sequence[Sequence[str]],
    *,
    ks: Sequence[int] = (1, 5, 20, 100),
    rank_cutoff: int = 10,
    split: str = "test",
    passages: Mapping[str, str] | None = None,
    answers: Sequence[Sequence[str]] | None = None,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Aggregate metrics ``{split}/{metric}`` and one row per question.

    Per question with at least one gold id (others count in ``n_unlabelled`` and are skipped
    for id metrics), with ``r`` the 1-based rank of the first gold passage:

    - ``recall_at_{k}``: 1 if ``r <= k`` else 0.
    - ``mrr_at_{c}``: ``1 / r`` if ``r <= c`` else 0.
    - ``ndcg_at_{c}``: binary relevance (every gold id is relevant),
      ``DCG = sum_{i<=c, d_i gold} 1 / log2(i + 1)`` over ranks i; divided by the ideal DCG with
      ``min(n_gold, c)`` gold passages at the top.

    Each aggregate is the mean over labelled questions; with none, id metrics are omitted.
    With ``passages`` and ``answers``, ``answer_recall_at_{k}`` is the fraction of questions
    with a non-empty answer list whose top k contains a passage holding an answer
    (``answer_in_passage``); ``n_with_answers`` counts those questions.
    """
    n = len(ranked_ids)
    if n == 0:
        raise RetrievalError("evaluate_retrieval: no questions")
    if len(gold_ids) != n:
        raise RetrievalError(f"evaluate_retrieval: {n} ranked lists but {len(gold_ids)} gold lists")
    ks = [check_int("ks", k) for k in ks]
    if not ks:
        raise RetrievalError("ks: must name at least one k")
    c = check_int("rank_cutoff", rank_cutoff)
    use_answers = passages is not None and answers is not None
    if (passages is None) != (answers is None):
        raise RetrievalError("evaluate_retrieval: pass both passages and answers, or neither")
    if use_answers and len(answers) != n:
        raise RetrievalError(
            f"evaluate_retrieval: {n} ranked lists but {len(answers)} answer lists"
        )
    keep = max(max(ks), c)

    sums: dict[str, float] = {f"recall_at_{k}": 0.0 for k in ks}
    sums |= {f"mrr_at_{c}": 0.0, f"ndcg_at_{c}": 0.0}
    ans_sums = {f"answer_recall_at_{k}": 0.0 for k in ks}
    n_labelled = n_with_answers = 0
    rows: list[dict[str, Any]] = []
    for qi in range(n):
        ranked = list(ranked_ids[qi])
        if len(set(ranked)) != len(ranked):
            raise RetrievalError(f"ranked_ids[{qi}]: duplicate passage ids in one ranking")
        gold = set(gold_ids[qi])
        row: dict[str, Any] = {"index": qi, "gold_ids": list(gold_ids[qi]),
                               "top_ids": ranked[:keep]}
        if gold:
            n_labelled += 1
            rank = next((i for i, pid in enumerate(ranked, start=1) if pid in gold), None)
            rr = 1.0 / rank if rank is not None and rank <= c else 0.0
            dcg = sum(1.0 / math.log2(i + 1) for i, pid in enumerate(ranked[:c], 1) if pid in gold)
            idcg = sum(1.0 / math.log2(i + 1) for i in range(1, min(len(gold), c) + 1))
            row["gold_rank"] = rank
            _add_hits(row, sums, "recall", rank, ks)
            row[f"rr_at_{c}"] = rr
            row[f"ndcg_at_{c}"] = dcg / idcg
            sums[f"mrr_at_{c}"] += rr
            sums[f"ndcg_at_{c}"] += dcg / idcg
        else:
            row["gold_rank"] = None
        if use_answers and answers[qi]:
            n_with_answers += 1
            first = None  # 1-based rank of the first answer passage within the top max(ks)
            for i, pid in enumerate(ranked[: max(ks)], start=1):
                if pid not in passages:
                    raise RetrievalError(f"ranked_ids[{qi}]: passage {pid!r} is not in passages")
                if answer_in_passage(answers[qi], passages[pid]):
                    first = i
                    break
            row["answer_rank"] = first
            _add_hits(row, ans_sums, "answer_recall", first, ks)
        rows.append(row)

    metrics: dict[str, float] = {f"{split}/n_questions": float(n),
                                 f"{split}/n_unlabelled": float(n - n_labelled)}
    if n_labelled:
        metrics |= {f"{split}/{name}": v / n_labelled for name, v in sums.items()}
    if use_answers:
        metrics[f"{split}/n_with_answers"] = float(n_with_answers)
        if n_with_answers:
            metrics |= {f"{split}/{name}": v / n_with_answers for name, v in ans_sums.items()}
    return metrics, rows
