"""`ragtrain <stage>`: a thin argparse layer over stages.py (dvc.yaml calls these)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
from ragtrain.pipeline import stages


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


def _cmd_retrieve(cfg: Config, paths: stages.Paths, args: argparse.Namespace) -> None:
    m = stages.run_stage("retrieve", cfg, paths)
    print(f"retrieved top passages -> {paths.retrieved}: " + ", ".join(
        f"{k}={v:.4f}" for k, v in m.items()))


def _cmd_train_generator(cfg: Config, paths: stages.Paths, args: argparse.Namespace) -> None:
    m = stages.run_stage("train-generator", cfg, paths, resume=args.resume)
    print(f"trained {cfg.generator.kind} generator -> {paths.generator}: " + ", ".join(
        f"{k}={v:.4g}" for k, v in m.items()))


def _cmd_evaluate(cfg: Config, paths: stages.Paths, args: argparse.Namespace) -> None:
    m = stages.run_stage("evaluate", cfg, paths)
    split = cfg.evaluation.split
    print(f"{split}: {int(m[f'{split}/n_questions'])} questions, top-{cfg.retriever.top_k} "
          f"{cfg.retriever.kind} passages (answer recall "
          f"{m[f'{split}/answer_recall_at_{cfg.retriever.top_k}']:.3f})")
    print(f"  {'':28s}{'EM':>8s}{'F1':>8s}{'acc':>8s}")
    for name, label in (("", "RAG (trained generator)"),
                        ("gold_passage/", "  same, gold passage given"),
                        ("untrained/", "untrained generator"),
                        ("baseline_window/", "sliding-window baseline")):
        print(f"  {label:28s}" + "".join(f"{m[f'{split}/{name}{x}']:8.2f}"
                                         for x in ("em", "f1", "accuracy")))
    print(f"  per question: {paths.generator_predictions}")


def _cmd_package(cfg: Config, paths: stages.Paths, args: argparse.Namespace) -> None:
    stages.run_stage("package", cfg, paths)
    print(f"RAG model bundle -> {paths.bundle}")


def _load_rag(cfg: Config, paths: stages.Paths, args: argparse.Namespace) -> Any:
    from ragtrain.generation.rag import RAGModel

    if args.bundle:
        return RAGModel.load(args.bundle)
    if args.alias:
        version, model = stages.load_registered_rag(cfg, paths, args.alias)
        print(f"{cfg.registry.model_name}@{args.alias} = version {version}", file=sys.stderr)
        return model
    return RAGModel.from_parts(cfg.retriever, **paths.rag_parts(),
                               precision=cfg.generator.precision)


def _cmd_ask(cfg: Config, paths: stages.Paths, args: argparse.Namespace) -> None:
    from ragtrain.errors import DataError

    question = " ".join(args.question).strip()
    if not question:
        raise DataError("ask: the question is empty")
    (a,) = _load_rag(cfg, paths, args).answer([question], top_k=args.top_k)
    if args.json:
        print(json.dumps(a, ensure_ascii=False, indent=1))
        return
    print(f"answer: {a['answer']}")
    for i, p in enumerate(a["passages"], 1):
        mark = " <- answer" if p["id"] == a["answer_passage"] else ""
        text = p["text"] if len(p["text"]) <= 300 else p["text"][:297] + "..."
        print(f"[{i}] {p['id']} (score {p['score']:.3f}){mark}\n    {text}")


def _read_questions(path: Path) -> list[dict[str, Any]]:
    """A .jsonl file of {"question", optional "id"} or a text file, one question per line;
    every line is checked before any work."""
    from ragtrain.errors import DataError

    if not path.is_file():
        raise DataError(f"{path}: no such file")
    rows: list[dict[str, Any]] = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not JSON ({e.msg})") from None
            q = r.get("question") if isinstance(r, dict) else None
            if not isinstance(q, str) or not q.strip():
                raise DataError(f"{path}:{n}: needs a non-empty string \"question\"")
            rows.append({"id": str(r.get("id", n)), "question": q})
        else:
            rows.append({"id": str(n), "question": line.strip()})
    if not rows:
        raise DataError(f"{path}: no questions")
    return rows


def _cmd_predict(cfg: Config, paths: stages.Paths, args: argparse.Namespace) -> None:
    from ragtrain.io import atomic_path, write_jsonl

    rows = _read_questions(args.questions)
    answers = _load_rag(cfg, paths, args).answer([r["question"] for r in rows],
                                                 top_k=args.top_k)
    with atomic_path(args.output) as tmp:
        write_jsonl(tmp, ({"id": r["id"], **a} for r, a in zip(rows, answers, strict=True)))
    print(f"{len(rows)} answers -> {args.output}")


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


# --------------------------------------------------------------------------- registry


def _cmd_register(cfg: Config, paths: stages.Paths, args: argparse.Namespace) -> None:
    r = stages.run_register(cfg, paths)
    if not r["registered"]:
        print(f"nothing registered: {r['reason']}")
        return
    parts = ", ".join(f"{k.removesuffix('_version')} v{v}" for k, v in r.items()
                      if k.endswith("_version"))
    print(f"registered {r['model']} version {r['version']} as @{r['alias']} ({parts}; "
          f"MLflow run {r['run_id']}); `ragtrain promote` makes it the champion if it wins")


def _cmd_promote(cfg: Config, paths: stages.Paths, args: argparse.Namespace) -> None:
    from ragtrain.errors import RegistryError
    from ragtrain.tracking import registry

    p = registry.promote(cfg.registry, cfg.tracking, root=paths.root, version=args.version)
    print(registry.describe(p))
    if not p.promoted:
        raise RegistryError(f"promotion refused (decision recorded as tags on {p.name} "
                            f"version {p.challenger}" + (f" and {p.champion}" if p.champion
                                                         else "") + ")")


def _cmd_rollback(cfg: Config, paths: stages.Paths, args: argparse.Namespace) -> None:
    from ragtrain.tracking import registry

    r = registry.rollback(cfg.registry, cfg.tracking, root=paths.root)
    print(f"{r.name}@champion: version {r.replaced} -> version {r.champion} (rolled back)")


def _cmd_evaluate_champion(cfg: Config, paths: stages.Paths, args: argparse.Namespace) -> None:
    from ragtrain.tracking import registry

    version, m = registry.evaluate_version(cfg.registry, cfg.tracking, args.questions,
                                           root=paths.root, split=args.split,
                                           record=args.record)
    print(f"{cfg.registry.model_name} version {version} (champion) on {args.questions}: "
          + ", ".join(f"{k}={v:.4g}" for k, v in m.items())
          + (" (recorded on the version)" if args.record else ""))


def _add_registry_commands(sub: Any) -> None:
    sp = sub.add_parser("register", help="register the RAG model (artifacts/rag) in MLflow "
                        "as the challenger (the pipeline's last stage)")
    sp.set_defaults(fn=_cmd_register)
    sp = sub.add_parser("promote", help="make the challenger the champion if it beats it on "
                        "registry.primary_metric (exit 2 when refused)")
    sp.add_argument("--version", help="judge this version instead of @challenger")
    sp.set_defaults(fn=_cmd_promote)
    sp = sub.add_parser("rollback", help="return the champion alias to the previous champion")
    sp.set_defaults(fn=_cmd_rollback)
    sp = sub.add_parser("evaluate-champion", help="re-score the registered champion on a "
                        "JSONL file of questions with answers (the evaluate stage's metrics)")
    sp.add_argument("questions", type=Path, nargs="?", default=Path("data/prepared/test.jsonl"))
    sp.add_argument("--split", default="test", help="metric prefix (default: test)")
    sp.add_argument("--record", action=argparse.BooleanOptionalAction, default=True,
                    help="tag the version with these metrics and the file's sha256, so a "
                    "challenger evaluated on it can be compared (default: on)")
    sp.set_defaults(fn=_cmd_evaluate_champion)


STAGES: dict[str, tuple[Callable[..., None], str]] = {
    "fetch": (_cmd_fetch, "copy or download data.source into data/raw and verify its sha256"),
    "prepare": (_cmd_prepare, "read, validate, chunk and split the data into data/prepared"),
    "build-bm25": (_cmd_build_bm25, "build the BM25 index over the corpus"),
    "train-retriever": (_cmd_train_retriever,
                        "fine-tune the dense retriever (contrastive, hard negatives)"),
    "build-index": (_cmd_build_index, "encode the corpus and build the FAISS index"),
    "eval-retriever": (_cmd_eval_retriever,
                       "recall@k / MRR / nDCG of BM25, untrained, trained and hybrid retrieval"),
    "retrieve": (_cmd_retrieve, "retrieve the top passages of every question (generator input)"),
    "train-generator": (_cmd_train_generator,
                        "fine-tune the generator by maximum likelihood on retrieved passages"),
    "evaluate": (_cmd_evaluate, "EM / F1 / accuracy of the RAG model on the held-out split"),
    "package": (_cmd_package, "assemble the self-contained RAG model bundle (artifacts/rag)"),
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
        if name in ("train-retriever", "train-generator"):
            sp.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                            help="continue from the last checkpoint of the same run, if any "
                            "(default: on; --no-resume starts over)")

    for name, fn, help_ in (
            ("ask", _cmd_ask, "answer a question with the RAG model, citing its passages"),
            ("predict", _cmd_predict, "answer every question of a file (.jsonl or .txt)")):
        sp = sub.add_parser(name, help=help_, description=help_ + "; from the current "
                            "pipeline outputs, or a bundle folder (--bundle)")
        sp.set_defaults(fn=fn)
        if name == "ask":
            sp.add_argument("question", nargs="+")
            sp.add_argument("--json", action="store_true", help="print the answer as JSON")
        else:
            sp.add_argument("questions", type=Path, help="questions: .jsonl with a "
                            "\"question\" (and optional \"id\") per line, or one per line")
            sp.add_argument("-o", "--output", type=Path, required=True,
                            help="answers .jsonl (written atomically)")
        src = sp.add_mutually_exclusive_group()
        src.add_argument("--bundle", type=Path, help="a RAG model bundle (artifacts/rag)")
        src.add_argument("--champion", dest="alias", action="store_const", const="champion",
                         help="the registry's champion (models:/<registry.model_name>@champion)")
        src.add_argument("--alias", dest="alias", help="another registry alias, e.g. challenger")
        sp.add_argument("--top-k", type=int, default=None,
                        help="passages to read (default: retriever.top_k)")

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
    _add_registry_commands(sub)
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
