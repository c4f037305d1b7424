"""No secret in what MLflow records: passwords in store URIs and data URLs, secret query
parameters, secret-named keys and the values of secret-named environment variables are written
as ``***`` in params, tags, logged dicts and model version tags; checked by reading a real sqlite
store back, and in the CLI's error line."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

from ragtrain import tracking
from ragtrain.config import Config, TrackingConfig, flatten, to_dict
from ragtrain.pipeline.paths import Paths
from ragtrain.pipeline.tracked import tracked
from ragtrain.tracking.runs import MASK, is_secret_key, redact, redact_value

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

DB_PASSWORD = "Db-pa55word-9f3"
URL_PASSWORD = "mirror-pa55-77"
ENV_TOKEN = "hf_envtoken0123456789"
QUERY_TOKEN = "q-token-abc123"
SECRETS = (DB_PASSWORD, URL_PASSWORD, ENV_TOKEN, QUERY_TOKEN)


@pytest.mark.parametrize("text, want", [
    (f"postgresql://mlflow:{DB_PASSWORD}@db.example:5432/mlflow",
     "postgresql://mlflow:***@db.example:5432/mlflow"),
    ("mysql+pymysql://u:p@ss@db/m?charset=utf8", "mysql+pymysql://u:***@db/m?charset=utf8"),
    ("http://admin:secret@127.0.0.1:5000", "http://admin:***@127.0.0.1:5000"),
    ("https://ghp_0123456789abcdefghij@github.com/o/r.git", "https://***@github.com/o/r.git"),
    ("https://h/x.zip?token=abc&v=1", "https://h/x.zip?token=***&v=1"),
    ("s3://b/k?X-Amz-Signature=abc", "s3://b/k?X-Amz-Signature=***"),
    ("['http://a:b@h/x', 'y']", "['http://a:***@h/x', 'y']"),
    # nothing secret: unchanged
    ("sqlite:///mlruns/mlflow.db", "sqlite:///mlruns/mlflow.db"),
    ("http://127.0.0.1:5000/path@x", "http://127.0.0.1:5000/path@x"),
    ("user@example.com wrote it", "user@example.com wrote it"),
])
def test_redact_uris(text: str, want: str) -> None:
    assert redact(text, environ={}) == want


@pytest.mark.parametrize("key, secret", [
    ("MLFLOW_TRACKING_PASSWORD", True), ("MLFLOW_TRACKING_TOKEN", True), ("HF_TOKEN", True),
    ("AWS_SECRET_ACCESS_KEY", True), ("PREFECT_API_KEY", True), ("api-key", True),
    ("PREFECT_API_AUTH_STRING", True), ("db.password", True),
    ("generator.max_new_tokens", False), ("data.chunk_tokens", False), ("tokenizer", False),
    ("TOKENIZERS_PARALLELISM", False), ("PWD", False), ("MLFLOW_TRACKING_USERNAME", False),
])
def test_secret_keys(key: str, secret: bool) -> None:
    assert is_secret_key(key) is secret


def test_values_of_secret_env_vars_are_masked() -> None:
    env = {"HF_TOKEN": ENV_TOKEN, "PREFECT_API_KEY": "1", "HOME": "/home/me"}
    assert redact(f"hub={ENV_TOKEN} home=/home/me", env) == "hub=*** home=/home/me"  # "1": short
    assert redact_value("x", {"hf_token": "anything", "n": 3, "l": ["http://u:p@h"]}) == {
        "hf_token": MASK, "n": 3, "l": ["http://u:***@h"]}


def _store(tmp_path: Path) -> tuple[TrackingConfig, Path]:
    return TrackingConfig(uri="sqlite:///mlruns/mlflow.db", experiment="redaction"), tmp_path


def _everything_recorded(tcfg: TrackingConfig, root: Path, run_id: str) -> str:
    """Every param, tag and logged JSON of the run, and every model version tag, as one text."""
    mc = tracking.client(tcfg.uri, root)
    r = mc.get_run(run_id)
    texts = [json.dumps(dict(r.data.params)), json.dumps(dict(r.data.tags))]
    art = Path(r.info.artifact_uri.removeprefix("file://"))
    texts += [p.read_text() for p in art.rglob("*.json")]
    for mv in mc.search_model_versions(f"run_id = '{run_id}'"):
        texts.append(json.dumps(dict(mc.get_model_version(mv.name, mv.version).tags)))
    return "\n".join(texts)


def test_no_secret_in_a_real_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A config naming a password-protected store and data mirror, logged as the pipeline logs
    it; a secret env var's value used in a tag; then read back from the sqlite store."""
    monkeypatch.setenv("HF_TOKEN", ENV_TOKEN)
    tcfg, root = _store(tmp_path)
    cfg = Config()
    cfg = dataclasses.replace(
        cfg,
        tracking=dataclasses.replace(
            cfg.tracking, uri=f"postgresql://mlflow:{DB_PASSWORD}@db.example:5432/mlflow"),
        data=dataclasses.replace(cfg.data, source=[
            f"https://ragtrain:{URL_PASSWORD}@mirror.example/dev.json.zip",
            f"https://other.example/dev.json.zip?token={QUERY_TOKEN}"]))
    (tmp_path / "payload").mkdir()
    (tmp_path / "payload/x.txt").write_text("x")
    with tracking.run(tcfg, "redaction", root=root,
                      tags={"ragtrain.note": f"pulled with {ENV_TOKEN}"}) as run:
        run.log_params(flatten(to_dict(cfg)))
        run.set_tags({"ragtrain.tracking_uri": cfg.tracking.uri, "api_key": "k-0123456789"})
        run.log_dict({"source": cfg.data.source, "nested": {"password": DB_PASSWORD}},
                     "source.json")
        run.log_artifact(tmp_path / "payload", "rag")
        version = tracking.register_model(tcfg, run.run_id, "rag", "redaction-model",
                                          {"ragtrain.source": cfg.data.source[0]}, root=root)
        tracking.tag_version(tcfg, "redaction-model", version,
                             {"ragtrain.tracking_uri": cfg.tracking.uri}, root=root)
    recorded = _everything_recorded(tcfg, root, run.run_id)
    for secret in (*SECRETS, "k-0123456789"):
        assert secret not in recorded
    params = tracking.client(tcfg.uri, root).get_run(run.run_id).data.params
    # what is not secret stays readable
    assert params["tracking.uri"] == "postgresql://mlflow:***@db.example:5432/mlflow"
    assert "https://ragtrain:***@mirror.example/dev.json.zip" in params["data.source"]
    assert "?token=***" in params["data.source"]
    assert params["tracking.experiment"] == cfg.tracking.experiment
    assert "ragtrain:***@mirror.example" in recorded and "pulled with ***" in recorded


