"""Hard negatives: top-ranked passages that are neither gold nor contain an answer."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ragtrain.retrieval.metrics import answer_in_passage


def mine_hard_negatives(
    ranked_ids: Sequence[Sequence[str]],
    gold: Sequence[Sequence[str]],
    answers: Sequence[Sequence[str]],
    passages: Mapping[str, str],
    n: int,
    *,
    ranked_scores: Sequence[Sequence[float]] | None = None,
    gold_scores: Sequence[float] | None = None,
    margin: float = 0.0,
) -> list[list[str]]:
    """Up to ``n`` negatives per query, hardest first.

    Skipped: gold passages, passages that contain an answer (DPR's answer match: likely false
    negatives), and, when ``margin > 0`` and scores are given, candidates scoring above
    ``gold_score - margin`` (too close to the positive to trust as negatives).
    """
    out: list[list[str]] = []
    for i, ranked in enumerate(ranked_ids):
        g = set(gold[i])
        negs: list[str] = []
        for r, pid in enumerate(ranked):
            if len(negs) == n:
                break
            if pid in g or (answers[i] and answer_in_passage(answers[i], passages[pid])):
                continue
            if (margin > 0 and ranked_scores is not None and gold_scores is not None
                    and ranked_scores[i][r] > gold_scores[i] - margin):
                continue
            negs.append(pid)
        out.append(negs)
    return out
