"""The work-pool path for real: a Prefect server, a process work pool, the deployments of
prefect.yaml (`prefect deploy --all`), a `prefect worker start` subprocess, and a run with
parameters triggered through the API, on a tiny copy of the project. And the Kubernetes GPU
job template of docs/prefect-workers.md, rendered the way a worker renders it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import BIN, REPO
from tests.test_dvc_pipeline import copy_repo, sh
from tests.test_flow import tiny_overrides
from tests.test_ui import api, free_port, stop, wait

POOL = "ragtrain-process"  # the pool prefect.yaml names
GPU_TEMPLATE = REPO / "deploy/kubernetes-gpu-job-template.json"


def prefect(cwd: Path, env: dict[str, str], *args: str) -> str:
    r = subprocess.run([str(BIN / "prefect"), *args], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=180)
    assert r.returncode == 0, f"prefect {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}"
    return r.stdout + r.stderr


def stop_worker(p: subprocess.Popen) -> None:
    """A worker stops on SIGINT (SIGTERM is not prompt); killed if it lingers."""
    stop(p, signal.SIGINT, 20)


def kill_flow_runs(url: str) -> None:
    """After the worker: a flow run process still alive is killed with its process group (the
    worker starts each run in its own, and SIGINT to the worker normally ends it already)."""
    for fr in api(url, "/flow_runs/filter", {}):
        pid = str(fr.get("infrastructure_pid") or "").rsplit(":", 1)[-1]
        if not pid.isdigit():
            continue
        try:
            if os.getpgid(int(pid)) == int(pid) != os.getpgrp():
                os.killpg(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture()
def server(tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """A real Prefect server on a free port, with its own PREFECT_HOME; its env for clients."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_UI_API_URL": url,
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("PREFECT_API_URL", None)
    with open(tmp_path / "server.log", "w") as log:
        p = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                              "--port", str(port)], env=env, stdout=log, stderr=log)
    try:
        wait(lambda: api(url, "/health") is True, 120, "the Prefect server")
        yield url, {**env, "PREFECT_API_URL": url}
    finally:
        stop(p)


