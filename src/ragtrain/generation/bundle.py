"""The RAG model bundle's format: the manifest (``rag.json``) and what it binds, and the export.

A *bundle* is a self-contained folder holding every part (weights as safetensors) and a manifest
with the fingerprints that bind them: the index was built by this encoder from this corpus, and
the reranker is the one the model was evaluated with. It is what the MLflow registry stores and
serves; ``generation.rag.RAGModel`` loads it. Writing and checking a bundle needs no torch, so
the ``package`` and ``register`` stages start without it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ragtrain.config import IndexConfig, RerankerConfig, RetrieverConfig, to_dict
from ragtrain.errors import IndexMismatchError, RagtrainError
from ragtrain.io import atomic_path, atomic_write_json, sha256_file

MANIFEST = "rag.json"
RAG, RETRIEVER = "rag", "retriever"  # the manifest's "kind": with a generator, or without
RERANKER_SPEC = "reranker.json"  # in a saved reranker folder: its spec and weights' fingerprint
# what reranking at inference reads of reranker.* (the bundle records them)
RERANK_KEYS = ("candidates", "fuse_weight", "eval_batch_size", "precision", "runtime",
               "max_windows")


@dataclass(frozen=True)
class Rerank:
    """How the first stage's list is reranked: its top ``candidates`` by the fused score."""

    candidates: int = 10
    fuse_weight: float = 0.5
    eval_batch_size: int = 64
    precision: str = "auto"
    runtime: str = "torch"  # reranker.runtime: torch | onnx | onnx_int8
    max_windows: int = 0  # reranker.max_windows; a bundle without it reads every window

    @classmethod
    def from_config(cls, rk: RerankerConfig) -> Rerank:
        return cls(**{k: getattr(rk, k) for k in RERANK_KEYS})


@dataclass(frozen=True)
class Reading:
    """How the generator reads the retrieved passages (``generation.reading``): ``answer_from``
    inputs of ``top_k`` passages each, the answer kept by answer score - ``null_weight`` x its
    empty answer's + ``answer_weight`` x retrieval score. A bundle without it reads one input."""

    answer_from: int = 1
    answer_weight: float = 0.0
    null_weight: float = 0.0
    # abstention: "no answer" when the first passage's relevance less abstain_null_weight x the
    # kept answer's p(empty answer) is below this (both chosen on dev); None: never
    abstain_below: float | None = None
    abstain_null_weight: float = 0.0

    @classmethod
    def from_config(cls, gc: Any, abstain_below: float | None = None,
                    abstain_null_weight: float = 0.0) -> Reading:
        return cls(gc.answer_from, gc.answer_weight, gc.answer_null_weight, abstain_below,
                   abstain_null_weight)


def reranker_fingerprint(reranker_dir: Path) -> str:
    """The fingerprint a saved reranker records for its weights."""
    f = Path(reranker_dir) / RERANKER_SPEC
    if not f.is_file():
        raise RagtrainError(f"{f}: missing; is {reranker_dir} a trained reranker? (run "
                            "`ragtrain train-reranker` with reranker.enabled: true)")
    fp = json.loads(f.read_text()).get("fingerprint")
    if not fp:
        raise RagtrainError(f"{f}: records no weights fingerprint")
    return str(fp)


def export_bundle(rc: RetrieverConfig, *, encoder_dir: Path, index_dir: Path, bm25_dir: Path,
                  corpus_path: Path, out: Path, generator_dir: Path | None = None,
                  precision: str = "auto", reranker_dir: Path | None = None,
                  rerank: Rerank | None = None, reading: Reading | None = None,
                  index_cfg: IndexConfig | None = None,
                  extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Copy every part into ``out`` (atomically) with a manifest; returns the manifest. No
    ``generator_dir``: a retriever bundle (kind "retriever"); a ``reranker_dir``: its
    fingerprint and the ``rerank`` settings are bound in the manifest; ``index_cfg``: how the
    served model searches its index (recorded where not the default)."""
    ic, default = index_cfg or IndexConfig(), IndexConfig()
    reading = reading or Reading()
    search_keys = {k: getattr(ic, k) for k in ("device", "mmap")
                   if getattr(ic, k) != getattr(default, k)}
    idx_meta = json.loads((index_dir / "meta.json").read_text())
    enc_meta = json.loads((encoder_dir / "retriever.json").read_text())
    manifest: dict[str, Any] = {
        "kind": RAG if generator_dir is not None else RETRIEVER,
        "retriever": to_dict(rc), "precision": precision, "top_k": rc.top_k,
        "encoder_fingerprint": enc_meta.get("fingerprint"),
        "index_encoder_fingerprint": idx_meta.get("encoder_fingerprint"),
        "corpus_sha256": sha256_file(corpus_path),
        "generator": (json.loads((generator_dir / "generator.json").read_text())
                      if generator_dir is not None else None),
        "reranker": ({**to_dict(rerank or Rerank()),
                      "fingerprint": reranker_fingerprint(reranker_dir)}
                     if reranker_dir is not None else None),
        "reading": ({k: v for k, v in to_dict(reading).items()  # no abstention: as before
                     if not (k.startswith("abstain_") and reading.abstain_below is None)}
                    if generator_dir is not None else None),
        **({"index": search_keys} if search_keys else {}),
        **(extra or {}),
    }
    if manifest["encoder_fingerprint"] != manifest["index_encoder_fingerprint"]:
        raise IndexMismatchError(
            f"{index_dir}: built by encoder {manifest['index_encoder_fingerprint']}, but "
            f"{encoder_dir} is {manifest['encoder_fingerprint']}; rebuild the index (dvc repro)")
    parts = [(encoder_dir, "retriever"), (index_dir, "index"), (bm25_dir, "bm25")]
    parts += [(p, name) for p, name in ((generator_dir, "generator"), (reranker_dir, "reranker"))
              if p is not None]
    with atomic_path(out) as tmp:
        tmp.mkdir()
        for src, name in parts:
            shutil.copytree(src, tmp / name)
        shutil.copy2(corpus_path, tmp / "corpus.jsonl")
        atomic_write_json(tmp / MANIFEST, manifest)
    return manifest
