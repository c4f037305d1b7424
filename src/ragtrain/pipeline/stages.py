"""The stage table: every pipeline stage declared once.

Each ``Stage`` names its function, its CLI help and summary, its DVC params, data deps and
outputs, what it logs to MLflow, and whether it trains (takes ``--resume``). The CLI makes one
subcommand per entry, ``run_stage`` logs each through its own ``log`` function, and dvc.yaml is
generated from the table (``ragtrain dag --write``), its code deps being each function's import
closure (``pipeline.code``), the same files that fingerprint a training checkpoint.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ragtrain import distributed, tracking
from ragtrain.config import Config, RerankerConfig
from ragtrain.pipeline import tracked as log
from ragtrain.pipeline.code import code_files, repo_path
from ragtrain.pipeline.data import run_fetch, run_prepare
from ragtrain.pipeline.generation import run_evaluate, run_package, run_train_generator
from ragtrain.pipeline.joint import run_train_rag
from ragtrain.pipeline.paths import Paths
from ragtrain.pipeline.registry import run_register
from ragtrain.pipeline.report import describe_report, run_report
from ragtrain.pipeline.reranking import run_teacher_scores, run_train_reranker
from ragtrain.pipeline.retrieval import (
    run_build_bm25,
    run_build_index,
    run_eval_retriever,
    run_retrieve,
    run_retrieve_unanswerable,
    run_train_retriever,
)
from ragtrain.pipeline.timing import read_timings, record_timings

LogFn = Callable[[tracking.RunHandle, Config, Paths, Any], None]


@dataclass(frozen=True)
class Plot:
    """A DVC plot file (cache: false) and its axes."""

    path: str
    x: str
    y: str


@dataclass(frozen=True)
class Option:
    """A CLI option of a stage's subcommand, passed to its function as ``dest=`` when given."""

    flags: tuple[str, ...]
    dest: str
    help: str
    type: Callable[[str], Any] = str


@dataclass(frozen=True)
class Stage:
    """One pipeline stage: what runs, what DVC tracks, what MLflow gets, what the CLI prints."""

    name: str  # the CLI subcommand; the dvc.yaml stage is the same with `_`
    fn: Callable[..., Any]  # run_*(cfg, paths, **kw)
    help: str
    summary: Callable[[Config, Paths, Any], str]  # the CLI's report of the result
    params: tuple[str, ...] = ()
    deps: tuple[str, ...] = ()  # data deps; the code deps are fn's import closure
    outs: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ()  # cache: false
    plots: tuple[Plot, ...] = ()
    log: LogFn | None = None  # what it leaves in its MLflow run besides the config
    resume: bool = False  # a training stage: --resume, per-step metrics (on_step)
    # runs as RAGTRAIN_NPROC_PER_NODE processes under torchrun (also every training stage)
    parallel: bool = False
    own_run: bool = False  # opens its MLflow run itself (only when it has work to log)
    # the config leaves it nothing to do (it writes its DISABLED marker): no MLflow run, whose
    # start-up (~2.5 s of importing MLflow) would be most of its time
    idle: Callable[[Config], bool] | None = None
    extra_code: tuple[str, ...] = ()  # package files loaded by path, not imported
    comment: str = ""  # explains the stage in dvc.yaml
    options: tuple[Option, ...] = ()  # extra CLI options (not used by dvc.yaml's cmd)

    @property
    def multiprocess(self) -> bool:
        """Whether RAGTRAIN_NPROC_PER_NODE > 1 relaunches it under torchrun."""
        return self.parallel or self.resume

    def is_idle(self, cfg: Config) -> bool:
        """Whether ``cfg`` leaves it nothing to do but write its DISABLED marker."""
        return self.idle is not None and self.idle(cfg)

    @property
    def dvc_name(self) -> str:
        return self.name.replace("-", "_")

    @property
    def cmd(self) -> str:
        return f"ragtrain {self.name}" + (" --resume" if self.resume else "")

    def code(self) -> list[str]:
        """The package files this stage runs (src/ragtrain/...), sorted."""
        return [repo_path(f) for f in code_files(self.fn, self.extra_code)]


