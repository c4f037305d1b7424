"""Answering from several inputs of retrieved passages, then keeping the best answer.

The generator reads ``n`` inputs per question, each of ``per_input`` passages (the best
``per_input``, the next ``per_input``, ...; with one passage per input this is RAG-Sequence-style
decoding, as DPR's reader selects among passages) and the answer kept is the one with the
highest ``answer score - null_weight * null score + weight * retrieval score``: the
generator's mean token log-probability of its answer, less its log-probability of the empty
answer (the copy model, trained to write "" where its input lacks the answer, ``missed_target:
empty``, says so there: on dev it tells the inputs apart, untrained it does not; BENCHMARKS.md),
plus the retriever's (fused, reranked) score of its input's first passage. A
question whose gold passage was ranked 2nd or 3rd can still be answered; a confident answer
from a lower-ranked input must beat the top input's answer by ``weight`` times their score gap.

The retrieval scores are the ones the RAG model's retriever returns: the weighted hybrid's and
the reranker's fused scores lie in [0, 1], dense scores are cosines; BM25's are unbounded, so
with ``retriever.kind: bm25`` choose the weight again on dev (or read only the top passage).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from ragtrain.data.corpus import Passage
from ragtrain.generation.generator import Example, Generator, Prediction


def best_answer(preds: Sequence[Prediction], scores: Sequence[float], weight: float,
                null_weight: float = 0.0) -> int:
    """The index of the answer kept: max of answer score - null_weight * null score + weight *
    retrieval score (the first on ties, so the top passage wins when all else is equal). An
    empty answer (the generator's "this input does not hold it") is kept only when all are."""
    if not preds:
        raise ValueError("no answers to choose from")
    combined = [(bool(p.answer.strip()), p.score - null_weight * p.null + weight * float(s))
                for p, s in zip(preds, scores, strict=True)]
    return max(range(len(combined)), key=lambda j: (*combined[j], -j))


def read_inputs(gen: Generator, questions: Sequence[str],
                passages: Sequence[Sequence[Passage]], *, n: int, per_input: int = 1,
                batch_size: int = 32, bf16: bool = False, progress: bool = False
                ) -> list[list[Prediction]]:
    """Per question, the generator's answer to each of its first ``n`` inputs of ``per_input``
    passages (the best ``per_input``, the next ``per_input``, ...), in one batched pass."""
    if n < 1 or per_input < 1:
        raise ValueError(f"n and per_input: must be >= 1, got {n} and {per_input}")
    flat: list[Example] = []
    counts: list[int] = []
    for q, ps in zip(questions, passages, strict=True):
        groups = [list(ps[j:j + per_input]) for j in range(0, len(ps), per_input)][:n] or [[]]
        counts.append(len(groups))
        flat += [Example(q, g) for g in groups]
    preds = gen.answer(flat, batch_size, bf16=bf16, progress=progress)
    out, start = [], 0
    for m in counts:
        out.append(preds[start:start + m])
        start += m
    return out


def pick(per_question: Sequence[Sequence[Prediction]], scores: Sequence[Sequence[float]], *,
         weight: float, per_input: int = 1, null_weight: float = 0.0) -> list[Prediction]:
    """The kept answer of each question (``best_answer`` over its inputs, each scored by its
    first passage's retrieval score); its ``passage`` indexes the question's whole list."""
    out = []
    for mine, s in zip(per_question, scores, strict=True):
        first = [s[j * per_input] if j * per_input < len(s) else 0.0 for j in range(len(mine))]
        j = best_answer(mine, first, weight, null_weight)
        cited = j * per_input + mine[j].passage if mine[j].passage >= 0 else -1
        out.append(replace(mine[j], passage=cited,
                           question_cut=any(p.question_cut for p in mine)))
    return out


def answer_each(gen: Generator, questions: Sequence[str], passages: Sequence[Sequence[Passage]],
                scores: Sequence[Sequence[float]], *, n: int, weight: float,
                null_weight: float = 0.0, per_input: int = 1, batch_size: int = 32,
                bf16: bool = False, progress: bool = False) -> list[Prediction]:
    """One prediction per question: the generator answers from each of its first ``n`` inputs
    of ``per_input`` passages and the best answer is kept (``pick``). ``n`` = 1 is plain
    reading of the top ``per_input`` passages."""
    return pick(read_inputs(gen, questions, passages, n=n, per_input=per_input,
                            batch_size=batch_size, bf16=bf16, progress=progress),
                scores, weight=weight, per_input=per_input, null_weight=null_weight)
