"""Distillation targets: a trained cross-encoder's scores over each train question's candidates.

``retriever.loss: distill`` trains the bi-encoder against these: each labelled train question
gets its gold passage and ``n`` hard negatives from BM25's top ``depth`` (no gold passage, no
passage containing an answer: likely false negatives, as ``mining.mine_hard_negatives``), and
the reranker scores every (question, candidate) pair once, before training (the teacher is
fixed, so its scores are computed once rather than every step).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ragtrain.data.corpus import Corpus
from ragtrain.errors import DataError
from ragtrain.io import read_jsonl
from ragtrain.retrieval.mining import mine_hard_negatives
from ragtrain.retrieval.reranker import Reranker, passage_texts

# question id -> {candidate passage id: teacher logit}; the gold passage is first
TeacherScores = dict[str, dict[str, float]]


def teacher_candidates(rows: Sequence[Mapping[str, Any]], corpus: Corpus, bm25: Any, *,
                       depth: int, n: int) -> list[list[str]]:
    """Per labelled question: [its first gold passage, up to ``n`` BM25 hard negatives]."""
    _, ranked = bm25.search([r["question"] for r in rows], min(depth, len(corpus.ids)))
    negatives = mine_hard_negatives(ranked, [r["gold_passage_ids"] for r in rows],
                                    [r.get("answers") or [] for r in rows], corpus.text_by_id, n)
    return [[r["gold_passage_ids"][0], *neg] for r, neg in zip(rows, negatives, strict=True)]


def score_candidates(reranker: Reranker, rows: Sequence[Mapping[str, Any]], corpus: Corpus,
                     candidates: Sequence[Sequence[str]], *, batch_size: int, bf16: bool,
                     progress: bool = False) -> list[dict[str, Any]]:
    """The rows of scores.jsonl: ``{"id", "candidates", "scores"}`` per question."""
    text = passage_texts(corpus, reranker.spec)
    scores = reranker.score([r["question"] for r in rows],
                            [[text[c] for c in cands] for cands in candidates],
                            batch_size=batch_size, bf16=bf16, progress=progress)
    return [{"id": r["id"], "candidates": list(c), "scores": [float(x) for x in s]}
            for r, c, s in zip(rows, candidates, scores, strict=True)]


def read_teacher_scores(path: Path, corpus_ids: Sequence[str]) -> TeacherScores:
    """scores.jsonl -> TeacherScores; a malformed row is a DataError naming file:line."""
    known = set(corpus_ids)
    out: TeacherScores = {}
    for line, row in enumerate(read_jsonl(path), 1):
        where = f"{path}:{line}"
        cands, scores = row.get("candidates"), row.get("scores")
        if not isinstance(row.get("id"), str) or not isinstance(cands, list) or not isinstance(
                scores, list) or len(cands) != len(scores) or not cands:
            raise DataError(f"{where}: expected {{id, candidates, scores}} with one score per "
                            "candidate")
        bad = next((c for c in cands if c not in known), None)
        if bad is not None:
            raise DataError(f"{where}: candidate {bad!r} is not in the corpus (rerun "
                            "`dvc repro teacher_scores`)")
        if not all(isinstance(x, int | float) and math.isfinite(x) for x in scores):
            raise DataError(f"{where}: scores must be finite numbers")
        out[row["id"]] = dict(zip(cands, map(float, scores), strict=True))
    return out


def distill_negatives(rows: Sequence[Mapping[str, Any]], teacher: TeacherScores,
                      n: int) -> list[list[str]]:
    """Each row's negatives for training: its teacher candidates without gold, first ``n``."""
    out = []
    for r in rows:
        if r["id"] not in teacher:
            raise DataError(f"teacher scores: no entry for train question {r['id']!r} (the "
                            "scores are stale: rerun `dvc repro teacher_scores`)")
        gold = set(r["gold_passage_ids"])
        out.append([c for c in teacher[r["id"]] if c not in gold][:n])
    return out