def _fmt(m: dict[str, Any], spec: str) -> str:
    return ", ".join(f"{k}={v:{spec}}" for k, v in m.items())


def _say_prepare(cfg: Config, paths: Paths, stats: dict[str, Any]) -> str:
    lines = [f"prepared {paths.prepared}:"]
    for split in ("train", "dev", "test"):
        lines.append(f"  {split:5s}: {stats[f'{split}/documents']:>6} documents "
                     f"{stats[f'{split}/questions']:>8} questions")
    lines.append(f"  corpus: {stats['data/passages']} passages from {stats['data/documents']} "
                 f"documents ({stats['data/passages_merged']} duplicates merged); "
                 f"{stats['data/questions']} questions, {stats['data/labels_lost']} gold labels "
                 "lost")
    return "\n".join(lines)


def _say_eval_retriever(cfg: Config, paths: Paths, m: dict[str, float]) -> str:
    split, ec = cfg.evaluation.split, cfg.evaluation
    cols = [f"recall_at_{k}" for k in ec.recall_ks] + [
        f"mrr_at_{ec.rank_cutoff}", f"ndcg_at_{ec.rank_cutoff}"]
    used = cfg.retriever.kind + (" reranked" if cfg.reranker.enabled else "")
    lines = [f"{split} retrieval ({int(m[f'{split}/n_questions'])} questions; "
             f"the RAG model uses {used}):",
             f"  {'':10s}" + "".join(f"{c:>14s}" for c in cols)]
    names = ("bm25", "untrained", "dense", "hybrid") + (
        ("reranked",) if f"{split}/reranked/n_questions" in m else ())
    for n in names:
        lines.append(f"  {n:10s}" + "".join(f"{m.get(f'{split}/{n}/{c}', float('nan')):14.4f}"
                                            for c in cols))
    return "\n".join(lines)


def _say_evaluate(cfg: Config, paths: Paths, m: dict[str, float]) -> str:
    split, k = cfg.evaluation.split, cfg.retriever.top_k
    if m.get("generator/enabled") == 0:
        return (f"no generator ({paths.generator_disabled}): nothing to score; the retriever's "
                f"metrics are in {paths.retriever_metrics}")
    lines = [f"{split}: {int(m[f'{split}/n_questions'])} questions, top-{k} "
             f"{cfg.retriever.kind} passages (answer recall "
             f"{m[f'{split}/answer_recall_at_{k}']:.3f})",
             f"  {'':28s}{'EM':>8s}{'F1':>8s}{'acc':>8s}"]
    for name, label in (("", "RAG (trained generator)"),
                        ("gold_passage/", "  same, gold passage given"),
                        ("untrained/", "untrained generator"),
                        ("baseline_window/", "sliding-window baseline")):
        lines.append(f"  {label:28s}" + "".join(f"{m[f'{split}/{name}{x}']:8.2f}"
                                                for x in ("em", "f1", "accuracy")))
    lines.append(f"  per question: {paths.generator_predictions}")
    return "\n".join(lines)


def _say_register(cfg: Config, paths: Paths, r: dict[str, Any]) -> str:
    if not r["registered"]:
        return f"nothing registered: {r['reason']}"
    parts = ", ".join(f"{k.removesuffix('_version')} v{v}" for k, v in r.items()
                      if k.endswith("_version"))
    return (f"registered {r['model']} version {r['version']} as @{r['alias']} ({parts}; "
            f"MLflow run {r['run_id']}); `ragtrain promote` makes it the champion if it wins")


_RESUME_NOTE = ("--resume: a run killed mid-way continues from its last checkpoint (checkpoints/ "
                "is not\nan output, so DVC does not delete it); a changed config or data starts "
                "over.")

