"""Fault injection: `kill -9` (no cleanup, no ``finally``) at chosen points inside the stages of a
tiny project run by the real `dvc repro`, then the rerun a user would do.

The kill comes from ``tests/fixtures/faults/sitecustomize.py``, put first on PYTHONPATH: the
`ragtrain <stage>` process DVC starts wraps one function and kills itself at its N-th call.
Nothing under src/ is touched. After each kill: no half-written file in any DVC out (each is
absent, or complete and equal to the uninterrupted run's), atomic temp folders only beside the
outs; after the rerun: the metrics and the outputs' hashes equal the uninterrupted baseline's, and
the registry has no dangling alias and no incomplete version.

The killed run and the rerun are `dvc repro -f -s STAGE`. The baseline already ran these exact
stages, so a plain `dvc repro` after the kill restores the baseline's outputs from DVC's cache
("is cached - skipping run, checking out outputs") instead of running the stage (the index test
checks that path too); a stage killed on the first run of its inputs has no such entry, and plain
`dvc repro` runs it, like the forced rerun here. Then a plain `dvc repro` must find nothing to run:
the rerun's outputs are byte for byte the baseline's.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from ragtrain.tracking.registry import (
    CHALLENGER,
    CHAMPION,
    ENCODER_FP_TAG,
    EVAL_SET_TAG,
    INDEX_FP_TAG,
    KIND_TAG,
    METRIC_TAG,
)
from tests.conftest import BIN, FIXTURES
from tests.test_dvc_pipeline import ENV, copy_repo, sh
from tests.test_flow import prefect_server, tiny_overrides  # noqa: F401 (a fixture)
from tests.test_ui import wait

pytestmark = pytest.mark.slow

FAULTS = FIXTURES / "faults"  # the sitecustomize.py that injects the kill
MODEL = "ragtrain-rag"
MODELS = (MODEL, f"{MODEL}-retriever", f"{MODEL}-generator")
REPRO = ("dvc", "repro", "register")


def force(stage: str) -> tuple[str, ...]:
    """`dvc repro -f -s STAGE`: run the stage's command whatever DVC's lock and cache say."""
    return ("dvc", "repro", "-f", "-s", stage)


_TIMING = re.compile(r"seconds|_per_s\b|wall")  # wall-clock fields: never compared


@dataclass(frozen=True)
class Fault:
    """Kill `ragtrain <stage>` at call ``target``'s N-th call ("module:attr@N[:before|after]")."""

    target: str
    stage: str


@dataclass
class Baseline:
    """What the uninterrupted run left: metrics, dvc.lock's out hashes, the outs' files."""

    metrics: dict[str, dict[str, Any]]
    lock: dict[str, str]
    files: dict[str, str]
    registry: dict[str, Any] = field(default_factory=dict)


def run(proj: Path, *cmd: str, fault: Fault | None = None, mark: Path | None = None,
        env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**ENV, **(env_extra or {})}
    if fault is not None:
        assert mark is not None
        env.update(fault_env(fault, mark, env.get("PYTHONPATH")))
    exe = str(BIN / cmd[0]) if (BIN / cmd[0]).exists() else cmd[0]
    return subprocess.run([exe, *cmd[1:]], cwd=proj, env=env, capture_output=True, text=True,
                          timeout=600)


def fault_env(fault: Fault, mark: Path, pythonpath: str | None,
              kill: str | None = None) -> dict[str, str]:
    """The variables that arm ``fault`` (the hook first on PYTHONPATH); ``kill``:
    RAGTRAIN_FAULT_KILL_PIDS (pids, "group", or "none" for a counting probe)."""
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(FAULTS), pythonpath])),
            "RAGTRAIN_FAULT": fault.target, "RAGTRAIN_FAULT_STAGE": fault.stage,
            "RAGTRAIN_FAULT_MARK": str(mark), **({"RAGTRAIN_FAULT_KILL_PIDS": kill} if kill
                                                 else {})}


