from __future__ import annotations

import math

import pytest

from ragtrain.errors import RetrievalError
from ragtrain.evaluation.answers import normalize_answer
from ragtrain.retrieval.metrics import answer_in_passage, evaluate_retrieval


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("The  Quick, brown FOX!", "quick brown fox"),
        ("an apple a day", "apple day"),
        ("theater", "theater"),  # articles only as whole words
        ("U.S.-led", "usled"),  # punctuation removed, not replaced by spaces
        ("A\tthe\nAn", ""),
        ("Denver Broncos", "denver broncos"),
    ],
)
def test_normalize_answer_matches_squad_v11(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


def test_answer_in_passage_is_token_level() -> None:
    assert not answer_in_passage(["art"], "They threw a party.")
    assert answer_in_passage(["art"], "Modern Art, they said.")
    assert answer_in_passage(["the Denver Broncos"], "Won by Denver broncos in 2016")
    assert not answer_in_passage(["Denver Broncos"], "Broncos of Denver")  # order matters
    assert answer_in_passage(["nope", "1,000"], "about 1000 people")  # any answer
    assert not answer_in_passage(["the"], "the cat")  # normalises to nothing
    assert not answer_in_passage([], "anything")


def test_evaluate_by_hand() -> None:
    ranked = [["a", "b", "c"], ["d", "e", "f"], ["g", "h", "i"]]
    gold = [["a"], ["f", "e"], ["x"]]
    # q0: gold rank 1 -> R@1 1, RR 1,   DCG 1,                         IDCG 1
    # q1: gold rank 2 -> R@1 0, RR 1/2, DCG 1/log2(3) + 1/log2(4) = 1/log2(3) + 1/2,
    #                                   IDCG (2 gold) 1 + 1/log2(3)
    # q2: no gold in list -> 0 everywhere
    metrics, rows = evaluate_retrieval(ranked, gold, ks=(1, 2, 5), rank_cutoff=3, split="dev")
    ndcg1 = (1 / math.log2(3) + 0.5) / (1 + 1 / math.log2(3))
    assert metrics["dev/recall_at_1"] == pytest.approx(1 / 3)
    assert metrics["dev/recall_at_2"] == pytest.approx(2 / 3)
    assert metrics["dev/recall_at_5"] == pytest.approx(2 / 3)  # k > list length: within list
    assert metrics["dev/mrr_at_3"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert metrics["dev/ndcg_at_3"] == pytest.approx((1 + ndcg1 + 0) / 3)
    assert metrics["dev/n_questions"] == 3
    assert metrics["dev/n_unlabelled"] == 0
    assert [r["gold_rank"] for r in rows] == [1, 2, None]
    assert [r["recall_at_2"] for r in rows] == [True, True, False]
    assert rows[1]["top_ids"] == ["d", "e", "f"]
    assert rows[1]["ndcg_at_3"] == pytest.approx(ndcg1)


def test_cutoff_applies_to_mrr_and_ndcg() -> None:
    metrics, _ = evaluate_retrieval([["x", "y", "g"]], [["g"]], ks=(1,), rank_cutoff=2)
    assert metrics["test/mrr_at_2"] == 0.0
    assert metrics["test/ndcg_at_2"] == 0.0
    metrics, _ = evaluate_retrieval([["x", "y", "g"]], [["g"]], ks=(1,), rank_cutoff=3)
    assert metrics["test/mrr_at_3"] == pytest.approx(1 / 3)
    assert metrics["test/ndcg_at_3"] == pytest.approx(1 / 2)  # 1/log2(4), ideal 1


def test_unlabelled_questions_are_skipped_and_counted() -> None:
    metrics, rows = evaluate_retrieval([["a"], ["b"]], [["a"], []], ks=(1,), rank_cutoff=1)
    assert metrics["test/recall_at_1"] == 1.0  # mean over the labelled question only
    assert metrics["test/n_unlabelled"] == 1
    assert rows[1]["gold_rank"] is None and "recall_at_1" not in rows[1]
    metrics, _ = evaluate_retrieval([["a"]], [[]], ks=(1,))
    assert "test/recall_at_1" not in metrics  # nothing to average


def test_answer_recall() -> None:
    passages = {"p1": "The party was fun", "p2": "Modern art museum", "p3": "nothing here"}
    ranked = [["p1", "p2", "p3"], ["p3", "p1"], ["p1"]]
    answers = [["art"], ["museum"], []]
    metrics, rows = evaluate_retrieval(ranked, [[], [], []], ks=(1, 2), passages=passages,
                                       answers=answers)
    assert metrics["test/answer_recall_at_1"] == 0.0
    assert metrics["test/answer_recall_at_2"] == pytest.approx(1 / 2)
    assert metrics["test/n_with_answers"] == 2
    assert [r.get("answer_rank") for r in rows] == [2, None, None]
    with pytest.raises(RetrievalError, match="'zz' is not in passages"):
        evaluate_retrieval([["zz"]], [[]], ks=(1,), passages=passages, answers=[["x"]])


def test_evaluate_errors() -> None:
    with pytest.raises(RetrievalError, match="2 ranked lists but 1 gold"):
        evaluate_retrieval([["a"], ["b"]], [["a"]])
    with pytest.raises(RetrievalError, match="no questions"):
        evaluate_retrieval([], [])
    with pytest.raises(RetrievalError, match="ks: must be an integer >= 1, got 0"):
        evaluate_retrieval([["a"]], [["a"]], ks=(0,))
    with pytest.raises(RetrievalError, match="duplicate passage ids"):
        evaluate_retrieval([["a", "a"]], [["a"]])
    with pytest.raises(RetrievalError, match="both passages and answers"):
        evaluate_retrieval([["a"]], [["a"]], passages={"a": "x"})
