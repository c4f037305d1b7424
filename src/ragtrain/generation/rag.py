"""The RAG model: retriever (encoder + index, BM25, fusion) + generator, as one object.

``RAGModel.answer(questions)`` returns, per question, the answer and the cited passages with
their retrieval scores. A *bundle* is a self-contained folder holding every part (weights as
safetensors) and a manifest (``rag.json``) with the fingerprints that bind them: the index was
built by this encoder from this corpus. It is what the MLflow registry stores and serves.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ragtrain import runtime
from ragtrain.config import RetrieverConfig, config_from_dict, to_dict
from ragtrain.data.corpus import Corpus
from ragtrain.errors import IndexMismatchError, RagtrainError
from ragtrain.generation.generator import Example, Generator
from ragtrain.io import atomic_path, atomic_write_json, sha256_file
from ragtrain.retrieval.search import Retriever

MANIFEST = "rag.json"


@dataclass
class RAGModel:
    retriever: Retriever
    generator: Generator
    corpus: Corpus
    top_k: int
    precision: str = "auto"
    manifest: dict[str, Any] | None = None

    @classmethod
    def from_parts(cls, rc: RetrieverConfig, *, encoder_dir: Path, index_dir: Path,
                   bm25_dir: Path, generator_dir: Path, corpus_path: Path,
                   precision: str = "auto") -> RAGModel:
        corpus_sha = sha256_file(corpus_path)
        retriever = Retriever.load(rc.kind, rc, encoder_dir=encoder_dir, index_dir=index_dir,
                                   bm25_dir=bm25_dir, corpus_sha256=corpus_sha)
        return cls(retriever, Generator.load(generator_dir), Corpus.load(corpus_path), rc.top_k,
                   precision)

    @classmethod
    def load(cls, bundle: Path) -> RAGModel:
        """Load a bundle written by ``export_bundle``; its parts must still fit together."""
        f = bundle / MANIFEST
        if not f.exists():
            raise RagtrainError(f"{f}: missing; is {bundle} a RAG model bundle?")
        manifest = json.loads(f.read_text())
        rc = config_from_dict({"retriever": manifest["retriever"]}, str(f)).retriever
        if manifest.get("encoder_fingerprint") != manifest.get("index_encoder_fingerprint"):
            raise IndexMismatchError(
                f"{f}: the index was built by encoder {manifest.get('index_encoder_fingerprint')}"
                f", not by this retriever ({manifest.get('encoder_fingerprint')})")
        m = cls.from_parts(rc, encoder_dir=bundle / "retriever", index_dir=bundle / "index",
                           bm25_dir=bundle / "bm25", generator_dir=bundle / "generator",
                           corpus_path=bundle / "corpus.jsonl",
                           precision=manifest.get("precision", "auto"))
        m.manifest = manifest
        return m

    def retrieve(self, questions: Sequence[str], k: int
                 ) -> list[list[tuple[str, float]]]:
        scores, ids = self.retriever.search(list(questions), k)
        return [[(pid, float(s)) for pid, s in zip(row_ids, row_scores, strict=False)]
                for row_ids, row_scores in zip(ids, scores, strict=True)]

    def answer(self, questions: Sequence[str], top_k: int | None = None,
               batch_size: int = 32) -> list[dict[str, Any]]:
        """Answers with the cited passages (id, title, text, retrieval score), best first."""
        k = min(top_k or self.top_k, self.retriever.n_passages)
        hits = self.retrieve(questions, k)
        examples = [Example(q, [self.corpus[pid] for pid, _ in h])
                    for q, h in zip(questions, hits, strict=True)]
        preds = self.generator.answer(examples, batch_size,
                                      bf16=runtime.use_bf16(self.precision))
        out = []
        for q, h, p in zip(questions, hits, preds, strict=True):
            out.append({
                "question": q, "answer": p.answer, "answer_score": p.score,
                "answer_passage": h[p.passage][0] if 0 <= p.passage < len(h) else None,
                "passages": [{"id": pid, "title": self.corpus[pid].title,
                              "text": self.corpus[pid].text, "score": s} for pid, s in h]})
        return out


def export_bundle(rc: RetrieverConfig, *, encoder_dir: Path, index_dir: Path, bm25_dir: Path,
                  generator_dir: Path, corpus_path: Path, out: Path, precision: str = "auto",
                  extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Copy every part into ``out`` (atomically) with a manifest; returns the manifest."""
    idx_meta = json.loads((index_dir / "meta.json").read_text())
    enc_meta = json.loads((encoder_dir / "retriever.json").read_text())
    manifest = {
        "retriever": to_dict(rc), "precision": precision, "top_k": rc.top_k,
        "encoder_fingerprint": enc_meta.get("fingerprint"),
        "index_encoder_fingerprint": idx_meta.get("encoder_fingerprint"),
        "corpus_sha256": sha256_file(corpus_path),
        "generator": json.loads((generator_dir / "generator.json").read_text()),
        **(extra or {}),
    }
    if manifest["encoder_fingerprint"] != manifest["index_encoder_fingerprint"]:
        raise IndexMismatchError(
            f"{index_dir}: built by encoder {manifest['index_encoder_fingerprint']}, but "
            f"{encoder_dir} is {manifest['encoder_fingerprint']}; rebuild the index (dvc repro)")
    with atomic_path(out) as tmp:
        tmp.mkdir()
        for src, name in ((encoder_dir, "retriever"), (index_dir, "index"), (bm25_dir, "bm25"),
                          (generator_dir, "generator")):
            shutil.copytree(src, tmp / name)
        shutil.copy2(corpus_path, tmp / "corpus.jsonl")
        atomic_write_json(tmp / MANIFEST, manifest)
    return manifest
