"""Answering from each of the top passages on its own (generation/reading.py)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from ragtrain.data.corpus import Passage
from ragtrain.generation.generator import Example, Prediction
from ragtrain.generation.reading import answer_each, best_answer


def P(pid: str, text: str) -> Passage:
    return Passage(pid, pid.split("/")[0], text)


class ByPassage:
    """A stand-in generator: each passage's answer and score are fixed by its text."""

    def __init__(self, table: dict[str, tuple[str, float]]) -> None:
        self.table, self.calls = table, []

    def answer(self, examples: Sequence[Example], batch_size: int = 32, *, bf16: bool = False,
               progress: bool = False) -> list[Prediction]:
        self.calls.append([[p.passage_id for p in ex.passages] for ex in examples])
        return [Prediction(*self.table[ex.passages[0].text], passage=0) for ex in examples]


def test_best_answer_adds_the_weighted_retrieval_score() -> None:
    preds = [Prediction("a", -1.0), Prediction("b", -0.2)]
    # -1.0 + 2*0.9 = 0.8 vs -0.2 + 2*0.5 = 0.8: a tie keeps the top passage
    assert best_answer(preds, [0.9, 0.5], 2.0) == 0
    assert best_answer(preds, [0.9, 0.6], 2.0) == 1  # 1.0 > 0.8
    assert best_answer(preds, [0.9, 0.5], 0.0) == 1  # answer score alone
    assert best_answer(preds, [0.9, 0.5], 10.0) == 0  # retrieval dominates
    with pytest.raises(ValueError):
        best_answer([], [], 1.0)


def test_an_empty_answer_is_kept_only_when_every_input_gave_one() -> None:
    # the empty answer is the generator's "this input does not hold it" (missed_target: empty)
    preds = [Prediction("", -0.01), Prediction("b", -3.0), Prediction(" ", 0.0)]
    assert best_answer(preds, [0.9, 0.1, 0.9], 2.0) == 1
    assert best_answer([Prediction("", -2.0), Prediction("", -1.0)], [0.9, 0.1], 2.0) == 0


def test_the_empty_answers_probability_counts_against_an_input() -> None:
    # b scores higher, but its input is likelier to hold no answer (null -0.5 against -6)
    preds = [Prediction("a", -1.0, null=-6.0), Prediction("b", -0.8, null=-0.5)]
    assert best_answer(preds, [0.5, 0.5], 1.0) == 1
    assert best_answer(preds, [0.5, 0.5], 1.0, null_weight=0.2) == 0  # -1+1.2 > -0.8+0.1


def test_answer_each_reads_each_passage_alone_and_cites_the_one_it_kept() -> None:
    gen = ByPassage({"x": ("paris", -2.0), "y": ("lyon", -0.1), "z": ("nice", -0.05)})
    ps = [[P("d/1", "x"), P("d/2", "y"), P("d/3", "z")], [P("d/4", "z")]]
    out = answer_each(gen, ["q1", "q2"], ps, [[0.9, 0.7, 0.1], [0.5]], n=2, weight=1.0)
    # q1 reads only its top 2: -2.0+0.9 = -1.1 vs -0.1+0.7 = 0.6 -> "lyon" from passage 1
    assert [o.answer for o in out] == ["lyon", "nice"]
    assert [o.passage for o in out] == [1, 0]
    assert gen.calls == [[["d/1"], ["d/2"], ["d/4"]]]  # one input per passage, n at most


def test_answer_each_with_n_1_is_top_1_reading(tiny_bert_dir: Path) -> None:
    from ragtrain.config import GeneratorConfig
    from ragtrain.generation.generator import Generator

    g = Generator.from_pretrained(GeneratorConfig(model_name=str(tiny_bert_dir),
                                                  max_source_tokens=96, max_answer_tokens=4))
    ps = [[P("a/1", "the cat sat on the mat"), P("a/2", "dogs bark at night")],
          [P("b/1", "rain falls in spain"), P("b/2", "snow in winter")]]
    qs = ["where did the cat sit?", "where does rain fall?"]
    top1 = g.answer([Example(q, p[:1]) for q, p in zip(qs, ps, strict=True)])
    each = answer_each(g, qs, ps, [[1.0, 0.5], [1.0, 0.2]], n=1, weight=2.0)
    assert [(p.answer, p.score) for p in each] == [(p.answer, p.score) for p in top1]
    both = answer_each(g, qs, ps, [[1.0, 0.5], [1.0, 0.2]], n=2, weight=0.0)
    alone = g.answer([Example(q, [p]) for q, pp in zip(qs, ps, strict=True) for p in pp])
    for i, b in enumerate(both):  # weight 0: the higher answer score of the two
        pair = alone[2 * i:2 * i + 2]
        assert b.score == max(x.score for x in pair)
        assert b.answer == pair[b.passage].answer


def test_inputs_of_several_passages_cite_the_passage_in_the_whole_list() -> None:
    gen = ByPassage({"x": ("paris", -2.0), "z": ("nice", -0.05)})
    ps = [[P("d/1", "x"), P("d/2", "y"), P("d/3", "z"), P("d/4", "w"), P("d/5", "v")]]
    out = answer_each(gen, ["q"], ps, [[0.9, 0.8, 0.7, 0.6, 0.5]], n=2, weight=1.0, per_input=2)
    assert gen.calls == [[["d/1", "d/2"], ["d/3", "d/4"]]]  # the 5th passage is never read
    assert (out[0].answer, out[0].passage) == ("nice", 2)  # input 1, its passage 0


def test_answer_each_rejects_n_below_1() -> None:
    with pytest.raises(ValueError, match="must be >= 1"):
        answer_each(ByPassage({}), ["q"], [[P("a/1", "x")]], [[1.0]], n=0, weight=1.0)