# what reranking at inference reads (the trained model itself is artifacts/reranker)
_RERANK_PARAMS = ("reranker.enabled", "reranker.candidates", "reranker.fuse_weight",
                  "reranker.max_windows", "reranker.precision", "reranker.eval_batch_size",
                  "reranker.runtime")
# what encoding questions or passages with the trained bi-encoder reads
_ENCODE_PARAMS = ("retriever.precision", "retriever.runtime")
# train-reranker: every reranker key but those only reranking at inference reads, so that
# trying another max_windows or runtime does not retrain it (tests/test_stage_declarations.py)
_RERANK_TRAIN_PARAMS = tuple(f"reranker.{f.name}" for f in fields(RerankerConfig)
                             if f.name not in RerankerConfig.INFERENCE_ONLY)

STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("fetch", run_fetch,
          "copy or download data.source into data/raw and verify its sha256",
          lambda c, p, m: f"fetched {m['source']} -> {p.raw / m['file']} "
                          f"(sha256 {m['sha256_file']})",
          params=("data.source", "data.sha256"), outs=("data/raw",), log=log.log_fetch),
    Stage("prepare", run_prepare,
          "read, validate, chunk and split the data into data/prepared", _say_prepare,
          params=("data.format", "data.chunk_tokens", "data.chunk_overlap",
                  "data.chunk_tokenizer", "data.dedup_passages", "data.split_seed",
                  "data.dev_fraction", "data.test_fraction"),
          deps=("data/raw",), outs=("data/prepared",), metrics=("metrics/prepare.json",),
          log=log.log_prepare),
    Stage("build-bm25", run_build_bm25, "build the BM25 index over the corpus",
          lambda c, p, out: f"built BM25 index {out}",
          deps=("data/prepared/corpus.jsonl",), outs=("artifacts/bm25",)),
    Stage("train-reranker", run_train_reranker,
          "fine-tune the cross-encoder reranker on BM25 hard negatives (reranker.enabled)",
          lambda c, p, m: (f"trained reranker -> {p.reranker}: " + _fmt(m, ".4g"))
          if c.reranker.enabled else f"reranker disabled (reranker.enabled: false) -> "
                                     f"{p.reranker_disabled}",
          params=("seed", *_RERANK_TRAIN_PARAMS), deps=("data/prepared", "artifacts/bm25"),
          idle=lambda c: not c.reranker.enabled,
          outs=("artifacts/reranker",), metrics=("metrics/train_reranker.json",),
          plots=(Plot("plots/train_reranker.json", "step", "loss"),),
          log=log.log_train_reranker, resume=True,
          comment="reranker.enabled: false writes artifacts/reranker/DISABLED.json (no model)\n"
                  + _RESUME_NOTE),
    Stage("teacher-scores", run_teacher_scores,
          "score train questions' candidates with the reranker (retriever.loss: distill)",
          lambda c, p, m: (f"teacher scores -> {p.teacher_scores}: " + _fmt(m, "g"))
          if m.get("teacher/enabled") else f"no teacher (retriever.loss: {c.retriever.loss}) "
                                           f"-> {p.teacher_scores}/DISABLED.json",
          idle=lambda c: c.retriever.loss != "distill",
          params=("retriever.loss", "retriever.hard_negative_depth",
                  "retriever.hard_negatives_per_query", "reranker.precision",
                  "reranker.eval_batch_size", "reranker.runtime"),
          deps=("data/prepared", "artifacts/bm25", "artifacts/reranker"),
          outs=("artifacts/teacher_scores",), log=log.log_metrics,
          comment="the reranker's logits over each train question's gold passage and BM25 hard "
                  "negatives,\nwhat retriever.loss: distill learns from; any other loss writes "
                  "DISABLED.json only"),
    Stage("train-retriever", run_train_retriever,
          "fine-tune the dense retriever (contrastive, hard negatives)",
          lambda c, p, m: f"trained retriever -> {p.retriever}: " + _fmt(m, ".4g"),
          params=("seed", "retriever"), deps=("data/prepared", "artifacts/teacher_scores"),
          outs=("artifacts/retriever",), metrics=("metrics/train_retriever.json",),
          plots=(Plot("plots/train_retriever.json", "step", "loss"),),
          log=log.log_train_retriever, resume=True, comment=_RESUME_NOTE),
    Stage("build-index", run_build_index, "encode the corpus and build the FAISS index",
          lambda c, p, out: f"built {c.index.kind} index {out}",
          params=("seed", "index", *_ENCODE_PARAMS),  # seed: IVF / PQ training
          deps=("data/prepared/corpus.jsonl", "artifacts/retriever"),
          outs=("artifacts/embeddings", "artifacts/index"), log=log.log_build_index,
          parallel=True),
    Stage("eval-retriever", run_eval_retriever,
          "recall@k / MRR / nDCG of BM25, untrained, trained, hybrid (and reranked) retrieval",
          _say_eval_retriever,
          params=("evaluation", "retriever.kind", "retriever.hybrid", *_RERANK_PARAMS,
                  *_ENCODE_PARAMS,  # and what the untrained baseline encodes with:
                  "retriever.model_name", "retriever.pooling", "retriever.shared_encoder",
                  "retriever.query_max_length", "retriever.passage_max_length",
                  "index.window_words", "index.window_stride", "index.encode_batch_size"),
          deps=("data/prepared", "artifacts/bm25", "artifacts/retriever", "artifacts/index",
                "artifacts/reranker"),
          outs=("artifacts/eval/retriever_test.jsonl",), metrics=("metrics/retriever.json",),
          log=log.log_eval_retriever),
    Stage("retrieve", run_retrieve,
          "retrieve the top passages of every question (generator input)",
          lambda c, p, m: f"retrieved top passages -> {p.retrieved}: " + _fmt(m, ".4f"),
          params=("retriever.kind", "retriever.top_k", "retriever.hybrid", *_RERANK_PARAMS,
                  *_ENCODE_PARAMS),
          deps=("data/prepared", "artifacts/bm25", "artifacts/retriever", "artifacts/index",
                "artifacts/reranker"),
          outs=("artifacts/retrieved",), log=log.log_metrics,
          comment="the top passages of every question: what the generator trains and is "
                  "evaluated on"),
    Stage("retrieve-unanswerable", run_retrieve_unanswerable,
          "abstention.enabled: dev / test questions searched without their articles",
          lambda c, p, m: f"unanswerable questions retrieved -> {p.unanswerable}: "
                          + _fmt(m, ".4f") if m.get("abstention/enabled")
          else f"abstention disabled -> {p.unanswerable}/DISABLED.json",
          idle=lambda c: not c.abstention.enabled,
          params=("seed", "abstention", "retriever.kind", "retriever.top_k",
                  "retriever.hybrid", *_RERANK_PARAMS, *_ENCODE_PARAMS),
          deps=("data/prepared", "artifacts/bm25", "artifacts/retriever", "artifacts/index",
                "artifacts/reranker"),
          outs=("artifacts/unanswerable",), log=log.log_metrics,
          comment="abstention.enabled: sampled dev / test questions searched without their "
                  "split's articles,\nwhat the threshold is chosen on (dev) and the correct "
                  "abstentions are counted on (test);\noff: DISABLED.json only"),
    Stage("train-generator", run_train_generator,
          "fine-tune the generator by maximum likelihood on retrieved passages",
          lambda c, p, m: f"trained {c.generator.kind} generator -> {p.generator}: "
                          + _fmt(m, ".4g") if m.get("generator/enabled") != 0
          else f"generator skipped -> {p.generator_disabled}",
          params=("seed", "retriever.top_k", "generator",
                  "evaluation.split"),  # no answers there: no generator
          deps=("data/prepared", "artifacts/retrieved"), outs=("artifacts/generator",),
          comment="data without reference answers (BEIR) or generator.enabled: false writes "
                  "artifacts/generator/DISABLED.json\n(no model); mixed data trains on the "
                  "questions with answers\n" + _RESUME_NOTE,
          metrics=("metrics/train_generator.json",),
          plots=(Plot("plots/train_generator.json", "step", "loss"),),
          log=log.log_train_generator, resume=True),
    Stage("train-rag", run_train_rag,
          "train query encoder + generator jointly (RAG marginal likelihood; joint.enabled)",
          lambda c, p, m: ("trained RAG jointly -> artifacts/rag_joint: " + _fmt(
              {k: v for k, v in m.items() if "/joint" in k or "/pipeline" in k}, ".4g"))
          if c.joint.enabled else "joint training disabled (joint.enabled: false) -> "
                                  "artifacts/rag_joint/DISABLED.json",
          idle=lambda c: not c.joint.enabled,
          params=("seed", "joint", "evaluation", "retriever.kind", "retriever.top_k",
                  "retriever.hybrid", *_ENCODE_PARAMS),
          deps=("data/prepared", "artifacts/bm25", "artifacts/retriever", "artifacts/embeddings",
                "artifacts/index", "artifacts/generator"),
          outs=("artifacts/rag_joint",), metrics=("metrics/train_rag.json",),
          plots=(Plot("plots/train_rag.json", "step", "loss"),),
          log=log.log_train_rag, resume=True,
          comment="joint.enabled: false writes artifacts/rag_joint/DISABLED.json (no model); on, "
                  "it also\nevaluates the joint and the pipeline-trained models side by side "
                  "(dev/test R@k, test EM/F1)\n" + _RESUME_NOTE),
    Stage("evaluate", run_evaluate,
          "EM / F1 / accuracy of the RAG model on the held-out split", _say_evaluate,
          params=("seed", "evaluation.split", "retriever.top_k", "generator", "abstention"),
          deps=("data/prepared", "artifacts/retrieved", "artifacts/generator",
                "artifacts/unanswerable", "artifacts/retriever"),
          outs=("artifacts/eval/generator_test.jsonl",), metrics=("metrics/generator.json",),
          log=log.log_evaluate, extra_code=("evaluation/rag_qa/rag_qa.py",)),
    Stage("package", run_package,
          "assemble the self-contained RAG model bundle (artifacts/rag)",
          lambda c, p, m: (f"RAG model bundle -> {p.bundle}" if m.get("kind") != "retriever"
                           else f"retriever model bundle (no generator: ranked passages) -> "
                                f"{p.bundle}") + (" (reranking)" if m.get("reranker") else ""),
          params=("retriever", "generator.precision", "generator.answer_from",
                  "generator.answer_weight", "generator.answer_null_weight", "evaluation.split",
                  "abstention.enabled", *_RERANK_PARAMS,
                  "index.device", "index.mmap"),  # the manifest records how to search
          deps=("data/prepared", "artifacts/bm25", "artifacts/retriever", "artifacts/index",
                "artifacts/generator", "metrics/generator.json", "artifacts/reranker"),
          outs=("artifacts/rag",), log=log.log_package,
          comment="the self-contained RAG model (retriever + index + BM25 + generator + corpus "
                  "+ manifest;\nwith reranker.enabled the reranker too; without a generator "
                  "(data without answers) a retriever model)"),
    Stage("register", run_register,
          "register the RAG model (artifacts/rag) in MLflow as the challenger",
          _say_register,
          params=("registry", "tracking", "evaluation.split"),  # + its questions: the examples
          deps=("artifacts/rag", "metrics/retriever.json", "metrics/generator.json",
                "data/prepared"),
          outs=("artifacts/registered.json",), own_run=True,
          comment="the RAG model and its parts into the MLflow registry as `challenger` "
                  "(registry.register:\nfalse skips it); `ragtrain promote` makes it the "
                  "champion if it beats the current one"),
    Stage("report", run_report,
          "the run report: one self-contained HTML page (metrics beside the champion's, "
          "curves, failures, every question, lineage)",
          lambda c, p, r: describe_report(r),
          params=tuple(f.name for f in fields(Config)),  # it shows every param
          deps=("metrics/retriever.json", "metrics/generator.json",
                "metrics/train_retriever.json", "metrics/train_generator.json",
                "metrics/train_reranker.json", "plots/train_retriever.json",
                "plots/train_generator.json", "plots/train_reranker.json",
                "artifacts/eval/retriever_test.jsonl", "artifacts/eval/generator_test.jsonl",
                "data/prepared/corpus.jsonl", "artifacts/registered.json"),
          outs=("reports/report.html",), log=log.log_report,
          options=(Option(("-o", "--output"), "output", "write the report here instead of "
                          "reports/report.html", Path),),
          comment="the pipeline's last stage; it compares with the registry's champion of the "
                  "moment: after\n`ragtrain promote`, `ragtrain report` redraws it"),
)}


