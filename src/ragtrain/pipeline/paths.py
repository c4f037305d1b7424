"""Where every stage's inputs and outputs live (as in dvc.yaml), and the two readers of
prepared files that several stages share."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ragtrain.errors import SourceError
from ragtrain.io import read_jsonl


@dataclass(frozen=True)
class Paths:
    """Every file a stage reads or writes, relative to the repo root (as in dvc.yaml)."""

    root: Path = Path(".")

    def _p(self, rel: str) -> Path:
        return self.root / rel

    @property
    def raw(self) -> Path:
        return self._p("data/raw")

    @property
    def prepared(self) -> Path:
        return self._p("data/prepared")

    @property
    def corpus(self) -> Path:
        return self.prepared / "corpus.jsonl"

    def queries(self, split: str) -> Path:
        return self.prepared / f"{split}.jsonl"

    @property
    def metrics(self) -> Path:
        return self._p("metrics")

    @property
    def prepare_metrics(self) -> Path:
        return self.metrics / "prepare.json"

    @property
    def bm25(self) -> Path:
        return self._p("artifacts/bm25")

    @property
    def retriever(self) -> Path:
        return self._p("artifacts/retriever")

    @property
    def retriever_checkpoints(self) -> Path:
        return self._p("checkpoints/retriever")  # not a DVC out: it must survive a killed run

    @property
    def retriever_train_metrics(self) -> Path:
        return self.metrics / "train_retriever.json"

    @property
    def retriever_train_plot(self) -> Path:
        return self._p("plots/train_retriever.json")

    @property
    def reranker(self) -> Path:
        return self._p("artifacts/reranker")

    @property
    def reranker_disabled(self) -> Path:
        return self.reranker / "DISABLED.json"  # train_reranker's output when reranker.enabled
        # is false: the stage stays a valid DVC stage and nothing downstream reranks

    @property
    def reranker_checkpoints(self) -> Path:
        return self._p("checkpoints/reranker")  # not a DVC out: it must survive a killed run

    @property
    def reranker_train_metrics(self) -> Path:
        return self.metrics / "train_reranker.json"

    @property
    def reranker_train_plot(self) -> Path:
        return self._p("plots/train_reranker.json")

    @property
    def teacher_scores(self) -> Path:
        return self._p("artifacts/teacher_scores")  # the reranker's scores that loss distill
        # learns from (scores.jsonl), or DISABLED.json when retriever.loss is not distill

    @property
    def embeddings(self) -> Path:
        return self._p("artifacts/embeddings")

    @property
    def embedding_cache(self) -> Path:
        # not a DVC out (DVC deletes outs before a rerun): a corpus edit re-encodes only the
        # passages that changed (retrieval/embedding_cache.py)
        return self._p("cache/embeddings")

    @property
    def index(self) -> Path:
        return self._p("artifacts/index")

    @property
    def retriever_metrics(self) -> Path:
        return self.metrics / "retriever.json"

    @property
    def retriever_predictions(self) -> Path:
        return self._p("artifacts/eval/retriever_test.jsonl")

    @property
    def retrieved(self) -> Path:
        return self._p("artifacts/retrieved")

    def retrieved_split(self, split: str) -> Path:
        return self.retrieved / f"{split}.jsonl"

    @property
    def unanswerable(self) -> Path:
        """abstention.enabled: dev / test questions searched without their articles."""
        return self._p("artifacts/unanswerable")

    @property
    def generator(self) -> Path:
        return self._p("artifacts/generator")

    @property
    def generator_disabled(self) -> Path:
        return self.generator / "DISABLED.json"  # train_generator's output when the data has no
        # answers (or generator.enabled is false): evaluate, package and register then make a
        # retriever model

    @property
    def generator_checkpoints(self) -> Path:
        return self._p("checkpoints/generator")  # not a DVC out: it must survive a killed run

    @property
    def generator_train_metrics(self) -> Path:
        return self.metrics / "train_generator.json"

    @property
    def generator_train_plot(self) -> Path:
        return self._p("plots/train_generator.json")

    @property
    def generator_metrics(self) -> Path:
        return self.metrics / "generator.json"

    @property
    def generator_predictions(self) -> Path:
        return self._p("artifacts/eval/generator_test.jsonl")

    @property
    def bundle(self) -> Path:
        return self._p("artifacts/rag")  # the self-contained RAG model (what MLflow registers)

    def rag_parts(self) -> dict[str, Path | None]:
        """The parts a RAG model is made of (``RAGModel.from_parts`` / ``export_bundle``); no
        generator (None) when train_generator left its disabled marker."""
        return {"encoder_dir": self.retriever, "index_dir": self.index, "bm25_dir": self.bm25,
                "generator_dir": None if self.generator_disabled.exists() else self.generator,
                "corpus_path": self.corpus}

    @property
    def registered(self) -> Path:
        return self._p("artifacts/registered.json")  # what `register` put in the MLflow registry

    @property
    def timings(self) -> Path:
        return self._p("timings/timings.json")  # wall-clock figures: not in git, not DVC metrics

    @property
    def report(self) -> Path:
        return self._p("reports/report.html")  # the run report (one self-contained page)


def read_queries(paths: Paths, split: str) -> list[dict[str, Any]]:
    """The prepared questions of ``split``; a missing file names the stage to run."""
    p = paths.queries(split)
    if not p.exists():
        raise SourceError(f"{p}: missing; run `ragtrain prepare` first")
    return read_jsonl(p)


def read_retrieved(paths: Paths, split: str) -> dict[str, list[str]]:
    """Question id -> the passage ids `retrieve` found for it, best first."""
    p = paths.retrieved_split(split)
    if not p.exists():
        raise SourceError(f"{p}: missing; run `ragtrain retrieve` first")
    return {r["id"]: r["passage_ids"] for r in read_jsonl(p)}


def read_first_stage(paths: Paths, split: str) -> dict[str, tuple[list[str], list[float]]] | None:
    """Question id -> the first stage's (passage ids, scores) before reranking, which `retrieve`
    keeps beside the reranked list when a reranker is on; None when it did not rerank."""
    rows = read_jsonl(paths.retrieved_split(split))
    if not rows or "first_stage_ids" not in rows[0]:
        return None
    return {r["id"]: (r["first_stage_ids"], r["first_stage_scores"]) for r in rows}


def read_retrieved_scores(paths: Paths, split: str) -> dict[str, list[float]]:
    """Question id -> the retrieval scores of `retrieve`'s passages (read_retrieved's order)."""
    p = paths.retrieved_split(split)
    if not p.exists():
        raise SourceError(f"{p}: missing; run `ragtrain retrieve` first")
    return {r["id"]: r["scores"] for r in read_jsonl(p)}
