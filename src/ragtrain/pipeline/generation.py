"""The generation stages: train the generator on retrieved passages, evaluate the RAG model,
package it as one self-contained bundle.

Data without reference answers (BEIR: relevance judgements only), or ``generator.enabled:
false``, skips the generator the DVC way: train_generator writes artifacts/generator/DISABLED.json
(and the empty metrics and plot files DVC expects), evaluate writes a metrics file saying so, and
package builds a retriever bundle (ranked passages, no answer). Mixed data trains and scores the
generator on the questions that have answers and counts the others.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ragtrain.config import Config, to_dict
from ragtrain.errors import DataError, SourceError
from ragtrain.io import atomic_path, atomic_write_json, read_jsonl, sha256_file, write_jsonl
from ragtrain.pipeline.code import code_hashes
from ragtrain.pipeline.paths import (
    Paths,
    read_first_stage,
    read_queries,
    read_retrieved,
    read_retrieved_scores,
)
from ragtrain.pipeline.timing import record_timings


def generator_plan(cfg: Config, paths: Paths) -> tuple[bool, str]:
    """(whether the generator is trained and evaluated, why not when it is not).

    ``generator.enabled``: false skips it; auto skips it when the train split or the
    evaluation split has no question with a reference answer; true requires them (an error
    naming the file otherwise)."""
    from ragtrain.data.questions import answered

    mode = cfg.generator.enabled
    if mode is False:
        return False, "generator.enabled is false in params.yaml"
    missing = [s for s in dict.fromkeys(("train", cfg.evaluation.split))
               if not answered(read_queries(paths, s))[0]]
    if not missing:
        return True, ""
    files = " and ".join(str(paths.queries(s)) for s in missing)
    if mode is True:
        raise DataError(f"{files}: no question has a reference answer to train or score the "
                        "generator on, but generator.enabled is true; set it to auto (or "
                        "false) to train, register and serve the retriever alone")
    return False, (f"no question of {files} has a reference answer (retrieval-only data, e.g. "
                   "BEIR qrels): the generator is skipped and the retriever is packaged and "
                   "registered on its own")


def _note(msg: str) -> None:
    print(msg, file=sys.stderr)


def _answered(paths: Paths, split: str, stage: str) -> tuple[list[dict[str, Any]], int]:
    """The split's questions with a reference answer; the others are counted and said."""
    from ragtrain.data.questions import answered

    rows, left_out = answered(read_queries(paths, split))
    if left_out:
        _note(f"{stage}: {left_out} of {len(rows) + left_out} {split} questions in "
              f"{paths.queries(split)} have no reference answer: left out of the generator "
              f"(counted in {split}/questions_without_answers)")
    return rows, left_out


def write_generator_disabled(cfg: Config, paths: Paths, reason: str) -> dict[str, Any]:
    """artifacts/generator/DISABLED.json and the (empty) metrics and plot files DVC expects."""
    with atomic_path(paths.generator) as tmp:
        tmp.mkdir()
        atomic_write_json(tmp / paths.generator_disabled.name, {
            "enabled": False, "reason": reason,
            "then": "evaluate, package and register make a retriever model (ranked passages "
                    "and scores, no answer), promoted on registry.retrieval_metric"})
    metrics = {"generator/enabled": 0, "train/steps": 0}
    atomic_write_json(paths.generator_train_metrics, metrics)
    atomic_write_json(paths.generator_train_plot, [])
    _note(f"train_generator: skipped: {reason}")
    return metrics


