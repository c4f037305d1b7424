"""Index refresh for joint RAG training (rag-end2end / Atlas style, opt-in).

When the passage encoder trains too, the passage embeddings the top-k search uses go stale; every
``every`` optimizer steps the corpus (each passage, or each window of it) is re-encoded with the
current passage tower. Each refresh logs its staleness (dev recall@k of the current query encoder
against the stale embeddings and against the refreshed ones) and its cost in seconds.

Resuming stays exact: each refreshed matrix is saved in the checkpoint folder under the step it
was computed at, and a resumed run loads the one an uninterrupted run would hold at that step.

Under torchrun every rank searches with the whole matrix, but each encodes only its share of the
corpus (``distributed.work``); the shares are gathered on every rank, and rank 0 alone measures
the staleness and writes the file.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ragtrain import distributed, runtime
from ragtrain.generation.joint import JointRAG
from ragtrain.retrieval.encoder import encode


def encode_corpus(rag: JointRAG, batch_size: int = 64, bf16: bool = False) -> torch.Tensor:
    """The corpus under ``rag``'s current passage tower # (n, D). Under torchrun a collective:
    every rank calls it, encodes its share, and gets the whole matrix."""
    assert rag.model.passage is not None
    texts = rag.passage_texts
    mine = distributed.work(len(texts))  # all of them in one process
    with runtime.autocast(bf16):
        emb = encode(rag.model.passage, rag.tokenizer, [texts[i] for i in mine],
                     rag.passage_max_length, batch_size)
    with torch.no_grad():
        return distributed.gather_rows(torch.from_numpy(emb), len(texts))


class IndexRefresh:
    """``refresh(step)``: make ``rag.passages.emb`` the embeddings of the latest refresh step
    ``<= step`` (a multiple of ``every``; step 0 keeps the starting ones)."""

    def __init__(self, rag: JointRAG, every: int, ckpt_dir: Path,
                 dev_rows: Sequence[Mapping[str, Any]], *, k: int, batch_size: int = 64,
                 bf16: bool = False,
                 on_refresh: Callable[[int, Mapping[str, float]], None] | None = None) -> None:
        if rag.model.passage is None or not rag.passage_texts:
            raise ValueError("index refresh needs a trainable passage tower and passage texts")
        self.rag, self.every, self.ckpt_dir = rag, every, ckpt_dir
        self.dev = [r for r in dev_rows if r.get("gold_passage_ids")]
        self.k, self.batch_size, self.bf16 = k, batch_size, bf16
        self.on_refresh = on_refresh
        self.version = 0
        self.count = 0
        self.seconds = 0.0
        self.last: dict[str, float] = {}

    def _file(self, step: int) -> Path:
        return self.ckpt_dir / f"refresh_{step:08d}.npy"

    def recall(self, emb: torch.Tensor) -> float:
        """Dev recall@k of the current query tower against ``emb`` (labelled dev questions)."""
        with runtime.autocast(self.bf16):
            q = encode(self.rag.model.query, self.rag.tokenizer,
                       [r["question"] for r in self.dev], self.rag.query_max_length,
                       self.batch_size)
        fixed = self.rag.passages
        top = fixed.top_ids(torch.from_numpy(q), min(self.k, fixed.n_passages), emb)
        return sum(any(pid in r["gold_passage_ids"] for pid in row)
                   for r, row in zip(self.dev, top, strict=True)) / len(self.dev)

    def __call__(self, step: int) -> None:
        due = step // self.every * self.every
        if due == self.version:
            return
        f = self._file(due)
        if distributed.broadcast(f.exists()):  # resumed (rank 0 decides for every rank)
            self.rag.passages.emb = torch.from_numpy(np.load(f))  # the uninterrupted run's
        else:
            t0 = time.perf_counter()
            new = encode_corpus(self.rag, self.batch_size, self.bf16)
            seconds = time.perf_counter() - t0
            self.count += 1
            self.seconds += seconds
            if distributed.is_main():
                staleness = {
                    f"refresh/stale_recall_at_{self.k}": self.recall(self.rag.passages.emb),
                    f"refresh/fresh_recall_at_{self.k}": self.recall(new)} if self.dev else {}
                tmp = f.with_suffix(".tmp.npy")
                np.save(tmp, new.numpy())
                tmp.replace(f)
                self.last = {**staleness, "refresh/seconds": seconds}
                if self.on_refresh:
                    self.on_refresh(step, self.last)
            self.rag.passages.emb = new
        self.rag.passages.index = None  # the saved index no longer matches: exact search
        self.version = due
