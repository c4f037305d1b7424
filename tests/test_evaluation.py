"""Answer metrics against hand-computed cases, through the local `evaluate` module too."""

from __future__ import annotations

import math

import pytest

from ragtrain.evaluation.answers import (
    METRIC_MODULE,
    contains,
    exact_match,
    f1,
    score_answers,
    score_one,
    sliding_window_answer,
)


def test_exact_match_uses_squad_normalisation() -> None:
    assert exact_match("The  Denver Broncos!", "denver broncos") == 1.0
    assert exact_match("an apple", "Apple.") == 1.0  # articles and punctuation dropped
    assert exact_match("Broncos", "Denver Broncos") == 0.0


def test_f1_by_hand() -> None:
    # pred tokens {denver, broncos, team}, ref {denver, broncos}: P = 2/3, R = 1, F1 = 0.8
    assert math.isclose(f1("the Denver Broncos team", "Denver Broncos"), 0.8)
    # one common token of 2 and 3: P = 1/2, R = 1/3, F1 = 0.4
    assert math.isclose(f1("Carolina Panthers", "the Panthers of Carolina's"), 0.4)
    assert f1("", "x") == 0.0 and f1("a", "the") == 0.0  # nothing left after normalisation
    assert math.isclose(f1("1 1 2", "1 2 2"), 2 / 3)  # multiset overlap: {1, 2}


def test_accuracy_is_reference_contained_as_tokens() -> None:
    assert contains("It was the Denver Broncos in 2016", "Denver Broncos") == 1.0
    assert contains("art", "party") == 0.0 and contains("party", "art") == 0.0
    assert contains("anything", "the") == 0.0  # a reference that normalises to nothing


def test_max_over_references_and_percent() -> None:
    assert score_one("Broncos", ["Denver Broncos", "Broncos"]) == {
        "em": 1.0, "f1": 1.0, "accuracy": 1.0}
    s = score_answers(["Denver Broncos", "Panthers", "x"],
                      [["Denver Broncos"], ["Carolina Panthers"], ["y"]])
    assert math.isclose(s["em"], 100 / 3)
    assert math.isclose(s["f1"], 100 * (1 + 2 / 3) / 3)  # Panthers vs Carolina Panthers: 2/3
    assert math.isclose(s["accuracy"], 100 / 3)
    with pytest.raises(ValueError, match="without reference"):
        score_one("x", [])
    with pytest.raises(ValueError, match="2 predictions for 1"):
        score_answers(["a", "b"], [["a"]])


def test_the_evaluate_module_loads_by_path_and_agrees() -> None:
    import evaluate

    metric = evaluate.load(str(METRIC_MODULE))
    preds = ["the Denver Broncos team", "Panthers", "Levi's Stadium"]
    refs = [["Denver Broncos"], ["Carolina Panthers", "Panthers"], ["Santa Clara"]]
    got = metric.compute(predictions=preds, references=refs)
    want = score_answers(preds, refs)
    assert got == {"exact_match": want["em"], "f1": want["f1"], "accuracy": want["accuracy"]}
    assert math.isclose(got["exact_match"], 100 / 3) and math.isclose(got["f1"], 60.0)


def test_sliding_window_baseline_by_hand() -> None:
    p = "In 1066 William the Conqueror invaded England after the battle of Hastings."
    # "invaded" / "england" are question words: the best span sits next to them
    assert sliding_window_answer("Who invaded England?", p, max_words=3, window=3) == (
        "William the Conqueror")
    assert sliding_window_answer("anything", "") == ""
