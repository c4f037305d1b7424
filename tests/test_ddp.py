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
from tests.conftest import BIN

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


def test_sharded_map_of_an_empty_list_answers_as_one_process(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 0 of 2: the ranks' shares of an empty list are all empty, and the answer is ``fn``'s
    own (the encoder's "no texts" error), not numpy's "need at least one array"."""
    import numpy as np

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(distributed, "gather_to_main", lambda part: [part, part])

    def fn(items: list[str]) -> np.ndarray:
        if not items:
            raise ValueError("fn: no items")
        return np.ones((len(items), 2))

    sharded = distributed.ShardedMap(fn)
    assert sharded._round(["a", "b"]).shape == (2, 2)  # one row each from the two ranks
    with pytest.raises(ValueError, match="fn: no items"):
        sharded._round([])


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
def test_index_refresh_encodes_shares_and_every_rank_gets_the_whole_matrix(
        tiny_bert_dir: Path, tmp_path: Path) -> None:
    """Joint training's index refresh under torchrun: each of 2 ranks encodes half the corpus,
    both hold the matrix one process computes, rank 0 alone measures the staleness and writes
    the refresh file, and a resumed run reads it on every rank instead of encoding."""
    import numpy as np

    one = _train("refresh", "-", tiny_bert_dir, tmp_path / "one", 1)
    two = _train("refresh", "-", tiny_bert_dir, tmp_path / "two", 2)
    ranks = [json.loads((tmp_path / f"two/rank{r}.json").read_text()) for r in (0, 1)]
    solo = json.loads((tmp_path / "one/rank0.json").read_text())
    assert solo["encoded"] == [10] and [r["encoded"] for r in ranks] == [[5], [5]]
    assert solo["files"] == ranks[0]["files"] == ["refresh_00000001.npy"]
    assert solo["resumed_equal"] and all(r["resumed_equal"] for r in ranks)
    want = np.load(tmp_path / "one/rank0.npy")
    for r in (0, 1):
        np.testing.assert_allclose(np.load(tmp_path / f"two/rank{r}.npy"), want, atol=1e-5)
    assert [s for s, _ in one["log"]] == [s for s, _ in two["log"]] == [1]  # rank 0's, once
    a, b = one["log"][0][1], two["log"][0][1]
    assert a["refresh/fresh_recall_at_2"] == b["refresh/fresh_recall_at_2"]
    assert a["refresh/stale_recall_at_2"] == b["refresh/stale_recall_at_2"]


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "variant"), [("retriever", "even"), ("retriever", "tail"),
                                               ("reranker", "even"),
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
