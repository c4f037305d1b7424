"""The generator stages, `ask` and `predict` end to end on a tiny project, via the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from ragtrain import cli
from ragtrain.config import load_config
from ragtrain.evaluation.answers import score_answers
from ragtrain.pipeline.generation import run_train_generator
from ragtrain.pipeline.paths import Paths
from tests.conftest import Crash, crash_at

# the stages that run no model (README: "never import torch")
MODEL_FREE = ("fetch", "prepare", "build-bm25", "package", "register", "report")
HEAVY = {"torch", "transformers", "evaluate", "faiss"}


def run(*args: str) -> int:
    return cli.main(list(args))


def test_generator_stages_end_to_end(tiny_rag_project: Path,
                                     capsys: pytest.CaptureFixture) -> None:
    p = tiny_rag_project
    for split in ("train", "dev", "test"):
        rows = [json.loads(x) for x in (p / f"artifacts/retrieved/{split}.jsonl").open()]
        assert all(len(r["passage_ids"]) == 5 and len(r["scores"]) == 5 for r in rows)
    assert (p / "artifacts/generator/model.safetensors").exists()
    train = json.loads((p / "metrics/train_generator.json").read_text())
    assert train["train/steps"] == 3
    m = json.loads((p / "metrics/generator.json").read_text())
    rows = [json.loads(x) for x in (p / "artifacts/eval/generator_test.jsonl").open()]
    assert {"question", "references", "prediction", "em", "f1", "gold_passage_rank"} <= set(
        rows[0])
    # every metric recomputed by hand from the per-question file
    n = len(rows)
    assert m["test/n_questions"] == n >= 1
    for k in ("em", "accuracy"):  # 0 / 1 per question
        assert m[f"test/{k}"] == round(100.0 * sum(r[k] for r in rows) / n, 4), k
    assert m["test/f1"] == pytest.approx(100.0 * sum(r["f1"] for r in rows) / n, abs=1e-3)
    refs = [r["references"] for r in rows]
    for name, col in (("", "prediction"), ("gold_passage/", "gold_passage_prediction"),
                      ("baseline_window/", "baseline_prediction")):
        s = score_answers([r[col] for r in rows], refs)
        assert {k: m[f"test/{name}{k}"] for k in s} == {k: round(v, 4) for k, v in s.items()}
    assert m["test/answer_recall_at_2"] == round(
        sum(r["answer_in_passages"] for r in rows) / n, 4)
    assert {"test/untrained/em", "test/untrained/f1", "test/untrained/accuracy"} <= set(m)
    # answer_from 2: the kept answers beside the same generator reading its first input only
    assert {"test/first_input/em", "test/first_input/f1", "test/answer_recall_at_4"} <= set(m)
    assert manifest_reading(p) == {"answer_from": 2, "answer_weight": 3.0, "null_weight": 0.2}
    manifest = json.loads((p / "artifacts/rag/rag.json").read_text())
    assert manifest["encoder_fingerprint"] == manifest["index_encoder_fingerprint"]
    assert manifest["eval_set_sha256"] and manifest["metrics"]["test/f1"] == m["test/f1"]

    capsys.readouterr()
    assert run("ask", "What", "river", "is", "Paris", "on?") == 0
    out = capsys.readouterr().out
    # the passages read: answer_from (2) inputs of top_k (2) passages each
    assert out.startswith("answer: ") and "[4] " in out and "[5]" not in out
    assert run("ask", "--bundle", "artifacts/rag", "--json", "--top-k", "3",
               "Which river runs through Rome?") == 0
    a = json.loads(capsys.readouterr().out)
    assert len(a["passages"]) == 5 and a["answer"] == a["answer"].strip()  # 2 x 3, of 5
    assert all(set(x) == {"id", "title", "text", "score"} for x in a["passages"])
    # every answer of the (constrained) copy generator is a span of a cited passage
    assert a["answer"] and any(a["answer"] in x["text"] for x in a["passages"])

    qs = p / "qs.jsonl"
    qs.write_text('{"id": "a", "question": "What is the capital of Germany?"}\n\n'
                  '{"question": "Which river runs through Rome?"}\n')
    assert run("predict", str(qs), "-o", "answers.jsonl") == 0
    got = [json.loads(x) for x in (p / "answers.jsonl").open()]
    assert [g["id"] for g in got] == ["a", "3"] and all("answer" in g for g in got)


def test_bad_questions_are_refused_without_output(tiny_rag_project: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    capsys.readouterr()
    assert run("ask", "  ") == 2
    assert "question is empty" in capsys.readouterr().err
    qs = tiny_rag_project / "qs.jsonl"
    qs.write_text('{"question": "ok?"}\n{"question": ""}\n')
    assert run("predict", str(qs), "-o", "out.jsonl") == 2
    assert 'qs.jsonl:2: needs a non-empty string "question"' in capsys.readouterr().err
    qs.write_text('{"question": "ok?"}\nnot json\n')
    assert run("predict", str(qs), "-o", "out.jsonl") == 2
    assert "qs.jsonl:2: not JSON" in capsys.readouterr().err
    assert not (tiny_rag_project / "out.jsonl").exists()
    # an over-long question is cut to generator.max_question_tokens, and answered
    assert run("ask", "--json", "river " * 400) == 0
    assert "answer" in json.loads(capsys.readouterr().out)


def test_missing_references_are_named(tiny_rag_project: Path,
                                      capsys: pytest.CaptureFixture) -> None:
    f = tiny_rag_project / "data/prepared/test.jsonl"
    rows = [json.loads(x) for x in f.read_text().splitlines()]
    rows[0]["answers"] = []
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tiny_rag_project / "metrics/generator.json").unlink()
    capsys.readouterr()
    assert run("evaluate") == 2  # mixed data leaves such questions out; with none left: refused
    assert "test.jsonl: no question has a reference answer to score" in capsys.readouterr().err
    assert not (tiny_rag_project / "metrics/generator.json").exists()


def test_resume_after_a_crash_reaches_the_same_weights(tiny_rag_project: Path) -> None:
    cfg = load_config(Path("params.yaml"), {"generator.max_steps": 4})
    paths = Paths()
    run_train_generator(cfg, paths, resume=False, progress=False)
    uninterrupted = load_file(str(paths.generator / "model.safetensors"))

    with pytest.raises(Crash):
        run_train_generator(cfg, paths, resume=False, progress=False, on_step=crash_at(3))
    state = json.loads((paths.generator_checkpoints / "last/trainer_state.json").read_text())
    assert state["state"]["step"] == 2  # the last checkpoint before the crash
    m = run_train_generator(cfg, paths, resume=True, progress=False)
    assert m["train/steps"] == 4
    resumed = load_file(str(paths.generator / "model.safetensors"))
    assert uninterrupted.keys() == resumed.keys()
    for k in uninterrupted:
        assert (uninterrupted[k] == resumed[k]).all(), k


@pytest.mark.tracked
def test_generator_stage_runs_are_tracked_in_mlflow(tiny_rag_project: Path) -> None:
    from mlflow.tracking import MlflowClient

    mc = MlflowClient(f"sqlite:///{tiny_rag_project}/mlruns/mlflow.db")
    exp = mc.get_experiment_by_name("ragtrain")
    runs = {r.info.run_name: r for r in mc.search_runs([exp.experiment_id])}
    assert {"retrieve", "train-generator", "evaluate", "package"} <= set(runs)
    assert "train/answer_recall_at_2" in runs["retrieve"].data.metrics
    train = runs["train-generator"]
    assert [m.step for m in mc.get_metric_history(train.info.run_id, "train/loss")] == [1, 2, 3]
    assert train.data.metrics["train/steps"] == 3
    assert {a.path for a in mc.list_artifacts(train.info.run_id, "plots")} == {
        "plots/train_generator_loss.png"}
    ev = runs["evaluate"]
    m = json.loads((tiny_rag_project / "metrics/generator.json").read_text())
    assert ev.data.metrics["test/f1"] == pytest.approx(m["test/f1"])
    assert ev.data.metrics["test/gold_passage/em"] == pytest.approx(m["test/gold_passage/em"])
    # the per-question table, for error analysis in the MLflow UI
    assert [a.path for a in mc.list_artifacts(ev.info.run_id, "predictions")] == [
        "predictions/generator_test.jsonl"]
    assert ev.inputs.dataset_inputs
    assert "rag_manifest.json" in {a.path for a in mc.list_artifacts(runs["package"].info.run_id)}

    # the stages the config switches off write their DISABLED markers and their wall time, and
    # open no MLflow run (one would cost ~2.5 s of importing MLflow for nothing)
    idle = ("train-reranker", "teacher-scores", "retrieve-unanswerable", "train-rag")
    for stage in idle:
        assert cli.main([stage]) == 0, stage
    for marker in ("reranker", "teacher_scores", "unanswerable", "rag_joint"):
        assert (tiny_rag_project / "artifacts" / marker / "DISABLED.json").is_file(), marker
    assert not set(idle) & {r.info.run_name for r in mc.search_runs([exp.experiment_id])}
    timings = json.loads((tiny_rag_project / "timings/timings.json").read_text())
    assert {f"{s.replace('-', '_')}/wall_seconds" for s in idle} <= set(timings)

    # the stages that run no model import no torch (~1.5 s a run), transformers or evaluate, in
    # a fresh process, tracked as here (register registers); stage by stage
    code = ("import json, sys\nfrom ragtrain import cli\nseen = {}\n"
            f"for s in {MODEL_FREE!r}:\n    assert cli.main([s]) == 0, s\n"
            f"    seen[s] = sorted(m for m in {sorted(HEAVY)!r} if m in sys.modules)\n"
            "print(json.dumps(seen))")
    r = subprocess.run([sys.executable, "-c", code], cwd=tiny_rag_project, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == {s: [] for s in MODEL_FREE}


def manifest_reading(project: Path) -> dict:
    return json.loads((project / "artifacts/rag/rag.json").read_text())["reading"]
