"""ragtrain.tracking against a real MLflow sqlite store under tmp (no mocks of MLflow)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ragtrain import tracking
from ragtrain.config import TrackingConfig
from ragtrain.errors import TrackingError
from ragtrain.tracking import Decision, should_promote

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

SHA256 = "95aa6a52d5d6a735563366753ca50492a658031da74f301ac5238b03966972c9"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[TrackingConfig, Path]:
    """One sqlite store per module (MLflow migrates a new database once, which takes seconds)."""
    root = tmp_path_factory.mktemp("repo")
    return TrackingConfig(uri="sqlite:///mlruns/mlflow.db", experiment="tests"), root


@pytest.fixture(scope="module")
def mc(store: tuple[TrackingConfig, Path]):
    cfg, root = store
    return tracking.client(cfg.uri, root)


# --------------------------------------------------------------------------- store checks


def test_import_is_cheap() -> None:
    code = (
        "import sys, ragtrain.tracking; "
        "bad = [m for m in ('mlflow', 'matplotlib') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_resolve_uri_relative_sqlite_lands_under_root(tmp_path: Path) -> None:
    got = tracking.resolve_uri("sqlite:///mlruns/mlflow.db", tmp_path)
    assert got == f"sqlite:///{tmp_path.resolve()}/mlruns/mlflow.db"
    assert tracking.resolve_uri("sqlite:////abs/x.db", tmp_path) == "sqlite:////abs/x.db"
    assert tracking.resolve_uri("http://127.0.0.1:5000", tmp_path) == "http://127.0.0.1:5000"
    assert tracking.artifact_root("sqlite:///mlruns/mlflow.db", tmp_path) == (
        tmp_path.resolve() / "mlruns/artifacts"
    )


@pytest.mark.parametrize("uri", ["file:./mlruns", "./mlruns", "mlruns"])
def test_check_store_refuses_file_store(uri: str) -> None:
    with pytest.raises(TrackingError, match=r"file store.*sqlite:///mlruns/mlflow\.db"):
        tracking.check_store(uri)


def test_check_store_refuses_closed_http_port_quickly() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(TrackingError, match=rf"cannot reach the MLflow server at .*:{port}"):
        tracking.check_store(f"http://127.0.0.1:{port}", timeout_s=2.0)
    assert time.monotonic() - t0 < 3.0


def test_check_store_accepts_new_sqlite_path_without_creating_it(tmp_path: Path) -> None:
    tracking.check_store("sqlite:///new/sub/mlflow.db", root=tmp_path)
    assert not (tmp_path / "new").exists()


def test_check_store_refuses_a_file_that_is_not_sqlite(tmp_path: Path) -> None:
    (tmp_path / "mlflow.db").write_text("not a database, just text " * 100)
    with pytest.raises(TrackingError, match="not a readable sqlite database"):
        tracking.check_store("sqlite:///mlflow.db", root=tmp_path)


def test_check_store_refuses_parent_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "mlruns").write_text("")
    with pytest.raises(TrackingError, match="not a folder"):
        tracking.check_store("sqlite:///mlruns/mlflow.db", root=tmp_path)


# --------------------------------------------------------------------------- runs


def test_run_finished_with_params_metrics_artifacts(store, mc, tmp_path: Path) -> None:
    cfg, root = store
    report = tmp_path / "eval.json"
    report.write_text('{"dev/recall_at_5": 0.8}\n')
    index = tmp_path / "index"
    index.mkdir()
    (index / "vectors.bin").write_bytes(b"\x00" * 16)
    with tracking.run(cfg, "train", root=root, tags={"stage": "train"}) as h:
        h.log_params({"retriever.lr": 1.0e-4, "evaluation.recall_ks": [1, 5], "long": "x" * 7000})
        h.log_metrics({"train/loss": 0.5}, step=1)
        h.log_metrics({"train/loss": 0.25}, step=2)
        h.log_metrics({"dev/recall_at_5": 0.8})
        h.log_artifact(report)
        h.log_artifact(index)
        h.log_dict({"a": 1}, "report.json")
        h.set_tags({"note": "hello"})
    r = mc.get_run(h.run_id)
    assert r.info.status == "FINISHED"
    assert r.info.run_name == "train"
    assert r.data.params["retriever.lr"] == "0.0001"
    assert r.data.params["evaluation.recall_ks"] == "[1, 5]"
    assert len(r.data.params["long"]) == 6000
    assert r.data.metrics == {"train/loss": 0.25, "dev/recall_at_5": 0.8}
    hist = mc.get_metric_history(h.run_id, "train/loss")
    assert [(m.step, m.value) for m in hist] == [(1, 0.5), (2, 0.25)]
    assert r.data.tags["stage"] == "train" and r.data.tags["note"] == "hello"
    assert {a.path for a in mc.list_artifacts(h.run_id)} == {"eval.json", "index", "report.json"}
    assert [a.path for a in mc.list_artifacts(h.run_id, "index")] == ["index/vectors.bin"]
    # sqlite store: database and artifacts under <root>/mlruns
    assert (root / "mlruns/mlflow.db").is_file()
    art = (root / "mlruns/artifacts").resolve()
    assert h.artifact_uri.startswith(art.as_uri())
    assert (art / h.run_id / "artifacts/index/vectors.bin").is_file()


def test_failing_body_marks_run_failed(store, mc) -> None:
    cfg, root = store
    with pytest.raises(RuntimeError, match="boom"):
        with tracking.run(cfg, "fails", root=root) as h:
            raise RuntimeError("boom")
    assert mc.get_run(h.run_id).info.status == "FAILED"


def test_keyboard_interrupt_marks_run_killed(store, mc) -> None:
    cfg, root = store
    with pytest.raises(KeyboardInterrupt):
        with tracking.run(cfg, "interrupted", root=root) as h:
            raise KeyboardInterrupt
    assert mc.get_run(h.run_id).info.status == "KILLED"


def test_nested_run_has_parent_tag(store, mc) -> None:
    cfg, root = store
    with tracking.run(cfg, "pipeline", root=root) as parent:
        with tracking.run(cfg, "evaluate", root=root, parent_run_id=parent.run_id) as child:
            pass
    assert mc.get_run(child.run_id).data.tags["mlflow.parentRunId"] == parent.run_id
    with pytest.raises(TrackingError, match="parent run 'nope' does not exist"):
        with tracking.run(cfg, "orphan", root=root, parent_run_id="nope"):
            pass


def test_metric_name_with_at_is_refused_naming_the_key(store, mc) -> None:
    cfg, root = store
    with pytest.raises(TrackingError, match=r"'dev/recall@5'.*'dev/recall_at_5'"):
        with tracking.run(cfg, "bad-metric", root=root) as h:
            h.log_metrics({"dev/ok": 1.0, "dev/recall@5": 0.5})
    r = mc.get_run(h.run_id)
    assert r.info.status == "FAILED"
    assert r.data.metrics == {}  # validated before anything is logged


def test_nan_metric_is_skipped_with_a_warning(store, mc, caplog) -> None:
    cfg, root = store
    with tracking.run(cfg, "nan", root=root) as h:
        h.log_metrics({"dev/em": float("nan"), "dev/f1": 0.5}, step=3)
    assert mc.get_run(h.run_id).data.metrics == {"dev/f1": 0.5}
    assert "dev/em" in caplog.text and "NaN" in caplog.text


def test_log_input_dataset(store, mc, tmp_path: Path) -> None:
    cfg, root = store
    data = tmp_path / "qa.jsonl"
    data.write_text('{"question": "q"}\n')
    with tracking.run(cfg, "inputs", root=root) as h:
        h.log_input_dataset("squad-dev", data, SHA256, "training")
    (di,) = mc.get_run(h.run_id).inputs.dataset_inputs
    assert di.dataset.name == "squad-dev"
    assert di.dataset.digest == SHA256[:36]
    assert di.dataset.source_type == "local"
    assert data.resolve().as_uri() in di.dataset.source
    tags = {t.key: t.value for t in di.tags}
    assert tags["mlflow.data.context"] == "training"
    assert tags["ragtrain.digest"] == SHA256


# --------------------------------------------------------------------------- lineage

DVC_LOCK = """\
schema: '2.0'
stages:
  prepare:
    cmd: ragtrain prepare
    deps:
    - path: data/raw
      hash: md5
      md5: 13cbad7ecedc4169c6b6d4ef07d1d286.dir
      size: 10
      nfiles: 2
    params:
      params.yaml:
        data.split_seed: 0
    outs:
    - path: data/prepared
      hash: md5
      md5: 0123456789abcdef0123456789abcdef.dir
  evaluate@dev:
    cmd: ragtrain evaluate --split dev
    outs:
    - path: metrics/eval.json
      hash: md5
      md5: fedcba9876543210fedcba9876543210