def test_a_stage_run_logs_no_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The stages' own path (``pipeline.tracked``: config as params, lineage as tags)."""
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ENV_TOKEN)
    cfg = Config()
    cfg = dataclasses.replace(
        cfg, tracking=dataclasses.replace(cfg.tracking, uri="sqlite:///mlruns/mlflow.db"),
        data=dataclasses.replace(
            cfg.data, source=f"https://u:{URL_PASSWORD}@h.example/{ENV_TOKEN}/dev.json"))
    with tracked(cfg, Paths(tmp_path), "fetch") as run:
        assert run is not None
        run.log_dict({"source": cfg.data.source}, "source.json")
    recorded = _everything_recorded(cfg.tracking, tmp_path, run.run_id)
    assert URL_PASSWORD not in recorded and ENV_TOKEN not in recorded
    assert "https://u:***@h.example/***/dev.json" in recorded


def test_the_cli_error_line_hides_the_password(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from ragtrain import cli

    (tmp_path / "p.yaml").write_text(
        f"tracking:\n  uri: http://admin:{DB_PASSWORD}@127.0.0.1:9\n")
    old = Path.cwd()
    os.chdir(tmp_path)
    try:
        rc = cli.main(["-p", "p.yaml", "promote"])
    finally:
        os.chdir(old)
    err = capsys.readouterr().err
    assert rc == 2 and DB_PASSWORD not in err, err
    assert "http://admin:***@127.0.0.1:9" in err, err
