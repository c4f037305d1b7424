"""Abstention (src/ragtrain/evaluation/abstention.py): the dev-chosen threshold by hand."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest

from ragtrain.evaluation.abstention import (
    abstains,
    abstention_score,
    calibrate,
    choose_threshold,
    report,
)


def test_threshold_maximises_the_mixture_f1_by_hand() -> None:
    # answerable (score, F1): confident ones right, the unsure one half right
    answerable = [(-0.1, 100.0), (-0.5, 100.0), (-2.0, 50.0)]
    unanswerable = [-3.0, -2.5, -0.3]
    cal = choose_threshold(answerable, unanswerable)
    # never abstain: (100 + 100 + 50 + 0 + 0 + 0) / 6 = 41.67
    assert cal.f1_never == pytest.approx(250 / 6)
    # abstain below -2.0 (i.e. t = -2.0: -2.5 and -3.0 abstain): (250 + 200) / 6 = 75
    # below -0.5 (t = -0.5 also drops the 50): (200 + 200) / 6 = 66.7; the first wins
    assert cal.threshold == -2.0
    assert cal.f1 == pytest.approx(450 / 6)
    assert cal.abstained_answerable == 0 and cal.abstained_unanswerable == pytest.approx(2 / 3)


def test_never_abstains_when_it_does_not_pay_and_ties_go_low() -> None:
    cal = choose_threshold([(-1.0, 100.0), (-2.0, 100.0)], [-0.5])
    assert cal.threshold == -math.inf and cal.f1 == cal.f1_never == pytest.approx(200 / 3)
    # all unanswerable scored lowest: abstaining below the lowest answerable one is best
    cal = choose_threshold([(-1.0, 100.0)], [-5.0, -4.0])
    assert cal.threshold == -1.0 and cal.f1 == 100.0
    assert not abstains(-1.0, cal.threshold) and abstains(-4.0, cal.threshold)


def test_report_scores_abstentions_as_wrong_on_answerable_questions() -> None:
    cal = choose_threshold([(-1.0, 100.0)], [-5.0, -4.0])
    m = report("test", cal, [(-0.5, 100.0, 100.0), (-3.0, 0.0, 40.0), (-0.9, 0.0, 50.0)],
               [-6.0, -0.2, -2.0, -1.5])
    assert m["test/abstain/em"] == pytest.approx(100 / 3)
    assert m["test/abstain/f1"] == pytest.approx(150 / 3)
    assert m["test/abstain/false_abstention_rate"] == pytest.approx(1 / 3)
    assert m["test/abstain/correct_abstention_rate"] == pytest.approx(3 / 4)
    assert m["dev/abstain/threshold"] == -1.0


def test_the_score_subtracts_the_weighted_probability_of_the_empty_answer() -> None:
    assert abstention_score(0.5, math.log(0.25), 0.4) == pytest.approx(0.5 - 0.4 * 0.25)
    assert abstention_score(0.5, math.log(0.25), 0.0) == 0.5
    assert abstention_score(0.5, 0.0, 1.0) == pytest.approx(-0.5)  # kinds without it: a shift


def test_calibrate_chooses_the_weight_that_separates_by_hand() -> None:
    # (relevance, log p(empty), F1): the cosine alone cannot tell the two sets apart (0.5, 0.3
    # answerable; 0.4, 0.6 not), the generator's "no answer" can (p 0.1 against 0.9)
    answerable = [(0.5, math.log(0.1), 100.0), (0.3, math.log(0.1), 100.0)]
    unanswerable = [(0.4, math.log(0.9)), (0.6, math.log(0.9))]
    cal = calibrate(answerable, unanswerable, [0.0])
    # w = 0: never abstaining (200 / 4) ties abstaining below 0.5 (100 + 100) / 4: the lowest
    assert cal.null_weight == 0.0 and cal.f1 == pytest.approx(50.0)
    assert cal.threshold == -math.inf
    cal = calibrate(answerable, unanswerable, [0.0, 1.0, 2.0])
    # w = 1: answerable 0.4, 0.2; unanswerable -0.5, -0.3: abstaining below 0.2 gets all four
    # right; w = 2 does as well and loses the tie to the earlier weight
    assert cal.null_weight == 1.0 and cal.threshold == pytest.approx(0.2)
    assert cal.f1 == pytest.approx(100.0) and cal.f1_never == pytest.approx(50.0)
    assert cal.abstained_unanswerable == 1.0 and cal.abstained_answerable == 0.0
    m = report("test", cal, [(0.4, 100.0, 100.0)], [-0.5])
    assert m["dev/abstain/null_weight"] == 1.0 and m["dev/abstain/threshold"] == pytest.approx(0.2)
    with pytest.raises(ValueError, match="at least one null weight"):
        calibrate(answerable, unanswerable, [])


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="needs answerable and unanswerable"):
        choose_threshold([], [-1.0])
    with pytest.raises(ValueError, match="finite"):
        choose_threshold([(float("nan"), 1.0)], [-1.0])


def test_the_stages_choose_report_and_apply_a_threshold(tiny_rag_project: Path) -> None:
    """abstention.enabled on the tiny project: retrieve-unanswerable searches the dev / test
    questions without their articles, evaluate chooses the threshold on dev and reports the
    split's abstentions, the bundle abstains below it."""
    import json

    from ragtrain import cli
    from ragtrain.config import set_params
    from ragtrain.generation.rag import RAGModel

    p = tiny_rag_project
    assert cli.main(["retrieve-unanswerable"]) == 0  # off by default: its marker only
    assert json.loads((p / "artifacts/unanswerable/DISABLED.json").read_text())["enabled"] is False
    set_params(p / "params.yaml", {"abstention.enabled": True})
    for stage in ("retrieve-unanswerable", "evaluate", "package"):
        assert cli.main([stage]) == 0, stage
    test_q = {json.loads(x)["id"] for x in (p / "data/prepared/test.jsonl").open()}
    unans = [json.loads(x) for x in (p / "artifacts/unanswerable/test.jsonl").open()]
    assert {u["id"] for u in unans} == test_q
    gone = {json.loads(x)["doc_id"] for x in (p / "data/prepared/test.jsonl").open()}
    corpus = {json.loads(x)["passage_id"]: json.loads(x)["doc_id"]
              for x in (p / "data/prepared/corpus.jsonl").open()}
    assert all(corpus[pid] not in gone for u in unans for pid in u["passage_ids"])
    m = json.loads((p / "metrics/generator.json").read_text())
    for key in ("em", "f1"):
        assert 0 <= m[f"test/abstain/{key}"] <= m[f"test/{key}"]
    for key in ("false_abstention_rate", "correct_abstention_rate"):
        assert 0 <= m[f"test/abstain/{key}"] <= 1
    assert m["dev/abstain/f1"] >= m["dev/abstain/f1_never"]
    rag = RAGModel.load(p / "artifacts/rag")
    assert rag.reading.abstain_below == m["dev/abstain/threshold"]
    assert rag.reading.abstain_null_weight == m["dev/abstain/null_weight"] in (0, .1, .2, .3, .5)
    out = rag.answer(["What river is Paris on?"])[0]
    w = rag.reading.abstain_null_weight
    assert -1.0001 - w <= out["relevance"] <= 1.0001  # a cosine, less w x p(empty answer)
    assert out["abstained"] == (out["relevance"] < rag.reading.abstain_below)
    # the served relevance is the cosine less the weight x the kept answer's p(empty answer)
    rag.reading = dataclasses.replace(rag.reading, abstain_null_weight=0.0)
    cosine = rag.answer(["What river is Paris on?"])[0]["relevance"]
    rag.reading = dataclasses.replace(rag.reading, abstain_null_weight=1.0)
    p_empty = cosine - rag.answer(["What river is Paris on?"])[0]["relevance"]
    assert 0 < p_empty <= 1.0001
    assert out["relevance"] == pytest.approx(cosine - w * p_empty, abs=1e-5)
    rag.reading = dataclasses.replace(rag.reading, abstain_below=2.0)  # above any cosine
    out = rag.answer(["What river is Paris on?"])[0]
    assert out["abstained"] is True and out["answer"] == "" and out["answer_passage"] is None
    rag.reading = dataclasses.replace(rag.reading, abstain_below=-2.0)
    assert rag.answer(["What river is Paris on?"])[0]["abstained"] is False
    # evaluated on dev (the tiny project's one dev question is both the split and the sample)
    set_params(p / "params.yaml", {"evaluation.split": "dev", "abstention.null_weights": [0.0]})
    assert cli.main(["evaluate"]) == 0
    m = json.loads((p / "metrics/generator.json").read_text())
    assert m["dev/abstain/null_weight"] == 0.0 and 0 <= m["dev/abstain/em"] <= m["dev/em"]


def test_relevance_is_the_cosine_of_the_two_embeddings() -> None:
    import numpy as np

    from ragtrain.evaluation.abstention import relevance

    class Enc:  # unit vectors by hand
        def encode_queries(self, texts: list, batch_size: int) -> np.ndarray:
            return np.array([[1.0, 0.0], [0.0, 1.0]])

        def encode_passages(self, texts: list, batch_size: int) -> np.ndarray:
            return np.array([[0.6, 0.8], [0.0, -1.0]])

    assert relevance(Enc(), ["a", "b"], ["x", "y"]) == pytest.approx([0.6, -1.0])
