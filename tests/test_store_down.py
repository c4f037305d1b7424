"""The tracking store goes down mid-stage: a real `mlflow server` (and its workers) killed with
`kill -9` while `ragtrain train-retriever` logs to it, and again while `ragtrain register`
registers; then the server comes back (same port, same database) and the stages are rerun.

The kill is injected at a chosen call inside the stage (tests/fixtures/faults/sitecustomize.py,
``RAGTRAIN_FAULT_KILL_PIDS``), so the outage always lands at the same point. MLflow's HTTP
client retries a refused connection 7 times with exponential backoff by default (~4 minutes
before the stage fails); the test sets ``MLFLOW_HTTP_REQUEST_MAX_RETRIES=0`` to fail at once.
What happens and what to do: docs/reliability.md.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests import test_serving
from tests.conftest import run_stages
from tests.test_faults import MODEL, MODELS, Fault, check_registry, registry_at, run
from tests.test_serving import STAGES, copy_project, params, start_mlflow_server

pytestmark = pytest.mark.slow

FAIL_FAST = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def cmdline(p: psutil.Process) -> list[str]:
    """``p``'s command line, or [] for a process that ended since it was listed (a short-lived
    child of the server, or of an earlier stage, can exit between the listing and the read)."""
    try:
        return p.cmdline()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return []


def server_pids(port: int) -> list[str]:
    """The `mlflow server` on ``port`` started by this process, and all its descendants."""
    me = psutil.Process()
    tops = [p for p in me.children(recursive=False)
            if "server" in cmdline(p) and str(port) in cmdline(p)]
    assert len(tops) == 1, [cmdline(p) for p in tops]
    return [str(p.pid) for p in [tops[0], *tops[0].children(recursive=True)]]


def stage(proj: Path, *args: str, kill_server_at: Fault | None = None,
          port: int | None = None, mark: Path | None = None) -> Any:
    """Run `ragtrain ...` in ``proj``; with ``kill_server_at``, the server on ``port`` is
    killed (kill -9) at that call while the stage goes on."""
    env = dict(FAIL_FAST)
    if kill_server_at is not None:
        assert port is not None
        env["RAGTRAIN_FAULT_KILL_PIDS"] = " ".join(server_pids(port))
    return run(proj, "ragtrain", *args, fault=kill_server_at, mark=mark, env_extra=env)


@pytest.fixture(scope="module")
def outage(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path) -> Iterator[dict]:
    """The whole story, in one tiny project tracked by a real server (one database):
    train-retriever loses the server mid-training, is rerun while it is down, then after it is
    back; register loses it between two registrations, and is rerun after it is back."""
    from mlflow.tracking import MlflowClient

    tmp = tmp_path_factory.mktemp("store_down")
    built = tmp / "built"
    built.mkdir()
    (built / "params.yaml").write_text(params(tiny_bert_dir, "sqlite:///mlruns/mlflow.db"))
    run_stages(built, STAGES)  # untracked, in-process: the inputs of the two stages
    db, arts = f"sqlite:///{tmp}/server.db", tmp / "server-artifacts"
    port = test_serving.free_port()
    seen: dict[str, Any] = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(test_serving, "free_port", lambda: port)  # every restart: the same URL
        with start_mlflow_server(db, arts, tmp / "server1.log") as url:
            proj = copy_project(built, tmp / "proj", url)
            # as DVC does before running the stage: its outs removed; no checkpoint yet
            for p in ("artifacts/retriever", "checkpoints/retriever",
                      "metrics/train_retriever.json", "plots/train_retriever.json"):
                shutil.rmtree(proj / p, ignore_errors=True) if (proj / p).is_dir() else (
                    proj / p).unlink(missing_ok=True)
            seen["url"] = url
            # training: the server dies right after the step-1 checkpoint (max_steps 2,
            # checkpoint_every 1); step 2's metrics cannot be logged
            seen["train_1"] = stage(proj, "train-retriever", "--resume", port=port,
                                    kill_server_at=Fault("ragtrain.trainer:save_checkpoint@1:"
                                                         "after", "train-retriever"),
                                    mark=tmp / "m1")
        seen["mark_1"] = (tmp / "m1").read_text()
        seen["ckpt_1"] = json.loads((proj / "checkpoints/retriever/last/trainer_state.json")
                                    .read_text())["state"]["step"]
        seen["exists_1"] = {p: (proj / p).exists() for p in (
            "artifacts/retriever", "metrics/train_retriever.json", "plots/train_retriever.json")}
        seen["train_2"] = stage(proj, "train-retriever", "--resume")  # still down
        with start_mlflow_server(db, arts, tmp / "server2.log"):
            seen["train_3"] = stage(proj, "train-retriever", "--resume")  # back
            mc = MlflowClient(url)
            runs = mc.search_runs([mc.get_experiment_by_name("ragtrain").experiment_id])
            seen["train_runs"] = {r.info.run_id: (r.info.status, dict(r.data.metrics))
                                  for r in runs if r.info.run_name == "train-retriever"}
            finished = [k for k, (s, _) in seen["train_runs"].items() if s == "FINISHED"]
            seen["train_3_loss_steps"] = ([m.step for m in mc.get_metric_history(
                finished[0], "train/loss")] if finished else None)
            # register: the server dies after the retriever's version is created, before the
            # generator's
            seen["register_1"] = stage(proj, "register", port=port,
                                       kill_server_at=Fault("ragtrain.tracking:register_model"
                                                            "@2:before", "register"),
                                       mark=tmp / "m2")
        seen["registered_1"] = (proj / "artifacts/registered.json").exists()
        with start_mlflow_server(db, arts, tmp / "server3.log"):
            seen["registry_1"] = registry_at(url)
            seen["register_2"] = stage(proj, "register")
            seen["registry_2"] = registry_at(url)
        seen["registered_2"] = json.loads((proj / "artifacts/registered.json").read_text())
    yield seen


def test_training_fails_when_the_store_dies_and_resumes_after(outage: dict) -> None:
    url = outage["url"]
    r1 = outage["train_1"]
    assert "save_checkpoint" in outage["mark_1"]
    # exit 2, one line naming the server and the call that failed (tqdm's bar may follow it)
    assert r1.returncode == 2, r1.stderr[-3000:]
    err = next((x for x in r1.stderr.splitlines() if x.startswith("error:")), r1.stderr[-3000:])
    assert err.startswith("error: run ") and ": log metrics: " in err and url in err, err
    # nothing half-written: the outs are absent (never written), the step-1 checkpoint is whole
    assert outage["ckpt_1"] == 1
    assert not any(outage["exists_1"].values()), outage["exists_1"]
    # rerun while the server is still down: refused before any work, saying what to do
    r2 = outage["train_2"]
    assert r2.returncode == 2
    assert (f"error: tracking.uri: cannot reach the MLflow server at {url}: " in r2.stderr
            and "start it with `make mlflow-ui` or fix tracking.uri" in r2.stderr), r2.stderr
    # back: the rerun resumes from the checkpoint (only step 2 is trained and logged), finishes
    r3 = outage["train_3"]
    assert r3.returncode == 0, r3.stderr[-3000:]
    statuses = sorted(s for s, _ in outage["train_runs"].values())
    # the interrupted run cannot be marked FAILED while the server is down: it stays RUNNING
    assert statuses == ["FINISHED", "RUNNING"], outage["train_runs"]
    assert outage["train_3_loss_steps"] == [2]


def test_register_fails_when_the_store_dies_and_succeeds_after(outage: dict) -> None:
    url = outage["url"]
    r = outage["register_1"]
    assert r.returncode == 2, r.stderr[-3000:]
    err = next((x for x in r.stderr.splitlines() if x.startswith("error:")), r.stderr[-3000:])
    assert err.startswith(f"error: register '{MODELS[2]}' from run ") and url in err, err
    assert not outage["registered_1"]  # no artifacts/registered.json for a failed registration
    mid = outage["registry_1"]
    # no RAG version and no alias: the only trace is the retriever's version (swept below)
    assert MODEL not in mid and MODELS[2] not in mid
    assert list(mid[MODELS[1]]["versions"]) == ["1"] and mid[MODELS[1]]["aliases"] == {}
    check_registry({MODELS[1]: mid[MODELS[1]]})
    assert outage["register_2"].returncode == 0, outage["register_2"].stderr[-3000:]
    after, reg = outage["registry_2"], outage["registered_2"]
    check_registry(after)
    assert after[MODEL]["aliases"] == {"challenger": reg["version"]}
    assert reg["retriever_version"] == "2" and after[MODELS[1]]["aliases"] == {
        "challenger": "2"}
    assert after[MODEL]["versions"][reg["version"]]["run_status"] == "FINISHED"


def test_a_store_outage_leaves_nothing_half_registered(outage: dict) -> None:
    """The registration that died with the store could not delete the retriever version it had
    created; the next one (under the registry lock, whose dead holder it breaks) deletes it."""
    after = outage["registry_2"]
    referenced = {(f"{MODEL}-{c}", t[f"ragtrain.{c}_version"])
                  for info in after[MODEL]["versions"].values() for t in [info["tags"]]
                  for c in ("retriever", "generator")}
    components = {(n, v) for n in MODELS[1:] for v in after.get(n, {}).get("versions", {})}
    assert components <= referenced, sorted(components - referenced)
