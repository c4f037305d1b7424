"""One function per pipeline stage: the seam that both `dvc.yaml` (via the CLI) and `flows/` call.

Each stage is a function of files in and files out (paths below), so it can run anywhere.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ragtrain import tracking
from ragtrain.config import Config, flatten, to_dict
from ragtrain.data import prepare as data
from ragtrain.data import source
from ragtrain.errors import DataError, RagtrainError
from ragtrain.io import atomic_path, atomic_write_json, read_jsonl, sha256_file, write_jsonl


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
    def embeddings(self) -> Path:
        return self._p("artifacts/embeddings")

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
    def generator(self) -> Path:
        return self._p("artifacts/generator")

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

    def rag_parts(self) -> dict[str, Path]:
        """The parts a RAG model is made of (``RAGModel.from_parts`` / ``export_bundle``)."""
        return {"encoder_dir": self.retriever, "index_dir": self.index, "bm25_dir": self.bm25,
                "generator_dir": self.generator, "corpus_path": self.corpus}

    @property
    def registered(self) -> Path:
        return self._p("artifacts/registered.json")  # what `register` put in the MLflow registry


def run_fetch(cfg: Config, paths: Paths) -> dict[str, Any]:
    """Copy or download data.source into data/raw, verifying data.sha256."""
    return source.fetch_source(cfg.data.source, cfg.data.sha256, paths.raw, root=paths.root,
                               timeout_s=cfg.data.download_timeout_s)


def run_prepare(cfg: Config, paths: Paths) -> dict[str, Any]:
    """data/raw -> data/prepared/{corpus,train,dev,test}.jsonl and metrics/prepare.json."""
    ds = data.read_dataset(source.raw_payload(paths.raw), cfg.data.format)
    prepared = data.prepare_dataset(ds, cfg.data)
    with atomic_path(paths.prepared) as tmp:
        tmp.mkdir()
        write_jsonl(tmp / paths.corpus.name, data.passage_rows(prepared.passages))
        for split, rows in prepared.queries.items():
            write_jsonl(tmp / paths.queries(split).name, rows)
    atomic_write_json(paths.prepare_metrics, prepared.stats)
    return prepared.stats


# --------------------------------------------------------------------------- retriever


def _queries(paths: Paths, split: str) -> list[dict[str, Any]]:
    p = paths.queries(split)
    if not p.exists():
        raise source.SourceError(f"{p}: missing; run `ragtrain prepare` first")
    return read_jsonl(p)


def run_build_bm25(cfg: Config, paths: Paths) -> Path:
    """data/prepared/corpus.jsonl -> artifacts/bm25 (BM25 over title + text)."""
    from ragtrain.retrieval.bm25 import BM25Retriever
    from ragtrain.retrieval.training import Corpus

    corpus = Corpus.load(paths.corpus)
    BM25Retriever.build(corpus.texts, corpus.ids,
                        corpus_sha256=sha256_file(paths.corpus)).save(paths.bm25)
    return paths.bm25


def run_train_retriever(cfg: Config, paths: Paths, *, resume: bool = True,
                        on_step: Callable[[int, Mapping[str, float]], None] | None = None,
                        progress: bool = True) -> dict[str, Any]:
    """Fine-tune the bi-encoder on train questions (dev for model selection) -> artifacts/."""
    from ragtrain.retrieval.bm25 import BM25Retriever
    from ragtrain.retrieval.encoder import BiEncoder, EncoderSpec
    from ragtrain.retrieval.training import Corpus, check_gold_ids, train_retriever

    rc = cfg.retriever
    corpus = Corpus.load(paths.corpus)
    train, dev = _queries(paths, "train"), _queries(paths, "dev")
    check_gold_ids(train, corpus, str(paths.queries("train")))
    check_gold_ids(dev, corpus, str(paths.queries("dev")))
    # BM25 for mining is rebuilt in memory (well under a second): no dependency on artifacts/
    bm25 = (BM25Retriever.build(corpus.texts, corpus.ids)
            if rc.hard_negatives in ("bm25", "both") else None)
    model = BiEncoder.from_pretrained(EncoderSpec.from_config(rc))
    history: list[dict[str, float]] = []

    def step_cb(step: int, logs: Mapping[str, float]) -> None:
        history.append({"step": step, **logs})
        if on_step:
            on_step(step, logs)

    t0 = time.perf_counter()
    state = train_retriever(
        model, corpus, train, dev, rc, seed=cfg.seed, ckpt_dir=paths.retriever_checkpoints,
        resume=resume, bm25=bm25, on_step=step_cb, progress=progress,
        signature_parts=[sha256_file(paths.corpus), sha256_file(paths.queries("train")),
                         sha256_file(paths.queries("dev")), *_code_hashes(TRAINING_CODE)])
    model.save(paths.retriever)
    metrics: dict[str, Any] = {"train/steps": state.step,
                               "train/seconds": round(time.perf_counter() - t0, 1)}
    if state.history:
        best = max(state.history, key=lambda h: h["dev/recall_at_1"])
        metrics.update({k: v for k, v in best.items() if k.startswith("dev/")})
        metrics["dev/best_step"] = best["step"]
    atomic_write_json(paths.retriever_train_metrics, metrics)
    losses = [{"step": h["step"], "loss": h["train/loss"], "lr": h["train/lr"]}
              for h in history if "train/loss" in h]
    atomic_write_json(paths.retriever_train_plot, losses)
    return metrics


# A checkpoint is resumed only by the same code: the modules dvc.yaml lists for training.
TRAINING_CODE = ("retrieval/encoder", "retrieval/training", "retrieval/losses", "retrieval/mining",
                 "trainer")


def _code_hashes(modules: tuple[str, ...]) -> list[str]:
    pkg = Path(__file__).parents[1]
    return [sha256_file(pkg / f"{m}.py") for m in modules]


def run_build_index(cfg: Config, paths: Paths) -> Path:
    """Encode the corpus with the trained passage tower -> artifacts/embeddings, artifacts/index."""
    import numpy as np

    from ragtrain import runtime
    from ragtrain.retrieval.encoder import BiEncoder
    from ragtrain.retrieval.index import build_index, save_index
    from ragtrain.retrieval.training import Corpus

    corpus = Corpus.load(paths.corpus)
    model = BiEncoder.load(paths.retriever)
    fp = model.fingerprint()
    with runtime.autocast(runtime.use_bf16(cfg.retriever.precision)):
        emb = model.encode_passages(corpus.texts, cfg.index.encode_batch_size, progress=True)
    corpus_sha = sha256_file(paths.corpus)
    with atomic_path(paths.embeddings) as tmp:
        tmp.mkdir()
        np.save(tmp / "embeddings.npy", emb)
        atomic_write_json(tmp / "meta.json", {"passage_ids": corpus.ids, "dim": emb.shape[1],
                                              "encoder_fingerprint": fp,
                                              "corpus_sha256": corpus_sha})
    idx = build_index(emb, corpus.ids, cfg.index, corpus_sha256=corpus_sha,
                      encoder_fingerprint=fp, seed=cfg.seed)
    save_index(idx, paths.index)
    return paths.index


def run_eval_retriever(cfg: Config, paths: Paths) -> dict[str, float]:
    """Score BM25, the untrained encoder, the trained one and the hybrid on the same held-out
    questions -> metrics/retriever.json (the configured kind unprefixed) + per-question file."""
    from ragtrain import runtime
    from ragtrain.retrieval.encoder import BiEncoder, EncoderSpec
    from ragtrain.retrieval.metrics import evaluate_retrieval
    from ragtrain.retrieval.search import Retriever
    from ragtrain.retrieval.training import Corpus, check_gold_ids, exact_search

    ec, rc = cfg.evaluation, cfg.retriever
    split = ec.split
    corpus = Corpus.load(paths.corpus)
    rows = _queries(paths, split)
    check_gold_ids(rows, corpus, str(paths.queries(split)))
    questions = [r["question"] for r in rows]
    k = min(max(max(ec.recall_ks), ec.rank_cutoff), len(corpus.ids))
    r = Retriever.load("hybrid", rc, encoder_dir=paths.retriever, index_dir=paths.index,
                       bm25_dir=paths.bm25, corpus_sha256=sha256_file(paths.corpus))
    ranked = {kind: ids for kind, (_, ids) in r.search_all(questions, k).items()}
    base = BiEncoder.from_pretrained(EncoderSpec.from_config(rc))
    with runtime.autocast(runtime.use_bf16(rc.precision)):
        p = base.encode_passages(corpus.texts, cfg.index.encode_batch_size, progress=True)
        q = base.encode_queries(questions, 128)
    ranked["untrained"] = exact_search(q, p, corpus.ids, k)[1]

    gold = [r["gold_passage_ids"] for r in rows]
    answers = [r["answers"] for r in rows]
    metrics: dict[str, float] = {}
    per_q: dict[str, list[dict[str, Any]]] = {}
    for name in ("bm25", "untrained", "dense", "hybrid"):
        m, per_q[name] = evaluate_retrieval(ranked[name], gold, ks=ec.recall_ks,
                                            rank_cutoff=ec.rank_cutoff, split=split,
                                            passages=corpus.raw, answers=answers)
        metrics.update({f"{split}/{name}/{key.split('/', 1)[1]}": v for key, v in m.items()})
        if name == rc.kind:  # the retriever the RAG model uses: unprefixed names
            metrics.update(m)
    with atomic_path(paths.retriever_predictions) as tmp:
        write_jsonl(tmp, (
            {"id": r["id"], "question": r["question"], "gold_passage_ids": r["gold_passage_ids"],
             "top_ids": ranked[rc.kind][i][:10],
             **{f"{name}_gold_rank": per_q[name][i].get("gold_rank") for name in per_q}}
            for i, r in enumerate(rows)))
    atomic_write_json(paths.retriever_metrics, metrics)
    return metrics


# --------------------------------------------------------------------------- generator

RETRIEVE_DEPTH = 20  # passages kept per question by `retrieve` (the generator takes top_k)


def run_retrieve(cfg: Config, paths: Paths) -> dict[str, float]:
    """Top passages of every train / dev / test question with the configured retriever (what
    the generator trains and is evaluated on) -> artifacts/retrieved/{split}.jsonl."""
    from ragtrain.retrieval.metrics import answer_in_passage
    from ragtrain.retrieval.search import Retriever
    from ragtrain.retrieval.training import Corpus

    rc = cfg.retriever
    corpus = Corpus.load(paths.corpus)
    r = Retriever.load(rc.kind, rc, encoder_dir=paths.retriever, index_dir=paths.index,
                       bm25_dir=paths.bm25, corpus_sha256=sha256_file(paths.corpus))
    depth = min(max(RETRIEVE_DEPTH, rc.top_k), len(corpus.ids))
    stats: dict[str, float] = {}
    with atomic_path(paths.retrieved) as tmp:
        tmp.mkdir()
        for split in ("train", "dev", "test"):
            rows = _queries(paths, split)
            if not rows:
                write_jsonl(tmp / f"{split}.jsonl", [])
                continue
            scores, ids = r.search([q["question"] for q in rows], depth)
            write_jsonl(tmp / f"{split}.jsonl", (
                {"id": q["id"], "passage_ids": ids[i],
                 "scores": [round(float(x), 6) for x in scores[i]]}
                for i, q in enumerate(rows)))
            hit = sum(answer_in_passage(q["answers"], " ".join(
                corpus.raw[p] for p in ids[i][:rc.top_k])) for i, q in enumerate(rows))
            stats[f"{split}/answer_recall_at_{rc.top_k}"] = hit / len(rows)
    return stats


def _retrieved(paths: Paths, split: str) -> dict[str, list[str]]:
    p = paths.retrieved_split(split)
    if not p.exists():
        raise source.SourceError(f"{p}: missing; run `ragtrain retrieve` first")
    return {r["id"]: r["passage_ids"] for r in read_jsonl(p)}


GENERATOR_CODE = ("generation/generator", "generation/training", "trainer", "evaluation/answers")


def run_train_generator(cfg: Config, paths: Paths, *, resume: bool = True,
                        on_step: Callable[[int, Mapping[str, float]], None] | None = None,
                        progress: bool = True) -> dict[str, Any]:
    """Fine-tune the generator by MLE on the train questions with their retrieved passages
    (dev F1 picks the best checkpoint) -> artifacts/generator."""
    from ragtrain.generation.generator import Generator
    from ragtrain.generation.rag import load_corpus
    from ragtrain.generation.training import train_generator
    from ragtrain.trainer import prepare_ckpt_dir, seed_everything

    gc = cfg.generator
    corpus = load_corpus(paths.corpus)
    train, dev = _queries(paths, "train"), _queries(paths, "dev")
    retrieved = {**_retrieved(paths, "train"), **_retrieved(paths, "dev")}
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
                            *_code_hashes(GENERATOR_CODE)])
    prepare_ckpt_dir(paths.generator_checkpoints, signature, resume)
    history: list[dict[str, float]] = []

    def step_cb(step: int, logs: Mapping[str, float]) -> None:
        history.append({"step": step, **logs})
        if on_step:
            on_step(step, logs)

    t0 = time.perf_counter()
    state = train_generator(gen, train, dev, retrieved, corpus, gc, top_k=cfg.retriever.top_k,
                            seed=cfg.seed, ckpt_dir=paths.generator_checkpoints, resume=resume,
                            signature=signature, on_step=step_cb,
                            progress=progress)
    seconds = time.perf_counter() - t0
    gen.save(paths.generator)
    metrics: dict[str, Any] = {"train/steps": state.step, "train/seconds": round(seconds, 1),
                               "train/examples": state.step * gc.batch_size * gc.grad_accum_steps}
    if state.history:
        top = max(state.history, key=lambda h: h["dev/f1"])
        metrics.update({k: v for k, v in top.items() if k.startswith("dev/")})
        metrics["dev/best_step"] = top["step"]
    atomic_write_json(paths.generator_train_metrics, metrics)
    points = [{"step": h["step"], "loss": h["train/loss"], "lr": h["train/lr"]}
              for h in history if "train/loss" in h]
    atomic_write_json(paths.generator_train_plot, points)
    return metrics


def run_evaluate(cfg: Config, paths: Paths, *, progress: bool = True) -> dict[str, float]:
    """The RAG model on the held-out split: EM / F1 / accuracy of the trained generator on
    retrieved passages, beside the same generator given the gold passage, the untrained
    generator and a non-learned baseline; answer recall of the passages it read
    -> metrics/generator.json + a per-question table."""
    import evaluate as hf_evaluate

    from ragtrain import runtime
    from ragtrain.evaluation.answers import METRIC_MODULE, score_one, sliding_window_answer
    from ragtrain.generation.generator import Generator
    from ragtrain.generation.rag import load_corpus
    from ragtrain.generation.training import gold_examples, make_examples
    from ragtrain.retrieval.metrics import answer_in_passage
    from ragtrain.trainer import seed_everything

    split, gc, k = cfg.evaluation.split, cfg.generator, cfg.retriever.top_k
    corpus = load_corpus(paths.corpus)
    rows = _queries(paths, split)
    if not rows:
        raise DataError(f"{paths.queries(split)}: no questions to evaluate")
    for i, r in enumerate(rows, 1):
        if not r.get("answers"):
            raise DataError(f"{paths.queries(split)}:{i}: no reference answer to score")
    retrieved = _retrieved(paths, split)
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
    per_s = len(rows) / (time.perf_counter() - t0)
    metrics = score(split, [p.answer for p in preds])
    recall = [answer_in_passage(r["answers"],
                                " ".join(corpus[p][1] for p in retrieved[r["id"]][:k]))
              for r in rows]
    metrics[f"{split}/answer_recall_at_{k}"] = sum(recall) / len(rows)
    metrics[f"{split}/answers_per_s"] = round(per_s, 2)
    metrics[f"{split}/n_questions"] = len(rows)
    metrics[f"{split}/questions_cut"] = sum(p.question_cut for p in preds)
    gold = gen.answer(gold_examples(rows, corpus), gc.eval_batch_size, bf16=bf16,
                      progress=progress)
    metrics.update(score(f"{split}/gold_passage", [p.answer for p in gold]))
    base = [sliding_window_answer(r["question"], corpus[retrieved[r["id"]][0]][1]) for r in rows]
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


# --------------------------------------------------------------------------- registry


def run_register(cfg: Config, paths: Paths) -> dict[str, Any]:
    """Register the RAG model bundle (artifacts/rag) and its parts in MLflow as ``challenger``,
    with its evaluation metrics, in a `register` run -> artifacts/registered.json."""
    from ragtrain.generation.rag import MANIFEST
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
            metrics.update(_numeric(json.loads(m.read_text())))
    questions = [r["question"] for r in _queries(paths, cfg.evaluation.split)[:2]]
    b = paths.bundle
    with tracked(cfg, paths, "register") as run:
        assert run is not None
        reg = registry.register(
            run, cfg.registry, cfg.tracking, bundle=b, manifest=manifest, metrics=metrics,
            components={"retriever": [b / "retriever", b / "index", b / "bm25"],
                        "generator": [b / "generator"]},
            example_questions=questions or ["What is this corpus about?"], root=paths.root)
    out = {"registered": True, "model": reg.name, "version": reg.version,
           "alias": registry.CHALLENGER, "run_id": reg.run_id,
           **{f"{c}_version": v for c, v in reg.components.items()},
           "tracking_uri": cfg.tracking.uri}
    atomic_write_json(paths.registered, out)
    return out


def load_registered_rag(cfg: Config, paths: Paths, alias: str = "champion") -> tuple[str, Any]:
    """(version, RAGModel) of ``registry.model_name@alias`` from the MLflow registry, loaded
    the way `mlflow models serve` loads it."""
    tracking.check_store(cfg.tracking.uri, root=paths.root)
    with tempfile.TemporaryDirectory() as tmp:  # every part is in memory once loaded
        return tracking.load_rag_model(cfg.tracking, cfg.registry.model_name, alias, Path(tmp),
                                       root=paths.root)


# --------------------------------------------------------------------------- tracking

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
    with tracking.run(cfg.tracking, name, root=paths.root, tags=tags,
                      parent_run_id=os.environ.get(PARENT_RUN_ENV) or None) as run:
        run.log_params(flatten(to_dict(cfg)))
        yield run


def _numeric(d: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in d.items()
            if isinstance(v, int | float) and not isinstance(v, bool)}


def _log_training(run: tracking.RunHandle, result: Any, metrics: Path, plot: Path, spec: Path,
                  what: str, curves: list[str]) -> None:
    """A training stage's run: final metrics, the metrics file, the loss curve, the model spec."""
    run.log_metrics(_numeric(result))
    run.log_artifact(metrics)
    points = json.loads(plot.read_text())
    if points:
        with tempfile.TemporaryDirectory() as tmp:
            png = Path(tmp) / f"train_{what}_loss.png"
            tracking.plot_curve(points, "step", curves, png, f"{what} training loss")
            run.log_artifact(png, "plots")
    run.log_dict(json.loads(spec.read_text()), spec.name)


