"""Hybrid retrieval: fuse ranked passage lists from several retrievers (pure functions).

Both functions work on a batch of queries and return ``(scores, ids)``: scores
``# (n_queries, top_k)`` float64 and one id list per query, best first. Ties are broken by
passage id (ascending), so results are deterministic. When fewer than ``top_k`` distinct
passages were retrieved for a query, its id list is shorter and the missing scores are ``-inf``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ragtrain.errors import RetrievalError
from ragtrain.retrieval.checks import check_int


def _top(fused: list[dict[str, float]], top_k: int) -> tuple[np.ndarray, list[list[str]]]:
    scores = np.full((len(fused), top_k), -np.inf, dtype=np.float64)  # (n_queries, top_k)
    ids: list[list[str]] = []
    for qi, by_id in enumerate(fused):
        best = sorted(by_id.items(), key=lambda kv: (-kv[1], kv[0]))[:top_k]
        scores[qi, : len(best)] = [s for _, s in best]
        ids.append([pid for pid, _ in best])
    return scores, ids


def reciprocal_rank_fusion(
    rankings: Sequence[Sequence[Sequence[str]]], *, top_k: int, k: int = 60
) -> tuple[np.ndarray, list[list[str]]]:
    """Reciprocal rank fusion (Cormack et al., 2009) of several rankings per query.

    ``rankings[q][r]`` is retriever r's ranked id list for query q (best first). The fused score
    of passage d is ``sum_r 1 / (k + rank_r(d))`` with ranks starting at 1; a retriever that did
    not return d adds nothing. A passage repeated within one list counts once, at its best rank.
    """
    top_k = check_int("top_k", top_k)
    k = check_int("rrf k", k, lo=0)
    fused: list[dict[str, float]] = []
    for qi, per_retriever in enumerate(rankings):
        if isinstance(per_retriever, str) or not per_retriever:
            raise RetrievalError(
                f"rankings[{qi}]: expected one ranked id list per retriever, got {per_retriever!r}"
            )
        by_id: dict[str, float] = {}
        for ranked in per_retriever:
            if isinstance(ranked, str):
                raise RetrievalError(f"rankings[{qi}]: expected a list of ids, got {ranked!r}")
            seen: set[str] = set()
            for rank, pid in enumerate(ranked, start=1):
                if pid in seen:
                    continue
                seen.add(pid)
                by_id[pid] = by_id.get(pid, 0.0) + 1.0 / (k + rank)
        fused.append(by_id)
    return _top(fused, top_k)


def _minmax(scores: np.ndarray, ids: Sequence[Sequence[str]], what: str) -> list[dict[str, float]]:
    """Per-query min-max normalised scores by id; a constant list maps to 0."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] != len(ids):
        raise RetrievalError(
            f"{what}: expected scores of shape (n_queries={len(ids)}, k), got {s.shape}"
        )
    out: list[dict[str, float]] = []
    for qi, row_ids in enumerate(ids):
        if len(row_ids) > s.shape[1]:
            raise RetrievalError(f"{what}: query {qi} has {len(row_ids)} ids but {s.shape[1]} "
                                 f"scores")
        row = s[qi, : len(row_ids)]  # (n_ids,)
        if not np.isfinite(row).all():
            raise RetrievalError(f"{what}: query {qi} has a NaN or infinite score for a passage")
        lo, hi = (float(row.min()), float(row.max())) if len(row) else (0.0, 0.0)
        norm = (row - lo) / (hi - lo) if hi > lo else np.zeros_like(row)
        by_id: dict[str, float] = {}
        for pid, v in zip(row_ids, norm.tolist(), strict=True):
            by_id[pid] = max(by_id.get(pid, 0.0), v)
        out.append(by_id)
    return out


def weighted_score_fusion(
    dense_scores: np.ndarray,
    dense_ids: Sequence[Sequence[str]],
    bm25_scores: np.ndarray,
    bm25_ids: Sequence[Sequence[str]],
    *,
    dense_weight: float,
    top_k: int,
) -> tuple[np.ndarray, list[list[str]]]:
    """Convex combination of per-query min-max normalised dense and BM25 scores.

    For each query and each list, ``norm(s) = (s - min) / (max - min)`` over that list's
    returned passages (a list whose scores are all equal carries no ranking information and
    maps to 0). The fused score is ``w * norm_dense(d) + (1 - w) * norm_bm25(d)``, where a
    passage missing from a list gets 0 from it. Scores are ``# (n_queries, k)``; an id list may
    be shorter than k (the extra scores, e.g. ``-inf`` padding, are ignored).
    """
    top_k = check_int("top_k", top_k)
    w = float(dense_weight)
    if not 0.0 <= w <= 1.0:
        raise RetrievalError(f"dense_weight: must be in [0, 1], got {dense_weight!r}")
    if len(dense_ids) != len(bm25_ids):
        raise RetrievalError(
            f"weighted fusion: {len(dense_ids)} dense queries but {len(bm25_ids)} BM25 queries"
        )
    dense = _minmax(dense_scores, dense_ids, "dense scores")
    sparse = _minmax(bm25_scores, bm25_ids, "bm25 scores")
    fused: list[dict[str, float]] = []
    for d, s in zip(dense, sparse, strict=True):
        fused.append({pid: w * d.get(pid, 0.0) + (1 - w) * s.get(pid, 0.0) for pid in d | s})
    return _top(fused, top_k)
