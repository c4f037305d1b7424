"""Prefect flows over the model registry: `promote` (challenger -> champion, by the registry
rule) and `evaluate-champion` (re-score the champion on a question file). Both call the same
code as `ragtrain promote` / `ragtrain evaluate-champion` (ragtrain.tracking.registry, .rescore).

    python flows/promote.py                     # one local promotion
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `flows.*` when run as a script

from prefect import flow, task  # noqa: E402
from prefect.artifacts import create_link_artifact, create_markdown_artifact  # noqa: E402

from flows.markdown import metrics_table  # noqa: E402
from ragtrain.config import load_config  # noqa: E402
from ragtrain.errors import RegistryError  # noqa: E402
from ragtrain.pipeline.paths import Paths  # noqa: E402
from ragtrain.tracking import registry  # noqa: E402
from ragtrain.tracking.rescore import evaluate_version  # noqa: E402


def _value(v: float | None) -> str:
    return "—" if v is None else f"{v:.4g}"


def promotion_markdown(p: registry.Promotion) -> str:
    return (f"### {'Promoted' if p.promoted else 'Refused'}: {p.name} version {p.challenger}\n\n"
            f"| | version | `{p.metric}` |\n|---|---|---|\n"
            f"| challenger | {p.challenger} | {_value(p.challenger_value)} |\n"
            f"| champion (before) | {p.champion or '—'} | {_value(p.champion_value)} |\n\n"
            f"Winner: **{p.winner or 'none'}**. {p.decision.reason}\n")


@task
def promote_challenger(params_path: str, version: str | None = None) -> registry.Promotion:
    """The registry rule (ragtrain.tracking.registry.promote), published as an artifact."""
    params = Path(params_path)
    cfg = load_config(params)
    p = registry.promote(cfg.registry, cfg.tracking, root=params.parent, version=version or None)
    report = Paths(params.parent).report
    create_markdown_artifact(markdown=promotion_markdown(p)
                             + (f"\nRun report: [{report.name}]({report.resolve().as_uri()})\n"
                                if report.is_file() else ""),
                             key="promotion", description="the promotion decision")
    print(registry.describe(p))
    if report.is_file():
        create_link_artifact(report.resolve().as_uri(), key="promotion-report",
                             link_text="run report of the challenger (vs the champion)")
        print(f"  run report: {report.resolve()}")
    return p


@flow(name="promote", log_prints=True)
def promote(params_path: str = "params.yaml", version: str = "") -> dict[str, Any]:
    """Make the challenger (or `version`) the champion if it wins; fails when refused."""
    params = Path(params_path).resolve()
    p = promote_challenger(str(params), version or None)
    if not p.promoted:
        raise RegistryError(f"promotion refused: {p.decision.reason}")
    return {"champion": p.challenger, "previous": p.champion, "reason": p.decision.reason}


@flow(name="evaluate-champion", log_prints=True)
def evaluate_champion(params_path: str = "params.yaml",
                      questions: str = "data/prepared/test.jsonl", split: str = "test",
                      record: bool = True) -> dict[str, float]:
    """Re-score the champion on `questions` (JSONL with question + answers; relative to the
    params file's folder) with the evaluate stage's metrics; `record` tags the version."""
    params = Path(params_path).resolve()
    cfg = load_config(params)
    q = Path(questions) if Path(questions).is_absolute() else params.parent / questions
    version, metrics = evaluate_version(cfg.registry, cfg.tracking, q, root=params.parent,
                                        split=split, record=record)
    create_markdown_artifact(
        markdown=f"### {cfg.registry.model_name} version {version} (champion) on `{q.name}`\n\n"
                 + metrics_table(metrics), key="champion-metrics",
        description="the champion re-scored")
    print(f"{cfg.registry.model_name} version {version} on {q}: {metrics}")
    return metrics


if __name__ == "__main__":
    promote(*(sys.argv[1:2]))
