"""The RAG model: retriever (encoder + index, BM25, fusion; optionally a reranker) + generator,
as one object.

``RAGModel.answer(questions)`` returns, per question, the answer and the cited passages with
their retrieval scores. Without a generator (retrieval-only data, e.g. BEIR) it is a retriever
model: the same call returns the ranked passages and scores, no answer. With a reranker, the
first stage's top ``candidates`` are reordered by the fused score, as the ``retrieve`` stage does.

``RAGModel.load`` reads a *bundle* (``generation.bundle``: the manifest and the export): a
self-contained folder holding every part, what the MLflow registry stores and serves.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ragtrain import runtime
from ragtrain.config import IndexConfig, RetrieverConfig, config_from_dict
from ragtrain.data.corpus import Corpus
from ragtrain.errors import IndexMismatchError, RagtrainError
from ragtrain.generation.bundle import (
    MANIFEST,
    RAG,
    RERANK_KEYS,
    RETRIEVER,
    Reading,
    Rerank,
    reranker_fingerprint,
)
from ragtrain.io import sha256_file
from ragtrain.retrieval.search import Retriever


@dataclass
class RAGModel:
    retriever: Retriever
    generator: Any  # a Generator, or None: a retriever model (ranked passages, no answer)
    corpus: Corpus
    top_k: int
    precision: str = "auto"
    manifest: dict[str, Any] | None = None
    reranker: Any = None  # a retrieval.reranker.Reranker, or None
    rerank: Rerank = field(default_factory=Rerank)
    reading: Reading = field(default_factory=Reading)
    _texts: dict[str, str] | None = None

    @property
    def kind(self) -> str:
        return RAG if self.generator is not None else RETRIEVER

    @classmethod
    def from_parts(cls, rc: RetrieverConfig, *, encoder_dir: Path, index_dir: Path,
                   bm25_dir: Path, corpus_path: Path, generator_dir: Path | None = None,
                   precision: str = "auto", reranker_dir: Path | None = None,
                   rerank: Rerank | None = None, reading: Reading | None = None,
                   index_cfg: IndexConfig | None = None) -> RAGModel:
        """The model from its parts; no ``generator_dir``: a retriever model; a
        ``reranker_dir``: reranked retrieval (``rerank`` settings); ``index_cfg``: how the
        index is searched (device, mmap)."""
        corpus_sha = sha256_file(corpus_path)
        retriever = Retriever.load(rc.kind, rc, encoder_dir=encoder_dir, index_dir=index_dir,
                                   bm25_dir=bm25_dir, corpus_sha256=corpus_sha,
                                   index_cfg=index_cfg)
        generator = None
        if generator_dir is not None:
            from ragtrain.generation.generator import Generator

            generator = Generator.load(generator_dir)
        reranker = None
        if reranker_dir is not None:
            from ragtrain.retrieval.reranker import Reranker

            reranker = Reranker.load(reranker_dir)  # refused if its weights were edited
            reranker.use_runtime((rerank or Rerank()).runtime)
        return cls(retriever, generator, Corpus.load(corpus_path), rc.top_k, precision,
                   reranker=reranker, rerank=rerank or Rerank(), reading=reading or Reading())

    @classmethod
    def load(cls, bundle: Path) -> RAGModel:
        """Load a bundle written by ``export_bundle``; its parts must still fit together."""
        f = bundle / MANIFEST
        if not f.exists():
            raise RagtrainError(f"{f}: missing; is {bundle} a RAG model bundle?")
        manifest = json.loads(f.read_text())
        parsed = config_from_dict({"retriever": manifest["retriever"],
                                   "index": manifest.get("index") or {}}, str(f))
        rc = parsed.retriever
        if manifest.get("encoder_fingerprint") != manifest.get("index_encoder_fingerprint"):
            raise IndexMismatchError(
                f"{f}: the index was built by encoder {manifest.get('index_encoder_fingerprint')}"
                f", not by this retriever ({manifest.get('encoder_fingerprint')})")
        rr = manifest.get("reranker")
        if rr is not None:
            bound, have = rr.get("fingerprint"), reranker_fingerprint(bundle / "reranker")
            if bound != have:
                raise IndexMismatchError(
                    f"{f}: binds reranker {str(bound)[:16]}, but {bundle / 'reranker'} holds "
                    f"reranker {have[:16]}; package the model again (ragtrain package)")
        has_gen = manifest.get("kind", RAG) == RAG
        m = cls.from_parts(rc, encoder_dir=bundle / "retriever", index_dir=bundle / "index",
                           bm25_dir=bundle / "bm25", corpus_path=bundle / "corpus.jsonl",
                           generator_dir=bundle / "generator" if has_gen else None,
                           precision=manifest.get("precision", "auto"),
                           reranker_dir=bundle / "reranker" if rr is not None else None,
                           rerank=Rerank(**{k: rr[k] for k in RERANK_KEYS if k in rr})
                           if rr is not None else None,
                           reading=Reading(**manifest.get("reading") or {}),
                           index_cfg=parsed.index)
        m.manifest = manifest
        return m

    def first_stage(self, questions: Sequence[str], k: int) -> list[list[tuple[str, float]]]:
        """The first stage's top k (retriever.kind), best first, without reranking."""
        scores, ids = self.retriever.search(list(questions), k)
        return [[(pid, float(s)) for pid, s in zip(row_ids, row_scores, strict=False)]
                for row_ids, row_scores in zip(ids, scores, strict=True)]

    def retrieve(self, questions: Sequence[str], k: int
                 ) -> list[list[tuple[str, float]]]:
        """Top k (passage id, score) per question, best first: the first stage's, or with a
        reranker its top ``rerank.candidates`` reordered by the fused score (the score then)."""
        if self.reranker is None:
            return self.first_stage(questions, k)
        from ragtrain.retrieval.reranker import passage_texts

        depth = min(max(k, self.rerank.candidates), self.retriever.n_passages)
        scores, ids = self.retriever.search(list(questions), depth)
        if self._texts is None:
            self._texts = passage_texts(self.corpus, self.reranker.spec)
        scores, ids = self.reranker.rerank(
            list(questions), scores, ids, self._texts, candidates=self.rerank.candidates,
            fuse_weight=self.rerank.fuse_weight, batch_size=self.rerank.eval_batch_size,
            bf16=runtime.use_bf16(self.rerank.precision), max_windows=self.rerank.max_windows)
        return [[(pid, float(s)) for pid, s in zip(row_ids[:k], row_scores[:k], strict=False)]
                for row_ids, row_scores in zip(ids, scores, strict=True)]

    def _passages(self, hits: list[tuple[str, float]]) -> list[dict[str, Any]]:
        return [{"id": pid, "title": self.corpus[pid].title, "text": self.corpus[pid].text,
                 "score": s} for pid, s in hits]

    def answer(self, questions: Sequence[str], top_k: int | None = None,
               batch_size: int = 32) -> list[dict[str, Any]]:
        """Answers with the passages read (id, title, text, retrieval score), best first; a
        retriever model (no generator) returns the passages alone (no "answer" key). The
        generator reads ``reading.answer_from`` inputs of ``top_k`` passages each and keeps the
        best answer (``generation.reading``)."""
        k = min(top_k or self.top_k, self.retriever.n_passages)
        if self.generator is None:
            return [{"question": q, "passages": self._passages(h)}
                    for q, h in zip(questions, self.retrieve(questions, k), strict=True)]
        from ragtrain.generation.reading import answer_each

        n = self.reading.answer_from
        hits = self.retrieve(questions, min(k * n, self.retriever.n_passages))
        preds = answer_each(self.generator, questions,
                            [[self.corpus[pid] for pid, _ in h] for h in hits],
                            [[s for _, s in h] for h in hits], n=n,
                            weight=self.reading.answer_weight,
                            null_weight=self.reading.null_weight, per_input=k,
                            batch_size=batch_size, bf16=runtime.use_bf16(self.precision))
        out = []
        below = self.reading.abstain_below
        rel: list[float | None] = [None] * len(questions)
        if below is not None:  # abstention: the first passage's relevance under the bi-encoder
            from ragtrain.evaluation.abstention import abstention_score, relevance
            from ragtrain.retrieval.passage_text import passage_inputs

            rel = [abstention_score(r, p.null, self.reading.abstain_null_weight) for r, p in zip(
                relevance(self._encoder(), questions,
                          passage_inputs([self.corpus[h[0][0]] for h in hits]),
                          bf16=runtime.use_bf16(self.precision)), preds, strict=True)]
        for q, h, p, r in zip(questions, hits, preds, rel, strict=True):
            no = r is not None and below is not None and r < below  # the dev threshold
            out.append({
                "question": q, "answer": "" if no else p.answer, "answer_score": p.score,
                "answer_passage": h[p.passage][0] if 0 <= p.passage < len(h) and not no
                else None, "passages": self._passages(h),
                **({"abstained": no, "relevance": r} if below is not None else {})})
        return out

    def _encoder(self) -> Any:
        """The bi-encoder (abstention's relevance): the retriever's own, else the bundle's."""
        if self.retriever.encoder is None:
            from ragtrain.errors import RetrievalError

            raise RetrievalError("abstention needs the bi-encoder; this model retrieves with "
                                 f"{self.retriever.kind!r} and has none loaded")
        return self.retriever.encoder
