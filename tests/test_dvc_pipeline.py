"""dvc.yaml is the stage table's, and a real `dvc repro` of the data stages in a temporary copy
of this repo (git + DVC + a remote + MLflow). The model stages run for real in `make demo`; here
the DAG is cut at `build_bm25` so the suite stays fast (their logic is tested on a tiny model in
test_retriever_stages.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from ragtrain import cli
from ragtrain.pipeline import stages
from tests.conftest import BIN, REPO

ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
       "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
       "GIT_COMMITTER_EMAIL": "t@t"}


def sh(cwd: Path, *cmd: str) -> str:
    r = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout}\n{r.stderr}"
    return r.stdout + r.stderr


def copy_repo(dest: Path) -> Path:
    """The working tree's files as git sees them (tracked + untracked, not ignored)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        src = REPO / f
        if src.is_file() and not f.startswith(("data/", "metrics/")) and f != "dvc.lock":
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)
    sh(dest, "git", "init", "-q", "-b", "main")
    sh(dest, "git", "add", "-A")
    sh(dest, "git", "commit", "-q", "-m", "copy")
    return dest


def test_dvc_yaml_is_generated_from_the_stage_table() -> None:
    """A stage's dvc.yaml deps are its import closure: a module it uses and dvc.yaml omits
    would let `dvc repro` skip a stage whose code changed. Fix: `ragtrain dag --write`."""
    assert (REPO / "dvc.yaml").read_text() == stages.dvc_yaml(), "run `ragtrain dag --write`"


def test_code_deps_follow_imports() -> None:
    from ragtrain.pipeline.code import code_hashes

    bm25 = stages.STAGES["build-bm25"].code()
    # the stage's module, what it imports in its body, and what those import in turn
    assert {"src/ragtrain/pipeline/retrieval.py", "src/ragtrain/retrieval/bm25.py",
            "src/ragtrain/retrieval/passage_text.py", "src/ragtrain/retrieval/__init__.py",
            "src/ragtrain/__init__.py", "src/ragtrain/io.py"} <= set(bm25)
    assert "src/ragtrain/data/prepare.py" not in bm25  # only what the function reaches
    assert "src/ragtrain/retrieval/encoder.py" not in bm25  # BM25 needs no torch
    assert "src/ragtrain/evaluation/rag_qa/rag_qa.py" in stages.STAGES["evaluate"].code()
    for name in ("train-retriever", "train-reranker", "train-generator",
                 "train-rag"):  # resume fp = deps
        stage = stages.STAGES[name]
        assert stage.resume
        assert [h.split()[0] for h in code_hashes(stage.fn)] == stage.code()


