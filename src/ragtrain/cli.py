"""`ragtrain <stage>`: a thin argparse layer over the stage table (dvc.yaml calls these)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from ragtrain import distributed
from ragtrain.allocator import reexec_with_jemalloc
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
from ragtrain.pipeline import orchestration, stages
from ragtrain.pipeline.paths import Paths
from ragtrain.pipeline.registry import load_registered_rag


def _cmd_stage(cfg: Config, paths: Paths, args: argparse.Namespace) -> int | None:
    stage = stages.STAGES[args.stage]
    # not when a caller (a test) runs main() in its own process, nor for a stage with no work
    if args.from_command_line and not stage.is_idle(cfg):
        reexec_with_jemalloc(args.argv)  # returns unless the process restarts under jemalloc
    nproc = distributed.requested_processes()
    if (stage.multiprocess and nproc > 1 and not distributed.under_torchrun()
            and not stage.is_idle(cfg)):
        return distributed.relaunch(nproc, ["-m", "ragtrain.cli", *args.argv])
    kwargs = {"resume": args.resume} if stage.resume else {}
    kwargs.update({o.dest: getattr(args, o.dest) for o in stage.options
                   if getattr(args, o.dest) is not None})
    result = stages.run_stage(stage.name, cfg, paths, **kwargs)
    if distributed.is_main():
        print(stage.summary(cfg, paths, result))
    return None


def _cmd_dag(cfg: Config, paths: Paths, args: argparse.Namespace) -> None:
    f = args.dvc_yaml
    text = stages.dvc_yaml()
    if args.write:
        from ragtrain.io import atomic_write_text

        atomic_write_text(f, text)
        print(f"wrote {f} ({len(stages.STAGES)} stages)")
    elif args.check:
        if not f.is_file() or f.read_text() != text:
            stale = stages.check_dvc_yaml(f.parent) or ["comments or layout"]
            raise RagtrainError(f"{f} differs from the stage table ({', '.join(stale)}); "
                                "regenerate it with `ragtrain dag --write`")
        print(f"{f} matches the stage table")
    else:
        print(text, end="")


def _load_rag(cfg: Config, paths: Paths, args: argparse.Namespace) -> Any:
    from ragtrain.generation.rag import RAGModel

    if args.bundle:
        return RAGModel.load(args.bundle)
    if args.alias:
        version, model = load_registered_rag(cfg, paths, args.alias)
        print(f"{cfg.registry.model_name}@{args.alias} = version {version}", file=sys.stderr)
        return model
    from ragtrain.pipeline.generation import model_parts

    return RAGModel.from_parts(cfg.retriever, **model_parts(cfg, paths),
                               precision=cfg.generator.precision, index_cfg=cfg.index)


def _cmd_ask(cfg: Config, paths: Paths, args: argparse.Namespace) -> None:
    from ragtrain.errors import DataError

    question = " ".join(args.question).strip()
    if not question:
        raise DataError("ask: the question is empty")
    (a,) = _load_rag(cfg, paths, args).answer([question], top_k=args.top_k)
    if args.json:
        print(json.dumps(a, ensure_ascii=False, indent=1))
        return
    if "answer" in a:  # a retriever model (no generator) prints the ranked passages alone
        print(f"answer: {a['answer']}")
    for i, p in enumerate(a["passages"], 1):
        mark = " <- answer" if "answer" in a and p["id"] == a["answer_passage"] else ""
        text = p["text"] if len(p["text"]) <= 300 else p["text"][:297] + "..."
        print(f"[{i}] {p['id']} (score {p['score']:.3f}){mark}\n    {text}")


def _cmd_predict(cfg: Config, paths: Paths, args: argparse.Namespace) -> None:
    from ragtrain.data.questions import read_questions
    from ragtrain.errors import DataError
    from ragtrain.io import atomic_path, write_jsonl

    if any(c.isspace() for c in args.trec_tag) or not args.trec_tag:
        raise DataError(f"--trec-tag: one word without spaces, got {args.trec_tag!r}")
    rows = read_questions(args.questions)
    answers = _load_rag(cfg, paths, args).answer([r["question"] for r in rows],
                                                 top_k=args.top_k)
    ranked = [{"id": r["id"], "question": a["question"],
               "passage_ids": [p["id"] for p in a["passages"]],
               "scores": [p["score"] for p in a["passages"]]}
              for r, a in zip(rows, answers, strict=True)]
    with atomic_path(args.output) as tmp:
        write_jsonl(tmp, ({"id": r["id"], **a} if "answer" in a else k
                          for r, a, k in zip(rows, answers, ranked, strict=True)))
    if args.trec:
        from ragtrain.io import atomic_write_text

        atomic_write_text(args.trec, trec_run(ranked, args.trec_tag))
    kind = "answers" if answers and "answer" in answers[0] else "ranked passage lists"
    print(f"{len(rows)} {kind} -> {args.output}"
          + (f"; TREC run -> {args.trec}" if args.trec else ""))


def trec_run(ranked: list[dict[str, Any]], tag: str = "ragtrain") -> str:
    """A TREC run file: ``query-id Q0 passage-id rank score tag`` per line, best first (what
    trec_eval / pytrec_eval / BEIR's evaluation read)."""
    lines = []
    for r in ranked:
        for rank, (pid, score) in enumerate(zip(r["passage_ids"], r["scores"], strict=True), 1):
            lines.append(f"{r['id']} Q0 {pid} {rank} {score:.6f} {tag}")
    return "\n".join(lines) + ("\n" if lines else "")


def _cmd_pipeline(cfg: Config, paths: Paths, args: argparse.Namespace) -> None:
    run_id = orchestration.run_pipeline(cfg, paths, args.dvc_args)
    if run_id:
        from ragtrain.tracking import redact

        print(f"pipeline MLflow run {run_id} ({redact(cfg.tracking.uri)}, experiment "
              f"{cfg.tracking.experiment!r}); see it with `make mlflow-ui`")


def _cmd_config_show(cfg: Config, paths: Paths, args: argparse.Namespace) -> None:
    d = to_dict(cfg)
    print(json.dumps(d, indent=2) if args.format == "json" else dump_yaml(d), end="")
    if args.format == "json":
        print()


def _cmd_params_set(cfg: Config, paths: Paths, args: argparse.Namespace) -> None:
    assignments = dict(parse_override(a) for a in args.assignments)
    set_params(args.params, assignments)
    for k, v in assignments.items():
        print(f"{args.params}: {k} = {v!r}")


# --------------------------------------------------------------------------- registry


def _cmd_promote(cfg: Config, paths: Paths, args: argparse.Namespace) -> None:
    from ragtrain.errors import RegistryError
    from ragtrain.tracking import registry

    p = registry.promote(cfg.registry, cfg.tracking, root=paths.root, version=args.version)
    print(registry.describe(p))
    if paths.report.is_file():  # the last run's report: the challenger beside the champion
        print(f"  run report: {paths.report.resolve()} (redraw it against the new champion: "
              "ragtrain report)" if p.promoted else f"  run report: {paths.report.resolve()}")
    if not p.promoted:
        raise RegistryError(f"promotion refused (decision recorded as tags on {p.name} "
                            f"version {p.challenger}" + (f" and {p.champion}" if p.champion
                                                         else "") + ")")


def _cmd_rollback(cfg: Config, paths: Paths, args: argparse.Namespace) -> None:
    from ragtrain.tracking import registry

    r = registry.rollback(cfg.registry, cfg.tracking, root=paths.root)
    print(f"{r.name}@champion: version {r.replaced} -> version {r.champion} ("
          + ("finished the interrupted rollback" if r.finished else "rolled back") + ")")


def _cmd_evaluate_champion(cfg: Config, paths: Paths, args: argparse.Namespace) -> None:
    from ragtrain.tracking.rescore import evaluate_version

    version, m = evaluate_version(cfg.registry, cfg.tracking, args.questions, root=paths.root,
                                  split=args.split, record=args.record)
    print(f"{cfg.registry.model_name} version {version} (champion) on {args.questions}: "
          + ", ".join(f"{k}={v:.4g}" for k, v in m.items())
          + (" (recorded on the version)" if args.record else ""))


def _add_registry_commands(sub: Any) -> None:
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ragtrain",
        description="Train, evaluate and track RAG models. Pipeline stages (run them all with "
        "`dvc repro`): " + ", ".join(stages.STAGES) + ".",
    )
    p.add_argument("-p", "--params", type=Path, default=DEFAULT_PARAMS,
                   help="params file (default: params.yaml)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for stage in stages.STAGES.values():
        sp = sub.add_parser(stage.name, help=stage.help, description=stage.help)
        sp.set_defaults(fn=_cmd_stage, stage=stage.name)
        if stage.resume:
            sp.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                            help="continue from the last checkpoint of the same run, if any "
                            "(default: on; --no-resume starts over)")
        for o in stage.options:
            sp.add_argument(*o.flags, dest=o.dest, type=o.type, help=o.help)

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
                            help="answers .jsonl (written atomically); a retriever model "
                            "writes {id, question, passage_ids, scores} per question")
            sp.add_argument("--trec", type=Path, default=None, metavar="FILE",
                            help="also write a TREC run file (query-id Q0 passage-id rank "
                            "score tag), e.g. for trec_eval against BEIR qrels")
            sp.add_argument("--trec-tag", default="ragtrain", help="the run tag (default: "
                            "ragtrain)")
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
    dg = sub.add_parser("dag", help="print dvc.yaml as the stage table declares it (code deps: "
                        "each stage's import closure)")
    mode = dg.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="write it to dvc.yaml")
    mode.add_argument("--check", action="store_true", help="exit 2 when dvc.yaml differs")
    dg.add_argument("--dvc-yaml", type=Path, default=Path("dvc.yaml"), help=argparse.SUPPRESS)
    dg.set_defaults(fn=_cmd_dag, skip_load=True)
    _add_registry_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what a torchrun relaunch repeats
    args.from_command_line = argv is None
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
        rc = args.fn(cfg, Paths(), args)
    except RagtrainError as e:
        from ragtrain.tracking.runs import redact  # a password in a URI never reaches a log

        print(f"error: {redact(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return rc or 0


if __name__ == "__main__":
    sys.exit(main())
