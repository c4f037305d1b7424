"""Abstention: the RAG model answers "no answer" when no passage it reads matches the question.

The signal is the bi-encoder's relevance of the first passage read: the cosine of the question's
and the passage's embeddings (``relevance``). Measured on 300 dev questions, as retrieved and
with their articles taken out of the corpus, it tells the two apart with AUC 0.93, where the
generator's answer score (mean token log-probability) scores 0.53 (it copies a span from an
unrelated passage as confidently) and the hybrid's fused score carries nothing (it is min-max
normalised per question).

The threshold is chosen on dev the way SQuAD 2.0's evaluation picks its best no-answer
threshold: over a mixture of answerable questions (their passages as retrieved) and the same
questions made unanswerable (their articles removed from the searched corpus), it maximises the
mean per-question F1 where answering an answerable question scores its F1, abstaining on it 0,
abstaining on an unanswerable question 100 and answering it 0.

Pure functions of scores and per-question F1 (and ``relevance`` of an encoder); the evaluate
stage feeds them and writes ``{split}/abstain/*`` beside EM / F1.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

NO_ANSWER = ""  # what an abstaining model answers (scored as a wrong answer on answerable ones)


@dataclass(frozen=True)
class Calibration:
    threshold: float  # abstain when the answer's score is below it; -inf: never abstain
    f1: float  # the dev mixture's mean F1 (percent) at the threshold
    f1_never: float  # the same when never abstaining
    abstained_answerable: float  # dev answerable questions abstained on (0-1)
    abstained_unanswerable: float  # dev unanswerable questions abstained on (0-1)


def sample_answered(rows: Sequence[Mapping[str, Any]], n: int, seed: int) -> list[Any]:
    """Up to ``n`` of the questions with reference answers, a seeded sample in file order (the
    retrieve and evaluate stages draw the same one)."""
    answered = [r for r in rows if r.get("answers")]
    if len(answered) <= n:
        return list(answered)
    keep = sorted(random.Random(seed).sample(range(len(answered)), n))
    return [answered[i] for i in keep]


def removed_passages(rows: Sequence[Mapping[str, Any]], corpus: Any) -> set[str]:
    """The passages of the articles ``rows`` ask about (their ``doc_id``, and their gold
    passages' documents; the gold passages alone where a corpus has no document ids): what is
    taken out of the searched corpus to make them unanswerable."""
    gold = {g for r in rows for g in r.get("gold_passage_ids") or []}
    docs = {r.get("doc_id") for r in rows} | {corpus[g].doc_id for g in gold
                                              if g in corpus.text_by_id}
    docs.discard("")
    docs.discard(None)
    return gold | {p.passage_id for p in corpus.passages if p.doc_id in docs}


def relevance(encoder: Any, questions: Sequence[str], passages: Sequence[str], *,
              bf16: bool = False, batch_size: int = 64) -> list[float]:
    """The cosine of each question with its passage (the encoders' input text, e.g.
    ``passage_inputs``) under the bi-encoder ``encoder`` (its embeddings are L2-normalised)."""
    from ragtrain import runtime

    with runtime.autocast(bf16):
        q = encoder.encode_queries(list(questions), batch_size)
        p = encoder.encode_passages(list(passages), batch_size)
    return [float(x) for x in (q * p).sum(axis=1)]


def abstains(score: float, threshold: float) -> bool:
    return score < threshold


def _mixture_f1(answerable: Sequence[tuple[float, float]], unanswerable: Sequence[float],
                threshold: float) -> float:
    got = sum(0.0 if abstains(s, threshold) else f1 for s, f1 in answerable)
    got += sum(100.0 for s in unanswerable if abstains(s, threshold))
    return got / (len(answerable) + len(unanswerable))


def choose_threshold(answerable: Sequence[tuple[float, float]],
                     unanswerable: Sequence[float]) -> Calibration:
    """The threshold maximising the mixture's F1; ``answerable``: (score, F1 in percent) per
    question, ``unanswerable``: scores. Candidates: never, and abstaining below each observed
    score; ties go to the lowest threshold (the fewest abstentions)."""
    if not answerable or not unanswerable:
        raise ValueError("choose_threshold: needs answerable and unanswerable questions")
    scores = [s for s, _ in answerable] + list(unanswerable)
    if not all(math.isfinite(s) for s in scores):
        raise ValueError("choose_threshold: scores must be finite")
    best, best_f1 = -math.inf, _mixture_f1(answerable, unanswerable, -math.inf)
    never = best_f1
    # abstaining below s and below the next larger score differ only for the questions scored
    # in between: every distinct score, plus just above the largest one (abstain on all)
    for t in sorted(set(scores)) + [math.nextafter(max(scores), math.inf)]:
        f = _mixture_f1(answerable, unanswerable, t)
        if f > best_f1 + 1e-12:
            best, best_f1 = t, f
    return Calibration(
        threshold=best, f1=best_f1, f1_never=never,
        abstained_answerable=sum(abstains(s, best) for s, _ in answerable) / len(answerable),
        abstained_unanswerable=sum(abstains(s, best) for s in unanswerable) / len(unanswerable))


def report(split: str, calibration: Calibration, answerable: Sequence[tuple[float, float, float]],
           unanswerable: Sequence[float]) -> dict[str, float]:
    """``{split}/abstain/*`` with the threshold applied: EM and F1 (percent) on the answerable
    questions (an abstention scores 0), the false abstention rate on them and the correct
    abstention rate on the unanswerable ones (0-1); ``answerable``: (score, EM, F1) per question,
    EM and F1 in percent. The dev calibration rides along as ``dev/abstain/*``."""
    t = calibration.threshold
    kept = [(em, f1) for s, em, f1 in answerable if not abstains(s, t)]
    n = len(answerable)
    return {
        f"{split}/abstain/em": sum(em for em, _ in kept) / n,
        f"{split}/abstain/f1": sum(f1 for _, f1 in kept) / n,
        f"{split}/abstain/false_abstention_rate": (n - len(kept)) / n,
        f"{split}/abstain/correct_abstention_rate":
            sum(abstains(s, t) for s in unanswerable) / len(unanswerable),
        f"{split}/abstain/n_unanswerable": len(unanswerable),
        "dev/abstain/threshold": t if math.isfinite(t) else -1e9,
        "dev/abstain/f1": calibration.f1, "dev/abstain/f1_never": calibration.f1_never,
        "dev/abstain/false_abstention_rate": calibration.abstained_answerable,
        "dev/abstain/correct_abstention_rate": calibration.abstained_unanswerable,
    }
