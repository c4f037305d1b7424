"""Passages as windows (MaxP): the windows, the passage-level search over them, the index files,
the config checks, and the stages on the tiny project."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ragtrain.config import IndexConfig, load_config
from ragtrain.data.corpus import Passage
from ragtrain.errors import ConfigError, IndexFileError, RetrievalError
from ragtrain.retrieval import index as ix
from ragtrain.retrieval.passage_text import passage_inputs
from ragtrain.retrieval.windows import (
    best_per_passage,
    passage_windows,
    search_passages,
    window_starts,
)


@pytest.mark.parametrize(("n", "words", "stride", "want"), [
    (0, 4, 2, [0]), (3, 4, 2, [0]), (4, 4, 2, [0]), (5, 4, 2, [0, 2]),
    (10, 4, 2, [0, 2, 4, 6]), (11, 4, 2, [0, 2, 4, 6, 8]), (9, 4, 4, [0, 4, 8]),
])
def test_window_starts_cover_every_word(n: int, words: int, stride: int, want: list[int]) -> None:
    assert window_starts(n, words, stride) == want
    covered = {i for s in want for i in range(s, min(s + words, n))}
    assert covered == set(range(n))


def test_passage_windows_prefix_the_title_and_name_their_passage() -> None:
    ps = [Passage("a", "Big_Cat", "one two three four five"), Passage("b", "", "six seven")]
    texts, owners = passage_windows(ps, 2, 0)  # stride 0: half the window, 1 word
    assert texts == ["Big Cat. one two", "Big Cat. two three", "Big Cat. three four",
                     "Big Cat. four five", "six seven"]
    assert owners == ["a", "a", "a", "a", "b"]
    assert passage_windows(ps, 3, 3) == (["Big Cat. one two three", "Big Cat. four five",
                                          "six seven"], ["a", "a", "b"])
    assert passage_windows(ps, 0, 0) == (passage_inputs(ps), ["a", "b"])  # off: whole passages


def test_best_per_passage_keeps_each_passage_once_at_its_best_window() -> None:
    scores = np.array([[0.9, 0.8, 0.7, 0.6, 0.5], [0.4, 0.3, 0.2, 0.1, 0.0]], dtype=np.float32)
    ids = [["a", "a", "b", "a", "c"], ["c", "c", "c"]]
    s, found = best_per_passage(scores, ids, 2)
    assert found == [["a", "b"], ["c"]]
    np.testing.assert_array_equal(s, np.array([[0.9, 0.7], [0.4, -np.inf]], dtype=np.float32))


def maxp_by_hand(q: np.ndarray, w: np.ndarray, owners: list[str], k: int) -> list[list[str]]:
    out = []
    for row in q @ w.T:
        best: dict[str, float] = {}
        for score, pid in zip(row.tolist(), owners, strict=True):
            best[pid] = max(best.get(pid, -np.inf), score)
        out.append(sorted(best, key=lambda p: -best[p])[:k])
    return out


def windowed(rng: np.random.Generator, n_passages: int, dim: int) -> tuple[np.ndarray, list[str]]:
    owners = [f"p{i}" for i in range(n_passages) for _ in range(1 + i % 5)]  # 1-5 windows each
    w = rng.standard_normal((len(owners), dim)).astype(np.float32)
    return w / np.linalg.norm(w, axis=1, keepdims=True), owners


@pytest.mark.parametrize("k", [1, 3, 10, 40])
def test_search_over_windows_is_maxp_by_hand(k: int) -> None:
    rng = np.random.default_rng(0)
    w, owners = windowed(rng, 40, 16)
    q = rng.standard_normal((25, 16)).astype(np.float32)
    cfg = IndexConfig(kind="flat", device="cpu", window_words=8, window_stride=0)
    idx = ix.build_index(w, owners, cfg, corpus_sha256="c" * 64, encoder_fingerprint="e" * 64)
    assert idx.meta.n_passages == 40 and idx.index.ntotal == len(owners)
    assert idx.meta.params == {"window_words": 8, "window_stride": 4, "vectors": len(owners)}
    scores, ids = ix.search(idx, q, k)
    assert ids == maxp_by_hand(q, w, owners, k)  # k = 40: every passage, searched to the end
    assert scores.shape == (25, k) and np.all(np.diff(scores, axis=1) <= 0)
    with pytest.raises(RetrievalError, match="k"):
        ix.search(idx, q, 41)  # more passages than there are


def test_search_passages_deepens_until_k_distinct() -> None:
    asked: list[int] = []
    rows = [["a"] * 9 + ["b", "c"]]  # one passage's windows crowd the top

    def vectors(m: int) -> tuple[np.ndarray, list[list[str]]]:
        asked.append(m)
        return -np.arange(m, dtype=np.float32)[None, :], [rows[0][:m]]

    assert search_passages(vectors, 2, 11)[1] == [["a", "b"]]
    assert asked == [8, 11]  # 4k, then doubled (capped at the vector count)


def test_windows_index_round_trip_and_checks(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    w, owners = windowed(rng, 6, 8)
    cfg = IndexConfig(kind="flat", device="cpu", window_words=4, window_stride=2)
    idx = ix.build_index(w, owners, cfg, corpus_sha256="c" * 64, encoder_fingerprint="e" * 64)
    ix.save_index(idx, tmp_path / "i")
    back = ix.load_index(tmp_path / "i")
    assert back.passage_ids == owners and back.meta == idx.meta
    q = rng.standard_normal((3, 8)).astype(np.float32)
    assert ix.search(back, q, 6)[1] == maxp_by_hand(q, w, owners, 6)
    # a passage's windows must be one run; without windows, ids stay distinct
    with pytest.raises(RetrievalError, match="duplicate passage id 'p0'"):
        ix.build_index(w, ["p0", *owners[1:-1], "p0"], cfg, corpus_sha256="",
                       encoder_fingerprint="")
    with pytest.raises(RetrievalError, match="duplicate passage id"):
        ix.build_index(w, owners, IndexConfig(kind="flat", device="cpu", window_words=0),
                       corpus_sha256="", encoder_fingerprint="")
    meta = json.loads((tmp_path / "i/meta.json").read_text())
    meta["params"] = {}  # the ids repeat, but the meta says one vector per passage
    (tmp_path / "i/meta.json").write_text(json.dumps(meta))
    with pytest.raises(IndexFileError, match="duplicate passage ids"):
        ix.load_index(tmp_path / "i")


def test_config_checks_name_the_key(tmp_path: Path) -> None:
    p = tmp_path / "params.yaml"
    p.write_text("index:\n  window_words: 8\n  window_stride: 9\n")
    with pytest.raises(ConfigError, match="window_stride: at most window_words \\(8\\), got 9"):
        load_config(p)
    p.write_text("index:\n  window_words: 8\njoint:\n  enabled: true\n")
    assert load_config(p).joint.enabled  # the joint stage scores passages by their best window
    p.write_text("index:\n  window_words: -1\n")
    with pytest.raises(ConfigError, match="window_words"):
        load_config(p)


def test_the_stages_search_windows_end_to_end(tiny_rag_project: Path) -> None:
    """build-index with windows; eval-retriever, retrieve and the packaged RAG model rank
    passages by their best window (each passage once)."""
    from ragtrain import cli
    from ragtrain.config import set_params
    from ragtrain.generation.rag import RAGModel

    root = tiny_rag_project
    assert cli.main(["eval-retriever"]) == 0
    plain = json.loads((root / "metrics/retriever.json").read_text())
    set_params(root / "params.yaml", {"index.window_words": 6, "index.window_stride": 3})
    for stage in ("build-index", "eval-retriever", "retrieve", "package"):
        assert cli.main([stage]) == 0, stage
    meta = json.loads((root / "artifacts/index/meta.json").read_text())
    ids = json.loads((root / "artifacts/index/passage_ids.json").read_text())
    corpus = [json.loads(x) for x in (root / "data/prepared/corpus.jsonl").open()]
    assert meta["n_passages"] == len(corpus) < len(ids) == meta["params"]["vectors"]
    assert meta["params"]["window_words"] == 6
    got = json.loads((root / "metrics/retriever.json").read_text())
    assert set(got) == set(plain)  # the same metrics, now of the windows
    for row in map(json.loads, (root / "artifacts/eval/retriever_test.jsonl").open()):
        assert len(row["top_ids"]) == len(set(row["top_ids"])) == len(corpus)  # k = 5: all
    rag = RAGModel.load(root / "artifacts/rag")
    out = rag.answer(["What is the capital of France?"], top_k=2)[0]
    pids = [p["id"] for p in out["passages"]]  # answer_from (2) inputs of top_k: 4 passages
    assert len(pids) == 4 == len(set(pids))