@pytest.mark.slow
def test_worker_runs_the_deployment_with_parameters(server: tuple[str, dict[str, str]],
                                                    tmp_path: Path,
                                                    tiny_bert_dir: Path) -> None:
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url, env = server
    proj = copy_repo(tmp_path / "proj")
    remote = tmp_path / "remote"
    sh(proj, "dvc", "remote", "modify", "--local", "local", "url", str(remote))

    prefect(proj, env, "work-pool", "create", POOL, "--type", "process")
    prefect(proj, env, "deploy", "--all", "--no-prompt")  # prefect.yaml, as `make worker` does
    deps = {d["name"]: d for d in api(url, "/deployments/filter", {})}
    assert set(deps) == {"train-eval-worker", "promote-worker"}
    dep = deps["train-eval-worker"]
    assert dep["work_pool_name"] == POOL
    # the code is loaded where it lies: the flow run starts in the folder deployed from
    assert dep["pull_steps"] == [{"prefect.deployments.steps.set_working_directory": {
        "directory": str(proj.resolve())}}]
    assert dep["parameters"]["params_path"] == "params.yaml"

    # the worker starts elsewhere: only the deployment's pull step brings the run to `proj`
    worker_dir = tmp_path / "worker"
    worker_dir.mkdir()
    with open(tmp_path / "worker.log", "w") as log:
        worker = subprocess.Popen(
            [str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--name", "test-worker",
             "--limit", "1"], cwd=worker_dir, env={**env, "PREFECT_WORKER_QUERY_SECONDS": "2"},
            stdout=log, stderr=subprocess.STDOUT)
    try:
        wait(lambda: api(url, f"/work_pools/{POOL}/workers/filter", {}), 60, "the worker")
        overrides = tiny_overrides(tiny_bert_dir)
        with temporary_settings({PREFECT_API_URL: url}):
            run = run_deployment("rag-train-eval/train-eval-worker", timeout=420,
                                 parameters={"overrides": overrides, "push": False,
                                             "until": "train_retriever",
                                             "nproc_per_node": 2})
        worker_log = (tmp_path / "worker.log").read_text()
        assert run.state is not None and run.state.is_completed(), (
            f"{run.state}\n{worker_log[-4000:]}")
    finally:
        stop_worker(worker)
        kill_flow_runs(url)

    # run by the worker on the pool, with the parameters given, not the deployment's defaults
    fr = api(url, f"/flow_runs/{run.id}")
    assert fr["work_pool_name"] == POOL and fr["deployment_id"] == dep["id"]
    assert fr["parameters"]["push"] is False
    assert fr["parameters"]["overrides"] == overrides
    assert fr["parameters"]["until"] == "train_retriever"
    assert fr["parameters"]["nproc_per_node"] == 2
    assert str(run.id) in worker_log  # this worker submitted it

    # the run's outputs, in the tiny project: the overrides took effect (and were recorded);
    # the stages up to the retriever's training, whose trainers (reranker, retriever) ran as 2
    # DDP processes (the whole DAG through Prefect is tests/test_flow.py's)
    metrics = json.loads((proj / "metrics/prepare.json").read_text())
    assert metrics["data/passages"] == 5  # the tiny fixture, not the default source
    params = (proj / "params.yaml").read_text()
    assert "max_steps: 2" in params and "tiny_jsonl" in params
    lock = (proj / "dvc.lock").read_text()
    assert "train_retriever:" in lock and "build_index:" not in lock
    trained = json.loads((proj / "metrics/train_retriever.json").read_text())
    assert trained["train/steps"] == 2
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{proj / 'mlruns/mlflow.db'}")
    runs = mlflow.search_runs(search_all_experiments=True,
                              filter_string="tags.`ragtrain.stage` = 'train-retriever'")
    assert list(runs["tags.ragtrain.processes"]) == ["2"]  # one run, by rank 0 of two
    assert not remote.exists()  # push=False: nothing pushed to the DVC remote
    arts = api(url, "/artifacts/filter", {"flow_runs": {"id": {"any_": [str(run.id)]}}})
    assert {a["key"] for a in arts} >= {"rag-metrics", "mlflow-run"}


def _render(template: dict, values: dict) -> dict:
    """The job manifest a worker builds: the variables' defaults, then the run's values."""
    from prefect.utilities.templating import apply_values

    props = template["variables"]["properties"]
    defaults = {k: v["default"] for k, v in props.items() if "default" in v}
    return apply_values(template["job_configuration"], {**defaults, **values})["job_manifest"]


def test_gpu_job_template_is_the_default_plus_gpu_placement() -> None:
    """deploy/kubernetes-gpu-job-template.json = the Kubernetes default of this Prefect version
    + gpu_limit / node_selector / tolerations; unset, they leave the Job as the default's."""
    import prefect

    bundled = (Path(prefect.__file__).parent / "server/api/collections_data/views"
               / "aggregate-worker-metadata.json")
    default = json.loads(bundled.read_text())["prefect-kubernetes"]["kubernetes"][
        "default_base_job_configuration"]
    gpu = json.loads(GPU_TEMPLATE.read_text())
    added = {"gpu_limit", "node_selector", "tolerations"}
    props = gpu["variables"]["properties"]
    assert set(props) == set(default["variables"]["properties"]) | added
    assert {k: v for k, v in props.items() if k not in added} == default["variables"][
        "properties"], "the default template changed: regenerate the GPU template"

    plain = _render(gpu, {"image": "ragtrain:1"})
    assert plain == _render(default, {"image": "ragtrain:1"})  # a CPU job as before
    job = _render(gpu, {"image": "ragtrain:1", "gpu_limit": "1",
                        "node_selector": {"nvidia.com/gpu.present": "true"},
                        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}]})
    pod = job["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": "1"}
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists"}]
