"""Orchestration: one pipeline run per workspace, `dvc repro` under a parent MLflow run, and
the DAG order of dvc.yaml (what the Prefect flow follows)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ragtrain import tracking
from ragtrain.config import Config, flatten, to_dict
from ragtrain.errors import RagtrainError
from ragtrain.pipeline.paths import Paths
from ragtrain.pipeline.tracked import PARENT_RUN_ENV, numeric


def dvc_executable() -> str:
    """The `dvc` beside this interpreter when it is not on PATH."""
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
                run.log_metrics(numeric(json.loads(f.read_text())))
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
    return _dag(root)[0]


def stages_up_to(root: Path, stage: str) -> list[str]:
    """``stage`` and every stage it depends on, in DAG order: what `dvc repro STAGE` runs."""
    order, needs = _dag(root)
    if stage not in needs:
        raise RagtrainError(f"dvc.yaml: no stage {stage!r}; the stages: {', '.join(order)}")
    wanted, todo = {stage}, [stage]
    while todo:
        for up in needs[todo.pop()] - wanted:
            wanted.add(up)
            todo.append(up)
    return [s for s in order if s in wanted]


def _dag(root: Path) -> tuple[list[str], dict[str, set[str]]]:
    """(the stages in dependency order, each stage's direct upstream stages) of dvc.yaml."""
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
    return order, needs
