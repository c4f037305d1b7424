"""Passages as windows (MaxP): each passage encoded as overlapping word windows, every window
its own vector in the index, a passage scored by its best window.

A bi-encoder pools a whole passage into one vector; a question about one of its sentences
matches the window that holds the sentence better than the whole (Dai & Callan 2019, MaxP;
BENCHMARKS.md, "Passages as windows", for the figures on SQuAD). ``index.window_words`` sets the
window (0: one vector per passage), ``index.window_stride`` the step between window starts.
Each window is prefixed by its passage's title, as the whole passage is (``passage_input``).

The index stores one id per vector (a passage's id once per window, its windows in a row), and
``index.search`` returns passages: the best-scoring window of each, deduplicated, deep enough
for ``k`` distinct passages (``search_passages``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # index.py imports this module: it stays free of torch
    from ragtrain.data.corpus import Passage


def stride_of(words: int, stride: int) -> int:
    """The step between window starts: ``stride``, or 0 for half a window (at least 1)."""
    return stride or max(1, words // 2)


def window_starts(n_words: int, words: int, stride: int) -> list[int]:
    """Where each window of ``words`` words starts, every ``stride`` words, the last one
    reaching the end (a text of at most ``words`` words is one window)."""
    starts = [0]
    while starts[-1] + words < n_words:
        starts.append(starts[-1] + stride)
    return starts


def word_windows(text: str, words: int, stride: int) -> list[str]:
    """The windows of ``text`` (``window_starts``; ``stride`` 0: half a window), their words
    joined by single spaces."""
    tokens = text.split()
    return [" ".join(tokens[start:start + words])
            for start in window_starts(len(tokens), words, stride_of(words, stride))]


def passage_windows(passages: Iterable[Passage], words: int,
                    stride: int) -> tuple[list[str], list[str]]:
    """The encoder inputs of every passage's windows, in passage order, and the id of the
    passage each belongs to. ``words`` 0: one input per passage (``passage_input``)."""
    from ragtrain.retrieval.passage_text import passage_input

    texts: list[str] = []
    owners: list[str] = []
    for p in passages:
        if not words:
            texts.append(passage_input(p.title, p.text))
            owners.append(p.passage_id)
            continue
        for window in word_windows(p.text, words, stride):
            texts.append(passage_input(p.title, window))
            owners.append(p.passage_id)
    return texts, owners


def best_per_passage(scores: np.ndarray, ids: Sequence[Sequence[str]],
                     k: int) -> tuple[np.ndarray, list[list[str]]]:
    """Each row's first ``k`` distinct ids of a best-first vector list (a passage's first
    occurrence is its best window) -> scores # (n, k), ``-inf`` where fewer were found."""
    out = np.full((len(ids), k), -np.inf, dtype=np.float32)
    found: list[list[str]] = []
    for i, row in enumerate(ids):
        seen: dict[str, None] = {}  # insertion-ordered
        for j, pid in enumerate(row):
            if pid not in seen:
                out[i, len(seen)] = scores[i, j]
                seen[pid] = None
                if len(seen) == k:
                    break
        found.append(list(seen))
    return out, found


def search_passages(search_vectors: Callable[[int], tuple[np.ndarray, list[list[str]]]],
                    k: int, n_vectors: int) -> tuple[np.ndarray, list[list[str]]]:
    """The top ``k`` passages by their best window: ``search_vectors(m)`` (the top ``m``
    vectors per query) deepened until every query has ``k`` distinct passages or all vectors
    were searched. Exact for an exact index: a passage not among the first ``k`` distinct ones
    has every window below the ``k``-th distinct passage's best."""
    m = min(n_vectors, 4 * k)
    while True:
        scores, ids = best_per_passage(*search_vectors(m), k)
        if m >= n_vectors or all(len(row) == k for row in ids):
            return scores, ids
        m = min(n_vectors, 2 * m)
