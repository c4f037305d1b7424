"""The registered RAG model for real: a tiny project's pipeline (tiny BERT retriever and
generator, 5 passages) registered, promoted, loaded by a fresh process from
``models:/<name>@champion``, served by ``mlflow models serve``, and the same against a real
``mlflow server``."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import BIN, FIXTURES, TINY_RAG_PARAMS, run_stages
from tests.test_ui import free_port, stop, wait

pytestmark = pytest.mark.slow

STAGES = ("fetch", "prepare", "build-bm25", "train-retriever", "build-index", "eval-retriever",
          "retrieve", "train-generator", "evaluate", "package")
QUESTION = "What is the capital of France?"


def params(tiny_bert_dir: Path, uri: str) -> str:
    return TINY_RAG_PARAMS.format(source=FIXTURES / "tiny_jsonl", bert=tiny_bert_dir,
                                  tracked="false", uri=uri)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path) -> Path:
    """A tiny project with its RAG bundle built (artifacts/rag); nothing registered yet."""
    root = tmp_path_factory.mktemp("proj")
    (root / "params.yaml").write_text(params(tiny_bert_dir, "sqlite:///mlruns/mlflow.db"))
    run_stages(root, STAGES)
    return root


def copy_project(project: Path, dst: Path, uri: str) -> Path:
    shutil.copytree(project, dst)
    p = dst / "params.yaml"
    p.write_text(p.read_text().replace("enabled: false", "enabled: true")
                 .replace("uri: sqlite:///mlruns/mlflow.db", f"uri: {uri}"))
    return dst


def ragtrain(proj: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run([str(BIN / "ragtrain"), *args], cwd=proj, env=env,
                          capture_output=True, text=True, timeout=300)


def load_in_fresh_process(uri: str, name: str = "ragtrain-rag") -> list[dict]:
    code = ("import json, sys, mlflow.pyfunc, pandas as pd; "
            f"m = mlflow.pyfunc.load_model('models:/{name}@champion'); "
            f"out = m.predict(pd.DataFrame({{'question': [{QUESTION!r}]}}), "
            "params={'top_k': 2}); print('RESULT', json.dumps(out))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "MLFLOW_TRACKING_URI": uri})
    assert r.returncode == 0, r.stderr[-3000:]
    line = next(x for x in r.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def check_answers(out: list[dict]) -> None:
    (a,) = out
    assert a["question"] == QUESTION and isinstance(a["answer"], str) and a["answer"].strip()
    assert len(a["passages"]) == 4  # answer_from 2 inputs x top_k 2
    assert {"id", "title", "text", "score"} <= set(a["passages"][0])
    ids = {json.loads(x)["id"] for x in (FIXTURES / "tiny_jsonl/corpus.jsonl").open()}
    assert {p["id"] for p in a["passages"]} <= ids
    assert a["passages"][0]["score"] >= a["passages"][1]["score"]


@pytest.fixture(scope="module")
def champion(project: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The tiny project registered and promoted in a sqlite store: (project, tracking URI)."""
    proj = tmp_path_factory.mktemp("sqlite") / "proj"
    db = proj / "mlruns/mlflow.db"
    copy_project(project, proj, "sqlite:///mlruns/mlflow.db")
    r = ragtrain(proj, "register")
    assert r.returncode == 0, r.stderr
    assert "registered ragtrain-rag version 1 as @challenger" in r.stdout
    reg = json.loads((proj / "artifacts/registered.json").read_text())
    assert reg["version"] == "1" and reg["retriever_version"] == "1"
    r = ragtrain(proj, "promote")
    assert r.returncode == 0, r.stderr
    assert "version 1 is now the champion" in r.stdout
    return proj, f"sqlite:///{db}"


