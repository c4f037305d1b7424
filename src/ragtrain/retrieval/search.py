"""One retriever interface over the parts: dense (encoder + FAISS), BM25, or their fusion."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ragtrain import runtime
from ragtrain.config import IndexConfig, RetrieverConfig
from ragtrain.errors import RetrievalError
from ragtrain.retrieval import fusion
from ragtrain.retrieval.bm25 import BM25Retriever
from ragtrain.retrieval.encoder import BiEncoder
from ragtrain.retrieval.index import DenseIndex, load_index, search


@dataclass
class Retriever:
    """Searches by ``kind``: "dense", "bm25" or "hybrid" (fusion of both, ``cfg.hybrid``)."""

    kind: str
    cfg: RetrieverConfig
    encoder: BiEncoder | None = None
    index: DenseIndex | None = None
    bm25: BM25Retriever | None = None

    @classmethod
    def load(cls, kind: str, cfg: RetrieverConfig, *, encoder_dir: Path, index_dir: Path,
             bm25_dir: Path, corpus_sha256: str | None = None,
             index_cfg: IndexConfig | None = None) -> Retriever:
        """Load what ``kind`` needs; the index must have been built by this encoder (and from
        the corpus with ``corpus_sha256``, when given); ``index_cfg``: where its search runs
        (``device``) and whether from disk (``mmap``)."""
        encoder = index = bm25 = None
        if kind in ("dense", "hybrid"):
            encoder = BiEncoder.load(encoder_dir).use_runtime(cfg.runtime)
            ic = index_cfg or IndexConfig()
            index = load_index(index_dir, expect_encoder_fingerprint=encoder.fingerprint(),
                               expect_corpus_sha256=corpus_sha256, device=ic.device,
                               mmap=ic.mmap)
        if kind in ("bm25", "hybrid"):
            bm25 = BM25Retriever.load(bm25_dir, expect_corpus_sha256=corpus_sha256)
        if index is not None and bm25 is not None and (
                index.meta.corpus_sha256 != bm25.corpus_sha256):
            raise RetrievalError(f"{index_dir} and {bm25_dir} were built from different corpora; "
                                 "rebuild both (dvc repro)")
        return cls(kind, cfg, encoder, index, bm25)

    @property
    def n_passages(self) -> int:
        if self.index is not None:
            return self.index.meta.n_passages  # an index of windows holds more vectors
        assert self.bm25 is not None
        return len(self.bm25.passage_ids)

    def dense(self, questions: Sequence[str], k: int) -> tuple[np.ndarray, list[list[str]]]:
        if self.encoder is None or self.index is None:
            raise RetrievalError(f"retriever kind {self.kind!r} has no dense index")
        with runtime.autocast(runtime.use_bf16(self.cfg.precision)):
            q = self.encoder.encode_queries(list(questions), batch_size=128)
        return search(self.index, q, k)

    def search(self, questions: Sequence[str], k: int) -> tuple[np.ndarray, list[list[str]]]:
        """Top-k passages per question: scores # (n_questions, k) and ids, best first."""
        n = self.n_passages
        if not 1 <= k <= n:
            raise RetrievalError(f"k: must be between 1 and {n} (passages in the corpus), got {k}")
        if not questions:
            raise RetrievalError("no questions to search for")
        for i, q in enumerate(questions):
            if not isinstance(q, str) or not q.strip():
                raise RetrievalError(f"question {i}: empty")
        if self.kind == "dense":
            return self.dense(questions, k)
        if self.kind == "bm25":
            assert self.bm25 is not None
            return self.bm25.search(list(questions), k)
        return self.search_all(questions, k)["hybrid"]

    def search_all(self, questions: Sequence[str],
                   k: int) -> dict[str, tuple[np.ndarray, list[list[str]]]]:
        """Dense, BM25 and their fusion from one pass of each (what evaluation compares)."""
        assert self.bm25 is not None
        depth = min(self.n_passages, max(k, self.cfg.hybrid.depth))
        d_scores, d_ids = self.dense(questions, depth)
        b_scores, b_ids = self.bm25.search(list(questions), depth)
        return {"dense": (d_scores[:, :k], [r[:k] for r in d_ids]),
                "bm25": (b_scores[:, :k], [r[:k] for r in b_ids]),
                "hybrid": self.fuse(d_scores, d_ids, b_scores, b_ids, k)}

    def fuse(self, d_scores: np.ndarray, d_ids: list[list[str]], b_scores: np.ndarray,
             b_ids: list[list[str]], k: int) -> tuple[np.ndarray, list[list[str]]]:
        """Fuse dense and BM25 candidate lists by cfg.hybrid (RRF or weighted scores)."""
        h = self.cfg.hybrid
        if h.fusion == "rrf":
            rankings = [[d, b] for d, b in zip(d_ids, b_ids, strict=True)]
            return fusion.reciprocal_rank_fusion(rankings, top_k=k, k=h.rrf_k)
        return fusion.weighted_score_fusion(d_scores, d_ids, b_scores, b_ids,
                                            dense_weight=h.dense_weight, top_k=k)