def _log_outputs(run: tracking.RunHandle, name: str, cfg: Config, paths: Paths,
                 result: Any) -> None:
    """What each stage leaves in its MLflow run: metrics, plots, tables, datasets."""

    if name == "fetch":
        run.log_dict(result, "source.json")
        payload = paths.raw / result["file"]
        if payload.is_file():
            run.log_input_dataset(result["source"], payload,
                                  result["sha256_payload"] or result["sha256_file"], "raw")
    elif name == "prepare":
        run.log_metrics(_numeric(result))
        run.log_artifact(paths.prepare_metrics)
        for split in ("train", "dev", "test"):
            run.log_input_dataset(f"{split}.jsonl", paths.queries(split),
                                  sha256_file(paths.queries(split)), split)
        run.log_input_dataset("corpus.jsonl", paths.corpus, sha256_file(paths.corpus), "corpus")
    elif name == "train-retriever":
        _log_training(run, result, paths.retriever_train_metrics, paths.retriever_train_plot,
                      paths.retriever / "retriever.json", "retriever", ["loss"])
    elif name == "build-index":
        meta = json.loads((paths.index / "meta.json").read_text())
        run.log_dict(meta, "index_meta.json")
        run.set_tags({"ragtrain.encoder_fingerprint": meta.get("encoder_fingerprint", ""),
                      "ragtrain.corpus_sha256": meta.get("corpus_sha256", "")})
    elif name == "eval-retriever":
        split = cfg.evaluation.split
        run.log_metrics(_numeric(result))
        run.log_artifact(paths.retriever_metrics)
        run.log_artifact(paths.retriever_predictions, "predictions")
        with tempfile.TemporaryDirectory() as tmp:
            png = Path(tmp) / "recall_at_k.png"
            tracking.plot_recall_at_k(result, split, png,
                                      ["bm25", "untrained", "dense", "hybrid"])
            run.log_artifact(png, "plots")
        run.log_input_dataset(f"{split}.jsonl", paths.queries(split),
                              sha256_file(paths.queries(split)), "evaluation")
    elif name == "retrieve":
        run.log_metrics(_numeric(result))
    elif name == "train-generator":
        _log_training(run, result, paths.generator_train_metrics, paths.generator_train_plot,
                      paths.generator / "generator.json", "generator", ["loss", "lr"])
    elif name == "evaluate":
        split = cfg.evaluation.split
        run.log_metrics(_numeric(result))
        run.log_artifact(paths.generator_metrics)
        run.log_artifact(paths.generator_predictions, "predictions")  # per-question table
        run.log_input_dataset(f"{split}.jsonl", paths.queries(split),
                              sha256_file(paths.queries(split)), "evaluation")
    elif name == "package":
        run.log_dict(result, "rag_manifest.json")


