"""Abstention: the RAG model answers "no answer" when no passage it reads matches the question.

The signal (``abstention_score``) is the bi-encoder's relevance of the first passage read (the
cosine of the question's and the passage's embeddings, ``relevance``) less ``null_weight`` x the
generator's probability of the empty answer on the input its answer was kept from (``Prediction
.null`` is its log; the copy generator learns the empty answer on training inputs that lack the
answer). Measured on 300 dev questions, as retrieved and with their articles taken out of the
corpus (bench/abstention.py): the cosine alone tells the two apart with AUC 0.926, the empty
answer's probability alone 0.79, both (weight 0.2-0.5) 0.936-0.938; the generator's answer score
(mean token log-probability) only 0.53 (it copies a span from an unrelated passage as
confidently), and the hybrid's fused score carries nothing (min-max normalised per question).

The weight and the threshold are chosen on dev the way SQuAD 2.0's evaluation picks its best
no-answer threshold: over a mixture of answerable questions (their passages as retrieved) and the
same questions made unanswerable (their articles removed from the searched corpus), they maximise
the mean per-question F1 where answering an answerable question scores its F1, abstaining on it
0, abstaining on an unanswerable question 100 and answering it 0 (``calibrate``: the best
threshold of each weight of ``abstention.null_weights``, the weight whose mixture F1 is highest).

Pure functions of scores and per-question F1 (and ``relevance`` of an encoder); the evaluate
stage feeds them and writes ``{split}/abstain/*`` beside EM / F1.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

NO_ANSWER = ""  # what an abstaining model answers (scored as a wrong answer on answerable ones)


@dataclass(frozen=True)
class Calibration:
    threshold: float  # abstain when the answer's score is below it; -inf: never abstain
    f1: float  # the dev mixture's mean F1 (percent) at the threshold
    f1_never: float  # the same when never abstaining
    abstained_answerable: float  # dev answerable questions abstained on (0-1)
    abstained_unanswerable: float  # dev unanswerable questions abstained on (0-1)
    null_weight: float = 0.0  # the score: relevance - null_weight x p(empty answer)


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


def abstention_score(relevance: float, null: float, null_weight: float) -> float:
    """The first passage's relevance less ``null_weight`` x the kept answer's probability of the
    empty answer (``null``: its log-probability; 0 for generator kinds that do not give it)."""
    return relevance - null_weight * math.exp(min(null, 0.0))


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


def calibrate(answerable: Sequence[tuple[float, float, float]],
              unanswerable: Sequence[tuple[float, float]],
              null_weights: Sequence[float]) -> Calibration:
    """The null weight and threshold that maximise the dev mixture's F1: ``answerable``:
    (relevance, null, F1 in percent) per question, ``unanswerable``: (relevance, null); each
    weight gets its best threshold (``choose_threshold``), ties go to the earlier weight."""
    if not null_weights:
        raise ValueError("calibrate: needs at least one null weight")
    best: Calibration | None = None
    for w in null_weights:
        cal = choose_threshold([(abstention_score(r, n, w), f1) for r, n, f1 in answerable],
                               [abstention_score(r, n, w) for r, n in unanswerable])
        if best is None or cal.f1 > best.f1 + 1e-12:
            best = replace(cal, null_weight=float(w))
    assert best is not None
    return best


def report(split: str, calibration: Calibration, answerable: Sequence[tuple[float, float, float]],
           unanswerable: Sequence[float]) -> dict[str, float]:
    """``{split}/abstain/*`` with the threshold applied: EM and F1 (percent) on the answerable
    questions (an abstention scores 0), the false abstention rate on them and the correct
    abstention rate on the unanswerable ones (0-1); ``answerable``: (score, EM, F1) per question,
    EM and F1 in percent, the scores ``abstention_score`` at the calibration's weight. The dev
    calibration rides along as ``dev/abstain/*``."""
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
        "dev/abstain/null_weight": calibration.null_weight,
        "dev/abstain/f1": calibration.f1, "dev/abstain/f1_never": calibration.f1_never,
        "dev/abstain/false_abstention_rate": calibration.abstained_answerable,
        "dev/abstain/correct_abstention_rate": calibration.abstained_unanswerable,
    }
