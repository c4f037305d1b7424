"""ragtrain.dropout: the CPU dropout masks the trainers use (set_training puts them in place)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ragtrain.dropout import CpuDropout, keep_mask
from ragtrain.models import set_training


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_mask_keeps_one_minus_p_and_follows_the_seed(p: float) -> None:
    torch.manual_seed(3)
    a = keep_mask((1000, 1001), p)  # an element count that is not a multiple of 4
    assert a.shape == (1000, 1001) and a.dtype == torch.bool
    # 1,001,000 draws: the kept fraction's standard error is under 0.0005
    assert abs(a.float().mean().item() - (1 - p)) < 0.003
    torch.manual_seed(3)
    assert torch.equal(keep_mask((1000, 1001), p), a)
    torch.manual_seed(4)
    assert not torch.equal(keep_mask((1000, 1001), p), a)


def test_keep_mask_elements_are_independent() -> None:
    """The four elements cut from one 64-bit draw neither repeat nor follow one another: the
    joint rate of neighbours kept is the product of the rates."""
    torch.manual_seed(0)
    m = keep_mask((400_000, 4), 0.5).float()
    for i in range(4):
        for j in range(i + 1, 4):
            assert abs((m[:, i] * m[:, j]).mean().item() - 0.25) < 0.005


def test_cpu_dropout_is_dropout_with_its_mask_and_gradient() -> None:
    x = torch.randn(64, 33, requires_grad=True)
    d = CpuDropout(0.25).train()
    torch.manual_seed(7)
    y = d(x)
    torch.manual_seed(7)
    keep = keep_mask((64, 33), 0.25)
    torch.testing.assert_close(y, torch.where(keep, x / 0.75, 0.0))
    y.sum().backward()
    torch.testing.assert_close(x.grad, keep.float() / 0.75)
    assert torch.equal(d.eval()(x), x)  # eval: the identity
    assert torch.equal(CpuDropout(0.0).train()(x), x)
    assert not CpuDropout(1.0).train()(x).any()
    z = x.detach().clone()
    torch.manual_seed(7)
    out = CpuDropout(0.25, inplace=True).train()(z)
    assert out.data_ptr() == z.data_ptr()
    torch.testing.assert_close(out, torch.where(keep, x.detach() / 0.75, 0.0))


def test_set_training_puts_cpu_dropout_in_training_and_keeps_the_model(tiny_bert_dir: Path
                                                                       ) -> None:
    """On the CPU, set_training(model, True) makes the encoder's dropout layers CpuDropout (the
    weights and the eval-mode function stay), and training outputs follow the seed."""
    from transformers import AutoModel

    enc = AutoModel.from_pretrained(tiny_bert_dir)
    drops = [m for m in enc.modules() if isinstance(m, torch.nn.Dropout)]
    assert drops and not any(isinstance(m, CpuDropout) for m in drops)
    keys = sorted(enc.state_dict())
    ids = torch.randint(1000, 2000, (2, 7))
    set_training(enc, False)
    with torch.no_grad():
        before = enc(input_ids=ids).last_hidden_state
    set_training(enc, True)
    assert all(type(m) is CpuDropout for m in drops)
    assert sorted(enc.state_dict()) == keys
    outs = []
    for _ in range(2):
        torch.manual_seed(11)
        with torch.no_grad():
            outs.append(enc(input_ids=ids).last_hidden_state)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    assert not torch.allclose(outs[0], before)  # dropout is on in training
    set_training(enc, False)
    with torch.no_grad():
        torch.testing.assert_close(enc(input_ids=ids).last_hidden_state, before, rtol=0, atol=0)
