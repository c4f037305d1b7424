"""GradCache (retriever.grad_cache_chunk) gives the plain loss's gradients and weights.

Tolerances (fp32 on CPU): the two passes sum the same per-chunk contributions in another order,
so gradients agree to rounding, not bit for bit: atol 1e-6 / rtol 1e-5 on gradients, atol 1e-5
on weights after a few AdamW steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import pytest
import torch

from ragtrain.config import RetrieverConfig
from ragtrain.retrieval import grad_cache, losses
from ragtrain.retrieval.encoder import BiEncoder, EncoderSpec
from ragtrain.retrieval.training import make_loss_fn, train_retriever
from tests.test_retriever import _toy

GRAD_TOL = {"atol": 1e-6, "rtol": 1e-5}
QUESTIONS = ["what is the apple?", "where is the river", "who built the castle here?",
             "a violin", "rocket launch date?", "garden size"]
PASSAGES = ["An apple is a fruit that grows on trees in many gardens.", "The river runs.",
            "A castle with walls", "The violin has four strings and a long neck.",
            "Rockets fly.", "The garden is green and large, full of flowers and trees."]
TARGETS = torch.tensor([0, 1, 2, 3, 4, 5])


def _model(tiny_bert_dir: Path, dropout: bool = True) -> BiEncoder:
    m = BiEncoder.from_pretrained(EncoderSpec(str(tiny_bert_dir), shared_encoder=False))
    if not dropout:
        for mod in m.modules():
            if isinstance(mod, torch.nn.Dropout):
                mod.p = 0.0
    return m.train()


def _grads(m: BiEncoder) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad(set_to_none=True)
    return out


def _loss(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    return losses.in_batch_nll_loss(q, p, TARGETS, 0.05)


def _chunked_plain(m: BiEncoder, chunk: int) -> torch.Tensor:
    """The plain loss over the same chunked forward passes (so the same dropout draws)."""
    q = torch.cat([m.forward_queries(QUESTIONS[i : i + chunk])
                   for i in range(0, len(QUESTIONS), chunk)])
    p = torch.cat([m.forward_passages(PASSAGES[i : i + chunk])
                   for i in range(0, len(PASSAGES), chunk)])
    return _loss(q, p)


def _cached(m: BiEncoder, chunk: int) -> torch.Tensor:
    return grad_cache.grad_cached_loss(
        [(lambda x: m.forward_queries(list(x)), QUESTIONS),
         (lambda x: m.forward_passages(list(x)), PASSAGES)], _loss, chunk)


def test_grad_cache_gradients_equal_plain_loss_with_dropout(
    tiny_bert_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    m = _model(tiny_bert_dir)
    torch.manual_seed(7)
    plain = _chunked_plain(m, 4)
    (plain * 0.5).backward()  # an upstream factor, as the loop's 1 / grad_accum_steps
    want = _grads(m)
    torch.manual_seed(7)
    cached = _cached(m, 4)
    assert cached.item() == pytest.approx(plain.item(), abs=1e-6)
    (cached * 0.5).backward()
    got = _grads(m)
    assert set(got) == set(want) and len(got) > 10
    for name in want:
        torch.testing.assert_close(got[name], want[name], **GRAD_TOL, msg=name)
    # without the RNG replay the second pass draws other dropout masks: the test would see it
    monkeypatch.setattr(grad_cache.RngState, "replay", lambda self: contextlib.nullcontext())
    torch.manual_seed(7)
    _cached(m, 4).mul(0.5).backward()
    off = _grads(m)
    assert max((off[n] - want[n]).abs().max().item() for n in want) > 1e-3


def test_grad_cache_small_chunks_equal_full_batch_without_dropout(tiny_bert_dir: Path) -> None:
    m = _model(tiny_bert_dir, dropout=False)
    _chunked_plain(m, len(QUESTIONS)).backward()  # one forward pass per tower
    want = _grads(m)
    _cached(m, 2).backward()
    got = _grads(m)
    for name in want:  # padding differs per chunk: equal up to rounding
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4, msg=name)


def test_grad_cache_rejects_bad_chunk() -> None:
    with pytest.raises(ValueError, match="chunk_size must be >= 1, got 0"):
        grad_cache.grad_cached_loss([], _loss, 0)


def _cfg(tiny_bert_dir: Path, **kw: object) -> RetrieverConfig:
    return dataclasses.replace(
        RetrieverConfig(), model_name=str(tiny_bert_dir), batch_size=4, questions_per_passage=2,
        lr=1e-3, max_steps=3, checkpoint_every=10, hard_negatives="none", warmup_ratio=0.0,
        precision="fp32", **kw)


@pytest.mark.parametrize("loss", ["in_batch_nll", "cosine"])
def test_trainer_loss_fn_with_one_chunk_is_the_plain_one(tiny_bert_dir: Path, tmp_path: Path,
                                                        loss: str) -> None:
    corpus, train, _ = _toy(tmp_path)
    grads = []
    for chunk in (0, 64):  # 64 >= the batch: one chunk per tower, the plain dropout draws
        cfg = _cfg(tiny_bert_dir, loss=loss, grad_cache_chunk=chunk)
        m = _model(tiny_bert_dir)
        fn = make_loss_fn(m, corpus, train, [[] for _ in train], cfg, seed=0, bf16=None)
        torch.manual_seed(3)
        value, n = fn(0)
        value.backward()
        grads.append((value.item(), n, _grads(m)))
    (v0, n0, g0), (v1, n1, g1) = grads
    assert (n0, v0) == (n1, pytest.approx(v1, abs=1e-6))
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], **GRAD_TOL, msg=name)


def test_grad_cache_under_torchrun_is_refused_by_key(tiny_bert_dir: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from ragtrain import distributed
    from ragtrain.errors import ConfigError

    corpus, train, _ = _toy(tmp_path)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    with pytest.raises(ConfigError, match="^retriever.grad_cache_chunk: does not run under"):
        make_loss_fn(_model(tiny_bert_dir), corpus, train, [[] for _ in train],
                     _cfg(tiny_bert_dir, grad_cache_chunk=4), seed=0, bf16=None)


@pytest.mark.parametrize(("chunk", "dropout", "accum"), [(64, True, 1), (3, False, 2)])
def test_training_steps_reach_the_same_weights(tiny_bert_dir: Path, tmp_path: Path,
                                               chunk: int, dropout: bool, accum: int) -> None:
    corpus, train, _ = _toy(tmp_path)
    weights = []
    for c in (0, chunk):
        cfg = _cfg(tiny_bert_dir, grad_cache_chunk=c, grad_accum_steps=accum)
        m = _model(tiny_bert_dir, dropout=dropout)
        log: list[float] = []
        train_retriever(m, corpus, train, [], cfg, seed=0, ckpt_dir=tmp_path / f"ck{c}",
                        progress=False, on_step=lambda s, d: log.append(d["train/loss"]))
        weights.append((log, {k: v.clone() for k, v in m.state_dict().items()}))
    (log0, w0), (log1, w1) = weights
    assert len(log0) == 3 and log1 == pytest.approx(log0, abs=1e-5)
    for name in w0:
        torch.testing.assert_close(w1[name], w0[name], atol=1e-5, rtol=1e-4, msg=name)
    base = _model(tiny_bert_dir).state_dict()
    moved = sum(not torch.equal(base[k], w0[k]) for k in w0)
    assert moved > 10  # the steps did train


def test_grad_cache_under_bf16_autocast_matches_plain(tiny_bert_dir: Path,
                                                      tmp_path: Path) -> None:
    corpus, train, _ = _toy(tmp_path)
    grads = []
    for chunk in (0, 64):  # the second pass re-enters the autocast it was given
        cfg = _cfg(tiny_bert_dir, grad_cache_chunk=chunk)
        m = _model(tiny_bert_dir)
        fn = make_loss_fn(m, corpus, train, [[] for _ in train], cfg, seed=0,
                          bf16=torch.bfloat16)
        torch.manual_seed(3)
        value, _ = fn(1)
        value.backward()
        grads.append((value.item(), _grads(m)))
    (v0, g0), (v1, g1) = grads
    assert v1 == pytest.approx(v0, abs=1e-6)
    for name in g0:  # the same bf16 forward passes, the loss in fp32 in both
        torch.testing.assert_close(g1[name], g0[name], **GRAD_TOL, msg=name)
