"""A BEIR folder (no answer strings) end to end, for real: `dvc repro` of the whole DAG ends
green with the generator stages skipped by their markers, the promote flow (Prefect) promotes
the registered retriever model on the retrieval metric, and `mlflow models serve` answers with
ranked passages and scores."""

from __future__ import annotations

import json
import os
import subprocess
import urllib.request
from pathlib import Path

import pytest

from ragtrain.config import set_params
from tests.conftest import BIN
from tests.test_dvc_pipeline import copy_repo, sh
from tests.test_flow import prefect_server  # noqa: F401  (the module's Prefect test server)
from tests.test_retrieval_only import TOPICS, make_beir
from tests.test_ui import free_port, stop, wait

pytestmark = pytest.mark.slow


def beir_overrides(source: Path, bert: Path) -> dict:
    return {
        "data.source": str(source), "data.sha256": "",
        "retriever.model_name": str(bert), "retriever.batch_size": 2,
        "retriever.questions_per_passage": 2, "retriever.max_steps": 2,
        "retriever.checkpoint_every": 1, "retriever.precision": "fp32", "retriever.top_k": 2,
        "evaluation.recall_ks": [1, 2, 5], "evaluation.rank_cutoff": 3,
        "registry.retrieval_metric": "test/ndcg_at_3",
    }


def test_beir_dvc_repro_flow_register_promote_serve(prefect_server: None,  # noqa: F811
                                                    tmp_path: Path,
                                                    tiny_bert_dir: Path) -> None:
    from flows.promote import promote
    from mlflow.tracking import MlflowClient

    proj = copy_repo(tmp_path / "proj")
    sh(proj, "dvc", "remote", "modify", "--local", "local", "url", str(tmp_path / "remote"))
    set_params(proj / "params.yaml", beir_overrides(make_beir(tmp_path / "beir"),
                                                    tiny_bert_dir))

    # 1. the real `dvc repro`: one DAG, every stage runs, the generator's leave markers
    out = sh(proj, "dvc", "repro")
    for stage in ("train_generator", "evaluate", "package", "register", "report"):
        assert f"Running stage '{stage}'" in out, stage
    assert "generator skipped" in out
    assert json.loads((proj / "artifacts/generator/DISABLED.json").read_text())["enabled"] is False
    assert json.loads((proj / "metrics/generator.json").read_text()) == {"generator/enabled": 0}
    assert json.loads((proj / "artifacts/rag/rag.json").read_text())["kind"] == "retriever"
    reg = json.loads((proj / "artifacts/registered.json").read_text())
    assert reg["registered"] and reg["kind"] == "retriever" and "generator_version" not in reg
    assert "Data and pipelines are up to date" in sh(proj, "dvc", "status")

    # 2. the promote flow promotes the registered retriever on registry.retrieval_metric (the
    #    train-eval flow over a reproduced workspace, nothing rerun, is tests/test_flow.py's)
    out = promote(params_path=str(proj / "params.yaml"))
    assert out["champion"] == "1" and "test/ndcg_at_3" in out["reason"]
    metrics = json.loads((proj / "metrics/retriever.json").read_text())
    uri = f"sqlite:///{proj}/mlruns/mlflow.db"
    mc = MlflowClient(uri, registry_uri=uri)
    mv = mc.get_model_version_by_alias("ragtrain-rag", "champion")
    t = mv.tags
    assert t["ragtrain.model_kind"] == "retriever"
    assert t["ragtrain.promotion.metric"] == "test/ndcg_at_3"
    assert t["ragtrain.promotion.decision"] == "promoted"
    assert float(t["metric.test/ndcg_at_3"]) == pytest.approx(metrics["test/ndcg_at_3"])
    retriever = mc.get_model_version_by_alias("ragtrain-rag-retriever", "champion")
    arts = {a.path for a in mc.list_artifacts(retriever.run_id, "retriever")}
    assert "retriever/binding.json" in arts
    assert not mc.search_model_versions("name = 'ragtrain-rag-generator'")

    # a second registration of the same retriever: a tie on the retrieval metric, refused
    r = subprocess.run([str(BIN / "ragtrain"), "register"], cwd=proj, capture_output=True,
                       text=True, env={**os.environ,
                                       "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"})
    assert r.returncode == 0, r.stderr
    r = subprocess.run([str(BIN / "ragtrain"), "promote"], cwd=proj, capture_output=True,
                       text=True)
    assert r.returncode == 2 and "test/ndcg_at_3" in r.stdout and "gain +0" in r.stdout

    # 3. served over HTTP: ranked passages with scores, no answer
    port = free_port()
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen(
        [str(BIN / "mlflow"), "models", "serve", "-m", "models:/ragtrain-rag@champion",
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
        env={**os.environ, "MLFLOW_TRACKING_URI": uri,
             "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}, stdout=log, stderr=log)
    base = f"http://127.0.0.1:{port}"
    try:
        wait(lambda: urllib.request.urlopen(f"{base}/ping", timeout=2).status == 200, 120,
             "mlflow models serve")
        body = {"inputs": [TOPICS[0][2], TOPICS[4][2]], "params": {"top_k": 3}}
        req = urllib.request.Request(f"{base}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            preds = json.loads(resp.read())["predictions"]
    finally:
        stop(server)
        log.close()
    assert [p["question"] for p in preds] == body["inputs"]
    for p in preds:
        assert set(p) == {"question", "passages"}
        assert len(p["passages"]) == 3
        scores = [x["score"] for x in p["passages"]]
        assert scores == sorted(scores, reverse=True)
        assert {x["id"] for x in p["passages"]} <= {f"d{i}" for i in range(len(TOPICS))}
