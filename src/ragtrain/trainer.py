"""A small, resumable training loop shared by the retriever and the generator.

AdamW, linear warm-up then linear decay, gradient clipping and accumulation, seeded per
micro-batch (so a resumed run draws the same dropout masks as an uninterrupted one), dev
evaluation with best-checkpoint selection and early stopping, and checkpoints in safetensors
(model weights and optimizer tensors; scalars in JSON) written atomically every N steps.
"""

from __future__ import annotations

import json
import random
import shutil
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from tqdm.auto import tqdm

from ragtrain import distributed
from ragtrain.allocator import release_free_memory
from ragtrain.io import atomic_path
from ragtrain.models import set_training

STATE_FILE = "trainer_state.json"
MODEL_FILE = "model.safetensors"
OPTIM_FILE = "optimizer.safetensors"
BEST_FILE = "best.safetensors"  # in ckpt_dir: the weights of the best dev evaluation


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch; deterministic algorithms where torch has them.

    Deterministic mode also fills every new tensor's memory with NaN by default (so a kernel
    that read memory it never wrote would show it): one more pass over each allocation, 1.08x a
    copy-generator training step and 1.06x a reranker step on 2 CPU cores (bench/
    deterministic_fill.py). No kernel here reads such memory (the reference run's outputs are
    byte-identical without it), so it is off; the algorithm choices stay deterministic."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False


@dataclass(frozen=True)
class LoopConfig:
    total_steps: int  # optimizer steps
    lr: float
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    grad_clip: float = 1.0  # 0 = off
    grad_accum_steps: int = 1
    checkpoint_every: int = 50
    eval_every: int = 0  # 0 = only at the end
    eval_at_start: bool = False  # evaluate the starting weights too: kept if nothing beats them
    patience: int = 0  # evaluations without improvement before stopping; 0 = never stop early
    seed: int = 0
    progress: bool = True
    fp16: bool = False  # fp16 autocast in loss_fn: scale the loss (torch.amp.GradScaler)


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    best_metric: float | None = None
    best_step: int | None = None
    evals_since_best: int = 0
    stopped_early: bool = False
    history: list[dict[str, float]] = field(default_factory=list)  # dev evaluations
    # every step's loss and lr, checkpointed with the rest so a resumed run's curve is whole
    steps: list[dict[str, float]] = field(default_factory=list)


