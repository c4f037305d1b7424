"""Distillation from the reranker into the bi-encoder (retriever.loss: distill): the KL term by
hand, its masking and gradient, the teacher file's checks, the config rule, and the stages on a
tiny project (teacher_scores then train_retriever)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from ragtrain import cli
from ragtrain.config import load_config
from ragtrain.errors import ConfigError, DataError
from ragtrain.retrieval import losses
from ragtrain.retrieval.distill import distill_negatives, read_teacher_scores
from tests.conftest import FIXTURES
from tests.test_reranker import RERANK_PARAMS

NAN = math.nan


def test_teacher_kl_matches_hand_computation() -> None:
    scores = torch.tensor([[2.0, 0.0, 1.0], [0.5, 1.5, -1.0]])
    teacher = torch.tensor([[3.0, NAN, 1.0], [0.0, 1.0, 2.0]])

    def kl(p: list[float], q: list[float]) -> float:
        zp, zq = sum(math.exp(x) for x in p), sum(math.exp(x) for x in q)
        return sum(math.exp(a) / zp * ((a - math.log(zp)) - (b - math.log(zq)))
                   for a, b in zip(p, q, strict=True))

    # row 0: the NaN column leaves both softmaxes; row 1: all three columns
    want = (kl([3.0, 1.0], [2.0, 1.0]) + kl([0.0, 1.0, 2.0], [0.5, 1.5, -1.0])) / 2
    assert losses.teacher_kl(scores, teacher).item() == pytest.approx(want, rel=1e-6)


def test_teacher_kl_zero_when_student_agrees_and_rows_without_signal_dropped() -> None:
    t = torch.tensor([[1.0, 2.0, NAN], [NAN, 4.0, NAN]])  # row 1: one column, no ranking
    s = torch.tensor([[1.0, 2.0, 9.0], [0.0, 0.0, 0.0]], requires_grad=True)
    assert losses.teacher_kl(s, t).item() == pytest.approx(0.0, abs=1e-7)
    shifted = torch.tensor([[5.0, 6.0, -3.0], [1.0, 1.0, 1.0]])  # a constant shift: same softmax
    assert losses.teacher_kl(shifted, t).item() == pytest.approx(0.0, abs=1e-6)
    none = torch.full((2, 3), NAN)
    out = losses.teacher_kl(s, none)
    out.backward()  # no signal at all: zero, and still differentiable
    assert out.item() == 0.0 and s.grad is not None and torch.all(s.grad == 0)


def test_distill_loss_is_nll_plus_weighted_kl_with_finite_gradients() -> None:
    torch.manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1).requires_grad_()
    p = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1).requires_grad_()
    targets = torch.tensor([0, 1, 2])
    teacher = torch.full((3, 5), NAN)
    teacher[0, [0, 3]] = torch.tensor([2.0, 1.0])
    teacher[1, [1, 4]] = torch.tensor([0.0, 3.0])  # the teacher prefers a negative here
    teacher[2, [2, 3, 4]] = torch.tensor([1.0, 0.5, -1.0])
    fn = losses.get_loss("distill")
    assert fn.uses_teacher and fn.uses_negatives
    nll = losses.in_batch_nll_loss(q, p, targets, 0.05)
    only = fn.fn(q, p, targets, 0.05, None, teacher=teacher, weight=0.0)
    assert only.item() == pytest.approx(nll.item())
    full = fn.fn(q, p, targets, 0.05, None, teacher=teacher, weight=2.0,
                 teacher_temperature=0.5)
    kl = losses.teacher_kl((q @ p.T) / 0.05, teacher / 0.5)
    assert full.item() == pytest.approx(nll.item() + 2.0 * kl.item(), rel=1e-5)
    full.backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(p.grad).all()
    assert q.grad.abs().sum() > 0


def _write(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_teacher_file_checks_name_the_line(tmp_path: Path) -> None:
    ids = ["a", "b", "c"]
    good = {"id": "q1", "candidates": ["a", "b"], "scores": [1.0, -0.5]}
    f = _write(tmp_path / "s.jsonl", [good])
    assert read_teacher_scores(f, ids) == {"q1": {"a": 1.0, "b": -0.5}}
    cases = [({"id": "q2", "candidates": ["a"], "scores": [1.0, 2.0]}, "one score per"),
             ({"id": "q2", "candidates": ["zz"], "scores": [1.0]}, "'zz' is not in the corpus"),
             ({"id": "q2", "candidates": ["a", "b"], "scores": [1.0, "x"]}, "finite numbers"),
             ({"candidates": ["a"], "scores": [1.0]}, "one score per")]
    for bad, msg in cases:
        f = _write(tmp_path / "s.jsonl", [good, bad])
        with pytest.raises(DataError, match=f"s.jsonl:2: .*{msg}"):
            read_teacher_scores(f, ids)


def test_distill_negatives_skip_gold_and_refuse_stale_scores() -> None:
    rows = [{"id": "q1", "gold_passage_ids": ["a", "c"]}]
    teacher = {"q1": {"a": 3.0, "b": 1.0, "c": 2.0, "d": 0.0}}
    assert distill_negatives(rows, teacher, 1) == [["b"]]
    assert distill_negatives(rows, teacher, 5) == [["b", "d"]]
    with pytest.raises(DataError, match="no entry for train question 'q9'.*teacher_scores"):
        distill_negatives([{"id": "q9", "gold_passage_ids": ["a"]}], teacher, 1)


def test_config_distill_needs_the_reranker(tmp_path: Path) -> None:
    p = tmp_path / "params.yaml"
    p.write_text("retriever:\n  loss: distill\n")
    with pytest.raises(ConfigError, match="retriever.loss: distill .* reranker.enabled: true"):
        load_config(p)
    p.write_text("retriever:\n  loss: distill\n  hard_negatives_per_query: 0\n"
                 "reranker:\n  enabled: true\n")
    with pytest.raises(ConfigError, match="hard_negatives_per_query: loss distill needs >= 1"):
        load_config(p)
    p.write_text("retriever:\n  loss: distill\nreranker:\n  enabled: true\n")
    assert load_config(p).retriever.loss == "distill"


def test_stages_teacher_scores_then_distilled_retriever(tmp_path: Path, tiny_bert_dir: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(RERANK_PARAMS.format(source=FIXTURES / "tiny_jsonl", bert=tiny_bert_dir,
                                           enabled="true"))
    monkeypatch.chdir(tmp_path)
    for stage in ("fetch", "prepare", "build-bm25", "teacher-scores"):
        assert cli.main([stage]) == 0, stage
    marker = tmp_path / "artifacts/teacher_scores/DISABLED.json"
    assert json.loads(marker.read_text())["enabled"] is False  # in_batch_nll: no teacher
    params.write_text(params.read_text().replace(
        "retriever:\n", "retriever:\n  loss: distill\n  hard_negatives_per_query: 2\n"
        "  distill_weight: 2.0\n", 1))
    capsys.readouterr()
    assert cli.main(["train-retriever"]) == 2  # the scores are not there yet: one clear line
    assert "retriever.loss distill needs the teacher's scores" in capsys.readouterr().err
    assert not (tmp_path / "artifacts/retriever").exists()
    for stage in ("train-reranker", "teacher-scores", "train-retriever"):
        assert cli.main([stage]) == 0, stage
    assert not marker.exists()
    corpus_ids = [json.loads(x)["passage_id"] for x in
                  (tmp_path / "data/prepared/corpus.jsonl").read_text().splitlines()]
    scores = read_teacher_scores(tmp_path / "artifacts/teacher_scores/scores.jsonl", corpus_ids)
    train = [json.loads(x) for x in
             (tmp_path / "data/prepared/train.jsonl").read_text().splitlines()]
    labelled = [r for r in train if r["gold_passage_ids"]]
    assert set(scores) == {r["id"] for r in labelled}
    for r in labelled:  # gold first, then negatives that are neither gold nor answer-bearing
        cands = list(scores[r["id"]])
        assert cands[0] == r["gold_passage_ids"][0] and 1 <= len(cands) <= 3
        assert not set(cands[1:]) & set(r["gold_passage_ids"])
    m = json.loads((tmp_path / "metrics/train_retriever.json").read_text())
    curve = json.loads((tmp_path / "plots/train_retriever.json").read_text())
    assert m["train/steps"] == 2 and len(curve) == 2
    assert all(math.isfinite(row["loss"]) for row in curve)
    assert (tmp_path / "artifacts/retriever").is_dir()
