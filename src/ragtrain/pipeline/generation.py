"""The generation stages: train the generator on retrieved passages, evaluate the RAG model,
package it as one self-contained bundle."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from typing import Any

from ragtrain.config import Config, to_dict
from ragtrain.errors import DataError
from ragtrain.io import atomic_path, atomic_write_json, sha256_file, write_jsonl
from ragtrain.pipeline.code import code_hashes
from ragtrain.pipeline.paths import Paths, read_queries, read_retrieved
from ragtrain.pipeline.timing import record_timings


def run_train_generator(cfg: Config, paths: Paths, *, resume: bool = True,
                        on_step: Callable[[int, Mapping[str, float]], None] | None = None,
                        progress: bool = True) -> dict[str, Any]:
    """Fine-tune the generator by MLE on the train questions with their retrieved passages
    (dev F1 picks the best checkpoint) -> artifacts/generator."""
    from ragtrain.data.corpus import Corpus
    from ragtrain.generation.generator import Generator
    from ragtrain.generation.training import train_generator
    from ragtrain.pipeline.history import TrainingRecord
    from ragtrain.trainer import prepare_ckpt_dir, seed_everything

    gc = cfg.generator
    corpus = Corpus.load(paths.corpus)
    train, dev = read_queries(paths, "train"), read_queries(paths, "dev")
    retrieved = {**read_retrieved(paths, "train"), **read_retrieved(paths, "dev")}
    for split, rows in (("train", train), ("dev", dev)):
        for i, r in enumerate(rows, 1):
            if not r.get("answers"):
                raise DataError(f"{paths.queries(split)}:{i}: no reference answer to "
                                "train or score the generator on")
    seed_everything(cfg.seed)
    gen = Generator.from_pretrained(gc)
    signature = json.dumps([to_dict(gc), cfg.seed, cfg.retriever.top_k,
                            sha256_file(paths.corpus), sha256_file(paths.queries("train")),
                            sha256_file(paths.retrieved_split("train")),
                            *code_hashes(run_train_generator)])
    prepare_ckpt_dir(paths.generator_checkpoints, signature, resume)
    record = TrainingRecord(on_step)
    state = train_generator(gen, train, dev, retrieved, corpus, gc, top_k=cfg.retriever.top_k,
                            seed=cfg.seed, ckpt_dir=paths.generator_checkpoints, resume=resume,
                            signature=signature, on_step=record, progress=progress)
    gen.save(paths.generator)
    return record.finish(
        state, select="dev/f1", metrics_file=paths.generator_train_metrics,
        plot_file=paths.generator_train_plot, timings_file=paths.timings,
        stage="train_generator",
        extra={"train/examples": state.step * gc.batch_size * gc.grad_accum_steps})


def run_evaluate(cfg: Config, paths: Paths, *, progress: bool = True) -> dict[str, float]:
    """The RAG model on the held-out split: EM / F1 / accuracy of the trained generator on
    retrieved passages, beside the same generator given the gold passage, the untrained
    generator and a non-learned baseline; answer recall of the passages it read
    -> metrics/generator.json + a per-question table."""
    import evaluate as hf_evaluate

    from ragtrain import runtime
    from ragtrain.data.corpus import Corpus
    from ragtrain.evaluation.answers import METRIC_MODULE, score_one, sliding_window_answer
    from ragtrain.generation.generator import Generator
    from ragtrain.generation.training import gold_examples, make_examples
    from ragtrain.retrieval.metrics import answer_in_passage
    from ragtrain.trainer import seed_everything

    split, gc, k = cfg.evaluation.split, cfg.generator, cfg.retriever.top_k
    corpus = Corpus.load(paths.corpus)
    rows = read_queries(paths, split)
    if not rows:
        raise DataError(f"{paths.queries(split)}: no questions to evaluate")
    for i, r in enumerate(rows, 1):
        if not r.get("answers"):
            raise DataError(f"{paths.queries(split)}:{i}: no reference answer to score")
    retrieved = read_retrieved(paths, split)
    refs = [r["answers"] for r in rows]
    metric = hf_evaluate.load(str(METRIC_MODULE))
    bf16 = runtime.use_bf16(gc.precision)

    def score(prefix: str, answers: list[str]) -> dict[str, float]:
        m = metric.compute(predictions=answers, references=refs)
        return {f"{prefix}/em": m["exact_match"], f"{prefix}/f1": m["f1"],
                f"{prefix}/accuracy": m["accuracy"]}

    examples = make_examples(rows, retrieved, corpus, k)
    gen = Generator.load(paths.generator)
    t0 = time.perf_counter()
    preds = gen.answer(examples, gc.eval_batch_size, bf16=bf16, progress=progress)
    record_timings(paths.timings, {"evaluate/answers_per_s":
                                   len(rows) / (time.perf_counter() - t0)})
    metrics = score(split, [p.answer for p in preds])
    recall = [answer_in_passage(r["answers"],
                                " ".join(corpus[p].text for p in retrieved[r["id"]][:k]))
              for r in rows]
    metrics[f"{split}/answer_recall_at_{k}"] = sum(recall) / len(rows)
    metrics[f"{split}/n_questions"] = len(rows)
    metrics[f"{split}/questions_cut"] = sum(p.question_cut for p in preds)
    gold = gen.answer(gold_examples(rows, corpus), gc.eval_batch_size, bf16=bf16,
                      progress=progress)
    metrics.update(score(f"{split}/gold_passage", [p.answer for p in gold]))
    base = [sliding_window_answer(r["question"], corpus[retrieved[r["id"]][0]].text) for r in rows]
    metrics.update(score(f"{split}/baseline_window", base))
    del gen
    seed_everything(cfg.seed)  # the untrained generator's new heads: the same every run
    untrained = Generator.from_pretrained(gc)
    u = untrained.answer(examples, gc.eval_batch_size, bf16=bf16, progress=progress)
    metrics.update(score(f"{split}/untrained", [p.answer for p in u]))
    rank = {}
    for r in rows:
        ids = retrieved[r["id"]]
        g = [ids.index(x) + 1 for x in r.get("gold_passage_ids") or [] if x in ids]
        rank[r["id"]] = min(g) if g else None
    with atomic_path(paths.generator_predictions) as tmp:
        write_jsonl(tmp, (
            {"id": r["id"], "question": r["question"], "references": r["answers"],
             "prediction": p.answer, **{k2: round(v, 4) for k2, v in
                                        score_one(p.answer, r["answers"]).items()},
             "gold_passage_rank": rank[r["id"]], "answer_in_passages": bool(rec),
             "answer_passage": (retrieved[r["id"]][p.passage]  # the passage it cites
                                if 0 <= p.passage < min(k, len(retrieved[r["id"]])) else None),
             "gold_passage_prediction": g.answer, "baseline_prediction": b}
            for r, p, g, b, rec in zip(rows, preds, gold, base, recall, strict=True)))
    metrics = {k2: (round(v, 4) if isinstance(v, float) else v) for k2, v in metrics.items()}
    atomic_write_json(paths.generator_metrics, metrics)
    return metrics


def run_package(cfg: Config, paths: Paths) -> dict[str, Any]:
    """The parts -> artifacts/rag, a self-contained RAG model bundle (what MLflow registers)."""
    from ragtrain.generation.rag import export_bundle

    extra = {"eval_set_sha256": sha256_file(paths.queries(cfg.evaluation.split)),
             "eval_split": cfg.evaluation.split}
    if paths.generator_metrics.exists():
        extra["metrics"] = json.loads(paths.generator_metrics.read_text())
    return export_bundle(cfg.retriever, **paths.rag_parts(), out=paths.bundle,
                         precision=cfg.generator.precision, extra=extra)
