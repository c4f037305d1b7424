"""Data-parallel training under torchrun (src/ragtrain/distributed.py, trainer.train_loop).

Two gloo processes on CPU must reach the weights of one process with the same global batch:
the same losses and gradient norms at every step (which also catches a wrongly scaled gradient
that Adam's normalisation would hide in the weights), and weights within atol 1e-4 / rtol 1e-3
after 3-4 Adam steps whose updates are ~1e-3 per weight. Dropout is off in both runs (each rank
draws its own masks), so what is left is float summation order. Tolerances measured: weights
differ by at most 5e-5, losses by 1e-6.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ragtrain import distributed
from tests.conftest import BIN, FIXTURES, TINY_RETRIEVER_PARAMS, run_cli

WORKER = Path(__file__).parent / "ddp_worker.py"
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("world", "n"), [(2, 5), (2, 1), (3, 7), (4, 2), (1, 3)])
def test_shares_partition_the_batch_in_rank_order(monkeypatch: pytest.MonkeyPatch, world: int,
                                                  n: int) -> None:
    shares, work = [], []
    for r in range(world):
        monkeypatch.setenv("WORLD_SIZE", str(world))
        monkeypatch.setenv("RANK", str(r))
        shares.append(distributed.share(n))
        work.append(distributed.work(n))
        assert distributed.weight(n, 7) == (7 if len(shares[-1]) else 0)
    assert [i for s in shares for i in s] == list(range(n))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    assert all(len(w) >= 1 for w in work)  # an idle rank still computes (with weight 0)


def test_bad_process_count_is_refused_by_name(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text("seed: 0\n")
    env = {**os.environ, "RAGTRAIN_NPROC_PER_NODE": "two"}
    r = subprocess.run([str(BIN / "ragtrain"), "train-retriever"], cwd=tmp_path, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert "RAGTRAIN_NPROC_PER_NODE='two'" in r.stderr and "whole number" in r.stderr


def _train(kind: str, variant: str, model: Path, out: Path, nproc: int, fails: bool = False,
           **env_extra: str) -> dict:
    out.mkdir(exist_ok=True)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone",
              f"--nproc-per-node={nproc}"] if nproc > 1 else [sys.executable]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT), **env_extra}
    r = subprocess.run([*launch, str(WORKER), kind, variant, str(model), str(out)], env=env,
                       capture_output=True, text=True, timeout=300)
    if fails:
        assert r.returncode != 0 and "crashed at step" in r.stderr, r.stderr[-3000:]
        return {}
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((out / "log.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "variant"), [("retriever", "even"), ("retriever", "tail"),
                                               ("reranker", "even"), ("reranker", "tail"),
                                               ("generator", "even"), ("generator", "tail")])
def test_two_processes_reach_the_weights_of_one(tiny_bert_dir: Path, tmp_path: Path,
                                                kind: str, variant: str) -> None:
    import torch
    from safetensors.torch import load_file

    one = _train(kind, variant, tiny_bert_dir, tmp_path / "one", 1)
    two = _train(kind, variant, tiny_bert_dir, tmp_path / "two", 2)
    assert (one["world_size"], two["world_size"]) == (1, 2)
    steps = [(s, d) for s, d in one["log"] if "train/loss" in d]
    steps2 = [(s, d) for s, d in two["log"] if "train/loss" in d]
    assert [s for s, _ in steps2] == [s for s, _ in steps] and len(steps) >= 3
    for (_, a), (_, b) in zip(steps, steps2, strict=True):
        assert b["train/loss"] == pytest.approx(a["train/loss"], abs=1e-5)
        assert b["train/grad_norm"] == pytest.approx(a["train/grad_norm"], rel=1e-4)
    dev = [d for _, d in one["log"] if "train/loss" not in d]
    dev2 = [d for _, d in two["log"] if "train/loss" not in d]
    assert dev and len(dev2) == len(dev)  # rank 0's dev evaluations
    for a, b in zip(dev, dev2, strict=True):
        assert b == pytest.approx(a, abs=1e-6)
    w1 = load_file(str(tmp_path / "one/weights.safetensors"))
    w2 = load_file(str(tmp_path / "two/weights.safetensors"))
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=1e-4, rtol=1e-3, msg=k)


@pytest.mark.slow
def test_a_crashed_torchrun_job_resumes_to_the_same_weights(tiny_bert_dir: Path,
                                                            tmp_path: Path) -> None:
    """Rank 0 dies after step 3 (checkpoint at step 2): torchrun stops both ranks; a resumed
    2-process run continues from step 2 and ends with the uninterrupted run's weights."""
    from safetensors.torch import load_file

    full = _train("retriever", "even", tiny_bert_dir, tmp_path / "full", 2)
    _train("retriever", "even", tiny_bert_dir, tmp_path / "cut", 2, fails=True,
           DDP_CRASH_AT="3")
    assert (tmp_path / "cut/ckpt/last").is_dir()
    again = _train("retriever", "even", tiny_bert_dir, tmp_path / "cut", 2, DDP_RESUME="1")
    assert [s for s, d in again["log"] if "train/loss" in d] == [3]
    w_full = load_file(str(tmp_path / "full/weights.safetensors"))
    w_again = load_file(str(tmp_path / "cut/weights.safetensors"))
    assert all(w_full[k].equal(w_again[k]) for k in w_full)
    assert full["world_size"] == again["world_size"] == 2


