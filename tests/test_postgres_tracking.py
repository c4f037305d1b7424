"""MLflow on a database, the way a team runs it: a real PostgreSQL (initdb + pg_ctl on a free
loopback port, in a temporary folder) behind a real `mlflow server`, and the project's registry
layer against it: track a run, register versions, promote, roll back, serve the champion.

Skips, naming the reason, when PostgreSQL's binaries are missing or cannot run here.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from ragtrain import tracking
from ragtrain.config import RegistryConfig, TrackingConfig
from ragtrain.tracking import registry
from tests.test_registry import alias, promote, register, tags
from tests.test_serving import (
    check_answers,
    copy_project,
    load_in_fresh_process,
    project,  # noqa: F401 (the fixture)
    ragtrain,
    serve_champion,
    start_mlflow_server,
)
from tests.test_ui import free_port

pytestmark = pytest.mark.slow

DB, USER = "mlflow", "mlflow"


def pg_bin() -> Path | None:
    """The folder of PostgreSQL's server binaries (initdb, pg_ctl): on PATH or Debian's."""
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                  key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    return Path(dirs[-1]).parent if dirs else None


def as_user() -> list[str]:
    """The prefix that runs a command as an unprivileged user: PostgreSQL refuses root."""
    if os.geteuid() != 0:
        return []
    runuser = shutil.which("runuser")
    if runuser is None:
        pytest.skip("PostgreSQL refuses to run as root, and runuser is missing")
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return [runuser, "-u", name, "--"]
    pytest.skip("PostgreSQL refuses to run as root, and there is no postgres or nobody user")


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """A throwaway PostgreSQL on a free loopback port; yields the SQLAlchemy URI of an empty
    database. Skips with the reason when the server cannot be set up."""
    bindir = pg_bin()
    if bindir is None:
        pytest.skip("PostgreSQL not installed (no initdb on PATH or in /usr/lib/postgresql/*/bin)"
                    "; Debian: apt-get install postgresql")
    prefix = as_user()
    # Not pytest's tmp_path: it is private to root (0700) and the server runs as another user.
    # A short path, too: the unix socket's path must fit in 107 bytes.
    top = Path(tempfile.mkdtemp(prefix="ragtrain-pg-"))
    data, port = top / "data", free_port()
    if prefix:
        uid = pwd.getpwnam(prefix[2]).pw_uid
        os.chown(top, uid, -1)

    def pg(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*prefix, *args], capture_output=True, text=True, timeout=120)

    started = False
    try:
        r = pg(str(bindir / "initdb"), "-D", str(data), "-U", USER, "--auth=trust",
               "-E", "UTF8", "--no-locale")
        if r.returncode != 0:
            pytest.skip(f"PostgreSQL initdb failed: {(r.stderr or r.stdout).strip()[-500:]}")
        r = pg(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(top / "server.log"), "-w",
               "-t", "60", "-o", f"-h 127.0.0.1 -p {port} -k {top} -c fsync=off", "start")
        started = r.returncode == 0
        if not started:
            log = (top / "server.log").read_text() if (top / "server.log").exists() else ""
            pytest.skip(f"PostgreSQL did not start: {(r.stderr or r.stdout).strip()[-300:]} "
                        f"{log.strip()[-500:]}")
        import psycopg2  # the driver of the dev extra; MLflow's server loads it the same way

        con = psycopg2.connect(host="127.0.0.1", port=port, user=USER, dbname="postgres")
        con.autocommit = True  # CREATE DATABASE refuses a transaction
        with con.cursor() as cur:
            cur.execute(f"CREATE DATABASE {DB}")
        con.close()
        # +psycopg2: SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3, not psycopg2
        yield f"postgresql+psycopg2://{USER}@127.0.0.1:{port}/{DB}"
    finally:
        if started:
            pg(str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(top, ignore_errors=True)


def sql(uri: str, query: str) -> list[tuple]:
    """Rows of ``query`` on the database behind ``uri``, read with psycopg2 directly."""
    import psycopg2

    con = psycopg2.connect(uri.replace("postgresql+psycopg2://", "postgresql://"))
    try:
        with con.cursor() as cur:
            cur.execute(query)
            return cur.fetchall()
    finally:
        con.close()


@pytest.fixture(scope="module")
def pg_mlflow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, Path]]:
    """(server URL, database URI, artifacts folder): `mlflow server` over PostgreSQL, once per
    module (MLflow migrates a new database once, which takes seconds)."""
    tmp = tmp_path_factory.mktemp("pg_mlflow")
    with postgres_server() as db, start_mlflow_server(db, tmp / "artifacts",
                                                      tmp / "mlflow-server.log") as url:
        yield url, db, tmp / "artifacts"


def test_register_promote_rollback_on_postgres(pg_mlflow: tuple[str, str, Path],
                                               tmp_path: Path) -> None:
    url, db, artifacts = pg_mlflow
    root = tmp_path / "repo"
    root.mkdir()
    store = (TrackingConfig(uri=url, experiment="tests"), root)
    rcfg = RegistryConfig(model_name="rag-pg", floor=10.0)
    tcfg = store[0]
    tracking.check_store(tcfg.uri)  # GET /health, as every stage does first

    r = register(store, rcfg, tmp_path, 40.0)  # a tracked run that registers three models
    assert (r.version, r.components) == ("1", {"retriever": "1", "generator": "1"})
    assert alias(store, "rag-pg", "challenger") == "1"
    assert float(tags(store, "rag-pg", "1")["metric.test/f1"]) == 40.0
    p = promote(store, rcfg)
    assert p.promoted and alias(store, "rag-pg", "champion") == "1"
    register(store, rcfg, tmp_path, 45.0)
    assert promote(store, rcfg).promoted and alias(store, "rag-pg", "champion") == "2"
    register(store, rcfg, tmp_path, 30.0)  # worse: refused, the decision written on both
    p = promote(store, rcfg)
    assert not p.promoted and alias(store, "rag-pg", "champion") == "2"
    assert tags(store, "rag-pg", "3")["ragtrain.promotion.decision"] == "refused"
    rb = registry.rollback(rcfg, tcfg, root=root)
    assert (rb.replaced, rb.champion) == ("2", "1")
    assert alias(store, "rag-pg-retriever", "champion") == "1"
    assert "replaced by version 1" in tags(store, "rag-pg", "2")["ragtrain.rolled_back"]

    # It is PostgreSQL that holds it all, and the server's folder the artifacts; not the repo.
    assert sql(db, "SELECT name FROM registered_models ORDER BY name") == [
        ("rag-pg",), ("rag-pg-generator",), ("rag-pg-retriever",)]
    assert sql(db, "SELECT alias, version FROM registered_model_aliases "
                   "WHERE name = 'rag-pg' ORDER BY alias") == [("challenger", 3), ("champion", 1)]
    (n_runs,) = sql(db, "SELECT count(*) FROM runs WHERE name = 'register'")[0]
    assert n_runs == 3
    assert list(artifacts.rglob("MLmodel"))
    assert not (root / "mlruns").exists()


def test_cli_registers_promotes_and_serves_from_postgres(pg_mlflow: tuple[str, str, Path],
                                                         project: Path, tmp_path: Path) -> None:  # noqa: F811
    url, db, _ = pg_mlflow
    proj = copy_project(project, tmp_path / "proj", url)  # tracking.uri: the server's URL
    r = ragtrain(proj, "register")
    assert r.returncode == 0, r.stderr
    assert "registered ragtrain-rag version 1 as @challenger" in r.stdout
    r = ragtrain(proj, "promote")
    assert r.returncode == 0, r.stderr
    assert "version 1 is now the champion" in r.stdout
    assert sql(db, "SELECT version FROM registered_model_aliases "
                   "WHERE name = 'ragtrain-rag' AND alias = 'champion'") == [(1,)]
    check_answers(load_in_fresh_process(url))  # models:/ragtrain-rag@champion via the server
    serve_champion(url, tmp_path / "serve.log")  # `mlflow models serve` answers over HTTP
    assert not (proj / "mlruns").exists()
