"""Data-parallel runs of whole jobs and stages under torchrun: a crashed job resumes, a training
stage writes once from rank 0, build-index encodes in shards (tests/test_ddp.py: the numerics)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import FIXTURES, TINY_RETRIEVER_PARAMS, run_cli
from tests.test_ddp import _train


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
