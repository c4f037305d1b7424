"""Answer metrics, pure: exact match, F1 and accuracy with the official SQuAD v1.1 answer
normalisation (max over the references), in percent like the official script; and a simple
non-learned baseline (a sliding window over the top passage)."""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Sequence
from pathlib import Path

METRIC_MODULE = Path(__file__).parent / "rag_qa"  # the `evaluate` module, by path

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
    """Lowercase, drop punctuation and articles, collapse whitespace (SQuAD v1.1 evaluate).

    The one answer normaliser: answer metrics here, and answer matching in retrieval metrics
    and hard-negative mining (``retrieval.metrics.answer_in_passage``).
    """
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def contains_tokens(tokens: Sequence[str], sub: Sequence[str]) -> bool:
    """True if ``sub`` occurs as a contiguous run of ``tokens`` (whole tokens, not substrings)."""
    n = len(sub)
    return any(tokens[i : i + n] == sub for i in range(len(tokens) - n + 1))


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def f1(prediction: str, reference: str) -> float:
    """Token F1 of the normalised strings (the official SQuAD v1.1 definition)."""
    p = normalize_answer(prediction).split()
    r = normalize_answer(reference).split()
    common = collections.Counter(p) & collections.Counter(r)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(r)
    return 2 * precision * recall / (precision + recall)


def contains(prediction: str, reference: str) -> float:
    """Accuracy: the normalised reference occurs (as whole tokens) in the normalised prediction."""
    r = normalize_answer(reference).split()
    return float(bool(r) and contains_tokens(normalize_answer(prediction).split(), r))


def score_one(prediction: str, references: Sequence[str]) -> dict[str, float]:
    """EM, F1 and accuracy of one prediction: the max over its references (0-1)."""
    if not references:
        raise ValueError("a question without reference answers cannot be scored")
    return {"em": max(exact_match(prediction, r) for r in references),
            "f1": max(f1(prediction, r) for r in references),
            "accuracy": max(contains(prediction, r) for r in references)}


def score_answers(predictions: Sequence[str], references: Sequence[Sequence[str]]
                  ) -> dict[str, float]:
    """Mean EM, F1 and accuracy in percent (the official SQuAD script's scale)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} reference lists")
    if not predictions:
        raise ValueError("no predictions to score")
    per = [score_one(p, r) for p, r in zip(predictions, references, strict=True)]
    return {k: 100.0 * sum(s[k] for s in per) / len(per) for k in ("em", "f1", "accuracy")}


_WORD = re.compile(r"\S+")


def sliding_window_answer(question: str, passage: str, max_words: int = 4,
                          window: int = 10) -> str:
    """A non-learned baseline: the span of 1..max_words passage words, none of them a question
    word, whose surrounding ``window`` words share the most words with the question (ties: the
    longest, then the earliest span)."""
    words = [(m.group(), m.start(), m.end()) for m in _WORD.finditer(passage)]
    if not words:
        return ""
    norm = [normalize_answer(w) for w, _, _ in words]
    qset = {w for w in normalize_answer(question).split()}
    best: tuple[int, int, int] | None = None  # (score, length, -start)
    for i in range(len(words)):
        if not norm[i]:
            continue  # a span never starts or ends with an article or punctuation
        for n in range(1, max_words + 1):
            j = i + n
            if j > len(words) or norm[j - 1] in qset:
                break
            if not norm[j - 1]:
                continue
            ctx = norm[max(0, i - window): i] + norm[j: j + window]
            key = (len(qset & set(ctx)), n, -i)
            if best is None or key > best:
                best = key
    if best is None:
        return words[0][0]
    i, j = -best[2], -best[2] + best[1]
    return passage[words[i][1]: words[j - 1][2]]
