"""The reranker stage: train the cross-encoder on BM25 candidates, or, when
``reranker.enabled`` is false, write the marker that says so (no model loaded)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ragtrain.config import Config
from ragtrain.io import atomic_path, atomic_write_json, sha256_file
from ragtrain.pipeline.code import code_hashes
from ragtrain.pipeline.paths import Paths, read_queries


def write_disabled(paths: Paths) -> dict[str, Any]:
    """artifacts/reranker/DISABLED.json and the (empty) metrics and plot files DVC expects."""
    with atomic_path(paths.reranker) as tmp:
        tmp.mkdir()
        atomic_write_json(tmp / paths.reranker_disabled.name, {
            "enabled": False,
            "reason": "reranker.enabled is false in params.yaml: no reranker was trained and "
                      "nothing is reranked; set it to true and rerun `dvc repro`"})
    metrics = {"reranker/enabled": 0, "train/steps": 0}
    atomic_write_json(paths.reranker_train_metrics, metrics)
    atomic_write_json(paths.reranker_train_plot, [])
    return metrics


def run_train_reranker(cfg: Config, paths: Paths, *, resume: bool = True,
                       on_step: Callable[[int, Mapping[str, float]], None] | None = None,
                       progress: bool = True) -> dict[str, Any]:
    """Fine-tune the cross-encoder reranker on train questions with BM25 hard negatives (dev
    reranked recall@1 picks the best checkpoint) -> artifacts/reranker."""
    rk = cfg.reranker
    if not rk.enabled:
        return write_disabled(paths)
    from ragtrain import distributed
    from ragtrain.data.corpus import Corpus, check_gold_ids
    from ragtrain.pipeline.history import TrainingRecord
    from ragtrain.retrieval.bm25 import BM25Retriever
    from ragtrain.retrieval.reranker import Reranker, RerankerSpec
    from ragtrain.retrieval.reranker_training import train_reranker

    corpus = Corpus.load(paths.corpus)
    train, dev = read_queries(paths, "train"), read_queries(paths, "dev")
    check_gold_ids(train, corpus, str(paths.queries("train")))
    check_gold_ids(dev, corpus, str(paths.queries("dev")))
    corpus_sha = sha256_file(paths.corpus)
    bm25 = BM25Retriever.load(paths.bm25, expect_corpus_sha256=corpus_sha)
    model = Reranker.from_pretrained(RerankerSpec.from_config(rk), seed=cfg.seed)
    record = TrainingRecord(on_step)
    state = train_reranker(
        model, corpus, train, dev, rk, bm25=bm25, seed=cfg.seed,
        ckpt_dir=paths.reranker_checkpoints, resume=resume, on_step=record, progress=progress,
        signature_parts=[corpus_sha, sha256_file(paths.queries("train")),
                         sha256_file(paths.queries("dev")), *code_hashes(run_train_reranker)])
    if not distributed.is_main():  # torchrun: rank 0 alone writes the outputs
        return {}
    model.save(paths.reranker)
    return record.finish(
        state, select="dev/recall_at_1", metrics_file=paths.reranker_train_metrics,
        plot_file=paths.reranker_train_plot, timings_file=paths.timings,
        stage="train_reranker",
        extra={"reranker/enabled": 1,
               "train/questions": state.step * rk.batch_questions * rk.grad_accum_steps})



def run_teacher_scores(cfg: Config, paths: Paths, *, progress: bool = True) -> dict[str, Any]:
    """The reranker's scores over each train question's gold passage and BM25 hard negatives
    (what ``retriever.loss: distill`` learns from) -> artifacts/teacher_scores/scores.jsonl;
    with another loss, the marker DISABLED.json (nothing scored, no model loaded)."""
    rc = cfg.retriever
    if rc.loss != "distill":
        with atomic_path(paths.teacher_scores) as tmp:
            tmp.mkdir()
            atomic_write_json(tmp / "DISABLED.json", {
                "enabled": False,
                "reason": f"retriever.loss is {rc.loss!r}, not distill: the retriever learns "
                          "from no teacher"})
        return {"teacher/enabled": 0}
    from ragtrain import runtime
    from ragtrain.data.corpus import Corpus, check_gold_ids
    from ragtrain.io import write_jsonl
    from ragtrain.retrieval.bm25 import BM25Retriever
    from ragtrain.retrieval.distill import score_candidates, teacher_candidates
    from ragtrain.retrieval.reranker import Reranker
    from ragtrain.retrieval.training import labelled

    corpus = Corpus.load(paths.corpus)
    train = read_queries(paths, "train")
    check_gold_ids(train, corpus, str(paths.queries("train")))
    rows = labelled(train)
    bm25 = BM25Retriever.load(paths.bm25, expect_corpus_sha256=sha256_file(paths.corpus))
    reranker = Reranker.load(paths.reranker).use_runtime(cfg.reranker.runtime)
    candidates = teacher_candidates(rows, corpus, bm25, depth=rc.hard_negative_depth,
                                    n=rc.hard_negatives_per_query)
    scored = score_candidates(reranker, rows, corpus, candidates,
                              batch_size=cfg.reranker.eval_batch_size,
                              bf16=runtime.use_bf16(cfg.reranker.precision), progress=progress)
    with atomic_path(paths.teacher_scores) as tmp:
        tmp.mkdir()
        write_jsonl(tmp / "scores.jsonl", scored)
        atomic_write_json(tmp / "meta.json", {
            "reranker_fingerprint": reranker.fingerprint(), "questions": len(scored),
            "pairs": sum(len(r["candidates"]) for r in scored)})
    return {"teacher/enabled": 1, "teacher/questions": len(scored),
            "teacher/pairs": sum(len(r["candidates"]) for r in scored)}