@pytest.mark.slow
def test_a_stage_under_torchrun_writes_once_from_rank_0(tmp_path: Path, tiny_bert_dir: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """RAGTRAIN_NPROC_PER_NODE=2: `ragtrain train-retriever` relaunches itself under torchrun;
    rank 0 alone prints, writes artifacts/ and metrics/ and logs one MLflow run."""
    from ragtrain import cli

    (tmp_path / "params.yaml").write_text(
        TINY_RETRIEVER_PARAMS.format(source=FIXTURES / "tiny_jsonl", bert=tiny_bert_dir)
        + "tracking:\n  enabled: true\n  uri: sqlite:///mlruns/mlflow.db\n")
    monkeypatch.chdir(tmp_path)
    for stage in ("fetch", "prepare", "build-bm25"):
        assert cli.main([stage]) == 0
    monkeypatch.setenv("RAGTRAIN_NPROC_PER_NODE", "2")
    r = run_cli(["train-retriever"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("trained retriever ->") == 1
    from ragtrain.retrieval.encoder import BiEncoder

    BiEncoder.load(tmp_path / "artifacts/retriever")  # written whole, its fingerprint checked
    metrics = json.loads((tmp_path / "metrics/train_retriever.json").read_text())
    assert metrics["train/steps"] == 2

    import mlflow

    mlflow.set_tracking_uri("sqlite:///mlruns/mlflow.db")
    runs = mlflow.search_runs(search_all_experiments=True,
                              filter_string="tags.`ragtrain.stage` = 'train-retriever'")
    assert len(runs) == 1
    assert runs.iloc[0]["tags.ragtrain.processes"] == "2"


@pytest.mark.slow
def test_build_index_encodes_in_shards_to_the_same_index(tmp_path: Path, tiny_bert_dir: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """RAGTRAIN_NPROC_PER_NODE=2 `ragtrain build-index`: each process encodes half the passages
    (with the embedding cache on: half of those missing from it), rank 0 joins and indexes
    them: the embeddings of one process (fp32, to 1e-5) and the same search results."""
    import numpy as np

    from ragtrain import cli
    from ragtrain.retrieval.index import load_index, search

    (tmp_path / "params.yaml").write_text(
        TINY_RETRIEVER_PARAMS.format(source=FIXTURES / "tiny_jsonl", bert=tiny_bert_dir)
        + "tracking:\n  enabled: false\nindex:\n  embedding_cache: true\n")
    monkeypatch.chdir(tmp_path)
    for stage in ("fetch", "prepare", "build-bm25", "train-retriever", "build-index"):
        assert cli.main([stage]) == 0
    one = np.load(tmp_path / "artifacts/embeddings/embeddings.npy")
    q = one[:3] + 0.01
    want = search(load_index(tmp_path / "artifacts/index"), q, 5)[1]
    for cached in (False, True):  # all encoded in 2 shards; then all from the cache
        if not cached:
            import shutil

            shutil.rmtree(tmp_path / "cache")
        monkeypatch.setenv("RAGTRAIN_NPROC_PER_NODE", "2")
        r = run_cli(["build-index"], tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        assert r.stdout.count("built flat index") == 1
        two = np.load(tmp_path / "artifacts/embeddings/embeddings.npy")
        np.testing.assert_allclose(two, one, atol=1e-5)
        assert search(load_index(tmp_path / "artifacts/index"), q, 5)[1] == want
