from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ragtrain import trainer
from ragtrain.config import RetrieverConfig
from ragtrain.data.corpus import Corpus, Passage
from ragtrain.errors import RagtrainError
from ragtrain.retrieval import losses
from ragtrain.retrieval.encoder import BiEncoder, EncoderSpec, encode, pool
from ragtrain.retrieval.mining import mine_hard_negatives
from ragtrain.retrieval.training import exact_search, train_retriever
from tests.conftest import tamper_safetensors

# ----------------------------------------------------------------- losses


def test_in_batch_nll_matches_hand_computation_and_gradcheck() -> None:
    torch.manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(3, 4, dtype=torch.float64), dim=-1)
    p = torch.nn.functional.normalize(torch.randn(5, 4, dtype=torch.float64), dim=-1)
    t = torch.tensor([0, 1, 2])
    loss = losses.in_batch_nll_loss(q, p, t, 0.5)
    s = (q @ p.T) / 0.5
    hand = -(s[torch.arange(3), t] - torch.logsumexp(s, 1)).mean()
    assert torch.allclose(loss.double(), hand, atol=1e-6)

    def f(qq: torch.Tensor, pp: torch.Tensor) -> torch.Tensor:
        s = (qq @ pp.T) / 0.5
        return torch.nn.functional.cross_entropy(s, t)

    assert torch.autograd.gradcheck(f, (q.clone().requires_grad_(), p.clone().requires_grad_()))
    # the analytic gradient wrt q_i: (sum_j softmax_ij p_j - p_t) / (tau * B)
    qg = q.clone().requires_grad_()
    f(qg, p).backward()
    sm = torch.softmax((q @ p.T) / 0.5, 1)
    expected = (sm @ p - p[t]) / (0.5 * 3)
    assert torch.allclose(qg.grad, expected, atol=1e-10)


def test_false_negative_mask_removes_other_gold_columns() -> None:
    mask = losses.false_negative_mask([{"a", "b"}, {"c"}], ["a", "c", "b"], [0, 1])
    assert mask.tolist() == [[False, False, True], [False, False, False]]
    q = torch.eye(3)[:2]
    p = torch.eye(3)
    masked = losses.in_batch_nll_loss(q, p, torch.tensor([0, 1]), 1.0, mask)
    unmasked = losses.in_batch_nll_loss(q, p, torch.tensor([0, 1]), 1.0)
    # query 0 loses column 2 from its softmax: -log(e / (e + 1)); query 1: -log(e / (e + 2))
    e = math.e
    assert masked.item() == pytest.approx((math.log(e + 1) + math.log(e + 2)) / 2 - 1)
    assert unmasked.item() == pytest.approx(math.log(e + 2) - 1)


def test_cosine_loss_value_gradient_and_collapse() -> None:
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    p = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    loss = losses.cosine_loss(q, p)
    assert loss.item() == pytest.approx(0.5)  # (0 + 1) / 2
    loss.backward()
    assert q.grad is not None and q.grad[0].abs().sum() == 0  # aligned pair: no gradient
    # the weakness: a collapsed encoder (all embeddings equal) reaches the minimum, 0
    same = torch.ones(4, 3)
    assert losses.cosine_loss(same, same).item() == pytest.approx(0.0, abs=1e-6)


def test_losses_are_looked_up_by_name() -> None:
    assert losses.get_loss("in_batch_nll").fn is losses.in_batch_nll_loss
    assert losses.get_loss("in_batch_nll").uses_negatives
    cos = losses.get_loss("cosine")
    assert not cos.uses_negatives
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    # targets pick the gold columns: cos(q0, p2) = 0, cos(q1, p1) = 0.8 -> mean(1 - cos) = 0.6
    assert cos.fn(q, p, torch.tensor([2, 1]), 0.05, None).item() == pytest.approx(0.6)
    with pytest.raises(ValueError,
                       match=r"unknown loss 'triplet' \(known: cosine, distill, in_batch_nll"):
        losses.get_loss("triplet")


def test_pool_mean_ignores_padding_and_cls() -> None:
    h = torch.tensor([[[1.0, 1.0], [3.0, 3.0], [100.0, 100.0]]])
    m = torch.tensor([[1, 1, 0]])
    assert pool(h, m, "mean").tolist() == [[2.0, 2.0]]
    assert pool(h, m, "cls").tolist() == [[1.0, 1.0]]


