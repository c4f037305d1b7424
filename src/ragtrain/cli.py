"""`ragtrain <stage>`: a thin argparse layer over stages.py (dvc.yaml calls these)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from ragtrain import stages
from ragtrain.config import (
    DEFAULT_PARAMS,
    Config,
    dump_yaml,
    load_config,
    parse_override,
    set_params,
    to_dict,
)
from ragtrain.errors import RagtrainError


def _print_stats(stats: dict[str, float | int]) -> None:
    for split in ("train", "dev", "test"):
        print(f"  {split:5s}: {stats[f'{split}/documents']:>6} documents "
              f"{stats[f'{split}/questions']:>8} questions")
    print(f"  corpus: {stats['data/passages']} passages from {stats['data/documents']} documents "
          f"({stats['data/passages_merged']} duplicates merged); "
          f"{stats['data/questions']} questions, {stats['data/labels_lost']} gold labels lost")


def _cmd_fetch(cfg: Config, paths: stages.Paths, args: argparse.Namespace) -> None:
    m = stages.run_stage("fetch", cfg, paths)
    print(f"fetched {m['source']} -> {paths.raw / m['file']} (sha256 {m['sha256_file']})")


def _cmd_prepare(cfg: Config, paths: stages.Paths, args: argparse.Namespace) -> None:
    stats = stages.run_stage("prepare", cfg, paths)
    print(f"prepared {paths.prepared}:")
    _print_stats(stats)


def _cmd_build_bm25(cfg: Config, paths: stages.Paths, args: argparse.Namespace) -> None:
    print(f"built BM25 index {stages.run_stage('build-bm25', cfg, paths)}")


def _cmd_train_retriever(cfg: Config, paths: stages.Paths, args: argparse.Namespace) -> None:
    m = stages.run_stage("train-retriever", cfg, paths, resume=args.resume)
    print(f"trained retriever -> {paths.retriever}: " + ", ".join(
        f"{k}={v:.4g}" for k, v in m.items()))


def _cmd_build_index(cfg: Config, paths: stages.Paths, args: argparse.Namespace) -> None:
    print(f"built {cfg.index.kind} index {stages.run_stage('build-index', cfg, paths)}")


def _cmd_eval_retriever(cfg: Config, paths: stages.Paths, args: argparse.Namespace) -> None:
    m = stages.run_stage("eval-retriever", cfg, paths)
    split = cfg.evaluation.split
    names = ("bm25", "untrained", "dense", "hybrid")
    cols = [f"recall_at_{k}" for k in cfg.evaluation.recall_ks] + [
        f"mrr_at_{cfg.evaluation.rank_cutoff}", f"ndcg_at_{cfg.evaluation.rank_cutoff}"]
    print(f"{split} retrieval ({int(m[f'{split}/n_questions'])} questions; "
          f"the RAG model uses {cfg.retriever.kind}):")
    print(f"  {'':10s}" + "".join(f"{c:>14s}" for c in cols))
    for n in names:
        print(f"  {n:10s}" + "".join(f"{m.get(f'{split}/{n}/{c}', float('nan')):14.4f}"
                                     for c in cols))


def _cmd_pipeline(cfg: Config, paths: stages.Paths, args: argparse.Namespace) -> None:
    run_id = stages.run_pipeline(cfg, paths, args.dvc_args)
    if run_id:
        print(f"pipeline MLflow run {run_id} ({cfg.tracking.uri}, experiment "
              f"{cfg.tracking.experiment!r}); see it with `make mlflow-ui`")


def _cmd_config_show(cfg: Config, paths: stages.Paths, args: argparse.Namespace) -> None:
    d = to_dict(cfg)
    print(json.dumps(d, indent=2) if args.format == "json" else dump_yaml(d), end="")
    if args.format == "json":
        print()


def _cmd_params_set(cfg: Config, paths: stages.Paths, args: argparse.Namespace) -> None:
    assignments = dict(parse_override(a) for a in args.assignments)
    set_params(args.params, assignments)
    for k, v in assignments.items():
        print(f"{args.params}: {k} = {v!r}")


STAGES: dict[str, tuple[Callable[..., None], str]] = {
    "fetch": (_cmd_fetch, "copy or download data.source into data/raw and verify its sha256"),
    "prepare": (_cmd_prepare, "read, validate, chunk and split the data into data/prepared"),
    "build-bm25": (_cmd_build_bm25, "build the BM25 index over the corpus"),
    "train-retriever": (_cmd_train_retriever,
                        "fine-tune the dense retriever (contrastive, hard negatives)"),
    "build-index": (_cmd_build_index, "encode the corpus and build the FAISS index"),
    "eval-retriever": (_cmd_eval_retriever,
                       "recall@k / MRR / nDCG of BM25, untrained, trained and hybrid retrieval"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ragtrain",
        description="Train, evaluate and track RAG models. Pipeline stages (run them all with "
        "`dvc repro`): " + ", ".join(STAGES) + ".",
    )
    p.add_argument("-p", "--params", type=Path, default=DEFAULT_PARAMS,
                   help="params file (default: params.yaml)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (fn, help_) in STAGES.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.set_defaults(fn=fn)
        if name == "train-retriever":
            sp.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                            help="continue from the last checkpoint of the same run, if any "
                            "(default: on; --no-resume starts over)")

    pl = sub.add_parser("pipeline", help="run `dvc repro` under one parent MLflow run "
                        "(the stages it runs nest under it)")
    pl.add_argument("dvc_args", nargs=argparse.REMAINDER, metavar="DVC_REPRO_ARGS",
                    help="passed to dvc repro, e.g. train_retriever")
    pl.set_defaults(fn=_cmd_pipeline)

    cp = sub.add_parser("config", help="show the effective config")
    csub = cp.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = csub.add_parser("show", help="print the effective config (params.yaml + defaults)")
    show.add_argument("--format", choices=("yaml", "json"), default="yaml")
    show.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                      help="preview an override (not saved)")
    show.set_defaults(fn=_cmd_config_show)

    pp = sub.add_parser("params", help="edit params.yaml (validated, comments kept)")
    psub = pp.add_subparsers(dest="params_command", required=True, metavar="ACTION")
    ps = psub.add_parser("set", help="set KEY=VALUE in params.yaml, e.g. data.source=/path")
    ps.add_argument("assignments", nargs="+", metavar="KEY=VALUE")
    ps.set_defaults(fn=_cmd_params_set, skip_load=True)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # MLflow logs at INFO (e.g. on creating the sqlite store): keep stderr for ragtrain's own
    # messages. MLflow sets its level from this variable when it is imported.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        if getattr(args, "skip_load", False):
            cfg = None
        else:
            overrides = dict(parse_override(s) for s in getattr(args, "set", []))
            cfg = load_config(args.params, overrides)
        args.fn(cfg, stages.Paths(), args)
    except RagtrainError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
