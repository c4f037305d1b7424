"""Prepare the corpus: chunk units into passages, merge duplicates, map gold labels, split by
document, with statistics (the input formats are read by ``formats``)."""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ragtrain.config import DataConfig
from ragtrain.data.corpus import Passage
from ragtrain.data.formats import Dataset, Question, Unit
from ragtrain.errors import DataError

SPLITS = ("train", "dev", "test")


@dataclass(frozen=True)
class Chunk:
    """A passage and where it was cut from: its unit and the character span inside it."""

    passage: Passage
    unit_id: str
    start: int
    end: int


# --------------------------------------------------------------------------- chunking

Tokenize = Callable[[str], list[tuple[int, int]]]


def whitespace_offsets(text: str) -> list[tuple[int, int]]:
    """Character spans of whitespace-separated tokens."""
    return [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]


def make_tokenizer(name: str) -> Tokenize:
    """'whitespace', or a Hugging Face tokenizer whose offsets define the tokens."""
    if name == "whitespace":
        return whitespace_offsets
    from ragtrain.models import load_tokenizer

    tok = load_tokenizer(name)

    def offsets(text: str) -> list[tuple[int, int]]:
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        return [(s, e) for s, e in enc["offset_mapping"] if e > s]

    return offsets


def chunk_spans(offsets: list[tuple[int, int]], max_tokens: int,
                overlap: int) -> list[tuple[int, int]]:
    """Character spans of windows of ``max_tokens`` tokens, consecutive ones sharing ``overlap``.

    The last window ends at the last token; ``max_tokens == 0`` means one window for all.
    """
    if not offsets:
        return []
    n = len(offsets)
    if max_tokens == 0 or n <= max_tokens:
        return [(offsets[0][0], offsets[-1][1])]
    step = max_tokens - overlap
    spans = []
    start = 0
    while True:
        end = min(start + max_tokens, n)
        spans.append((offsets[start][0], offsets[end - 1][1]))
        if end == n:
            return spans
        start += step


def chunk_units(units: list[Unit], cfg: DataConfig,
                tokenize: Tokenize | None = None) -> list[Chunk]:
    """Passages: one per unit when chunking is off, else token windows ``<unit_id>#c<k>``."""
    if cfg.chunk_tokens == 0:
        return [Chunk(Passage(u.unit_id, u.title, u.text, u.doc_id), u.unit_id, 0, len(u.text))
                for u in units]
    tokenize = tokenize or make_tokenizer(cfg.chunk_tokenizer)
    out = []
    for u in units:
        for k, (s, e) in enumerate(chunk_spans(tokenize(u.text), cfg.chunk_tokens,
                                               cfg.chunk_overlap)):
            out.append(Chunk(Passage(f"{u.unit_id}#c{k}", u.title, u.text[s:e], u.doc_id),
                             u.unit_id, s, e))
    return out


def gold_passages(q: Question, by_unit: Mapping[str, list[Chunk]]) -> list[str]:
    """Passages that hold the answer: span inside the chunk where offsets exist, else the chunks
    of the named gold units that contain an answer string (or the unit's only chunk)."""
    gold: list[str] = []
    for unit_id, s, e in q.spans:
        gold += [c.passage.passage_id for c in by_unit[unit_id] if c.start <= s and e <= c.end]
    for unit_id in q.gold_units:
        chunks = by_unit[unit_id]
        if len(chunks) == 1:
            gold.append(chunks[0].passage.passage_id)
        else:
            low = [a.lower() for a in q.answers]
            gold += [c.passage.passage_id for c in chunks
                     if any(a in c.passage.text.lower() for a in low)]
    return list(dict.fromkeys(gold))


# --------------------------------------------------------------------------- dedup and split


def _norm_ws(text: str) -> str:
    return " ".join(text.split())


def dedup_passages(passages: list[Passage]) -> tuple[list[Passage], dict[str, str]]:
    """Merge passages with the same text (whitespace-normalised); returns kept, id -> kept id."""
    kept: list[Passage] = []
    first: dict[str, str] = {}
    alias: dict[str, str] = {}
    for p in passages:
        key = _norm_ws(p.text)
        if key in first:
            alias[p.passage_id] = first[key]
        else:
            first[key] = p.passage_id
            alias[p.passage_id] = p.passage_id
            kept.append(p)
    return kept, alias


