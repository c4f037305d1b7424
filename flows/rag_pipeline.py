"""Prefect flow over the DVC pipeline: one task per `dvc.yaml` stage, each run through DVC.

DVC's cache and lock decide what reruns, so a run from the Prefect UI and `dvc repro` leave the
same record (`dvc.lock`) and can never drift: the task list is read from `dvc.yaml` itself.
Parameter overrides are written into `params.yaml` first (validated, comments kept), the way
`dvc exp run -S` does, so every run is reproducible from its files.

    python flows/rag_pipeline.py                       # one local run
    python -c "from flows.rag_pipeline import rag_pipeline; rag_pipeline(overrides={...})"
    python -c "...; rag_pipeline(until='eval_retriever')"   # the retriever half only
    python -c "...; rag_pipeline(nproc_per_node=2)"   # training stages under torchrun (DDP)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `flows.*` when run as a script

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_link_artifact, create_markdown_artifact  # noqa: E402

from flows.markdown import metrics_table  # noqa: E402
from ragtrain.config import load_config, set_params  # noqa: E402
from ragtrain.errors import RagtrainError  # noqa: E402
from ragtrain.pipeline import orchestration  # noqa: E402
from ragtrain.pipeline.paths import Paths  # noqa: E402


@task(task_run_name="dvc repro {stage}")
def repro_stage(stage: str, root: str, env: dict[str, str]) -> str:
    """Run one DVC stage (no upstream: the flow orders them); returns "ran" or "skipped"."""
    r = subprocess.run([orchestration.dvc_executable(), "repro", "--single-item", stage],
                       cwd=root, env=env, capture_output=True, text=True)
    log = get_run_logger()
    if r.returncode:
        tail = "\n".join((r.stdout + r.stderr).strip().splitlines()[-15:])
        raise RagtrainError(f"stage {stage} failed (exit {r.returncode}):\n{tail}")
    skipped = "didn't change, skipping" in r.stdout
    log.info("%s: %s", stage, "up to date (DVC cache)" if skipped else "ran")
    return "skipped" if skipped else "ran"


@task(retries=2, retry_delay_seconds=10)
def push_data(root: str, env: dict[str, str]) -> None:
    """Push data and outputs to the DVC remote (I/O that can fail: retried)."""
    r = subprocess.run([orchestration.dvc_executable(), "push"], cwd=root, env=env,
                       capture_output=True, text=True)
    if r.returncode:
        raise RagtrainError(f"dvc push failed: {(r.stdout + r.stderr).strip()[-2000:]}")


@flow(name="rag-train-eval", log_prints=True)
def rag_pipeline(params_path: str = "params.yaml", overrides: dict[str, Any] | None = None,
                 push: bool = True, promote: bool = False, until: str = "",
                 nproc_per_node: int = 0) -> dict[str, float]:
    """Train and evaluate the RAG pipeline: the `dvc.yaml` stages in order (the last registers
    the RAG model as challenger), then `dvc push`; `promote`: then the registry's promotion
    rule (a refusal is reported, not a failure of the run). `until`: only that stage and the
    stages it depends on, as `dvc repro STAGE` does (e.g. "eval_retriever"); empty: all.
    `nproc_per_node` > 1: the training stages run as that many data-parallel processes under
    torchrun (RAGTRAIN_NPROC_PER_NODE); 0: the worker's environment decides (default 1)."""
    if nproc_per_node < 0:
        raise RagtrainError(f"nproc_per_node: expected >= 0, got {nproc_per_node}")
    params = Path(params_path).resolve()
    root = params.parent
    paths = Paths(root)
    if overrides:
        set_params(params, overrides)  # params.yaml stays the record of what ran
    cfg = load_config(params)
    order = orchestration.stages_up_to(root, until) if until else orchestration.dag_order(root)
    with orchestration.pipeline_run(cfg, paths) as (run, env):
        if nproc_per_node:
            env = {**env, "RAGTRAIN_NPROC_PER_NODE": str(nproc_per_node)}
        outcome = {s: repro_stage(s, str(root), env) for s in order}
        if push:
            push_data(str(root), env)
    metrics: dict[str, float] = {}
    for f in sorted(paths.metrics.glob("*.json")):
        metrics.update({k: float(v) for k, v in json.loads(f.read_text()).items()
                        if isinstance(v, int | float) and not isinstance(v, bool)})
    ran = ", ".join(f"{s} ({o})" for s, o in outcome.items())
    create_markdown_artifact(markdown=f"### Stages\n{ran}\n\n### Metrics\n"
                             + metrics_table(metrics), key="rag-metrics",
                             description="metrics of this pipeline run")
    if run is not None:
        link = tracking_link(cfg.tracking.uri, run.experiment_id, run.run_id)
        create_link_artifact(link, link_text=f"MLflow run {run.run_id}", key="mlflow-run")
        print(f"MLflow run: {link}")
    link_report(paths)
    if promote:
        from flows.promote import promote_challenger
        from ragtrain.errors import RegistryError

        try:
            promote_challenger(str(params))
        except RegistryError as e:  # e.g. nothing new registered: reported, the run succeeded
            print(f"not promoted: {e}")
    return metrics


def link_report(paths: Paths) -> str | None:
    """The run report (the `report` stage's page) as a Prefect link artifact: a file:// link
    (it opens in a browser on the machine that ran the flow; it is also in the MLflow run's
    artifacts under report/)."""
    if not paths.report.is_file():
        return None
    link = paths.report.resolve().as_uri()
    create_link_artifact(link, link_text="run report (challenger vs champion)",
                         key="run-report", description="the run report: metrics beside the "
                         "champion's, curves, failures, every question, lineage")
    print(f"run report: {link}")
    return link


def tracking_link(uri: str, experiment_id: str, run_id: str) -> str:
    """The run's page: on the tracking server, or on `make mlflow-ui` for a sqlite store."""
    base = uri.rstrip("/") if uri.startswith("http") else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"


if __name__ == "__main__":
    rag_pipeline(*(sys.argv[1:2]))