def run_stage(name: str, cfg: Config, paths: Paths, **kwargs: Any) -> Any:
    """Run a stage inside its MLflow run (what the CLI, hence dvc.yaml, calls)."""
    stage = STAGES[name]
    if not distributed.is_main():  # a torchrun worker: it trains beside rank 0, which alone
        return stage.fn(cfg, paths, **kwargs)  # tracks, times and writes the outputs
    t0 = time.perf_counter()
    before = read_timings(paths.timings)
    if stage.own_run or stage.is_idle(cfg):
        result = stage.fn(cfg, paths, **kwargs)
        record_timings(paths.timings, {f"{stage.dvc_name}/wall_seconds": time.perf_counter() - t0})
        return result
    with log.tracked(cfg, paths, name) as run:
        if run is not None and stage.resume:
            kwargs["on_step"] = lambda step, logs: run.log_metrics(logs, step=step)
        result = stage.fn(cfg, paths, **kwargs)
        if run is not None and stage.log is not None:
            stage.log(run, cfg, paths, result)
        record_timings(paths.timings, {f"{stage.dvc_name}/wall_seconds": time.perf_counter() - t0})
        if run is not None:  # this stage's figures (wall time, training time, answers/s)
            after = read_timings(paths.timings)
            run.log_metrics({k: v for k, v in after.items()
                             if k.startswith(f"{stage.dvc_name}/") and before.get(k) != v})
    return result