STAGES: dict[str, Callable[..., Any]] = {
    "fetch": run_fetch,
    "prepare": run_prepare,
    "build-bm25": run_build_bm25,
    "train-retriever": run_train_retriever,
    "build-index": run_build_index,
    "eval-retriever": run_eval_retriever,
    "retrieve": run_retrieve,
    "train-generator": run_train_generator,
    "evaluate": run_evaluate,
    "package": run_package,
}


def run_stage(name: str, cfg: Config, paths: Paths, **kwargs: Any) -> Any:
    """Run a stage inside its MLflow run (what the CLI, hence dvc.yaml, calls)."""
    with tracked(cfg, paths, name) as run:
        if run is not None and name in ("train-retriever", "train-generator"):
            kwargs["on_step"] = lambda step, logs: run.log_metrics(logs, step=step)
        result = STAGES[name](cfg, paths, **kwargs)
        if run is not None:
            _log_outputs(run, name, cfg, paths, result)
    return result


def dvc_executable() -> str:
    return shutil.which("dvc") or str(Path(sys.executable).parent / "dvc")


@contextlib.contextmanager
def workspace_lock(root: Path) -> Iterator[None]:
    """One pipeline run per workspace at a time: a second one fails at once with "busy"."""
    import fcntl

    path = root / ".ragtrain.lock"
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise RagtrainError(
                f"workspace busy: a pipeline run ({holder}) holds {path}; wait for it to end, "
                "or run in another clone of the repo") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}")
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def pipeline_run(cfg: Config, paths: Paths
                 ) -> Iterator[tuple[tracking.RunHandle | None, dict[str, str]]]:
    """The parent MLflow run of one pipeline run: yields (run, environment for the stage
    processes, which nest their runs under it); on success logs lineage (git, the dvc.lock
    hashes as they are now) and the metrics files. Holds the workspace lock throughout."""
    # the stage commands (`ragtrain ...` in dvc.yaml) run from this interpreter's environment
    env = {**os.environ,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    with workspace_lock(paths.root):
        if not cfg.tracking.enabled:
            yield None, env
            return
        with tracking.run(cfg.tracking, "pipeline", root=paths.root,
                          tags={"ragtrain.stage": "pipeline"}) as run:
            run.log_params(flatten(to_dict(cfg)))
            yield run, {**env, PARENT_RUN_ENV: run.run_id}
            run.set_tags(tracking.lineage(paths.root))
            for f in sorted(paths.metrics.glob("*.json")):
                run.log_metrics(_numeric(json.loads(f.read_text())))
                run.log_artifact(f, "metrics")


def run_pipeline(cfg: Config, paths: Paths, dvc_args: list[str] | None = None) -> str | None:
    """`dvc repro` under one parent MLflow run (see ``pipeline_run``)."""
    with pipeline_run(cfg, paths) as (run, env):
        r = subprocess.run([dvc_executable(), "repro", *(dvc_args or [])], cwd=paths.root,
                           env=env)
        if r.returncode:
            raise RagtrainError(f"dvc repro failed (exit status {r.returncode})" + (
                f"; the MLflow run {run.run_id} is marked FAILED" if run else ""))
    return run.run_id if run else None


def dag_order(root: Path) -> list[str]:
    """The stages of dvc.yaml in dependency order (an out feeding a dep comes first): the one
    DAG, read from the file DVC runs, so the Prefect flow cannot drift from `dvc repro`."""
    import yaml

    spec = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]

    def paths_of(entries: list[Any]) -> list[str]:
        return [next(iter(e)) if isinstance(e, dict) else e for e in entries or []]

    outs = {name: paths_of(st.get("outs")) + paths_of(st.get("metrics"))
            + paths_of(st.get("plots")) for name, st in spec.items()}
    needs: dict[str, set[str]] = {}
    for name, st in spec.items():
        deps = paths_of(st.get("deps"))
        needs[name] = {other for other, o in outs.items() if other != name and any(
            d == x or d.startswith(x.rstrip("/") + "/") or x.startswith(d.rstrip("/") + "/")
            for d in deps for x in o)}
    order: list[str] = []
    while len(order) < len(spec):
        ready = [n for n in spec if n not in order and needs[n] <= set(order)]
        if not ready:
            raise RagtrainError("dvc.yaml: the stages form a cycle")
        order.append(ready[0])
    return order
