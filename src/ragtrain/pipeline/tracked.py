"""Stage logging: each stage's MLflow run (``tracked``) and what each stage leaves in it.

One ``log_*`` function per stage that logs more than its config; the stage table
(``stages.STAGES``) names the one each stage uses.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from ragtrain import distributed, tracking
from ragtrain.config import Config, flatten, to_dict
from ragtrain.io import sha256_file
from ragtrain.pipeline.paths import Paths

PARENT_RUN_ENV = "RAGTRAIN_PARENT_RUN_ID"  # set by `ragtrain pipeline` for the stages under it


@contextlib.contextmanager
def tracked(cfg: Config, paths: Paths, name: str) -> Iterator[tracking.RunHandle | None]:
    """An MLflow run for one stage (nested under the pipeline's run when there is one): the
    effective config as params, lineage as tags; FAILED if the stage raises. The store is
    checked before the stage does any work."""
    if not cfg.tracking.enabled:
        yield None
        return
    tags = {"ragtrain.stage": name, **tracking.lineage(paths.root)}
    if distributed.world_size() > 1:  # trained by torchrun's processes (data parallel)
        tags["ragtrain.processes"] = str(distributed.world_size())
    with tracking.run(cfg.tracking, name, root=paths.root, tags=tags,
                      parent_run_id=os.environ.get(PARENT_RUN_ENV) or None) as run:
        run.log_params(flatten(to_dict(cfg)))
        yield run


def numeric(d: Mapping[str, Any]) -> dict[str, float]:
    """The numeric values of a metrics dict, as floats (booleans left out)."""
    return {k: float(v) for k, v in d.items()
            if isinstance(v, int | float) and not isinstance(v, bool)}


def _log_training(run: tracking.RunHandle, result: Any, metrics: Path, plot: Path, spec: Path,
                  what: str, curves: list[str]) -> None:
    """A training stage's run: final metrics, the metrics file, the loss curve, the model spec."""
    run.log_metrics(numeric(result))
    run.log_artifact(metrics)
    points = json.loads(plot.read_text())
    if points:
        with tempfile.TemporaryDirectory() as tmp:
            png = Path(tmp) / f"train_{what}_loss.png"
            tracking.plot_curve(points, "step", curves, png, f"{what} training loss")
            run.log_artifact(png, "plots")
    run.log_dict(json.loads(spec.read_text()), spec.name)


def _log_evaluation_set(run: tracking.RunHandle, cfg: Config, paths: Paths) -> None:
    split = cfg.evaluation.split
    run.log_input_dataset(f"{split}.jsonl", paths.queries(split),
                          sha256_file(paths.queries(split)), "evaluation")


def log_fetch(run: tracking.RunHandle, cfg: Config, paths: Paths, result: Any) -> None:
    """The source's record and the raw file as a dataset input."""
    run.log_dict(result, "source.json")
    payload = paths.raw / result["file"]
    if payload.is_file():
        run.log_input_dataset(result["source"], payload,
                              result["sha256_payload"] or result["sha256_file"], "raw")


def log_prepare(run: tracking.RunHandle, cfg: Config, paths: Paths, result: Any) -> None:
    """The data statistics; the splits and the corpus as dataset inputs."""
    run.log_metrics(numeric(result))
    run.log_artifact(paths.prepare_metrics)
    for split in ("train", "dev", "test"):
        run.log_input_dataset(f"{split}.jsonl", paths.queries(split),
                              sha256_file(paths.queries(split)), split)
    run.log_input_dataset("corpus.jsonl", paths.corpus, sha256_file(paths.corpus), "corpus")


def log_train_retriever(run: tracking.RunHandle, cfg: Config, paths: Paths,
                        result: Any) -> None:
    """Final metrics, the loss curve, the retriever's spec."""
    _log_training(run, result, paths.retriever_train_metrics, paths.retriever_train_plot,
                  paths.retriever / "retriever.json", "retriever", ["loss"])


def log_train_reranker(run: tracking.RunHandle, cfg: Config, paths: Paths,
                       result: Any) -> None:
    """Final metrics, the loss and learning-rate curves, the reranker's spec; when disabled,
    the marker alone."""
    if not cfg.reranker.enabled:
        run.log_metrics(numeric(result))
        run.log_dict(json.loads(paths.reranker_disabled.read_text()), "reranker_disabled.json")
        return
    _log_training(run, result, paths.reranker_train_metrics, paths.reranker_train_plot,
                  paths.reranker / "reranker.json", "reranker", ["loss", "lr"])


def log_build_index(run: tracking.RunHandle, cfg: Config, paths: Paths, result: Any) -> None:
    """The index's metadata, and the encoder and corpus it was built from as tags."""
    meta = json.loads((paths.index / "meta.json").read_text())
    run.log_dict(meta, "index_meta.json")
    run.set_tags({"ragtrain.encoder_fingerprint": meta.get("encoder_fingerprint", ""),
                  "ragtrain.corpus_sha256": meta.get("corpus_sha256", "")})


def log_eval_retriever(run: tracking.RunHandle, cfg: Config, paths: Paths,
                       result: Any) -> None:
    """The metrics, the per-question table, the recall@k plot, the evaluation set."""
    run.log_metrics(numeric(result))
    run.log_artifact(paths.retriever_metrics)
    run.log_artifact(paths.retriever_predictions, "predictions")
    with tempfile.TemporaryDirectory() as tmp:
        png = Path(tmp) / "recall_at_k.png"
        tracking.plot_recall_at_k(result, cfg.evaluation.split, png,
                                  ["bm25", "untrained", "dense", "hybrid"]
                                  + (["reranked"] if cfg.reranker.enabled else []))
        run.log_artifact(png, "plots")
    _log_evaluation_set(run, cfg, paths)


def log_metrics(run: tracking.RunHandle, cfg: Config, paths: Paths, result: Any) -> None:
    """The stage's numeric results as metrics."""
    run.log_metrics(numeric(result))


def log_train_generator(run: tracking.RunHandle, cfg: Config, paths: Paths,
                        result: Any) -> None:
    """Final metrics, the loss and learning-rate curves, the generator's spec; when skipped
    (no answers in the data, or generator.enabled: false), the marker alone."""
    if paths.generator_disabled.exists():
        run.log_metrics(numeric(result))
        run.log_dict(json.loads(paths.generator_disabled.read_text()), "generator_disabled.json")
        return
    _log_training(run, result, paths.generator_train_metrics, paths.generator_train_plot,
                  paths.generator / "generator.json", "generator", ["loss", "lr"])


def log_train_rag(run: tracking.RunHandle, cfg: Config, paths: Paths, result: Any) -> None:
    """Final metrics (the joint and pipeline models side by side), the loss and learning-rate
    curves, the joint config; when disabled, the marker alone."""
    root = paths.root / "artifacts/rag_joint"
    if not cfg.joint.enabled:
        run.log_metrics(numeric(result))
        run.log_dict(json.loads((root / "DISABLED.json").read_text()), "rag_joint_disabled.json")
        return
    _log_training(run, result, paths.metrics / "train_rag.json",
                  paths.root / "plots/train_rag.json", root / "joint.json", "rag", ["loss", "lr"])


def log_evaluate(run: tracking.RunHandle, cfg: Config, paths: Paths, result: Any) -> None:
    """The metrics, the per-question table (error analysis in the UI), the evaluation set."""
    run.log_metrics(numeric(result))
    run.log_artifact(paths.generator_metrics)
    run.log_artifact(paths.generator_predictions, "predictions")
    _log_evaluation_set(run, cfg, paths)


def log_package(run: tracking.RunHandle, cfg: Config, paths: Paths, result: Any) -> None:
    """The bundle's manifest."""
    run.log_dict(result, "rag_manifest.json")


def log_report(run: tracking.RunHandle, cfg: Config, paths: Paths, result: Any) -> None:
    """The report page itself (open it from the run's artifacts) and which champion it shows."""
    run.log_artifact(Path(result["path"]), "report")
    run.set_tags({"ragtrain.report": result["path"],
                  "ragtrain.report_champion": result["champion"] or "none"})