# ----------------------------------------------------------------- mining


def test_mining_excludes_gold_and_answer_passages_and_margin() -> None:
    passages = {"p1": "Paris is in France", "p2": "Lyon is big", "p3": "The capital is Paris",
                "p4": "Rome is old", "p5": "Berlin is cold"}
    ranked = [["p1", "p3", "p2", "p4", "p5"]]
    negs = mine_hard_negatives(ranked, [["p1"]], [["Paris"]], passages, 2)
    assert negs == [["p2", "p4"]]  # p1 gold, p3 contains the answer
    negs = mine_hard_negatives(ranked, [["p1"]], [[]], passages, 2)
    assert negs == [["p3", "p2"]]  # no answers known: only gold excluded
    scores = [[0.9, 0.8, 0.85, 0.5, 0.4]]
    negs = mine_hard_negatives(ranked, [["p1"]], [["Paris"]], passages, 2,
                               ranked_scores=scores, gold_scores=[0.9], margin=0.1)
    assert negs == [["p4", "p5"]]  # p2 scores 0.85 > 0.9 - 0.1: too close, skipped


# ----------------------------------------------------------------- encoder


def test_exact_search_matches_bruteforce() -> None:
    rng = np.random.default_rng(0)
    p = rng.normal(size=(50, 8)).astype(np.float32)
    q = rng.normal(size=(4, 8)).astype(np.float32)
    ids = [f"p{i}" for i in range(50)]
    scores, top = exact_search(q, p, ids, 5)
    brute = np.argsort(-(q @ p.T), axis=1)[:, :5]
    assert top == [[ids[j] for j in row] for row in brute]
    np.testing.assert_array_equal(scores, np.take_along_axis(q @ p.T, brute, axis=1))


def test_encode_sorted_batches_equal_one_by_one(tiny_bert_dir: Path) -> None:
    m = BiEncoder.from_pretrained(EncoderSpec(str(tiny_bert_dir)))
    texts = ["short", "a much longer text with many more words in it", "mid size text"]
    batched = m.encode_passages(texts, batch_size=2)
    single = np.concatenate([m.encode_passages([t]) for t in texts])
    assert np.allclose(batched, single, atol=1e-5)
    assert np.allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)
    with pytest.raises(RagtrainError, match="no texts"):
        encode(m.query_tower, m.tokenizer, [], 16, 2)


def test_save_load_roundtrip_and_separate_towers(tiny_bert_dir: Path, tmp_path: Path) -> None:
    m = BiEncoder.from_pretrained(EncoderSpec(str(tiny_bert_dir), shared_encoder=False))
    with torch.no_grad():
        for prm in m.passage.parameters():  # towers differ now
            prm.add_(0.1 * torch.randn_like(prm))
    m.save(tmp_path / "r")
    assert (tmp_path / "r/query/model.safetensors").exists()
    assert (tmp_path / "r/passage/model.safetensors").exists()
    back = BiEncoder.load(tmp_path / "r")
    assert back.fingerprint() == m.fingerprint()
    assert np.allclose(back.encode_queries(["hi there"]), m.encode_queries(["hi there"]))
    assert not np.allclose(back.encode_passages(["hi there"]), back.encode_queries(["hi there"]))
    # a checkpoint whose weights were edited after saving is refused
    tamper_safetensors(tmp_path / "r/query/model.safetensors")
    with pytest.raises(RagtrainError, match="do not match the fingerprint"):
        BiEncoder.load(tmp_path / "r")


# ----------------------------------------------------------------- training + resume


def _toy(tmp_path: Path) -> tuple[Corpus, list[dict], list[dict]]:
    topics = ["apple", "river", "castle", "violin", "rocket", "garden", "pirate", "glacier"]
    ids = [f"p{i}" for i in range(len(topics))]
    texts = [f"A passage about the {t} and more about the {t}." for t in topics]
    corpus = Corpus([Passage(i, "", t) for i, t in zip(ids, texts, strict=True)])
    rows = [{"id": f"q{i}{j}", "question": f"{w} question {t}?", "answers": [t],
             "gold_passage_ids": [ids[i]]}
            for i, t in enumerate(topics) for j, w in enumerate(["what", "which"])]
    return corpus, rows[::2] + rows[1::2][:4], rows[1::2][4:]