def linear_warmup_decay(step: int, total: int, warmup: int) -> float:
    """LR multiplier: 0 -> 1 over ``warmup`` steps, then 1 -> 0 at ``total``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float,
                    param_lrs: dict[str, float] | None = None) -> torch.optim.AdamW:
    """AdamW; no weight decay on biases and LayerNorm weights; optional per-prefix LRs."""
    groups: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        g_lr = lr
        for prefix, plr in (param_lrs or {}).items():
            if name.startswith(prefix):
                g_lr = plr
        wd = 0.0 if p.ndim < 2 else weight_decay
        groups.setdefault((g_lr, wd), []).append(p)
    # fused: one kernel over all parameters (CPU: 17 vs 72 ms a step for 22.7M parameters)
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point
                for ps in groups.values() for p in ps)
    return torch.optim.AdamW(
        [{"params": ps, "lr": g_lr, "weight_decay": wd} for (g_lr, wd), ps in groups.items()],
        lr=lr, weight_decay=weight_decay, fused=fused or None,
    )


def _optim_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {"param_groups": sd["param_groups"], "state": {}}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.contiguous()
            else:
                scalars["state"].setdefault(str(pid), {})[k] = v
    return tensors, scalars


def _load_optim(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                scalars: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    for pid, st in scalars["state"].items():
        state.setdefault(int(pid), {}).update(st)
    opt.load_state_dict({"state": state, "param_groups": scalars["param_groups"]})


def save_checkpoint(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer,
                    state: TrainState, signature: str,
                    scaler: torch.amp.GradScaler | None = None) -> None:
    """Atomically write weights, optimizer, loss-scaler and loop state to the folder ``path``."""
    with atomic_path(path) as tmp:
        tmp.mkdir()
        save_model(model, str(tmp / MODEL_FILE))
        tensors, scalars = _optim_tensors(opt)
        save_file(tensors, str(tmp / OPTIM_FILE))
        (tmp / STATE_FILE).write_text(json.dumps(
            {"signature": signature, "state": asdict(state), "optimizer": scalars,
             "scaler": scaler.state_dict() if scaler is not None else {}}, indent=1))


def load_checkpoint(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer,
                    signature: str, scaler: torch.amp.GradScaler | None = None
                    ) -> TrainState | None:
    """Restore a checkpoint written for the same ``signature``; None if absent or different."""
    f = path / STATE_FILE
    if not f.exists():
        return None
    meta = json.loads(f.read_text())
    if meta.get("signature") != signature:
        return None
    load_model(model, str(path / MODEL_FILE))
    _load_optim(opt, load_file(str(path / OPTIM_FILE)), meta["optimizer"])
    if scaler is not None and meta.get("scaler"):
        scaler.load_state_dict(meta["scaler"])
    return TrainState(**meta["state"])


def prepare_ckpt_dir(ckpt_dir: Path, signature: str, resume: bool) -> bool:
    """Keep ``ckpt_dir`` only when resuming the same run; returns whether it was kept.
    Under torchrun every rank reads the folder and rank 0 alone clears it."""
    f = ckpt_dir / "last" / STATE_FILE
    same = f.exists() and json.loads(f.read_text()).get("signature") == signature
    distributed.barrier()  # every rank has read it before rank 0 deletes it
    if distributed.is_main():
        if not (resume and same):
            shutil.rmtree(ckpt_dir, ignore_errors=True)
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    distributed.barrier()
    return resume and same


def train_loop(
    model: torch.nn.Module,
    loss_fn: Callable[[int], tuple[torch.Tensor, int]],
    loop: LoopConfig,
    *,
    ckpt_dir: Path,
    signature: str,
    resume: bool,
    evaluate: Callable[[], dict[str, float]] | None = None,
    select_metric: str | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> TrainState:
    """Run optimizer steps ``state.step .. loop.total_steps``.

    ``loss_fn(micro_index)`` returns (mean loss of that micro-batch, its example count); it must
    depend only on the index (the data order is fixed by the seed), which is what makes resuming
    exact. ``evaluate`` returns dev metrics; the weights of the best by ``select_metric`` are
    kept in ``ckpt_dir/best.safetensors`` (so a resumed run keeps them too) and the model ends
    holding them. ``on_step(step, {"loss", "lr", ...})`` reports progress (e.g. to MLflow).

    Under torchrun (distributed.py) the model runs under DDP: ``loss_fn`` computes this rank's
    share of micro-batch ``micro`` (``distributed.shard``), each rank's mean loss is weighted by
    its share of the examples so that the averaged gradient is the global batch's, and rank 0
    alone evaluates, reports and writes checkpoints; the others follow its evaluations.
    """
    ddp = distributed.wrap(model)
    main = distributed.is_main()
    if not main:
        on_step = None
    opt = optimizer or build_optimizer(model, loop.lr, loop.weight_decay)
    warmup = int(loop.warmup_ratio * loop.total_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: linear_warmup_decay(s, loop.total_steps, warmup))
    last = ckpt_dir / "last"
    best = ckpt_dir / BEST_FILE
    dev_type = next(model.parameters()).device.type
    scaler = torch.amp.GradScaler(dev_type, enabled=loop.fp16)  # disabled: every call a no-op
    state = (load_checkpoint(last, model, opt, signature, scaler) if resume else None
             ) or TrainState()
    if state.step:
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: linear_warmup_decay(s, loop.total_steps, warmup),
            last_epoch=state.step - 1)
        for g, lr in zip(opt.param_groups, sched.get_last_lr(), strict=True):
            g["lr"] = lr
    if state.stopped_early or state.step >= loop.total_steps:
        return _end(model, state, best if evaluate else None)

    def do_eval() -> None:
        assert evaluate is not None and select_metric is not None
        metrics = evaluate()
        value = metrics[select_metric]
        state.history.append({"step": state.step, **metrics})
        if on_step:
            on_step(state.step, metrics)
        if state.best_metric is None or value > state.best_metric:
            state.best_metric, state.best_step, state.evals_since_best = value, state.step, 0
            tmp = best.with_suffix(".tmp")
            save_model(model, str(tmp))
            tmp.replace(best)
        else:
            state.evals_since_best += 1
            if loop.patience and state.evals_since_best >= loop.patience:
                state.stopped_early = True

    def eval_now() -> None:  # rank 0 evaluates; every rank gets its verdict (best, early stop)
        if main:
            set_training(model, False)
            do_eval()
            release_free_memory()  # what decoding left free (jemalloc keeps it otherwise)
            set_training(model, True)
        if ddp is not None:
            (state.history, state.best_metric, state.best_step, state.evals_since_best,
             state.stopped_early) = distributed.broadcast(
                (state.history, state.best_metric, state.best_step, state.evals_since_best,
                 state.stopped_early))

    bar = tqdm(total=loop.total_steps, initial=state.step, disable=not (loop.progress and main),
               desc="train", unit="step", dynamic_ncols=True)
    set_training(model, True)
    if evaluate and loop.eval_at_start and state.step == 0:
        eval_now()  # the starting weights are a candidate: training must beat them on dev
    while state.step < loop.total_steps and not state.stopped_early:
        opt.zero_grad(set_to_none=True)
        total, count = 0.0, 0
        for a in range(loop.grad_accum_steps):
            micro = state.step * loop.grad_accum_steps + a
            torch.manual_seed(loop.seed * 1_000_003 + micro)  # dropout masks fixed per batch
            if ddp is None:
                loss, n = loss_fn(micro)
                scaler.scale(loss / loop.grad_accum_steps).backward()
                total += float(loss.detach()) * n
                count += n
                continue
            with distributed.no_sync(ddp, a < loop.grad_accum_steps - 1):
                loss, n = ddp(loss_fn, micro)
                n_all, loss_sum = distributed.sum_all([n, float(loss.detach()) * n])
                share = n * distributed.world_size() / n_all  # DDP averages over ranks
                scaler.scale(loss * share / loop.grad_accum_steps).backward()
            total += loss_sum
            count += int(n_all)
        scaler.unscale_(opt)  # clip the true gradients
        grad_norm = (torch.nn.utils.clip_grad_norm_(model.parameters(), loop.grad_clip)
                     if loop.grad_clip > 0 else torch.tensor(float("nan")))
        scaler.step(opt)  # skipped (scale lowered) when fp16 gradients overflowed
        scaler.update()
        with warnings.catch_warnings():  # the schedule follows steps, skipped or not (resumable)
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
            sched.step()
        state.step += 1
        logs = {"train/loss": total / max(1, count), "train/lr": sched.get_last_lr()[0],
                "train/grad_norm": float(grad_norm)}
        state.steps.append({"step": state.step, "loss": logs["train/loss"],
                            "lr": logs["train/lr"]})
        if on_step:
            on_step(state.step, logs)
        bar.update(1)
        bar.set_postfix(loss=f"{logs['train/loss']:.4f}")
        at_end = state.step == loop.total_steps
        if evaluate and ((loop.eval_every and state.step % loop.eval_every == 0) or at_end):
            eval_now()
        if state.step % loop.checkpoint_every == 0 or at_end or state.stopped_early:
            if main:
                save_checkpoint(last, model, opt, state, signature, scaler)
            release_free_memory()  # bounded memory: jemalloc without decay keeps freed pages
            distributed.barrier()
    bar.close()
    return _end(model, state, best if evaluate else None)


def _end(model: torch.nn.Module, state: TrainState, best: Path | None) -> TrainState:
    """Load the best dev weights when there are some; eval mode."""
    if best is not None and best.exists():
        load_model(model, str(best))
    set_training(model, False)
    return state
