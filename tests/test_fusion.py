from __future__ import annotations

import numpy as np
import pytest

from ragtrain.errors import RetrievalError
from ragtrain.retrieval.fusion import reciprocal_rank_fusion, weighted_score_fusion


def test_rrf_by_hand() -> None:
    # dense: a b c ; bm25: b d a   (k = 60, ranks from 1)
    # a: 1/61 + 1/63   b: 1/62 + 1/61   c: 1/63   d: 1/62
    scores, ids = reciprocal_rank_fusion([[["a", "b", "c"], ["b", "d", "a"]]], top_k=4, k=60)
    assert ids == [["b", "a", "d", "c"]]
    np.testing.assert_allclose(
        scores[0], [1 / 62 + 1 / 61, 1 / 61 + 1 / 63, 1 / 62, 1 / 63], rtol=1e-12)
    assert scores.shape == (1, 4)


def test_rrf_batch_ties_padding_and_duplicates() -> None:
    rankings = [
        [["x", "y"], ["y", "x"]],  # x and y tie exactly: broken by id
        [["p", "p", "q"]],  # a repeat counts once, at its best rank
    ]
    scores, ids = reciprocal_rank_fusion(rankings, top_k=3, k=0)
    assert ids[0] == ["x", "y"]  # only 2 distinct passages: shorter list, -inf padding
    assert scores[0, 0] == scores[0, 1] == pytest.approx(1.5)
    assert scores[0, 2] == -np.inf
    assert ids[1] == ["p", "q"]
    np.testing.assert_allclose(scores[1, :2], [1.0, 1 / 3])


def test_rrf_top_k_truncates_and_validates() -> None:
    _, ids = reciprocal_rank_fusion([[["a", "b", "c"]]], top_k=1)
    assert ids == [["a"]]
    with pytest.raises(RetrievalError, match="top_k"):
        reciprocal_rank_fusion([[["a"]]], top_k=0)
    with pytest.raises(RetrievalError, match="one ranked id list per retriever"):
        reciprocal_rank_fusion([[]], top_k=1)
    with pytest.raises(RetrievalError, match="expected a list of ids"):
        reciprocal_rank_fusion([["abc"]], top_k=1)


def test_weighted_fusion_by_hand() -> None:
    # dense a=0.9 b=0.5 c=0.1 -> norm 1, 0.5, 0 ; bm25 b=10 d=4 -> norm 1, 0
    # w = 0.5: a = .5*1 + 0 = .5 ; b = .5*.5 + .5*1 = .75 ; c = 0 ; d = 0 (c, d tie: by id)
    scores, ids = weighted_score_fusion(
        np.array([[0.9, 0.5, 0.1]]), [["a", "b", "c"]],
        np.array([[10.0, 4.0]]), [["b", "d"]],
        dense_weight=0.5, top_k=4,
    )
    assert ids == [["b", "a", "c", "d"]]
    np.testing.assert_allclose(scores[0], [0.75, 0.5, 0.0, 0.0])


def test_weighted_fusion_extremes_and_padding() -> None:
    dense = np.array([[0.2, 0.9, -np.inf]])  # a padded row: 2 ids, 3 scores
    bm25 = np.array([[3.0, 1.0, 0.5]])
    _, only_dense = weighted_score_fusion(dense, [["a", "b"]], bm25, [["c", "a", "b"]],
                                          dense_weight=1.0, top_k=2)
    assert only_dense == [["b", "a"]]
    _, only_bm25 = weighted_score_fusion(dense, [["a", "b"]], bm25, [["c", "a", "b"]],
                                         dense_weight=0.0, top_k=2)
    assert only_bm25 == [["c", "a"]]


def test_weighted_fusion_constant_list_carries_no_information() -> None:
    scores, ids = weighted_score_fusion(np.array([[0.7, 0.7]]), [["z", "y"]],
                                        np.array([[2.0, 1.0]]), [["x", "w"]],
                                        dense_weight=0.9, top_k=4)
    assert ids == [["x", "w", "y", "z"]]
    np.testing.assert_allclose(scores[0], [0.1, 0.0, 0.0, 0.0], atol=1e-12)


def test_weighted_fusion_errors() -> None:
    s, i = np.array([[1.0]]), [["a"]]
    with pytest.raises(RetrievalError, match="dense_weight"):
        weighted_score_fusion(s, i, s, i, dense_weight=1.5, top_k=1)
    with pytest.raises(RetrievalError, match="1 dense queries but 2 BM25"):
        weighted_score_fusion(s, i, np.ones((2, 1)), [["a"], ["b"]], dense_weight=0.5, top_k=1)
    with pytest.raises(RetrievalError, match="NaN"):
        weighted_score_fusion(np.array([[np.nan]]), i, s, i, dense_weight=0.5, top_k=1)
    with pytest.raises(RetrievalError, match="2 ids but 1 scores"):
        weighted_score_fusion(s, [["a", "b"]], s, i, dense_weight=0.5, top_k=1)