def run_train_generator(cfg: Config, paths: Paths, *, resume: bool = True,
                        on_step: Callable[[int, Mapping[str, float]], None] | None = None,
                        progress: bool = True) -> dict[str, Any]:
    """Fine-tune the generator by MLE on the train questions with their retrieved passages
    (dev F1 picks the best checkpoint) -> artifacts/generator."""
    gc = cfg.generator
    enabled, reason = generator_plan(cfg, paths)
    if not enabled:  # before the imports: data without answers skips it in a second
        return write_generator_disabled(cfg, paths, reason)
    from ragtrain import distributed
    from ragtrain.data.corpus import Corpus
    from ragtrain.generation.generator import Generator
    from ragtrain.generation.training import train_generator
    from ragtrain.pipeline.history import TrainingRecord
    from ragtrain.trainer import prepare_ckpt_dir, seed_everything

    corpus = Corpus.load(paths.corpus)
    (train, train_out), (dev, dev_out) = (_answered(paths, s, "train_generator")
                                          for s in ("train", "dev"))
    retrieved = {**read_retrieved(paths, "train"), **read_retrieved(paths, "dev")}
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
    if not distributed.is_main():  # torchrun: rank 0 alone writes the outputs
        return {}
    gen.save(paths.generator)
    return record.finish(
        state, select="dev/f1", metrics_file=paths.generator_train_metrics,
        plot_file=paths.generator_train_plot, timings_file=paths.timings,
        stage="train_generator",
        extra={"train/examples": state.step * gc.batch_size * gc.grad_accum_steps,
               # only when some were left out, so data with answers keeps its metrics file
               **({"train/questions_without_answers": train_out,
                   "dev/questions_without_answers": dev_out} if train_out or dev_out else {})})


def run_evaluate(cfg: Config, paths: Paths, *, progress: bool = True) -> dict[str, float]:
    """The RAG model on the held-out split: EM / F1 / accuracy of the trained generator on
    retrieved passages, beside the same generator given the gold passage, the untrained
    generator and a non-learned baseline; answer recall of the passages it read
    -> metrics/generator.json + a per-question table."""
    if paths.generator_disabled.exists():  # train_generator skipped it: nothing to score
        return _write_evaluate_disabled(paths)
    import evaluate as hf_evaluate  # ~3 s to import (transformers' pipelines): after the skip

    from ragtrain import runtime
    from ragtrain.data.corpus import Corpus
    from ragtrain.evaluation.answers import METRIC_MODULE, score_one, sliding_window_answer
    from ragtrain.generation.generator import Generator
    from ragtrain.generation.reading import pick, read_inputs
    from ragtrain.generation.training import gold_examples
    from ragtrain.retrieval.metrics import answer_in_passage
    from ragtrain.trainer import seed_everything

    split, gc, k = cfg.evaluation.split, cfg.generator, cfg.retriever.top_k
    n_read = k * gc.answer_from  # passages read: answer_from inputs of top_k passages each
    if not read_queries(paths, split):
        raise DataError(f"{paths.queries(split)}: no questions to evaluate")
    rows, left_out = _answered(paths, split, "evaluate")
    if not rows:
        raise DataError(f"{paths.queries(split)}: no question has a reference answer to score")
    corpus = Corpus.load(paths.corpus)
    retrieved = read_retrieved(paths, split)
    retrieval_scores = read_retrieved_scores(paths, split)
    refs = [r["answers"] for r in rows]
    metric = hf_evaluate.load(str(METRIC_MODULE))
    bf16 = runtime.use_bf16(gc.precision)

    def score(prefix: str, answers: list[str]) -> dict[str, float]:
        m = metric.compute(predictions=answers, references=refs)
        return {f"{prefix}/em": m["exact_match"], f"{prefix}/f1": m["f1"],
                f"{prefix}/accuracy": m["accuracy"]}

    questions = [r["question"] for r in rows]
    passages = [[corpus[p] for p in retrieved[r["id"]][:n_read]] for r in rows]
    scores = [retrieval_scores[r["id"]] for r in rows]

    def answer(g: Generator, n: int = gc.answer_from) -> tuple[list[Any], list[list[Any]]]:
        """(the kept answers of ``n`` inputs, each question's answer to each input)."""
        per_q = read_inputs(g, questions, passages, n=n, per_input=k,
                            batch_size=gc.eval_batch_size, bf16=bf16, progress=progress)
        return (pick(per_q, scores, weight=gc.answer_weight, per_input=k,
                     null_weight=gc.answer_null_weight), per_q)

    gen = Generator.load(paths.generator)
    t0 = time.perf_counter()
    preds, per_q = answer(gen)
    first = [q[0] for q in per_q]
    record_timings(paths.timings, {"evaluate/answers_per_s":
                                   len(rows) / (time.perf_counter() - t0)})
    metrics = score(split, [p.answer for p in preds])
    if cfg.abstention.enabled:  # calibrated on dev, reported on the split
        metrics.update(_abstention(cfg, paths, gen, corpus, split, rows, preds, bf16, progress))
    if gc.answer_from > 1:  # the same generator reading only its first input, for comparison
        metrics.update(score(f"{split}/first_input", [p.answer for p in first]))
        metrics[f"{split}/answer_recall_at_{n_read}"] = sum(
            answer_in_passage(r["answers"], " ".join(p.text for p in ps))
            for r, ps in zip(rows, passages, strict=True)) / len(rows)
    recall = [answer_in_passage(r["answers"],
                                " ".join(corpus[p].text for p in retrieved[r["id"]][:k]))
              for r in rows]
    metrics[f"{split}/answer_recall_at_{k}"] = sum(recall) / len(rows)
    first_stage = read_first_stage(paths, split)  # the lists before reranking (reranker on)
    if first_stage is not None:
        fs = _first_stage_answers(gen, rows, corpus, first_stage, per_q, passages, gc, k,
                                  bf16, progress)
        metrics.update(score(f"{split}/first_stage", [p.answer for p in fs]))
    metrics[f"{split}/n_questions"] = len(rows)
    metrics[f"{split}/questions_cut"] = sum(p.question_cut for p in preds)
    if left_out:
        metrics[f"{split}/questions_without_answers"] = left_out
    # the same generator given the gold passage; where that is exactly the first input (top_k
    # 1, the gold passage ranked first) the first input's answer is that answer: decoded once
    same = [retrieved[r["id"]][:k] == r["gold_passage_ids"][:1] for r in rows]
    fresh = iter(gen.answer(gold_examples([r for r, s in zip(rows, same, strict=True) if not s],
                                          corpus), gc.eval_batch_size, bf16=bf16,
                            progress=progress))
    gold = [f if s else next(fresh) for f, s in zip(first, same, strict=True)]
    metrics.update(score(f"{split}/gold_passage", [p.answer for p in gold]))
    base = [sliding_window_answer(r["question"], corpus[retrieved[r["id"]][0]].text) for r in rows]
    metrics.update(score(f"{split}/baseline_window", base))
    del gen
    seed_everything(cfg.seed)  # the untrained generator's new heads: the same every run
    # its top input only, greedy: it never stops before max_answer_tokens, so beams would only
    # spend time (a baseline's floor, not a decoder comparison)
    untrained = Generator.from_pretrained(dataclasses.replace(gc, num_beams=1))
    u, _ = answer(untrained, n=1)
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
                                if 0 <= p.passage < min(n_read, len(retrieved[r["id"]]))
                                else None),
             "gold_passage_prediction": g.answer, "baseline_prediction": b}
            for r, p, g, b, rec in zip(rows, preds, gold, base, recall, strict=True)))
    metrics = {k2: (round(v, 4) if isinstance(v, float) else v) for k2, v in metrics.items()}
    atomic_write_json(paths.generator_metrics, metrics)
    return metrics