def killed(r: subprocess.CompletedProcess, mark: Path, fault: Fault) -> None:
    """The stage died of the injected SIGKILL, at the injected point."""
    out = r.stdout + r.stderr
    assert r.returncode != 0, out[-3000:]
    # -9 when DVC execs the stage command itself; 137 (128 + SIGKILL) when a shell runs it
    assert r.returncode == -9 or re.search(r"exited with (-9|137)\b", out), out[-3000:]
    assert mark.is_file() and fault.target in mark.read_text(), out[-3000:]


def ok(r: subprocess.CompletedProcess) -> str:
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    return out


def dvc_outs(proj: Path) -> dict[str, list[str]]:
    """Each stage's outs, metrics and plots (paths), from dvc.yaml."""
    stages = yaml.safe_load((proj / "dvc.yaml").read_text())["stages"]
    out: dict[str, list[str]] = {}
    for name, st in stages.items():
        for key in ("outs", "metrics", "plots"):
            for o in st.get(key, []):
                out.setdefault(name, []).append(o if isinstance(o, str) else next(iter(o)))
    return out


def file_hashes(proj: Path, rels: list[str]) -> dict[str, str]:
    """sha256 of every file under the given paths (relative to ``proj``)."""
    out = {}
    for rel in rels:
        p = proj / rel
        for f in [p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file()):
            out[str(f.relative_to(proj))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def metrics(proj: Path) -> dict[str, dict[str, Any]]:
    """metrics/*.json without wall-clock fields."""
    return {f.name: {k: v for k, v in json.loads(f.read_text()).items() if not _TIMING.search(k)}
            for f in sorted((proj / "metrics").glob("*.json"))}


def lock_outs(proj: Path) -> dict[str, str]:
    """path -> md5 of every out dvc.lock records."""
    lock = yaml.safe_load((proj / "dvc.lock").read_text())["stages"]
    return {o["path"]: o["md5"] for st in lock.values() for o in st.get("outs", [])}


def no_partial_outputs(proj: Path, base: Baseline, stage: str) -> list[Path]:
    """Each out of the killed ``stage`` is absent, or complete and equal to the baseline's;
    atomic temp folders are only beside outs, never inside one. Returns those temp folders."""
    outs = [o for os_ in dvc_outs(proj).values() for o in os_]
    for out in dvc_outs(proj)[stage]:
        if (proj / out).exists():
            now = file_hashes(proj, [out])
            assert now == {k: v for k, v in base.files.items()
                           if k == out or k.startswith(out + "/")}, f"{out} is partial"
    temps = [p for p in proj.rglob(".*.tmp")
             if not {".git", ".dvc"} & set(p.relative_to(proj).parts)]
    for t in temps:
        rel = str(t.relative_to(proj))
        assert not any(rel.startswith(o + "/") for o in outs), f"temp {rel} inside an out"
    return temps


def registry(proj: Path) -> dict[str, Any]:
    """The registry of ``proj``'s sqlite store (see ``registry_at``)."""
    return registry_at(f"sqlite:///{proj}/mlruns/mlflow.db")


def registry_at(uri: str) -> dict[str, Any]:
    """Per registered model: its aliases and versions (tags, status, run id and status)."""
    from mlflow.tracking import MlflowClient

    mc = MlflowClient(uri, registry_uri=uri)
    state: dict[str, Any] = {}
    for name in MODELS:
        versions = mc.search_model_versions(f"name = '{name}'")
        if not versions:
            continue
        aliases = mc.get_registered_model(name).aliases or {}
        state[name] = {
            "aliases": {a: str(v) for a, v in aliases.items()},
            "versions": {str(v.version): {"tags": dict(v.tags), "status": v.status,
                                          "run_id": v.run_id,
                                          "run_status": mc.get_run(v.run_id).info.status}
                         for v in versions}}
    return state


def check_registry(state: dict[str, Any]) -> None:
    """No dangling alias; every version READY and complete with its tags; every RAG version's
    components exist."""
    for name, m in state.items():
        for alias, v in m["aliases"].items():
            assert v in m["versions"], f"{name}@{alias} -> missing version {v}"
        for v, info in m["versions"].items():
            t = info["tags"]
            assert info["status"] == "READY", (name, v, info)
            for tag in (EVAL_SET_TAG, ENCODER_FP_TAG, INDEX_FP_TAG, KIND_TAG):
                assert t.get(tag), f"{name} version {v} lacks tag {tag}"
            if name == MODEL:
                assert f"{METRIC_TAG}test/f1" in t, f"{name} version {v} lacks its metrics"
                for c in ("retriever", "generator"):
                    assert t[f"ragtrain.{c}_version"] in state[f"{MODEL}-{c}"]["versions"]


def rag_tags(state: dict[str, Any], version: str) -> dict[str, str]:
    """A RAG version's tags without those that name versions (they differ run to run)."""
    return {k: v for k, v in state[MODEL]["versions"][version]["tags"].items()
            if not k.endswith("_version")}


# --------------------------------------------------------------------------- baseline


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path
            ) -> tuple[Path, Baseline]:
    """One tiny project (git + DVC), run uninterrupted up to `register`: the baseline. The model
    stages run untracked (faster); tracking is switched on for `register` only (its params)."""
    proj = copy_repo(tmp_path_factory.mktemp("faults") / "proj")
    overrides = {**tiny_overrides(tiny_bert_dir), "retriever.max_steps": 4,
                 "retriever.checkpoint_every": 2, "tracking.enabled": False}
    sh(proj, "ragtrain", "params", "set",
       *(f"{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in overrides.items()))
    ok(run(proj, "dvc", "repro", "register"))
    sh(proj, "ragtrain", "params", "set", "tracking.enabled=true")
    assert "Running stage 'register'" in ok(run(proj, "dvc", "repro", "register"))
    outs = [o for os_ in dvc_outs(proj).values() for o in os_ if (proj / o).exists()]
    base = Baseline(metrics(proj), lock_outs(proj), file_hashes(proj, outs), registry(proj))
    assert base.registry[MODEL]["aliases"] == {CHALLENGER: "1"}
    return proj, base


# --------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def resumed_retriever(project: tuple[Path, Baseline], tmp_path_factory: pytest.TempPathFactory
                      ) -> dict[str, Any]:
    """train_retriever (4 steps, a checkpoint every 2) killed mid step 3, then, resumed, killed
    mid-write of its step-4 checkpoint, then resumed to the end by `dvc repro`."""
    proj, base = project
    tmp = tmp_path_factory.mktemp("resumed_retriever")
    ckpt = proj / "checkpoints/retriever"
    shutil.rmtree(ckpt)  # the baseline's finished checkpoint: start this run afresh
    seen: dict[str, Any] = {}

    # 1. mid training step 3: after its backward pass, before clipping and the optimizer step
    f1 = Fault("torch.nn.utils:clip_grad_norm_@3:before", "train-retriever")
    killed(run(proj, *force("train_retriever"), fault=f1, mark=tmp / "m1"), tmp / "m1", f1)
    seen["step_after_kill_1"] = json.loads(
        (ckpt / "last/trainer_state.json").read_text())["state"]["step"]
    seen["temps_1"] = no_partial_outputs(proj, base, "train_retriever")
    seen["absent_1"] = [o for o in dvc_outs(proj)["train_retriever"] if not (proj / o).exists()]

    # 2. resumed from step 2, killed mid-write of the step-4 checkpoint (optimizer tensors
    # written, trainer_state.json not, the folder not renamed into place)
    f2 = Fault("ragtrain.trainer:save_file@1:after", "train-retriever")
    r2 = run(proj, *force("train_retriever"), fault=f2, mark=tmp / "m2")
    killed(r2, tmp / "m2", f2)
    seen["step_after_kill_2"] = json.loads(
        (ckpt / "last/trainer_state.json").read_text())["state"]["step"]
    seen["last_files_2"] = sorted(p.name for p in (ckpt / "last").iterdir())
    seen["temps_2"] = no_partial_outputs(proj, base, "train_retriever")

    # 3. the rerun: resumes from step 2 to the end; then nothing downstream has to run
    seen["out_3"] = ok(run(proj, *force("train_retriever")))
    seen["repro"] = ok(run(proj, *REPRO))
    return seen


def test_kill_mid_training_step_and_mid_checkpoint_write(
        project: tuple[Path, Baseline], resumed_retriever: dict[str, Any]) -> None:
    proj, base = project
    seen = resumed_retriever
    # after each kill: the last complete checkpoint (step 2) is what `last` holds, whole
    assert seen["step_after_kill_1"] == 2
    assert seen["step_after_kill_2"] == 2
    assert seen["last_files_2"] == ["model.safetensors", "optimizer.safetensors",
                                    "trainer_state.json"]
    assert set(seen["absent_1"]) == {"artifacts/retriever", "metrics/train_retriever.json",
                                     "plots/train_retriever.json"}  # DVC removed, none written
    # the half-written checkpoint is an orphaned temp folder beside `last`, never read
    assert [t.parent for t in seen["temps_2"]] == [proj / "checkpoints/retriever"]
    assert not (seen["temps_2"][0] / "last/trainer_state.json").exists()
    # the rerun resumed the stage; its outputs are bit-identical, so nothing downstream reruns
    assert "Running stage 'train_retriever'" in seen["out_3"]
    assert "Running stage" not in seen["repro"], seen["repro"]
    assert metrics(proj) == base.metrics
    now = lock_outs(proj)
    assert {k: v for k, v in now.items() if not k.startswith("plots/")} == {
        k: v for k, v in base.lock.items() if not k.startswith("plots/")}


def test_resumed_training_keeps_the_whole_loss_curve(
        project: tuple[Path, Baseline], resumed_retriever: dict[str, Any]) -> None:
    proj, base = project
    assert lock_outs(proj)["plots/train_retriever.json"] == base.lock[
        "plots/train_retriever.json"]


# --------------------------------------------------------------------------- the flow


def test_a_crashed_flow_run_rerun_ends_with_the_same_results(
        project: tuple[Path, Baseline], prefect_server: None, tmp_path: Path,  # noqa: F811
        tiny_bert_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Prefect flow (the retriever half), in its own process group, killed whole mid
    training step 3 of train_retriever: the flow process, DVC and the stage at once, as a lost
    machine would. A new run of the flow resumes the stage from its step-2 checkpoint and ends
    with the baseline's metrics and byte-identical outputs."""
    import sys

    from flows.rag_pipeline import rag_pipeline
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    _, base = project
    proj = copy_repo(tmp_path / "proj")
    overrides = {**tiny_overrides(tiny_bert_dir), "retriever.max_steps": 4,
                 "retriever.checkpoint_every": 2, "tracking.enabled": False}  # the baseline's
    code = ("import json, sys; sys.path.insert(0, '.'); "
            "from flows.rag_pipeline import rag_pipeline; "
            "rag_pipeline(params_path='params.yaml', overrides=json.loads(sys.argv[1]), "
            "push=False, until='eval_retriever')")
    f, mark = Fault("torch.nn.utils:clip_grad_norm_@3:before", "train-retriever"), tmp_path / "m"
    env = {**ENV, **fault_env(f, mark, ENV.get("PYTHONPATH"), kill="group"),
           "PREFECT_API_URL": str(PREFECT_API_URL.value())}
    with subprocess.Popen([sys.executable, "-c", code, json.dumps(overrides)], cwd=proj,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True) as p:
        out = p.communicate(timeout=600)[0]
    assert p.returncode == -9, out[-3000:]
    # until the init process has reaped the group (DVC takes a dead but unreaped holder of its
    # rwlock for a live one), as after a lost machine
    wait(lambda: not _group_exists(p.pid), 60, "the killed process group to be reaped")
    assert f.target in mark.read_text()
    state = json.loads((proj / "checkpoints/retriever/last/trainer_state.json").read_text())
    assert state["state"]["step"] == 2 and not (proj / "artifacts/retriever").exists()

    # a new run of the flow (what Run in the UI starts), the same parameters; a probe counts
    # the training steps the stage runs
    probe = tmp_path / "probe"
    every_step = Fault("torch.nn.utils:clip_grad_norm_@1:before", "train-retriever")
    for k, v in fault_env(every_step, probe, os.environ.get("PYTHONPATH"), kill="none").items():
        monkeypatch.setenv(k, v)
    got = rag_pipeline(params_path=str(proj / "params.yaml"), overrides=overrides, push=False,
                       until="eval_retriever")
    assert len(probe.read_text().splitlines()) == 2  # steps 3 and 4: resumed from step 2
    with get_client(sync_client=True) as client:  # nothing was left to end the killed one
        states = sorted(r.state.type.value for r in client.read_flow_runs())
    assert states == ["COMPLETED", "RUNNING"], states
    assert got["test/recall_at_1"] == base.metrics["retriever.json"]["test/recall_at_1"]
    now = metrics(proj)
    assert now and all(now[k] == base.metrics[k] for k in now)
    outs = lock_outs(proj)
    for o in ("artifacts/retriever", "plots/train_retriever.json", "artifacts/index"):
        assert outs[o] == base.lock[o], o  # byte for byte, the loss curve whole


def _group_exists(pgid: int) -> bool:
    """Whether any process (a zombie too) is still in process group ``pgid``."""
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


# --------------------------------------------------------------------------- index


def test_kill_mid_index_write(project: tuple[Path, Baseline], tmp_path: Path) -> None:
    """Killed after index.faiss is written into the temp folder, before its ids and meta."""
    proj, base = project
    f = Fault("ragtrain.retrieval.index:atomic_write_json@1:before", "build-index")
    killed(run(proj, *force("build_index"), fault=f, mark=tmp_path / "m"), tmp_path / "m", f)
    temps = no_partial_outputs(proj, base, "build_index")
    assert not (proj / "artifacts/index").exists()
    assert (proj / "artifacts/embeddings/embeddings.npy").is_file()  # written before: whole
    (t,) = [t for t in temps if t.parent == proj / "artifacts"]
    assert t.name.startswith(".index.")
    assert sorted(p.name for p in (t / "index").iterdir()) == ["index.faiss"]

    # plain `dvc repro`: the inputs are the lock's, so DVC checks the index out of its cache
    out = ok(run(proj, *REPRO))
    assert "Stage 'build_index' is cached - skipping run, checking out outputs" in out
    assert file_hashes(proj, ["artifacts/index"]) == {
        k: v for k, v in base.files.items() if k.startswith("artifacts/index/")}
    # the stage itself rebuilds the same index, byte for byte: nothing downstream reruns
    assert "Running stage 'build_index'" in ok(run(proj, *force("build_index")))
    assert "Running stage" not in ok(run(proj, *REPRO))
    assert metrics(proj) == base.metrics
    assert lock_outs(proj)["artifacts/index"] == base.lock["artifacts/index"]


# --------------------------------------------------------------------------- registry


def test_kill_mid_register(project: tuple[Path, Baseline], tmp_path: Path) -> None:
    """Killed after the three versions exist and the first challenger alias (the retriever's)
    moved, before the others: no dangling alias, no incomplete version; the rerun registers a
    whole new challenger."""
    proj, base = project
    before = registry(proj)
    f = Fault("ragtrain.tracking:set_alias@1:after", "register")
    killed(run(proj, *force("register"), fault=f, mark=tmp_path / "m"), tmp_path / "m", f)
    assert not (proj / "artifacts/registered.json").exists()
    mid = registry(proj)
    check_registry(mid)
    new = {n: sorted(set(mid[n]["versions"]) - set(before[n]["versions"])) for n in MODELS}
    assert all(len(v) == 1 for v in new.values()), new  # one version each, all complete
    # only the retriever's challenger alias moved; the RAG model's challenger is the old one
    assert mid[MODELS[1]]["aliases"][CHALLENGER] == new[MODELS[1]][0]
    assert mid[MODEL]["aliases"].get(CHALLENGER) == before[MODEL]["aliases"].get(CHALLENGER)
    killed_run = mid[MODEL]["versions"][new[MODEL][0]]["run_id"]
    assert mid[MODEL]["versions"][new[MODEL][0]]["run_status"] == "RUNNING"  # never ended

    # plain `dvc repro` would not register: the killed run was a forced re-registration of the
    # same bundle, so DVC restores the last registration's record from its cache, and the
    # challenger aliases stay as the kill left them (docs/reliability.md)
    assert "Stage 'register' is cached - skipping run" in ok(run(proj, *REPRO))
    stale = json.loads((proj / "artifacts/registered.json").read_text())
    assert stale["retriever_version"] != mid[MODELS[1]]["aliases"][CHALLENGER]
    assert registry(proj) == mid
    # the stage itself registers a whole new challenger
    ok(run(proj, *force("register")))
    after = registry(proj)
    check_registry(after)
    reg = json.loads((proj / "artifacts/registered.json").read_text())
    assert after[MODEL]["aliases"][CHALLENGER] == reg["version"]
    assert after[MODELS[1]]["aliases"][CHALLENGER] == reg["retriever_version"]
    assert after[MODELS[2]]["aliases"][CHALLENGER] == reg["generator_version"]
    assert rag_tags(after, reg["version"]) == rag_tags(base.registry, "1")  # same model, tags
    assert after[MODEL]["versions"][reg["version"]]["run_status"] == "FINISHED"
    # the killed attempt's versions stay, complete but with no alias, in a run left RUNNING
    assert after[MODEL]["versions"][new[MODEL][0]]["run_id"] == killed_run
    assert metrics(proj) == base.metrics


@pytest.fixture(scope="module")
def killed_promote(project: tuple[Path, Baseline], tmp_path_factory: pytest.TempPathFactory
                   ) -> dict[str, Any]:
    """`ragtrain promote` (the first promotion) killed after it moved ragtrain-rag@champion,
    before the components' champion aliases and before removing @challenger; then run again."""
    proj, _ = project
    tmp = tmp_path_factory.mktemp("killed_promote")
    before = registry(proj)
    assert CHAMPION not in before[MODEL]["aliases"]
    f = Fault("ragtrain.tracking:set_alias@1:after", "promote")
    killed(run(proj, "ragtrain", "promote", fault=f, mark=tmp / "m"), tmp / "m", f)
    mid = registry(proj)
    # the killed promote still holds the registry lock (a registered model, stale after 10 min;
    # a promote meanwhile waits 60 s, then refuses naming it): break it as its message says
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{proj}/mlruns/mlflow.db"
    mc = MlflowClient(uri, registry_uri=uri)
    lock = f"{MODEL}.promotion-lock"
    lock_tags = dict(mc.get_registered_model(lock).tags)
    mc.delete_registered_model(lock)
    rerun = run(proj, "ragtrain", "promote")
    killed_pid = (tmp / "m").read_text().split()[-1]
    return {"before": before, "mid": mid, "lock": lock_tags, "killed_pid": killed_pid,
            "rerun": rerun, "after": registry(proj)}


def test_kill_mid_promote_leaves_no_dangling_alias(killed_promote: dict[str, Any]) -> None:
    before, mid = killed_promote["before"], killed_promote["mid"]
    check_registry(mid)
    challenger = before[MODEL]["aliases"][CHALLENGER]
    assert mid[MODEL]["aliases"][CHAMPION] == challenger  # the RAG model's alias moved ...
    for name in MODELS[1:]:  # ... its components' did not, and @challenger is still there
        assert CHAMPION not in mid[name]["aliases"]
        assert mid[name]["aliases"][CHALLENGER] == before[name]["aliases"][CHALLENGER]
    decision = mid[MODEL]["versions"][challenger]["tags"]["ragtrain.promotion.decision"]
    assert decision == "promoted"  # the decision was recorded before the alias moved
    assert killed_promote["lock"]["owner"].endswith(":" + killed_promote["killed_pid"])


def test_promote_rerun_completes_an_interrupted_promotion(
        killed_promote: dict[str, Any]) -> None:
    before, after, rerun = (killed_promote["before"], killed_promote["after"],
                            killed_promote["rerun"])
    challenger = before[MODEL]["aliases"][CHALLENGER]
    tags = before[MODEL]["versions"][challenger]["tags"]
    # what an uninterrupted first promotion leaves (as test_serving's champion fixture shows)
    assert rerun.returncode == 0, rerun.stderr
    assert "finished the interrupted promotion" in rerun.stdout
    assert after[MODEL]["aliases"] == {CHAMPION: challenger}
    for c, name in zip(("retriever", "generator"), MODELS[1:], strict=True):
        assert after[name]["aliases"] == {CHAMPION: tags[f"ragtrain.{c}_version"]}
