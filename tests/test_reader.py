"""The extractive reader baseline on a tiny model: locating answers, spans, windows, training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ragtrain.data.corpus import Passage
from ragtrain.generation.reader import Reader, ReaderConfig, best_span, locate_answer, train_reader

TEXT = ("The Denver Broncos defeated the Carolina Panthers 24–10 to win Super Bowl 50 at "
        "Levi's Stadium in Santa Clara.")


def reader(tiny_bert_dir: Path, **kw: object) -> Reader:
    torch.manual_seed(0)
    return Reader.from_pretrained(ReaderConfig(model_name=str(tiny_bert_dir), **kw))  # type: ignore[arg-type]


def test_locate_answer_exact_then_case_and_space_insensitive() -> None:
    assert locate_answer(TEXT, ["Panthers"]) == (TEXT.index("Panthers"),
                                                 TEXT.index("Panthers") + 8)
    i = TEXT.index("Santa Clara")
    assert locate_answer(TEXT, ["nowhere", "santa   clara"]) == (i, i + len("Santa Clara"))
    assert locate_answer(TEXT, ["nowhere", ""]) is None


def test_best_span_respects_order_length_and_context() -> None:
    start = torch.tensor([9.0, 1.0, 5.0, 0.0, 0.0])
    end = torch.tensor([9.0, 0.0, 0.0, 4.0, 8.0])
    ctx = torch.tensor([False, True, True, True, True])  # token 0 ([CLS]) is never an answer
    assert best_span(start, end, ctx, 30)[:2] == (2, 4)
    assert best_span(start, end, ctx, 2)[:2] == (2, 3)  # at most 2 tokens
    # an end before the start is never chosen, however high
    assert best_span(torch.tensor([0.0, 0.0, 9.0]), torch.tensor([0.0, 5.0, 1.0]),
                     torch.tensor([True, True, True]), 5)[:2] == (2, 2)
    assert best_span(start, end, torch.zeros(5, dtype=torch.bool), 3)[0] == -1


def test_train_features_point_at_the_answer_in_every_window(tiny_bert_dir: Path) -> None:
    r = reader(tiny_bert_dir)
    (f,) = r.train_features("Who won?", TEXT, ["Denver Broncos"])
    assert r.tok.decode(f["input_ids"][f["start"]:f["end"] + 1]) == "denver broncos"
    assert r.train_features("Who won?", TEXT, ["not in it"]) == []
    # a long passage in short windows: the answer is found where a window holds it, [CLS] else
    small = reader(tiny_bert_dir, max_length=24, stride=8)
    feats = small.train_features("Where?", TEXT, ["Santa Clara"])
    assert len(feats) > 1
    hits = [f for f in feats if f["start"] > 0]
    assert hits and all(small.tok.decode(f["input_ids"][f["start"]:f["end"] + 1])
                        == "santa clara" for f in hits)
    assert any(f["start"] == f["end"] == 0 for f in feats)


def test_reader_learns_spans_and_answers_with_the_passage_text(tmp_path: Path,
                                                               tiny_bert_dir: Path) -> None:
    corpus = {"p": Passage("p", "Super_Bowl_50", TEXT)}
    rows = [{"question": "who won?", "answers": ["Denver Broncos"], "gold_passage_ids": ["p"]},
            {"question": "where was it?", "answers": ["Levi's Stadium"],
             "gold_passage_ids": ["p"]}]
    r = reader(tiny_bert_dir, batch_size=2, max_steps=80, lr=3e-3, new_params_lr=3e-3,
               warmup_ratio=0.0)
    state = train_reader(r, rows, corpus, seed=0, ckpt_dir=tmp_path / "ckpt", progress=False)
    assert state.step == 80
    answers = r.answer([x["question"] for x in rows], [[TEXT], ["Nothing here.", TEXT]])
    # the passage's own text ("Levi's", capitalised), not WordPiece decoding ("levi ' s")
    assert answers == ["Denver Broncos", "Levi's Stadium"]
    # windows: the same answers when the passage is read in overlapping windows
    r.cfg = ReaderConfig(model_name=r.cfg.model_name, max_length=32, stride=16)
    assert r.answer(["who won?"], [[TEXT]]) == ["Denver Broncos"]
    assert r.answer(["who won?"], [[""]]) == [""]


def test_reader_refuses_training_without_locatable_answers(tmp_path: Path,
                                                           tiny_bert_dir: Path) -> None:
    r = reader(tiny_bert_dir)
    with pytest.raises(ValueError, match="no training feature"):
        train_reader(r, [{"question": "q", "answers": ["absent"], "gold_passage_ids": ["p"]}],
                     {"p": Passage("p", "t", TEXT)}, seed=0, ckpt_dir=tmp_path, progress=False)