def _first_stage_answers(gen: Any, rows: list[dict[str, Any]], corpus: Any,
                         first_stage: dict[str, tuple[list[str], list[float]]],
                         per_q: list[list[Any]], passages: list[list[Any]], gc: Any, k: int,
                         bf16: bool, progress: bool) -> list[Any]:
    """The same generator's kept answers on the first stage's lists (``retrieve`` reranked:
    what reranking changed in EM / F1). An input (a group of ``k`` passages) already read on
    the reranked list is not read again: only the inputs reranking did not hand it are."""
    from ragtrain.generation.reading import pick, read_inputs

    def groups(ps: list[Any]) -> list[tuple[str, ...]]:
        ids = [p.passage_id for p in ps]
        return [tuple(ids[j:j + k]) for j in range(0, len(ids), k)][:gc.answer_from]

    known = {(r["id"], g): pred for r, ps, mine in zip(rows, passages, per_q, strict=True)
             for g, pred in zip(groups(ps), mine, strict=False)}
    lists = [[corpus[p] for p in first_stage[r["id"]][0][:k * gc.answer_from]] for r in rows]
    todo = sorted({(i, g) for i, (r, ps) in enumerate(zip(rows, lists, strict=True))
                   for g in groups(ps) if (r["id"], g) not in known})
    fresh = read_inputs(gen, [rows[i]["question"] for i, _ in todo],
                        [[corpus[p] for p in g] for _, g in todo], n=1, per_input=k,
                        batch_size=gc.eval_batch_size, bf16=bf16, progress=progress)
    known.update({(rows[i]["id"], g): a[0] for (i, g), a in zip(todo, fresh, strict=True)})
    return pick([[known[(r["id"], g)] for g in groups(ps)] for r, ps in zip(rows, lists,
                                                                            strict=True)],
                [first_stage[r["id"]][1] for r in rows], weight=gc.answer_weight,
                per_input=k, null_weight=gc.answer_null_weight)


