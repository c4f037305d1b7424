"""The report stage: read a finished run's files (metrics, per-question tables, training
curves) and the registry's champion, and write the run report (one self-contained HTML page)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

from ragtrain import tracking
from ragtrain.config import Config, flatten, to_dict
from ragtrain.errors import RagtrainError
from ragtrain.io import atomic_write_text, read_jsonl
from ragtrain.pipeline.paths import Paths
from ragtrain.pipeline.tracked import numeric
from ragtrain.report import Champion, ReportData, join_questions, render_report


def _json(path: Path, notes: list[str], default: Any) -> Any:
    if not path.is_file():
        notes.append(f"{path}: missing (its stage has not run); its part of the report is empty")
        return default
    return json.loads(path.read_text(encoding="utf-8"))


def _jsonl(path: Path, notes: list[str]) -> list[dict[str, Any]]:
    if not path.is_file():
        notes.append(f"{path}: missing (its stage has not run); its part of the report is empty")
        return []
    return read_jsonl(path)


def _passages(corpus: Path, ids: set[str]) -> dict[str, dict[str, str]]:
    """id -> {title, text} of the passages the report cites (one read of the corpus)."""
    out: dict[str, dict[str, str]] = {}
    if not ids or not corpus.is_file():
        return out
    with open(corpus, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                p = json.loads(line)
                if p["passage_id"] in ids:
                    out[p["passage_id"]] = {"title": p.get("title", ""), "text": p["text"]}
    return out


def champion_for_report(cfg: Config, paths: Paths) -> tuple[Champion | None, str]:
    """The registry's champion (None and why not, when there is none or no tracking)."""
    from ragtrain.tracking.champion import champion_record

    if not cfg.tracking.enabled:
        return None, "tracking is off (tracking.enabled: false), so there is no registry"
    try:
        rec = champion_record(cfg.registry, cfg.tracking, root=paths.root)
    except RagtrainError as e:
        return None, f"the registry could not be read ({e})"
    if rec is None:
        return None, (f"{cfg.registry.model_name} has no @champion yet in {cfg.tracking.uri} "
                      "(`ragtrain promote` makes one)")
    note = ""
    sha = paths.queries(cfg.evaluation.split)
    if rec["eval_set_sha256"] and sha.is_file():
        from ragtrain.io import sha256_file

        if sha256_file(sha) != rec["eval_set_sha256"]:
            note = ("The champion was evaluated on another evaluation set: its figures are not "
                    "comparable (re-score it: `ragtrain evaluate-champion`).")
    return Champion(rec["version"], rec["run_id"], rec["metrics"], rec["params"],
                    rec["lineage"]), note


def collect_report(cfg: Config, paths: Paths) -> ReportData:
    """Everything the report shows, read from the run's files and the registry."""
    split, notes = cfg.evaluation.split, []
    metrics: dict[str, float] = {}
    for f in (paths.retriever_metrics, paths.generator_metrics):
        metrics.update(numeric(_json(f, notes, {})))
    generated = _jsonl(paths.generator_predictions, notes)
    retrieved = _jsonl(paths.retriever_predictions, notes)
    read = cfg.retriever.top_k * cfg.generator.answer_from  # the passages the generator read
    rows = join_questions(generated, retrieved, read)
    curves, train_metrics = {}, {}
    for model, plot, m in (
            ("retriever", paths.retriever_train_plot, paths.retriever_train_metrics),
            ("reranker", paths.reranker_train_plot, paths.reranker_train_metrics),
            ("generator", paths.generator_train_plot, paths.generator_train_metrics)):
        if plot.is_file():
            curves[model] = json.loads(plot.read_text(encoding="utf-8"))
        if m.is_file():
            train_metrics[model] = numeric(json.loads(m.read_text(encoding="utf-8")))
    if not curves:
        notes.append("plots/train_*.json: missing; no training curves")
    registered = (json.loads(paths.registered.read_text(encoding="utf-8"))
                  if paths.registered.is_file() else {})
    champion, note = champion_for_report(cfg, paths)
    return ReportData(
        split=split, top_k=read, retriever_kind=cfg.retriever.kind,
        metrics=metrics, rows=rows,
        passages=_passages(paths.corpus, {r["cited"] for r in rows if r["cited"]}),
        curves=curves, train_metrics=train_metrics, champion=champion, champion_note=note,
        this_version=str(registered["version"]) if registered.get("version") else None,
        primary_metric=cfg.registry.primary_metric,
        greater_is_better=cfg.registry.greater_is_better, lineage=tracking.lineage(paths.root),
        params=flatten(to_dict(cfg)),
        created=dt.datetime.now().astimezone().isoformat(timespec="seconds"), notes=notes)


def run_report(cfg: Config, paths: Paths, *, output: Path | None = None) -> dict[str, Any]:
    """The run report -> reports/report.html (or ``output``): the run beside the champion,
    recall@k and training curves, the failure breakdown, every question, the lineage."""
    data = collect_report(cfg, paths)
    out = Path(output) if output is not None else paths.report
    html = render_report(data)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, html)
    return {"path": str(out), "bytes": len(html.encode("utf-8")), "questions": len(data.rows),
            "champion": data.champion.version if data.champion else None,
            "champion_note": data.champion_note}


def describe_report(result: dict[str, Any]) -> str:
    """The CLI's line about a written report."""
    vs = (f"against champion version {result['champion']}" if result["champion"]
          else f"no champion to compare with: {result['champion_note']}")
    return (f"report -> {result['path']} ({result['bytes'] / 1e6:.2f} MB, "
            f"{result['questions']} questions; {vs}); open it in a browser")
