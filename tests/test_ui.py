"""The UI path for real: a Prefect server on 127.0.0.1, the served deployment, a run triggered
through the API the UI's Run button uses, on a small real data slice."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import BIN
from tests.test_dvc_pipeline import copy_repo, sh
from tests.test_flow import tiny_overrides
from tests.test_retriever_stages import recall_at

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api(url: str, path: str, body: dict | None = None) -> object:
    req = urllib.request.Request(f"{url}{path}", data=json.dumps(body or {}).encode(),
                                 headers={"Content-Type": "application/json"},
                                 method="POST" if body is not None else "GET")
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def wait(cond, timeout: float, what: str) -> object:
    end = time.time() + timeout
    while time.time() < end:
        try:
            v = cond()
            if v:
                return v
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def stop(p: subprocess.Popen, sig: int = signal.SIGTERM, wait_s: float = 15) -> None:
    """Stop ``p`` with ``sig``; killed if it lingers past ``wait_s``."""
    if p.poll() is None:
        p.send_signal(sig)
        try:
            p.wait(wait_s)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


@pytest.fixture()
def served(tmp_path: Path) -> Iterator[tuple[str, Path, dict]]:
    proj = copy_repo(tmp_path / "proj")
    sh(proj, "dvc", "remote", "modify", "--local", "local", "url", str(tmp_path / "remote"))
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_UI_API_URL": url,
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("PREFECT_API_URL", None)
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                               "--port", str(port)], env=env, stdout=log, stderr=log)
    serve = None
    try:
        wait(lambda: api(url, "/health") is True, 120, "the Prefect server")
        slog = open(tmp_path / "serve.log", "w")
        serve = subprocess.Popen([sys.executable, str(proj / "flows/serve.py")], cwd=proj,
                                 env={**env, "PREFECT_API_URL": url}, stdout=slog, stderr=slog)
        yield url, proj, env
    finally:
        if serve is not None:
            stop(serve)
        stop(server)


def test_ui_deployment_run_with_override(served: tuple[str, Path, dict],
                                         tiny_bert_dir: Path) -> None:
    from mlflow.tracking import MlflowClient
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url, proj, _ = served
    names = {"train-eval", "promote", "evaluate-champion"}

    def all_served() -> list:  # `serve` registers them one by one: wait for the three
        got = api(url, "/deployments/filter", {})
        return got if {d["name"] for d in got} >= names else []

    deps = wait(all_served, 90, "the three served deployments")
    assert {d["name"] for d in deps} == names
    dep = next(d for d in deps if d["name"] == "train-eval")
    assert set(dep["parameters"]) == {"params_path", "overrides", "push", "promote", "until",
                                      "nproc_per_node"}
    # the retriever half (the whole DAG through Prefect is tests/test_flow.py's)
    with temporary_settings({PREFECT_API_URL: url}):
        run = run_deployment("rag-train-eval/train-eval", timeout=600,
                             parameters={"overrides": tiny_overrides(tiny_bert_dir),
                                         "until": "eval_retriever"})
    assert run.state is not None and run.state.is_completed(), run.state
    m = json.loads((proj / "metrics/retriever.json").read_text())
    rows = [json.loads(x) for x in (proj / "artifacts/eval/retriever_test.jsonl").open()]
    assert m["test/recall_at_1"] == recall_at(rows, "hybrid", 1)  # by hand, per question
    lock = (proj / "dvc.lock").read_text()
    assert "train_retriever:" in lock and "eval_retriever:" in lock
    assert "train_generator:" not in lock and not (proj / "metrics/generator.json").exists()
    assert "max_steps: 2" in (proj / "params.yaml").read_text()
    mc = MlflowClient(f"sqlite:///{proj}/mlruns/mlflow.db")
    runs = mc.search_runs([mc.get_experiment_by_name("ragtrain").experiment_id])
    parent = next(r for r in runs if r.info.run_name == "pipeline")
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["test/recall_at_1"] == pytest.approx(m["test/recall_at_1"])
    children = {r.info.run_name for r in runs
                if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert children == {"fetch", "prepare", "build-bm25", "train-retriever", "build-index",
                        "eval-retriever"}  # train-reranker, teacher-scores: off, no run
    arts = api(url, "/artifacts/filter", {})
    assert {a["key"] for a in arts} >= {"rag-metrics", "mlflow-run"}


def chromium() -> str | None:
    import shutil

    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(chromium() is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_ui_renders_the_deployment_and_its_parameters(served: tuple[str, Path, dict],
                                                      tmp_path: Path) -> None:
    """Headless Chromium opens the deployment's page; its name and parameters are rendered."""
    from tests.conftest import REPO

    url, _, _ = served
    deps = wait(lambda: api(url, "/deployments/filter", {}), 90, "the served deployments")
    dep = next(d for d in deps if d["name"] == "train-eval")
    page = f"{url.removesuffix('/api')}/deployments/deployment/{dep['id']}?tab=Parameters"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'chrome'}", "--window-size=1400,1000",
             "--virtual-time-budget=20000"]
    shot = REPO / "test-output" / "prefect_deployment.png"
    shot.parent.mkdir(exist_ok=True)
    dom = subprocess.run([chromium(), *flags, "--dump-dom", page], capture_output=True,
                         text=True, timeout=120).stdout
    subprocess.run([chromium(), *flags, f"--screenshot={shot}", page], capture_output=True,
                   timeout=120)
    assert "train-eval" in dom and "rag-train-eval" in dom
    for param in ("params_path", "overrides", "push", "promote", "until", "nproc_per_node"):
        assert param in dom, f"parameter {param} not rendered"
    assert shot.exists() and shot.stat().st_size > 10_000  # kept as the test's output