def _abstention(cfg: Config, paths: Paths, gen: Any, corpus: Any, split: str,
                rows: list[dict[str, Any]], preds: list[Any], bf16: bool,
                progress: bool) -> dict[str, float]:
    """abstention.enabled: the null weight and the threshold on the first passage's relevance
    (the bi-encoder's cosine) less the weight x the kept answer's p(empty answer), chosen on dev
    (its sampled questions as retrieved, and searched without the dev articles), then
    ``{split}/abstain/*``: the split's answers with them applied, and its questions searched
    without its articles (evaluation/abstention.py)."""
    from ragtrain.evaluation.abstention import (
        abstention_score,
        calibrate,
        relevance,
        report,
        sample_answered,
    )
    from ragtrain.evaluation.answers import score_one
    from ragtrain.generation.reading import answer_each
    from ragtrain.retrieval.encoder import BiEncoder
    from ragtrain.retrieval.passage_text import passage_inputs

    gc, k = cfg.generator, cfg.retriever.top_k
    encoder = BiEncoder.load(paths.retriever)

    def ask(qs: list[dict[str, Any]], which: str) -> tuple[list[Any], list[float]]:
        """The predictions and the relevance of each question's first passage."""
        if which.endswith("_unanswerable"):  # stage retrieve_unanswerable
            f = paths.unanswerable / f"{which.removesuffix('_unanswerable')}.jsonl"
            if not f.exists():
                raise DataError(f"{f}: missing; abstention.enabled: run `ragtrain "
                                "retrieve-unanswerable` (or dvc repro)")
            lines = read_jsonl(f)
            got = {x["id"]: x["passage_ids"] for x in lines}
            sc = {x["id"]: x["scores"] for x in lines}
        else:
            got, sc = read_retrieved(paths, which), read_retrieved_scores(paths, which)
        rel = relevance(encoder, [q["question"] for q in qs],
                        passage_inputs([corpus[got[q["id"]][0]] for q in qs]), bf16=bf16)
        if qs is rows:  # the split's answers are already there
            return preds, rel
        return answer_each(gen, [q["question"] for q in qs],
                           [[corpus[p] for p in got[q["id"]][:k * gc.answer_from]] for q in qs],
                           [sc[q["id"]] for q in qs], n=gc.answer_from,
                           weight=gc.answer_weight, null_weight=gc.answer_null_weight,
                           per_input=k,
                           batch_size=gc.eval_batch_size, bf16=bf16, progress=progress), rel

    dev = sample_answered(read_queries(paths, "dev"), cfg.abstention.dev_questions, cfg.seed)
    if not dev:
        raise DataError(f"{paths.queries('dev')}: abstention.enabled needs dev questions with "
                        "answers to choose its threshold on")
    answered = [(r, p.null, 100 * score_one(p.answer, q["answers"])["f1"])
                for p, r, q in zip(*ask(dev, "dev"), dev, strict=True)]
    calibration = calibrate(answered, [(r, p.null) for p, r in zip(*ask(dev, "dev_unanswerable"),
                                                                    strict=True)],
                            cfg.abstention.null_weights)
    w = calibration.null_weight
    unanswerable = sample_answered(rows, cfg.abstention.dev_questions if split == "dev"
                                   else cfg.abstention.test_questions, cfg.seed)
    per_q = [(abstention_score(r, p.null, w), *(100 * v for v in (s["em"], s["f1"])))
             for p, r, q in zip(*ask(rows, split), rows, strict=True)
             for s in [score_one(p.answer, q["answers"])]]
    return report(split, calibration, per_q, [
        abstention_score(r, p.null, w)
        for p, r in zip(*ask(unanswerable, f"{split}_unanswerable"), strict=True)])


