"""The shared training loop: precision choice, fp16 loss scaling, resume with the scaler state,
the starting weights as a dev candidate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ragtrain import runtime
from ragtrain.trainer import STATE_FILE, LoopConfig, train_loop


def test_amp_dtype_by_precision(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    assert runtime.amp_dtype("fp32", cpu) is None
    assert runtime.amp_dtype("bf16", cpu) == torch.bfloat16
    assert runtime.amp_dtype("fp16", cpu) == torch.float16
    runtime.cpu_has_bf16.cache_clear()
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: False)
    assert runtime.amp_dtype("auto", cpu) is None
    assert not runtime.use_bf16("fp16", cpu)  # inference paths run fp16 configs in fp32
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: True)
    assert runtime.amp_dtype("auto", cpu) == torch.bfloat16


def test_models_are_placed_on_this_rank_gpu_or_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """runtime.device(): the CPU without CUDA; with it, GPU 0, or LOCAL_RANK's under torchrun
    (models are built there before the process group exists, so not the current device)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert runtime.device() == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert runtime.device() == torch.device("cuda", 1)
    monkeypatch.delenv("LOCAL_RANK")
    assert runtime.device() == torch.device("cuda", 0)


def _problem() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    return x, x @ torch.randn(8, 1, generator=g)


def _run(ckpt: Path, steps: int, crash_after: int | None = None, state: list | None = None
         ) -> tuple[torch.nn.Module, list]:
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    x, y = _problem()
    losses: list[float] = []

    def loss_fn(micro: int) -> tuple[torch.Tensor, int]:
        if crash_after is not None and micro >= crash_after:
            raise KeyboardInterrupt  # stands in for a kill mid-run
        i = (micro * 16) % 64
        with runtime.autocast(torch.float16, torch.device("cpu")):
            out = model(x[i:i + 16])
        return torch.nn.functional.mse_loss(out.float(), y[i:i + 16]), 16

    loop = LoopConfig(total_steps=steps, lr=0.05, warmup_ratio=0.0, checkpoint_every=2,
                      progress=False, fp16=True)
    end = train_loop(model, loss_fn, loop, ckpt_dir=ckpt, signature="t", resume=True,
                     on_step=lambda s, d: losses.append(d["train/loss"]))
    if state is not None:
        state.append(end)
    return model, losses


def test_fp16_training_scales_the_loss_and_resumes_exactly(tmp_path: Path) -> None:
    full, losses = _run(tmp_path / "a", 12)
    assert losses[-1] < 0.5 * losses[0]
    meta = json.loads((tmp_path / "a" / "last" / STATE_FILE).read_text())
    assert meta["scaler"]["scale"] > 1  # the loss scaler's state travels with the checkpoint
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "b", 12, crash_after=7)  # checkpoint at step 6, crash in step 8
    resumed, _ = _run(tmp_path / "b", 12)
    for p, q in zip(full.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)


def test_a_resumed_run_keeps_the_whole_per_step_log(tmp_path: Path) -> None:
    """The loss curve of a run killed at step 8 and resumed from its step-6 checkpoint is the
    uninterrupted run's, steps 1-12 (the checkpoint carries the per-step log)."""
    full: list = []
    _run(tmp_path / "a", 12, state=full)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "b", 12, crash_after=7)
    resumed: list = []
    _, after_resume = _run(tmp_path / "b", 12, state=resumed)
    assert len(after_resume) == 6  # steps 7-12 were trained (and reported) again
    assert [h["step"] for h in resumed[0].steps] == list(range(1, 13))
    assert resumed[0].steps == full[0].steps


@pytest.mark.parametrize("start_is_best", [True, False])
def test_eval_at_start_keeps_the_starting_weights_unless_training_beats_them(
        tmp_path: Path, start_is_best: bool) -> None:
    """With ``eval_at_start`` the weights training starts from are evaluated first: the model
    ends holding them when no later evaluation beats them on the dev metric (the joint stage
    never ends below the pipeline pair it started from), else the best trained ones."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    start = [p.detach().clone() for p in model.parameters()]
    x, y = _problem()
    seen: list[int] = []

    def loss_fn(micro: int) -> tuple[torch.Tensor, int]:
        return ((model(x) - y) ** 2).mean(), len(x)

    def evaluate() -> dict[str, float]:
        seen.append(len(seen))
        dev = -float(((model(x) - y) ** 2).mean())  # higher is better
        return {"dev/score": dev + (100.0 if start_is_best and len(seen) == 1 else 0.0)}

    loop = LoopConfig(total_steps=4, lr=0.05, warmup_ratio=0.0, eval_every=2, progress=False,
                      eval_at_start=True)
    state = train_loop(model, loss_fn, loop, ckpt_dir=tmp_path, signature="t", resume=False,
                       evaluate=evaluate, select_metric="dev/score")
    assert [h["step"] for h in state.history] == [0, 2, 4]
    assert state.best_step == (0 if start_is_best else 4)
    kept = all(torch.equal(p, q) for p, q in zip(model.parameters(), start, strict=True))
    assert kept is start_is_best


def test_bert_encoders_train_with_eager_attention_and_infer_with_sdpa(tiny_bert_dir: Path
                                                                       ) -> None:
    """set_training switches a BERT-style encoder's SDPA attention to the eager one for
    training steps and back for inference; both compute the same function; a model built with
    another implementation keeps it; the optimizer is the fused AdamW."""
    from transformers import AutoModel

    from ragtrain.models import set_training
    from ragtrain.trainer import build_optimizer

    holder = torch.nn.ModuleDict({"enc": AutoModel.from_pretrained(tiny_bert_dir)})
    enc = holder["enc"]
    assert enc.config._attn_implementation == "sdpa"
    ids = torch.randint(1000, 2000, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    set_training(holder, False)
    with torch.no_grad():
        sdpa = enc(input_ids=ids, attention_mask=mask).last_hidden_state
    set_training(holder, True)
    assert enc.training and enc.config._attn_implementation == "eager"
    enc.eval()  # dropout off, the kernel left as the training mode chose it
    with torch.no_grad():
        eager = enc(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(eager, sdpa, atol=1e-5, rtol=1e-4)
    set_training(holder, False)
    assert not enc.training and enc.config._attn_implementation == "sdpa"

    other = AutoModel.from_pretrained(tiny_bert_dir, attn_implementation="eager")
    for mode in (True, False):
        set_training(other, mode)
        assert other.config._attn_implementation == "eager"
    assert build_optimizer(enc, 1e-3, 0.01).defaults["fused"]