"""


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_lineage_in_a_git_repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "dvc.lock").write_text(DVC_LOCK)

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
            cwd=repo, check=True, capture_output=True, text=True,
        ).stdout.strip()

    git("init", "-q")
    git("add", "dvc.lock")
    git("commit", "-q", "-m", "init")
    lin = tracking.lineage(repo)
    assert lin["git.commit"] == git("rev-parse", "HEAD")
    assert lin["git.dirty"] == "false"
    assert lin["dvc.prepare.data/raw"] == "13cbad7ecedc4169c6b6d4ef07d1d286.dir"
    assert lin["dvc.prepare.data/prepared"] == "0123456789abcdef0123456789abcdef.dir"
    assert lin["dvc.evaluate_dev.metrics/eval.json"] == "fedcba9876543210fedcba9876543210"
    assert lin["version.python"] == ".".join(map(str, sys.version_info[:3]))
    assert lin["version.mlflow"] != "absent"
    assert set(lin) >= {"version.torch", "version.transformers", "version.dvc", "version.faiss"}
    for k in lin:
        tracking.check_name(k, "tag")  # every key is loggable as an MLflow tag
    (repo / "dvc.lock").write_text(DVC_LOCK + "\n")
    assert tracking.lineage(repo)["git.dirty"] == "true"


def test_lineage_outside_git(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    lin = tracking.lineage(tmp_path)
    assert lin["git.commit"] == "unknown" and lin["git.dirty"] == "unknown"
    assert not any(k.startswith("dvc.") for k in lin)


# --------------------------------------------------------------------------- promotion

M = "dev/recall_at_5"


@pytest.mark.parametrize(
    ("new", "current", "kwargs", "promote", "words"),
    [
        ({M: 0.80}, {M: 0.75}, {}, True, ["0.8", "0.75"]),
        ({M: 0.75}, {M: 0.75}, {}, False, ["0.75", "gain +0"]),
        ({M: 0.70}, {M: 0.75}, {}, False, ["0.7", "0.75"]),
        ({M: 0.76}, {M: 0.75}, {"min_gain": 0.02}, False, ["0.76", "needs > 0.02"]),
        ({M: 0.80}, {M: 0.75}, {"min_gain": 0.02}, True, ["0.8", "0.75"]),
        ({M: 1.5}, {M: 2.0}, {"greater_is_better": False}, True, ["1.5", "2", "lower"]),
        ({M: 2.5}, {M: 2.0}, {"greater_is_better": False}, False, ["2.5", "2"]),
        ({"dev/em": 0.9}, {M: 0.75}, {}, False, [M, "new model has no"]),
        ({M: 0.8}, {"dev/em": 0.9}, {}, False, [M, "champion has no", "0.8"]),
        ({M: 0.8}, None, {}, True, ["no current champion", "0.8"]),
        ({M: 0.6}, None, {"floor": 0.5}, True, ["0.6", "0.5"]),
        ({M: 0.4}, None, {"floor": 0.5}, False, ["0.4", "floor 0.5"]),
        ({M: 0.5}, None, {"floor": 0.5}, True, ["0.5"]),  # meeting the floor is enough
        ({M: 0.45}, {M: 0.40}, {"floor": 0.5}, False, ["floor"]),  # floor holds with a champion
        ({M: float("nan")}, {M: 0.4}, {}, False, ["no " + M]),
    ],
)
def test_should_promote(new, current, kwargs, promote: bool, words: list[str]) -> None:
    d = should_promote(new, current, metric=M, **kwargs)
    assert d.promote is promote, d.reason
    for w in words:
        assert w in d.reason, (w, d.reason)


@pytest.mark.parametrize(
    ("new", "current", "kwargs", "want"),
    [
        (0.80, 0.75, {"min_gain": 0.02}, Decision(True, (
            f"promoted: new {M} = 0.8 vs champion 0.75 (higher is better): gain +0.05, "
            "needs > 0.02"))),
        (2.5, 2.0, {"greater_is_better": False}, Decision(False, (
            f"refused: new {M} = 2.5 vs champion 2 (lower is better): gain -0.5, needs > 0"))),
        (0.4, None, {"floor": 0.5}, Decision(False, (
            f"refused: new {M} = 0.4 does not meet the floor 0.5 (higher is better)"))),
        (0.6, None, {"floor": 0.5}, Decision(True, (
            f"promoted: no current champion; new {M} = 0.6, which meets the floor 0.5"))),
    ],
)
def test_should_promote_reason_in_full(new: float, current: float | None, kwargs, want) -> None:
    champion = None if current is None else {M: current}
    assert should_promote({M: new}, champion, metric=M, **kwargs) == want


def test_should_promote_rejects_negative_min_gain() -> None:
    with pytest.raises(ValueError, match="min_gain"):
        should_promote({M: 1.0}, {M: 0.0}, metric=M, min_gain=-0.1)


# --------------------------------------------------------------------------- registry


def test_register_alias_and_tags_round_trip(store, mc, tmp_path: Path) -> None:
    cfg, root = store
    model = tmp_path / "model"
    model.mkdir()
    (model / "weights.bin").write_bytes(b"\x01" * 8)
    versions = []
    for score in (0.7, 0.8):
        with tracking.run(cfg, "train", root=root) as h:
            h.log_artifact(model)
            h.log_metrics({M: score})
        versions.append(
            tracking.register_model(cfg, h.run_id, "model", "retriever", {"split": "dev"},
                                    root=root)
        )
    assert versions == ["1", "2"]
    assert tracking.get_alias(cfg, "retriever", "champion", root=root) is None
    assert tracking.get_alias(cfg, "no-such-model", "champion", root=root) is None
    tracking.set_alias(cfg, "retriever", "champion", "1", root=root)
    assert tracking.get_alias(cfg, "retriever", "champion", root=root) == "1"
    for version, score in (("1", 0.7), ("2", 0.8)):
        run_id = mc.get_model_version("retriever", version).run_id
        assert mc.get_run(run_id).data.metrics == {M: score}
    tracking.set_alias(cfg, "retriever", "champion", "2", root=root)
    assert tracking.get_alias(cfg, "retriever", "champion", root=root) == "2"
    tracking.tag_version(cfg, "retriever", "2", {"promoted_over": 1}, root=root)
    mv = mc.get_model_version("retriever", "2")
    assert mv.tags == {"split": "dev", "promoted_over": "1"}
    assert mv.source.endswith(f"{mv.run_id}/artifacts/model")
    tracking.delete_alias(cfg, "retriever", "champion", root=root)
    tracking.delete_alias(cfg, "retriever", "champion", root=root)  # idempotent
    assert tracking.get_alias(cfg, "retriever", "champion", root=root) is None
    with pytest.raises(TrackingError, match="no artifacts under 'missing'"):
        tracking.register_model(cfg, h.run_id, "missing", "retriever", root=root)


# --------------------------------------------------------------------------- plots


def test_plots_write_png(tmp_path: Path) -> None:
    points = [{"step": i, "loss": 1.0 / (i + 1), "lr": 1e-4 * min(1, i / 3)} for i in range(10)]
    points.append({"step": 10, "loss": float("nan")})  # skipped, not plotted
    curve = tracking.plot_curve(points, "step", ["loss", "lr"], tmp_path / "p/loss.png", "train")
    metrics = {f"test/{s}/recall_at_{k}": v * k / 100 for s, v in (("bm25", 0.5), ("dense", 0.9))
               for k in (1, 5, 20, 100)}
    recall = tracking.plot_recall_at_k(metrics, "test", tmp_path / "recall.png", ["bm25", "dense"])
    for p in (curve, recall):
        assert p.read_bytes()[:8] == PNG_MAGIC
    assert sorted(x.name for x in tmp_path.rglob("*")) == ["loss.png", "p", "recall.png"]
    with pytest.raises(TrackingError, match="test/hybrid/recall_at_<k>"):
        tracking.plot_recall_at_k(metrics, "test", tmp_path / "r2.png", ["hybrid"])
    with pytest.raises(TrackingError, match="no point has numeric 'epoch'"):
        tracking.plot_curve(points, "epoch", ["loss"], tmp_path / "e.png", "x")