def split_documents(doc_ids: list[str], cfg: DataConfig) -> dict[str, str]:
    """doc_id -> split, by a seeded shuffle; fractions are rounded, each non-zero split >= 1."""
    docs = list(dict.fromkeys(doc_ids))
    n = len(docs)
    n_test = max(1, round(cfg.test_fraction * n))
    n_dev = max(1, round(cfg.dev_fraction * n)) if cfg.dev_fraction > 0 else 0
    if n - n_test - n_dev < 1:
        raise DataError(
            f"params.data.test_fraction={cfg.test_fraction}, dev_fraction={cfg.dev_fraction}: "
            f"the split leaves no training documents ({n} document(s) with questions; "
            f"test {n_test}, dev {n_dev}); need more documents or smaller fractions"
        )
    rng = random.Random(cfg.split_seed)
    rng.shuffle(docs)
    out = {d: "test" for d in docs[:n_test]}
    out.update({d: "dev" for d in docs[n_test : n_test + n_dev]})
    out.update({d: "train" for d in docs[n_test + n_dev :]})
    return out


# --------------------------------------------------------------------------- prepare


@dataclass
class Prepared:
    passages: list[Passage]
    queries: dict[str, list[dict[str, Any]]]  # split -> rows
    stats: dict[str, float | int]


def _percentiles(values: list[int], prefix: str) -> dict[str, float]:
    if not values:
        return {}
    a = np.asarray(values)
    return {
        f"{prefix}_p50": float(np.percentile(a, 50)),
        f"{prefix}_p90": float(np.percentile(a, 90)),
        f"{prefix}_p99": float(np.percentile(a, 99)),
        f"{prefix}_max": int(a.max()),
    }


def prepare_dataset(ds: Dataset, cfg: DataConfig, tokenize: Tokenize | None = None) -> Prepared:
    """Chunk, merge duplicates, map gold labels, split by document; with statistics."""
    if tokenize is None:  # one tokenizer for chunking and the length statistics
        tokenize = whitespace_offsets if cfg.chunk_tokens == 0 else make_tokenizer(
            cfg.chunk_tokenizer)
    chunks = chunk_units(ds.units, cfg, tokenize)
    if not chunks:
        raise DataError("no passages after chunking (every text is blank)")
    by_unit: dict[str, list[Chunk]] = {}
    for c in chunks:
        by_unit.setdefault(c.unit_id, []).append(c)
    passages = all_passages = [c.passage for c in chunks]
    if cfg.dedup_passages:
        passages, alias = dedup_passages(passages)
    else:
        alias = {p.passage_id: p.passage_id for p in passages}

    split_of = split_documents([q.doc_id for q in ds.questions], cfg)
    queries: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    lost = 0
    for q in ds.questions:
        gold = list(dict.fromkeys(alias[g] for g in gold_passages(q, by_unit)))
        lost += not gold
        queries[split_of[q.doc_id]].append(
            {"id": q.qid, "question": q.question, "answers": q.answers,
             "gold_passage_ids": gold, "doc_id": q.doc_id}
        )
    # A merged passage whose copies came from documents in different splits leaks text.
    splits_of_kept: dict[str, set[str]] = {}
    for p in all_passages:
        if p.doc_id in split_of:
            splits_of_kept.setdefault(alias[p.passage_id], set()).add(split_of[p.doc_id])
    across = sum(len(s) > 1 for s in splits_of_kept.values())

    stats: dict[str, float | int] = {
        "data/documents": len({u.doc_id for u in ds.units}),
        "data/units": len(ds.units),
        "data/passages": len(passages),
        "data/passages_merged": len(all_passages) - len(passages),
        "data/duplicates_across_splits": across,
        "data/questions": len(ds.questions),
        "data/labels_lost": lost,
        "data/questions_with_gold": len(ds.questions) - lost,
    }
    for reason, n in sorted(ds.skipped.items()):
        stats[f"data/skipped_{reason}"] = n
    # questions without a reference answer (BEIR, or own data with gold ids only): the retriever
    # trains on them, the generator does not (counted only when there are some)
    no_answer = sum(not q.answers for q in ds.questions)
    if no_answer:
        stats["data/questions_without_answers"] = no_answer
    for s in SPLITS:
        stats[f"{s}/documents"] = sum(1 for v in split_of.values() if v == s)
        stats[f"{s}/questions"] = len(queries[s])
        stats[f"{s}/labels_lost"] = sum(1 for r in queries[s] if not r["gold_passage_ids"])
        if no_answer:
            stats[f"{s}/questions_without_answers"] = sum(not r["answers"] for r in queries[s])
    stats.update(_percentiles([len(tokenize(p.text)) for p in passages], "data/passage_tokens"))
    stats.update(_percentiles([len(q.question.split()) for q in ds.questions],
                              "data/question_words"))
    if not queries["test"]:
        raise DataError("the split leaves an empty test set; lower params.data.test_fraction")
    return Prepared(passages, queries, stats)


def passage_rows(passages: list[Passage]) -> Iterator[dict[str, Any]]:
    """The ``corpus.jsonl`` lines of ``passages``, in order."""
    for p in passages:
        yield p.row()

