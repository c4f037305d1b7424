"""The retriever stages end to end on a tiny project (tiny BERT, 5 passages), via the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ragtrain import cli
from ragtrain.config import RetrieverConfig
from ragtrain.retrieval.training import Batches
from tests.conftest import FIXTURES


@pytest.fixture()
def tiny_project(tmp_path: Path, tiny_bert_dir: Path, monkeypatch: pytest.MonkeyPatch,
                 request: pytest.FixtureRequest) -> Path:
    (tmp_path / "params.yaml").write_text(f"""
data:
  source: {FIXTURES / 'tiny_jsonl'}
  sha256: ""
retriever:
  model_name: {tiny_bert_dir}
  batch_size: 2
  questions_per_passage: 2
  max_steps: 2
  checkpoint_every: 1
  precision: fp32
  hard_negatives: bm25
evaluation:
  recall_ks: [1, 2, 5]
  rank_cutoff: 3
tracking:
  enabled: {str(request.node.get_closest_marker("tracked") is not None).lower()}
""")
    monkeypatch.chdir(tmp_path)
    for stage in ("fetch", "prepare", "build-bm25"):
        assert cli.main([stage]) == 0
    return tmp_path


def run(*args: str) -> int:
    return cli.main(list(args))


def recall_at(rows: list[dict], name: str, k: int) -> float:
    """recall@k of retriever ``name`` by hand from artifacts/eval/retriever_test.jsonl rows: the
    share of labelled questions whose first gold passage ranks within k."""
    ranks = [r[f"{name}_gold_rank"] for r in rows if r["gold_passage_ids"]]
    return sum(x is not None and x <= k for x in ranks) / len(ranks)


def test_retriever_stages_end_to_end(tiny_project: Path, capsys: pytest.CaptureFixture) -> None:
    assert run("train-retriever") == 0
    assert (tiny_project / "artifacts/retriever/retriever.json").exists()
    assert run("build-index") == 0
    emb = np.load(tiny_project / "artifacts/embeddings/embeddings.npy")
    assert emb.shape[0] == 5
    assert run("eval-retriever") == 0
    out = capsys.readouterr().out
    assert "bm25" in out and "untrained" in out and "hybrid" in out
    m = json.loads((tiny_project / "metrics/retriever.json").read_text())
    rows = [json.loads(x) for x in open(tiny_project / "artifacts/eval/retriever_test.jsonl")]
    assert rows and {"id", "gold_passage_ids", "top_ids", "bm25_gold_rank"} <= set(rows[0])
    for name in ("bm25", "untrained", "dense", "hybrid"):  # recomputed from the per-question file
        for k in (1, 2, 5):
            assert m[f"test/{name}/recall_at_{k}"] == recall_at(rows, name, k), (name, k)
        ranks = [r[f"{name}_gold_rank"] for r in rows if r["gold_passage_ids"]]
        assert m[f"test/{name}/mrr_at_3"] == pytest.approx(
            sum(1 / x for x in ranks if x is not None and x <= 3) / len(ranks))
    assert m["test/recall_at_1"] == m["test/hybrid/recall_at_1"]  # the configured kind
    assert m["test/recall_at_5"] == 1.0  # 5 passages: everything is in the top 5


def test_index_from_another_encoder_is_refused(tiny_project: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    assert run("train-retriever") == 0 and run("build-index") == 0
    saved = tiny_project / "saved_index"
    shutil.copytree(tiny_project / "artifacts/index", saved)
    # retrain with another seed: another encoder; the old index no longer matches it
    params = tiny_project / "params.yaml"
    params.write_text(params.read_text() + "seed: 1\n")
    assert run("train-retriever", "--no-resume") == 0
    shutil.rmtree(tiny_project / "artifacts/index")
    shutil.copytree(saved, tiny_project / "artifacts/index")
    capsys.readouterr()
    assert run("eval-retriever") == 2
    err = capsys.readouterr().err
    assert "was built by encoder" in err and "ragtrain build-index" in err


def test_corrupted_index_file(tiny_project: Path, capsys: pytest.CaptureFixture) -> None:
    assert run("train-retriever") == 0 and run("build-index") == 0
    f = tiny_project / "artifacts/index/index.faiss"
    f.write_bytes(f.read_bytes()[:-7] + b"garbage")
    capsys.readouterr()
    assert run("eval-retriever") == 2
    assert "index.faiss" in capsys.readouterr().err


def test_queries_naming_unknown_passages(tiny_project: Path,
                                         capsys: pytest.CaptureFixture) -> None:
    f = tiny_project / "data/prepared/train.jsonl"
    rows = [json.loads(x) for x in f.read_text().splitlines()]
    rows[0]["gold_passage_ids"] = ["nope"]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    capsys.readouterr()
    assert run("train-retriever") == 2
    err = capsys.readouterr().err
    assert "names gold passage 'nope', which is not in the corpus" in err
    assert not (tiny_project / "artifacts/retriever").exists()


def test_empty_corpus(tiny_project: Path, capsys: pytest.CaptureFixture) -> None:
    (tiny_project / "data/prepared/corpus.jsonl").write_text("")
    capsys.readouterr()
    assert run("build-bm25") == 2
    assert "empty corpus" in capsys.readouterr().err


def test_batches_group_by_document_and_share_columns() -> None:
    rows = [{"question": f"q{d}{p}{k}", "gold_passage_ids": [f"d{d}p{p}"], "doc_id": f"d{d}"}
            for d in range(4) for p in range(4) for k in range(3)]
    cfg = RetrieverConfig(batch_size=4, questions_per_passage=2, group_by_document=4)
    b = Batches.build(rows, cfg, seed=0)
    assert b.per_epoch == 4
    for i in range(4):
        pids, idx, targets = b(i)
        assert len({p.split("p")[0] for p in pids}) == 1  # one document per batch
        assert len(idx) == 8 and all(rows[j]["gold_passage_ids"][0] == pids[t]
                                     for j, t in zip(idx, targets, strict=True))
    seen = [p for i in range(4) for p in b(i)[0]]
    assert sorted(seen) == sorted(b.passage_ids)  # an epoch covers every passage once
    assert b(5) == Batches.build(rows, cfg, seed=0)(5)  # a pure function of (seed, i)
    assert b(0) != Batches.build(rows, cfg, seed=1)(0)


@pytest.mark.slow
def test_kill_9_then_resume_reaches_the_same_model(tiny_project: Path) -> None:
    """A real SIGKILL mid-training, then `--resume`: the same weights as an uninterrupted run."""
    import os
    import signal
    import subprocess
    import time

    from tests.conftest import BIN

    params = tiny_project / "params.yaml"
    params.write_text(params.read_text().replace("max_steps: 2", "max_steps: 120")
                      .replace("checkpoint_every: 1", "checkpoint_every: 10")
                      .replace("hard_negatives: bm25", "hard_negatives: none"))
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    assert run("train-retriever", "--no-resume") == 0
    full = json.loads((tiny_project / "artifacts/retriever/retriever.json").read_text())
    shutil.rmtree(tiny_project / "artifacts/retriever")
    shutil.rmtree(tiny_project / "checkpoints")

    state = tiny_project / "checkpoints/retriever/last/trainer_state.json"
    p = subprocess.Popen([str(BIN / "ragtrain"), "train-retriever", "--no-resume"],
                         cwd=tiny_project, env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not state.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    step = json.loads(state.read_text())["state"]["step"]
    assert 0 < step < 120, "the run was not interrupted mid-way"
    assert not (tiny_project / "artifacts/retriever").exists()  # nothing half-written

    r = subprocess.run([str(BIN / "ragtrain"), "train-retriever", "--resume"],
                       cwd=tiny_project, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    resumed = json.loads((tiny_project / "artifacts/retriever/retriever.json").read_text())
    assert resumed["fingerprint"] == full["fingerprint"]
    assert json.loads((tiny_project / "metrics/train_retriever.json").read_text())[
        "train/steps"] == 120


def test_index_from_another_corpus_is_refused(tiny_project: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    assert run("train-retriever") == 0 and run("build-index") == 0
    corpus = tiny_project / "data/prepared/corpus.jsonl"
    rows = [json.loads(x) for x in corpus.read_text().splitlines()]
    rows[0]["text"] += " Edited."
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    capsys.readouterr()
    assert run("eval-retriever") == 2
    assert "built from corpus" in capsys.readouterr().err


@pytest.mark.tracked
def test_stage_runs_are_tracked_in_mlflow(tiny_project: Path,
                                          capsys: pytest.CaptureFixture) -> None:
    from mlflow.tracking import MlflowClient

    assert run("train-retriever") == 0 and run("build-index") == 0
    assert run("eval-retriever") == 0
    mc = MlflowClient(f"sqlite:///{tiny_project}/mlruns/mlflow.db")
    exp = mc.get_experiment_by_name("ragtrain")
    runs = {r.info.run_name: r for r in mc.search_runs([exp.experiment_id])}
    assert {"fetch", "prepare", "build-bm25", "train-retriever", "build-index",
            "eval-retriever"} <= set(runs)
    assert all(r.info.status == "FINISHED" for r in runs.values())
    train = runs["train-retriever"]
    assert train.data.params["retriever.batch_size"] == "2"  # the effective config
    assert "git.dirty" in train.data.tags and "version.torch" in train.data.tags
    losses = mc.get_metric_history(train.info.run_id, "train/loss")
    assert [m.step for m in losses] == [1, 2]  # per step
    ev = runs["eval-retriever"]
    m = json.loads((tiny_project / "metrics/retriever.json").read_text())
    assert ev.data.metrics["test/recall_at_1"] == pytest.approx(m["test/recall_at_1"])
    arts = {a.path for a in mc.list_artifacts(ev.info.run_id, "plots")}
    assert "plots/recall_at_k.png" in arts
    assert mc.list_artifacts(ev.info.run_id, "predictions")
    assert runs["prepare"].inputs.dataset_inputs  # the data as MLflow dataset inputs

    # a stage that fails leaves its run FAILED
    f = tiny_project / "artifacts/index/index.faiss"
    f.write_bytes(b"garbage")
    assert run("eval-retriever") == 2
    failed = [r for r in mc.search_runs([exp.experiment_id])
              if r.info.run_name == "eval-retriever" and r.info.status == "FAILED"]
    assert len(failed) == 1


def test_unreachable_tracking_server_fails_before_work(tiny_project: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    params = tiny_project / "params.yaml"
    params.write_text(params.read_text().replace(
        "  enabled: false", "  enabled: true\n  uri: http://127.0.0.1:9"))
    capsys.readouterr()
    assert run("train-retriever") == 2
    err = capsys.readouterr().err
    assert "cannot reach the MLflow server at http://127.0.0.1:9" in err
    assert not (tiny_project / "artifacts/retriever").exists()
    assert not (tiny_project / "checkpoints").exists()


def test_same_data_params_code_same_metrics(tiny_project: Path) -> None:
    """Reproducible: the same tiny run twice gives the same weights and the same metrics."""
    outs = []
    for _ in range(2):
        assert run("train-retriever", "--no-resume") == 0
        assert run("build-index") == 0 and run("eval-retriever") == 0
        outs.append((
            json.loads((tiny_project / "artifacts/retriever/retriever.json").read_text()),
            (tiny_project / "metrics/retriever.json").read_text(),
            # the whole metrics file: wall times live in timings/, outside the DVC metrics
            (tiny_project / "metrics/train_retriever.json").read_text(),
        ))
    assert outs[0] == outs[1]


def test_checkpoint_of_other_code_is_not_resumed(tiny_project: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """DVC reruns training when its code changes; a finished checkpoint must not stand in."""
    from ragtrain.config import load_config
    from ragtrain.pipeline import retrieval
    from ragtrain.pipeline.paths import Paths

    assert run("train-retriever") == 0
    cfg, steps = load_config(Path("params.yaml")), []

    def train() -> None:  # record the optimizer steps this run really takes
        retrieval.run_train_retriever(
            cfg, Paths(), resume=True, progress=False,
            on_step=lambda s, logs: steps.append(s) if "train/loss" in logs else None)

    train()
    assert steps == []  # same code: resumed, nothing to do
    monkeypatch.setattr(retrieval, "code_hashes", lambda fn: ["other code"])
    train()
    assert steps == [1, 2]  # other code: trained again