def dvc_yaml() -> str:
    """dvc.yaml as the table declares it (``ragtrain dag --write`` writes it)."""
    out = ["# The pipeline DAG, generated from the stage table (src/ragtrain/pipeline/stages.py)",
           "# by `ragtrain dag --write`: edit the table, not this file. `dvc repro` runs it; the",
           "# Prefect flows run these same stages through DVC. Each stage's code deps are the",
           "# import closure of its function, so a code change reruns exactly the stages it "
           "affects.",
           "stages:"]
    for s in STAGES.values():
        out.append(f"  {s.dvc_name}:")
        out += [f"    # {line}" for line in s.comment.splitlines()]
        out.append(f"    cmd: {s.cmd}")
        for key, items in (("params", s.params), ("deps", (*s.deps, *s.code())),
                           ("outs", s.outs)):
            if items:
                out += [f"    {key}:", *(f"      - {x}" for x in items)]
        if s.metrics:
            out.append("    metrics:")
            out += [f"      - {m}:\n          cache: false" for m in s.metrics]
        if s.plots:
            out.append("    plots:")
            out += [f"      - {p.path}:\n          cache: false\n          x: {p.x}\n"
                    f"          y: {p.y}" for p in s.plots]
    return "\n".join(out) + "\n"


def check_dvc_yaml(root: Path) -> list[str]:
    """The stages whose entry in ``root``/dvc.yaml differs from the table (empty: up to date)."""
    import yaml

    f = root / "dvc.yaml"
    have = yaml.safe_load(f.read_text())["stages"] if f.is_file() else {}
    want = yaml.safe_load(dvc_yaml())["stages"]
    return sorted(n for n in {*have, *want} if have.get(n) != want.get(n))
