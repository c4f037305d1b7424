"""What the run report shows, as plain data: per-question outcomes, the failure breakdown,
metric deltas against the champion, recall@k curves, params and lineage differences.

Pure functions over dicts and lists (the pipeline reads the files and the registry).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

WH_WORDS = ("what", "who", "when", "where", "which", "how", "why")
QUESTION_TYPES = (*WH_WORDS, "other")
_WH_ALIASES = {"whom": "who", "whose": "who"}
LENGTH_BUCKETS = ("1", "2", "3", "4-5", "6-10", "11+")  # answer length in words
CORRECT, RETRIEVAL_MISS, READING_MISS, NO_GOLD = (
    "correct", "retrieval miss", "reading miss", "no gold passage")
OUTCOMES = (CORRECT, RETRIEVAL_MISS, READING_MISS, NO_GOLD)
RETRIEVERS = ("bm25", "untrained", "dense", "hybrid", "reranked")  # retriever_test.jsonl ranks
# metrics that are counts or sizes: a change is neither better nor worse
_NEUTRAL = re.compile(r"(n_questions|n_with_answers|n_unlabelled|/steps|/examples|best_step)$")
_LOWER_IS_BETTER = re.compile(r"(loss|seconds|questions_cut)")


def question_type(question: str) -> str:
    """The question's wh-word (the first one in it: "In what year ..." is a *what*), or
    "other"."""
    for token in re.findall(r"[a-z]+", question.lower()):
        token = _WH_ALIASES.get(token, token)
        if token in WH_WORDS:
            return token
    return "other"


def length_bucket(answer: str) -> str:
    """The bucket of an answer's length in words (``LENGTH_BUCKETS``)."""
    n = len(answer.split())
    if n <= 3:
        return LENGTH_BUCKETS[max(n, 1) - 1]
    return "4-5" if n <= 5 else "6-10" if n <= 10 else "11+"


def outcome(em: float, read_rank: int | None, top_k: int, labelled: bool = True) -> str:
    """Why a question was answered or missed: correct (EM 1); a *retrieval miss* when the gold
    passage was not among the ``top_k`` passages the generator read; a *reading miss* when it
    was and the answer is still wrong; "no gold passage" when the question has none."""
    if em >= 1:
        return CORRECT
    if not labelled:
        return NO_GOLD
    if read_rank is None or read_rank > top_k:
        return RETRIEVAL_MISS
    return READING_MISS


def join_questions(generated: Sequence[Mapping[str, Any]],
                   retrieved: Sequence[Mapping[str, Any]], top_k: int) -> list[dict[str, Any]]:
    """One row per question of the generator's table, with the gold passage's rank under each
    retriever (from the retriever's table, by id), its type, answer length and outcome.

    The cited passage is the generator's ``answer_passage``; tables written before it was
    recorded fall back to the one passage read when ``top_k`` is 1.
    """
    by_id = {r["id"]: r for r in retrieved}
    out = []
    for g in generated:
        r = by_id.get(g["id"], {})
        refs = list(g.get("references") or [])
        gold = r.get("gold_passage_ids")
        cited = g.get("answer_passage")
        if cited is None and "answer_passage" not in g and top_k == 1 and r.get("top_ids"):
            cited = r["top_ids"][0]
        row = {"id": g["id"], "question": g.get("question", ""), "references": refs,
               "prediction": g.get("prediction", ""), "em": float(g.get("em", 0.0)),
               "f1": float(g.get("f1", 0.0)), "read_rank": g.get("gold_passage_rank"),
               "cited": cited, "type": question_type(g.get("question", "")),
               "length": length_bucket(refs[0] if refs else ""),
               "ranks": {k: r[f"{k}_gold_rank"] for k in RETRIEVERS if f"{k}_gold_rank" in r}}
        row["labelled"] = gold is None or bool(gold)  # unknown (no retriever row): assume so
        row["outcome"] = outcome(row["em"], row["read_rank"], top_k, row["labelled"])
        out.append(row)
    return out


def breakdown(rows: Iterable[Mapping[str, Any]], by: str,
              order: Sequence[str]) -> list[tuple[str, dict[str, int]]]:
    """Outcome counts per value of ``by`` ("type" or "length"), in ``order`` (values with no
    question left out), each with its total ``n``; the last entry is "all"."""
    counts: dict[str, Counter[str]] = {}
    for r in rows:
        counts.setdefault(r[by], Counter())[r["outcome"]] += 1
    table = [(v, {"n": sum(counts[v].values()), **{o: counts[v][o] for o in OUTCOMES}})
             for v in order if v in counts]
    total = {"n": sum(t["n"] for _, t in table),
             **{o: sum(t[o] for _, t in table) for o in OUTCOMES}}
    return [*table, ("all", total)]


def direction(key: str) -> int:
    """+1 when a higher value of metric ``key`` is better, -1 when lower is, 0 for counts."""
    if _NEUTRAL.search(key):
        return 0
    return -1 if _LOWER_IS_BETTER.search(key) else 1


def delta(key: str, new: float | None, old: float | None) -> tuple[float | None, str]:
    """(new - old, its CSS class): "better", "worse", "same" or "" (no comparison)."""
    if new is None or old is None or not (math.isfinite(new) and math.isfinite(old)):
        return None, ""
    d = new - old
    if d == 0 or direction(key) == 0:
        return d, "same"
    return d, "better" if d * direction(key) > 0 else "worse"


def recall_curves(rows: Sequence[Mapping[str, Any]], retrievers: Iterable[str],
                  max_k: int) -> dict[str, list[tuple[int, float]]]:
    """recall@k for k = 1..max_k per retriever, from the gold ranks of the labelled questions
    (those with a rank for that retriever or none: the same denominator as the metrics)."""
    out = {}
    for name in retrievers:
        ranks = [r["ranks"][name] for r in rows if name in r["ranks"] and r["labelled"]]
        if not ranks:
            continue
        hits = Counter(x for x in ranks if x is not None)
        n, acc, pts = len(ranks), 0, []
        for k in range(1, max_k + 1):
            acc += hits.get(k, 0)
            pts.append((k, acc / n))
        out[name] = pts
    return out


def metric_points(metrics: Mapping[str, float], split: str,
                  name: str | None) -> list[tuple[int, float]]:
    """(k, recall@k) from ``{split}/{name}/recall_at_{k}`` (``name`` None: unprefixed)."""
    prefix = f"{split}/" + (f"{name}/" if name else "")
    pat = re.compile(rf"^{re.escape(prefix)}recall_at_(\d+)$")
    return sorted((int(m.group(1)), float(v)) for k, v in metrics.items()
                  if (m := pat.match(k)))


def dict_diff(mine: Mapping[str, Any], theirs: Mapping[str, Any]
              ) -> list[tuple[str, str | None, str | None]]:
    """(key, this run's value, the other's) for every key whose values differ (as strings, as
    MLflow stores params), sorted; None where a side lacks the key."""
    out = []
    for k in sorted({*mine, *theirs}):
        a = None if k not in mine else str(mine[k])
        b = None if k not in theirs else str(theirs[k])
        if a != b:
            out.append((k, a, b))
    return out


def smooth(ys: Sequence[float], alpha: float | None = None) -> list[float]:
    """An exponential moving average (what a noisy loss curve is read by); by default over
    about a fifth of the points, at most 50."""
    alpha = alpha if alpha is not None else min(0.5, max(0.02, 5 / max(len(ys), 1)))
    out: list[float] = []
    for y in ys:
        out.append(y if not out else alpha * y + (1 - alpha) * out[-1])
    return out
