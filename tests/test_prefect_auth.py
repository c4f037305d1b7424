"""The Prefect server's API login for real (docs/security.md): a `prefect server start` with
PREFECT_SERVER_API_AUTH_STRING answers 401 without it or with a wrong one (health probes
aside), and a flow run by a client with PREFECT_API_AUTH_STRING is recorded, while a client
without it cannot start one."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import BIN
from tests.test_ui import free_port, stop, wait

pytestmark = pytest.mark.slow

LOGIN = "ragtrain:a-long-shared-secret"
FLOW = ("from prefect import flow\n"
        "@flow(name='auth-probe')\n"
        "def probe() -> int:\n"
        "    return 7\n"
        "print('result', probe())\n")


def call(url: str, path: str, login: str | None, body: dict | None = None) -> tuple[int, object]:
    """(HTTP status, JSON body) of a request, with ``login`` as HTTP Basic credentials."""
    headers = {"Content-Type": "application/json"}
    if login is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(login.encode()).decode()
    req = urllib.request.Request(f"{url}{path}", headers=headers,
                                 data=None if body is None else json.dumps(body).encode(),
                                 method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


@pytest.fixture()
def server(tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_UI_API_URL": url}
    for k in ("PREFECT_API_URL", "PREFECT_API_AUTH_STRING"):
        env.pop(k, None)
    with open(tmp_path / "server.log", "w") as log:
        p = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                              "--port", str(port)],
                             env={**env, "PREFECT_SERVER_API_AUTH_STRING": LOGIN},
                             stdout=log, stderr=log)
    try:
        wait(lambda: call(url, "/health", None) == (200, True), 120, "the Prefect server")
        yield url, {**env, "PREFECT_API_URL": url}
    finally:
        stop(p)


def test_the_api_needs_the_login_and_a_client_with_it_runs_flows(
        server: tuple[str, dict[str, str]], tmp_path: Path) -> None:
    url, env = server
    assert call(url, "/ready", None)[0] == 200  # probes stay open
    for login in (None, "ragtrain:wrong", "someone-else:" + LOGIN.split(":", 1)[1]):
        status, body = call(url, "/flow_runs/filter", login, {})
        assert (status, body) == (401, {"exception_message": "Unauthorized"}), login

    def run_flow(client_env: dict[str, str]) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", FLOW], cwd=tmp_path, env=client_env,
                              capture_output=True, text=True, timeout=180)

    refused = run_flow(env)  # no PREFECT_API_AUTH_STRING
    assert refused.returncode != 0 and "401" in refused.stdout + refused.stderr
    done = run_flow({**env, "PREFECT_API_AUTH_STRING": LOGIN})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "result 7" in done.stdout

    status, runs = call(url, "/flow_runs/filter", LOGIN, {})
    assert status == 200
    assert [(r["name"] != "", r["state_type"]) for r in runs] == [(True, "COMPLETED")]
    status, flows = call(url, "/flows/filter", LOGIN, {})
    assert [f["name"] for f in flows] == ["auth-probe"]
