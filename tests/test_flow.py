"""The Prefect flow over the DVC stages, on a tiny project, under a real (test) Prefect server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ragtrain.errors import RagtrainError
from ragtrain.pipeline import orchestration
from tests.conftest import FIXTURES, REPO
from tests.test_dvc_pipeline import copy_repo, sh
from tests.test_retriever_stages import recall_at


def tiny_overrides(tiny_bert_dir: Path) -> dict:
    """params.yaml overrides for a small real slice: 5 passages, a tiny BERT, 2 steps."""
    return {
        "data.source": str(FIXTURES / "tiny_jsonl"), "data.sha256": "",
        "retriever.model_name": str(tiny_bert_dir), "retriever.batch_size": 2,
        "retriever.questions_per_passage": 2, "retriever.max_steps": 2,
        "retriever.precision": "fp32", "evaluation.recall_ks": [1, 2, 5],
        "evaluation.rank_cutoff": 3, "retriever.top_k": 2,
        "generator.model_name": str(tiny_bert_dir), "generator.max_source_tokens": 96,
        "generator.batch_size": 2, "generator.max_steps": 1, "generator.precision": "fp32",
        "registry.floor": 0.0,
    }


def test_dag_order_follows_dvc_yaml() -> None:
    order = orchestration.dag_order(REPO)
    assert order[:2] == ["fetch", "prepare"]
    assert order.index("train_retriever") < order.index("build_index") < order.index(
        "eval_retriever")
    assert order.index("build_bm25") < order.index("eval_retriever")
    assert len(order) == len(set(order))


def test_stages_up_to_a_stage_are_what_dvc_repro_of_it_runs() -> None:
    order = orchestration.dag_order(REPO)
    assert orchestration.stages_up_to(REPO, "fetch") == ["fetch"]
    assert orchestration.stages_up_to(REPO, "build_bm25") == ["fetch", "prepare", "build_bm25"]
    upto = orchestration.stages_up_to(REPO, "eval_retriever")
    assert upto == [s for s in order if s in upto]  # in DAG order
    assert {"train_retriever", "build_index", "build_bm25"} <= set(upto)
    assert not {"retrieve", "train_generator", "register", "report"} & set(upto)
    for stage in order:  # each ends with itself and holds what the stages before it need
        upto = orchestration.stages_up_to(REPO, stage)
        assert upto[-1] == stage
        assert all(set(orchestration.stages_up_to(REPO, s)) <= set(upto) for s in upto)
    with pytest.raises(RagtrainError, match="no stage 'train'; the stages: fetch, prepare"):
        orchestration.stages_up_to(REPO, "train")


def test_workspace_lock_refuses_a_second_run(tmp_path: Path) -> None:
    with orchestration.workspace_lock(tmp_path):
        with pytest.raises(RagtrainError, match="workspace busy: a pipeline run \\(pid"):
            with orchestration.workspace_lock(tmp_path):
                pass
    with orchestration.workspace_lock(tmp_path):  # released: free again
        pass


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory):
    import os

    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect_home"))
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.mark.slow
def test_flow_runs_dvc_stages_with_overrides(prefect_server: None, tmp_path: Path,
                                              tiny_bert_dir: Path) -> None:
    from flows.rag_pipeline import rag_pipeline
    from mlflow.tracking import MlflowClient

    proj = copy_repo(tmp_path / "proj")
    sh(proj, "dvc", "remote", "modify", "--local", "local", "url", str(tmp_path / "remote"))
    overrides = tiny_overrides(tiny_bert_dir)
    metrics = rag_pipeline(params_path=str(proj / "params.yaml"), overrides=overrides,
                           promote=True)
    rows = [json.loads(x) for x in (proj / "artifacts/eval/retriever_test.jsonl").open()]
    assert metrics["test/recall_at_1"] == recall_at(rows, "hybrid", 1)  # the configured kind
    assert metrics["data/passages"] == 5
    assert "max_steps: 2" in (proj / "params.yaml").read_text()  # recorded the DVC way
    lock = (proj / "dvc.lock").read_text()
    for stage in orchestration.dag_order(proj):
        assert f"  {stage}:" in lock
    assert "Data and pipelines are up to date" in sh(proj, "dvc", "status")
    assert "recall@k on test" in (proj / "reports/report.html").read_text()  # the last stage

    mc = MlflowClient(f"sqlite:///{proj}/mlruns/mlflow.db")
    exp = mc.get_experiment_by_name("ragtrain")
    runs = mc.search_runs([exp.experiment_id])
    parent = next(r for r in runs if r.info.run_name == "pipeline")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "FINISHED"
    # one child run per DVC stage with work to do, named as the CLI command (train_retriever ->
    # train-retriever); the four the default params switch off open none
    idle = {"train-reranker", "teacher-scores", "retrieve-unanswerable", "train-rag"}
    assert {r.info.run_name for r in children} == {
        stage.replace("_", "-") for stage in orchestration.dag_order(proj)} - idle
    # registered by the register stage, then promoted by the flow (promote=True)
    assert str(mc.get_model_version_by_alias("ragtrain-rag", "champion").version) == "1"
    assert parent.data.metrics["test/recall_at_1"] == pytest.approx(metrics["test/recall_at_1"])

    # again: DVC's cache decides, nothing reruns, the metrics are the same
    again = rag_pipeline(params_path=str(proj / "params.yaml"))
    assert again == metrics
    assert len(mc.search_runs([exp.experiment_id])) == len(runs) + 1  # only a new parent run
    assert json.loads((proj / "metrics/retriever.json").read_text())["test/recall_at_1"] == (
        metrics["test/recall_at_1"])


@pytest.mark.slow
def test_promote_and_evaluate_champion_flows(prefect_server: None, tmp_path: Path,
                                             tiny_bert_dir: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The registry flows on a registered tiny model: the same code as the CLI."""
    from flows.promote import evaluate_champion, promote
    from mlflow.tracking import MlflowClient

    from ragtrain import cli
    from tests.test_serving import STAGES, params

    (tmp_path / "params.yaml").write_text(params(tiny_bert_dir, "sqlite:///mlruns/mlflow.db")
                                          .replace("enabled: false", "enabled: true"))
    monkeypatch.chdir(tmp_path)
    for stage in (*STAGES, "register"):
        assert cli.main([stage]) == 0, stage
    out = promote(params_path=str(tmp_path / "params.yaml"))
    assert out["champion"] == "1" and out["previous"] is None
    with pytest.raises(RagtrainError, match="no ragtrain-rag@challenger to promote"):
        promote(params_path=str(tmp_path / "params.yaml"))
    m = evaluate_champion(params_path=str(tmp_path / "params.yaml"))
    # by hand: the local bundle (what was registered) on the same questions, the same scorer
    from ragtrain.evaluation.answers import score_answers
    from ragtrain.generation.rag import RAGModel

    rows = [json.loads(x) for x in (tmp_path / "data/prepared/test.jsonl").open()]
    answers = RAGModel.load(tmp_path / "artifacts/rag").answer([r["question"] for r in rows])
    s = score_answers([a["answer"] for a in answers], [r["answers"] for r in rows])
    assert m == {**{f"test/{k}": round(v, 4) for k, v in s.items()},
                 "test/n_questions": float(len(rows))}
    mc = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    mv = mc.get_model_version_by_alias("ragtrain-rag", "champion")
    assert float(mv.tags["metric.test/f1"]) == pytest.approx(m["test/f1"])
    assert "test.jsonl" in mv.tags["ragtrain.rescored"]