def test_training_lowers_loss_and_resume_equals_uninterrupted(
    tiny_bert_dir: Path, tmp_path: Path
) -> None:
    corpus, train, dev = _toy(tmp_path)
    cfg = dataclasses.replace(RetrieverConfig(), model_name=str(tiny_bert_dir), batch_size=2,
                              questions_per_passage=2, lr=1e-3, max_steps=6,
                              checkpoint_every=2, eval_every=3,
                              hard_negatives="none", warmup_ratio=0.0, precision="fp32")

    def run(ckpt: Path, steps_then_crash: int | None = None) -> tuple[BiEncoder, list]:
        m = BiEncoder.from_pretrained(EncoderSpec.from_config(cfg))
        log: list = []
        if steps_then_crash is not None:
            # simulate a kill after `steps_then_crash` optimizer steps (checkpoint at step 4)
            crash = dataclasses.replace(cfg, max_steps=cfg.max_steps)

            class Killed(Exception):
                pass

            def on_step(step: int, logs: dict) -> None:
                if step == steps_then_crash and "train/loss" in logs:
                    raise Killed

            with pytest.raises(Killed):
                train_retriever(m, corpus, train, dev, crash, seed=0, ckpt_dir=ckpt,
                                on_step=on_step, progress=False)
            m = BiEncoder.from_pretrained(EncoderSpec.from_config(cfg))
            train_retriever(m, corpus, train, dev, cfg, seed=0, ckpt_dir=ckpt, resume=True,
                            on_step=lambda s, d: log.append((s, dict(d))), progress=False)
            return m, log
        train_retriever(m, corpus, train, dev, cfg, seed=0, ckpt_dir=ckpt,
                        on_step=lambda s, d: log.append((s, dict(d))), progress=False)
        return m, log

    full, log = run(tmp_path / "a")
    train_losses = [d["train/loss"] for _, d in log if "train/loss" in d]
    assert len(train_losses) == 6 and train_losses[-1] < train_losses[0]
    assert any("dev/recall_at_1" in d for _, d in log)
    resumed, log_r = run(tmp_path / "b", steps_then_crash=5)
    assert [s for s, d in log_r if "train/loss" in d] == [5, 6]  # continued after step 4
    assert resumed.fingerprint() == full.fingerprint()
    # a different config does not resume a foreign checkpoint: it starts over
    other = dataclasses.replace(cfg, lr=5e-4)
    m = BiEncoder.from_pretrained(EncoderSpec.from_config(other))
    steps: list = []
    train_retriever(m, corpus, train, dev, other, seed=0, ckpt_dir=tmp_path / "b",
                    resume=True, on_step=lambda s, d: steps.append(s), progress=False)
    assert steps[0] == 1


def test_lr_schedule_warmup_and_decay() -> None:
    assert trainer.linear_warmup_decay(0, 10, 2) == 0.5
    assert trainer.linear_warmup_decay(1, 10, 2) == 1.0
    assert trainer.linear_warmup_decay(2, 10, 2) == 1.0
    assert trainer.linear_warmup_decay(6, 10, 2) == 0.5
    assert trainer.linear_warmup_decay(10, 10, 2) == 0.0


def test_attention_dropout_off_keeps_hidden_dropout_and_the_same_weights(
        tiny_bert_dir: Path) -> None:
    spec = EncoderSpec(str(tiny_bert_dir), shared_encoder=False)
    on = BiEncoder.from_pretrained(spec)
    off = BiEncoder.from_pretrained(spec, attention_dropout=False)
    for tower in (off.query_tower, off.passage):
        assert tower.model.config.attention_probs_dropout_prob == 0.0
        assert tower.model.config.hidden_dropout_prob == on.passage.model.config.hidden_dropout_prob
    assert on.query_tower.model.config.attention_probs_dropout_prob > 0  # the default: as saved
    assert on.fingerprint() == off.fingerprint()  # a training setting, not other weights
    texts = ["Paris is the capital of France.", "The Seine runs through it."]
    assert np.allclose(encode(on.query_tower, on.tokenizer, texts, 8, 2),
                       encode(off.query_tower, off.tokenizer, texts, 8, 2), atol=1e-6)