def test_dag_check_names_a_stale_stage(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    f = tmp_path / "dvc.yaml"
    f.write_text(stages.dvc_yaml().replace("      - src/ragtrain/retrieval/bm25.py\n", "", 1))
    assert cli.main(["dag", "--check", "--dvc-yaml", str(f)]) == 2
    assert "differs from the stage table (build_bm25)" in capsys.readouterr().err
    assert cli.main(["dag", "--write", "--dvc-yaml", str(f)]) == 0
    assert cli.main(["dag", "--check", "--dvc-yaml", str(f)]) == 0


def dvc_stale(proj: Path) -> set[str]:
    """The stages `dvc status` reports (changed deps, outs or command)."""
    r = subprocess.run(["dvc", "status", "--json"], cwd=proj, env=ENV, capture_output=True,
                       text=True, check=True)
    return {k.rsplit(":", 1)[-1] for k in json.loads(r.stdout or "{}")}


@pytest.mark.slow
def test_dvc_repro_push_pull_roundtrip(tmp_path: Path, squad_zip: Path) -> None:
    proj = copy_repo(tmp_path / "proj")
    remote = tmp_path / "remote"
    sh(proj, "dvc", "remote", "modify", "--local", "local", "url", str(remote))
    sh(proj, "ragtrain", "params", "set", f"data.source={squad_zip}")

    # the pipeline under one MLflow run; the stages DVC runs nest under it
    out = sh(proj, "ragtrain", "pipeline", "prepare")
    assert "Running stage 'fetch'" in out and "Running stage 'prepare'" in out
    from mlflow.tracking import MlflowClient

    mc = MlflowClient(f"sqlite:///{proj}/mlruns/mlflow.db")
    runs = mc.search_runs([mc.get_experiment_by_name("ragtrain").experiment_id])
    by_name = {r.info.run_name: r for r in runs}
    parent = by_name["pipeline"]
    assert parent.info.status == "FINISHED"
    for stage in ("fetch", "prepare"):
        assert by_name[stage].data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert parent.data.metrics["data/passages"] == 2067
    assert parent.data.tags["git.dirty"] in ("true", "false")
    assert any(k.startswith("dvc.prepare.") for k in parent.data.tags)  # dvc.lock hashes
    stats = json.loads((proj / "metrics/prepare.json").read_text())
    assert stats["data/passages"] == 2067 and stats["data/questions"] == 10570
    lock = (proj / "dvc.lock").read_text()
    assert "data/raw" in lock and "md5" in lock  # the raw data's hash is recorded

    out = sh(proj, "dvc", "repro", "prepare")
    assert "Data and pipelines are up to date" in out and "Running stage" not in out

    # Editing a module makes `dvc status` report exactly the stages whose import closure holds
    # it (of those that ran; the others are always reported).
    assert "Running stage 'build_bm25'" in sh(proj, "dvc", "repro", "build_bm25")
    ran = {"fetch", "prepare", "build_bm25"}
    assert not dvc_stale(proj) & ran
    for module in ("src/ragtrain/retrieval/bm25.py", "src/ragtrain/data/corpus.py",
                   "src/ragtrain/data/prepare.py", "src/ragtrain/io.py"):
        expected = {s.dvc_name for s in stages.STAGES.values() if module in s.code()} & ran
        assert expected, module  # each of these is used by a stage that ran
        if module.endswith("bm25.py"):
            assert expected == {"build_bm25"}  # not the data stages
        f = proj / module
        text = f.read_text()
        f.write_text(text + "# edited\n")
        assert dvc_stale(proj) & ran == expected, module
        f.write_text(text)
    assert not dvc_stale(proj) & ran

    # A param only reranking at inference reads leaves the reranker's training as it is (the
    # stage is idle here, reranker.enabled being false, but DVC judges it the same); a training
    # param reruns it (tests/test_stage_declarations.py: each stage declares what it reads).
    assert "Running stage 'train_reranker'" in sh(proj, "dvc", "repro", "train_reranker")
    params = (proj / "params.yaml").read_text()
    sh(proj, "ragtrain", "params", "set", "reranker.max_windows=3", "reranker.runtime=onnx")
    assert "train_reranker" not in dvc_stale(proj)
    sh(proj, "ragtrain", "params", "set", "reranker.lr=1e-4")
    assert "train_reranker" in dvc_stale(proj)
    (proj / "params.yaml").write_text(params)
    assert "train_reranker" not in dvc_stale(proj)

    # A data param reruns prepare, and not fetch.
    sh(proj, "ragtrain", "params", "set", "data.split_seed=3")
    out = sh(proj, "dvc", "repro", "prepare")
    assert "Stage 'fetch' didn't change, skipping" in out
    assert "Running stage 'prepare'" in out
    assert json.loads((proj / "metrics/prepare.json").read_text()) != stats

    # The DVC way of overriding: dvc exp run -S
    sh(proj, "git", "add", "-A")
    sh(proj, "git", "commit", "-q", "-m", "run")
    out = sh(proj, "dvc", "exp", "run", "-S", "data.split_seed=4", "prepare")
    assert "Running stage 'prepare'" in out
    assert "split_seed: 4" in (proj / "params.yaml").read_text()
    sh(proj, "git", "checkout", "-q", "--", "params.yaml", "dvc.lock")  # back to the commit
    sh(proj, "dvc", "checkout", "--with-deps", "prepare")

    # push, then a fresh clone pulls everything and has nothing to rerun
    sh(proj, "dvc", "push", "--with-deps", "prepare")
    clone = tmp_path / "clone"
    sh(tmp_path, "git", "clone", "-q", str(proj), str(clone))
    sh(clone, "dvc", "remote", "modify", "--local", "local", "url", str(remote))
    sh(clone, "dvc", "pull", "--with-deps", "prepare")
    assert (clone / "data/prepared/corpus.jsonl").exists()
    out = sh(clone, "dvc", "repro", "prepare")
    assert "Data and pipelines are up to date" in out and "Running stage" not in out
