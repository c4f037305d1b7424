"""Access control: a real `mlflow server --app-name basic-auth` (sqlite stores under tmp) in
front of the registry. An anonymous client and a read-only user can read but cannot register,
promote or roll back through ragtrain's own functions, and get a TrackingError that names the
problem and MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD; the admin can do all three.
Setup in docs/security.md."""

from __future__ import annotations

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

from ragtrain import tracking
from ragtrain.config import RegistryConfig, TrackingConfig
from ragtrain.errors import TrackingError
from ragtrain.tracking import registry

pytestmark = pytest.mark.slow

ADMIN = ("admin", "admin-Pa55-for-tests")
READER = ("reader", "reader-Pa55-for-tests")
MODEL = "auth-rag"
CREDS = "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The basic-auth MLflow server on a free 127.0.0.1 port; its URL."""
    pytest.importorskip("flask_wtf", reason="the basic-auth app needs mlflow[auth] (Flask-WTF)")
    d = tmp_path_factory.mktemp("mlflow-auth")
    (d / "basic_auth.ini").write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{d / 'basic_auth.db'}\nadmin_username = {ADMIN[0]}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    port = _free_port()
    env = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(d / "basic_auth.ini"),
           "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN[1],
           "MLFLOW_FLASK_SERVER_SECRET_KEY": "csrf-key-for-tests",
           "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    for k in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        env.pop(k, None)
    log = open(d / "server.log", "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{d / 'mlflow.db'}",
         "--artifacts-destination", str(d / "artifacts")],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("mlflow server did not start:\n"
                            + (d / "server.log").read_text()[-3000:])
            time.sleep(1)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server's own process group
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def login(monkeypatch: pytest.MonkeyPatch, who: tuple[str, str] | None) -> None:
    """Send ``who``'s credentials (MLflow reads them from the environment on every request)."""
    if who is None:
        monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
        monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", who[0])
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", who[1])


def _version(tcfg: TrackingConfig, run_id: str, metric: float) -> str:
    tags = {f"{registry.METRIC_TAG}test/f1": repr(metric), registry.EVAL_SET_TAG: "e" * 64,
            registry.KIND_TAG: "rag", registry.ENCODER_FP_TAG: "f" * 16,
            registry.INDEX_FP_TAG: "f" * 16}
    return tracking.register_model(tcfg, run_id, "rag", MODEL, tags)


@pytest.fixture(scope="module")
def registry_state(server: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """As admin: the reader account; a run; v1 champion, v2 promoted over it, v3 challenger."""
    from mlflow.server.auth.client import AuthServiceClient

    mp = pytest.MonkeyPatch()
    try:
        login(mp, ADMIN)
        AuthServiceClient(server).create_user(*READER)
        tcfg, rcfg = TrackingConfig(uri=server, experiment="auth"), RegistryConfig(model_name=MODEL)
        payload = tmp_path_factory.mktemp("payload")
        (payload / "MLmodel").write_text("a stand-in model folder\n")
        with tracking.run(tcfg, "auth-test") as run:
            run.log_artifact(payload, "rag")
        v1, v2 = _version(tcfg, run.run_id, 50.0), _version(tcfg, run.run_id, 60.0)
        tracking.set_alias(tcfg, MODEL, registry.CHAMPION, v1)
        tracking.set_alias(tcfg, MODEL, registry.CHALLENGER, v2)
        p = registry.promote(rcfg, tcfg)  # the admin can promote
        assert p.promoted and tracking.get_alias(tcfg, MODEL, registry.CHAMPION) == v2
        v3 = _version(tcfg, run.run_id, 70.0)
        tracking.set_alias(tcfg, MODEL, registry.CHALLENGER, v3)
        return {"run_id": run.run_id, "v1": v1, "v2": v2, "v3": v3}
    finally:
        mp.undo()


@pytest.mark.parametrize("who, why", [
    (None, "not authenticated: the MLflow server requires a login and none was given"),
    (READER, "permission denied to user 'reader' by the MLflow server: this needs EDIT"),
    ((READER[0], "wrong-password"), "not authenticated: the MLflow server requires a login "
                                    "and refused user 'reader'"),
])
def test_no_write_without_permission(server: str, registry_state: dict[str, str],
                                     monkeypatch: pytest.MonkeyPatch,
                                     who: tuple[str, str] | None, why: str) -> None:
    tcfg, rcfg = TrackingConfig(uri=server, experiment="auth"), RegistryConfig(model_name=MODEL)
    login(monkeypatch, who)
    if who == READER:  # read-only, not locked out
        assert tracking.get_alias(tcfg, MODEL, registry.CHAMPION) == registry_state["v2"]
    attempts = {
        "register": lambda: _version(tcfg, registry_state["run_id"], 99.0),
        "set champion": lambda: tracking.set_alias(tcfg, MODEL, registry.CHAMPION,
                                                   registry_state["v1"]),
        "promote": lambda: registry.promote(rcfg, tcfg),
        "rollback": lambda: registry.rollback(rcfg, tcfg),
    }
    for what, attempt in attempts.items():
        with pytest.raises(TrackingError) as e:
            attempt()
        assert why in str(e.value) and CREDS in str(e.value), f"{what}: {e.value}"
    # nothing changed: the aliases and the versions are as the admin left them
    login(monkeypatch, ADMIN)
    assert tracking.get_alias(tcfg, MODEL, registry.CHAMPION) == registry_state["v2"]
    assert tracking.get_alias(tcfg, MODEL, registry.CHALLENGER) == registry_state["v3"]
    mc = tracking.client(server)
    assert len(mc.search_model_versions(f"name = '{MODEL}'")) == 3


def test_the_cli_says_which_credentials_to_set(server: str, registry_state: dict[str, str],
                                               monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from ragtrain import cli

    (tmp_path / "params.yaml").write_text(
        f"tracking:\n  uri: {server}\n  experiment: auth\nregistry:\n  model_name: {MODEL}\n")
    login(monkeypatch, READER)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["promote"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "permission denied to user 'reader'" in err, err
    assert CREDS in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_the_admin_can_roll_back(server: str, registry_state: dict[str, str],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    tcfg, rcfg = TrackingConfig(uri=server, experiment="auth"), RegistryConfig(model_name=MODEL)
    login(monkeypatch, ADMIN)
    r = registry.rollback(rcfg, tcfg)
    assert (r.replaced, r.champion) == (registry_state["v2"], registry_state["v1"])
    assert tracking.get_alias(tcfg, MODEL, registry.CHAMPION) == registry_state["v1"]