def _abstention_reading(cfg: Config, paths: Paths) -> tuple[float, float] | None:
    """abstention.enabled: the threshold and the null weight evaluate chose on dev
    (metrics/generator.json)."""
    if not cfg.abstention.enabled:
        return None
    m = json.loads(paths.generator_metrics.read_text()) if paths.generator_metrics.exists() \
        else {}
    if "dev/abstain/threshold" not in m:
        raise DataError(f"{paths.generator_metrics}: no dev/abstain/threshold; abstention.enabled "
                        "is true: run `ragtrain evaluate` with it (or dvc repro)")
    return float(m["dev/abstain/threshold"]), float(m.get("dev/abstain/null_weight", 0.0))


def _write_evaluate_disabled(paths: Paths) -> dict[str, float]:
    """metrics/generator.json saying the generator was skipped, and an empty answer table."""
    metrics = {"generator/enabled": 0}
    with atomic_path(paths.generator_predictions) as tmp:
        write_jsonl(tmp, [])
    atomic_write_json(paths.generator_metrics, metrics)
    _note(f"evaluate: no generator ({paths.generator_disabled}): retrieval metrics only "
          f"({paths.retriever_metrics})")
    return metrics


def model_parts(cfg: Config, paths: Paths) -> dict[str, Any]:
    """What ``RAGModel.from_parts`` / ``export_bundle`` take from the current outputs: the
    retriever parts, the generator unless skipped, the reranker when reranker.enabled."""
    from ragtrain.generation.bundle import Reading, Rerank

    parts: dict[str, Any] = dict(paths.rag_parts())
    if parts.get("generator_dir") is not None:
        abstain = _abstention_reading(cfg, paths) or ()
        parts["reading"] = Reading.from_config(cfg.generator, *abstain)
    if cfg.reranker.enabled:
        if paths.reranker_disabled.exists():
            raise DataError(f"{paths.reranker_disabled}: reranker.enabled is true but no "
                            "reranker was trained; run `ragtrain train-reranker` (or dvc repro)")
        parts.update(reranker_dir=paths.reranker, rerank=Rerank.from_config(cfg.reranker))
    return parts


# The file of each part export_bundle opens, and the stage that writes it.
_PART_FILES = {"encoder_dir": ("retriever.json", "train-retriever"),
               "index_dir": ("meta.json", "build-index"), "bm25_dir": ("", "build-bm25"),
               "generator_dir": ("generator.json", "train-generator"),
               "reranker_dir": ("", "train-reranker"), "corpus_path": ("", "prepare")}


def check_parts(parts: Mapping[str, Any], eval_queries: Path) -> None:
    """Raise naming every missing input of `package` and the stage that makes it."""
    missing = [] if eval_queries.exists() else [f"{eval_queries} (made by `ragtrain prepare`)"]
    for key, (name, stage) in _PART_FILES.items():
        part = parts.get(key)
        if part is not None and not (part / name if name else part).exists():
            missing.append(f"{part / name if name else part} (made by `ragtrain {stage}`)")
    if missing:
        raise SourceError(f"package: missing input(s): {', '.join(missing)}; run those stages "
                          "first (or `dvc repro package`)")


def run_package(cfg: Config, paths: Paths) -> dict[str, Any]:
    """The parts -> artifacts/rag, a self-contained RAG model bundle (what MLflow registers);
    without a generator, a retriever bundle; with reranker.enabled, the reranker bound in."""
    from ragtrain.generation.bundle import export_bundle

    parts = model_parts(cfg, paths)
    check_parts(parts, paths.queries(cfg.evaluation.split))
    extra = {"eval_set_sha256": sha256_file(paths.queries(cfg.evaluation.split)),
             "eval_split": cfg.evaluation.split}
    if paths.generator_metrics.exists():
        extra["metrics"] = json.loads(paths.generator_metrics.read_text())
    return export_bundle(cfg.retriever, **parts, out=paths.bundle,
                         precision=cfg.generator.precision, index_cfg=cfg.index, extra=extra)
