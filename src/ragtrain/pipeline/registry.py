"""The registry stage (the RAG model into MLflow as the challenger) and loading a registered
model back."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from ragtrain import tracking
from ragtrain.config import Config
from ragtrain.errors import RagtrainError
from ragtrain.io import atomic_write_json
from ragtrain.pipeline.paths import Paths, read_queries
from ragtrain.pipeline.tracked import numeric, tracked


def run_register(cfg: Config, paths: Paths) -> dict[str, Any]:
    """Register the RAG model bundle (artifacts/rag) and its parts in MLflow as ``challenger``,
    with its evaluation metrics, in a `register` run -> artifacts/registered.json."""
    from ragtrain.generation.bundle import MANIFEST, RAG
    from ragtrain.tracking import registry

    if not (cfg.registry.register and cfg.tracking.enabled):  # the registry is MLflow's
        why = ("registry.register is false" if not cfg.registry.register
               else "tracking.enabled is false")
        atomic_write_json(paths.registered, {"registered": False, "reason": why})
        return {"registered": False, "reason": why}
    f = paths.bundle / MANIFEST
    if not f.is_file():
        raise RagtrainError(f"{f}: missing; build the RAG model first (ragtrain package)")
    manifest = json.loads(f.read_text())
    metrics: dict[str, float] = {}
    for m in (paths.retriever_metrics, paths.generator_metrics):
        if m.is_file():
            metrics.update(numeric(json.loads(m.read_text())))
    questions = [r["question"] for r in read_queries(paths, cfg.evaluation.split)[:2]]
    b = paths.bundle
    # the retriever component: encoder, index, BM25 and (when the bundle reranks) the reranker
    retriever = [b / "retriever", b / "index", b / "bm25"] + (
        [b / "reranker"] if manifest.get("reranker") else [])
    components = {"retriever": retriever}
    if manifest.get("kind", RAG) == RAG:
        components["generator"] = [b / "generator"]
    with tracked(cfg, paths, "register") as run:
        assert run is not None
        reg = registry.register(
            run, cfg.registry, cfg.tracking, bundle=b, manifest=manifest, metrics=metrics,
            components=components,
            example_questions=questions or ["What is this corpus about?"], root=paths.root)
    out = {"registered": True, "model": reg.name, "version": reg.version,
           "kind": manifest.get("kind", RAG), "alias": registry.CHALLENGER, "run_id": reg.run_id,
           **{f"{c}_version": v for c, v in reg.components.items()},
           "tracking_uri": tracking.redact(cfg.tracking.uri)}
    atomic_write_json(paths.registered, out)
    return out


def load_registered_rag(cfg: Config, paths: Paths, alias: str = "champion") -> tuple[str, Any]:
    """(version, RAGModel) of ``registry.model_name@alias`` from the MLflow registry, loaded
    the way `mlflow models serve` loads it."""
    tracking.check_store(cfg.tracking.uri, root=paths.root)
    with tempfile.TemporaryDirectory() as tmp:  # every part is in memory once loaded
        return tracking.load_rag_model(cfg.tracking, cfg.registry.model_name, alias, Path(tmp),
                                       root=paths.root)