def test_a_fresh_process_loads_the_champion(champion: tuple[Path, str]) -> None:
    proj, uri = champion
    check_answers(load_in_fresh_process(uri))
    from mlflow.tracking import MlflowClient

    mc = MlflowClient(uri, registry_uri=uri)
    mv = mc.get_model_version_by_alias("ragtrain-rag", "champion")
    t = mv.tags
    assert t["ragtrain.encoder_fingerprint"] == t["ragtrain.index_encoder_fingerprint"]
    assert len(t["ragtrain.eval_set_sha256"]) == 64
    assert "metric.test/f1" in t and "metric.test/recall_at_1" in t
    run = mc.get_run(mv.run_id)
    assert run.info.run_name == "register" and run.info.status == "FINISHED"
    arts = {a.path for a in mc.list_artifacts(mv.run_id, "rag/artifacts/rag/generator")}
    assert any(p.endswith(".safetensors") for p in arts), arts
    # `ragtrain ask --champion` answers from the registry, the way serving loads the model
    r = ragtrain(proj, "ask", "--champion", "--json", QUESTION)
    assert r.returncode == 0, r.stderr
    assert "ragtrain-rag@champion = version 1" in r.stderr
    check_answers([json.loads(r.stdout)])


def test_mlflow_models_serve_answers_over_http(champion: tuple[Path, str],
                                               tmp_path: Path) -> None:
    _, uri = champion
    serve_champion(uri, tmp_path / "serve.log")


def serve_champion(uri: str, log_path: Path, name: str = "ragtrain-rag") -> None:
    """`mlflow models serve` of ``models:/<name>@champion`` from ``uri`` answers over HTTP."""
    port = free_port()
    log = open(log_path, "w")
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri,
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    server = subprocess.Popen([str(BIN / "mlflow"), "models", "serve", "-m",
                               f"models:/{name}@champion", "--env-manager", "local",
                               "-h", "127.0.0.1", "-p", str(port)],
                              env=env, stdout=log, stderr=log)
    base = f"http://127.0.0.1:{port}"
    try:
        wait(lambda: urllib.request.urlopen(f"{base}/ping", timeout=2).status == 200, 120,
             "mlflow models serve")

        def post(body: dict) -> list[dict]:
            req = urllib.request.Request(f"{base}/invocations", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=60) as r:
                return json.loads(r.read())["predictions"]

        check_answers(post({"dataframe_split": {"columns": ["question"], "data": [[QUESTION]]},
                            "params": {"top_k": 2}}))
        check_answers(post({"inputs": [QUESTION], "params": {"top_k": 2}}))  # a list works too
    finally:
        stop(server)
        log.close()


@contextlib.contextmanager
def start_mlflow_server(backend_uri: str, artifacts: Path, log_path: Path,
                        timeout_s: float = 120) -> Iterator[str]:
    """A real `mlflow server` on a free loopback port over ``backend_uri`` (artifacts proxied
    to ``artifacts``); yields its URL once /health answers, stops it on exit."""
    port = free_port()
    log = open(log_path, "w")
    server = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", backend_uri, "--artifacts-destination", str(artifacts)],
        stdout=log, stderr=log,
        env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"})
    url = f"http://127.0.0.1:{port}"
    try:
        wait(lambda: server.poll() is not None
             or urllib.request.urlopen(f"{url}/health", timeout=2).status == 200,
             timeout_s, "mlflow server")
        if server.poll() is not None:
            raise AssertionError(f"mlflow server exited with code {server.returncode}:\n"
                                 f"{log_path.read_text()[-3000:]}")
        yield url
    finally:
        stop(server)
        log.close()


@pytest.fixture()
def mlflow_server(tmp_path: Path) -> Iterator[str]:
    with start_mlflow_server(f"sqlite:///{tmp_path}/server.db", tmp_path / "server-artifacts",
                             tmp_path / "mlflow-server.log") as url:
        yield url


def test_a_tracking_server_works_the_same(project: Path, mlflow_server: str,
                                          tmp_path: Path) -> None:
    proj = copy_project(project, tmp_path / "proj", mlflow_server)
    for _ in range(2):
        r = ragtrain(proj, "register")
        assert r.returncode == 0, r.stderr
    assert "version 2 as @challenger" in r.stdout
    assert ragtrain(proj, "promote", "--version", "1").returncode == 0
    r = ragtrain(proj, "promote")  # the same model again: a tie, refused
    assert r.returncode == 2 and "gain +0" in r.stdout and "promotion refused" in r.stderr
    check_answers(load_in_fresh_process(mlflow_server))
    assert not (proj / "mlruns").exists()  # everything went to the server
