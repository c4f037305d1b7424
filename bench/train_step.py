"""Training-step benchmark: what the trainers' step costs with the attention kernel and the
optimizer the trainer picks, beside the ones it used before, in one run.

    python bench/train_step.py --root <a project after make demo> [--steps 8 --rounds 3]

For the copy generator (the default generator) and the bi-encoder (the retriever's default
loss), each on the pipeline's own training batches (the first ``--steps`` micro-batches of
epoch 0, from ``data/prepared`` and ``artifacts/retrieved``), bf16 autocast as the stages run:

- ``sdpa + foreach``: PyTorch's SDPA attention and the default (foreach) AdamW: the old step;
- ``eager + foreach``, ``sdpa + fused``: one change each;
- ``eager + fused``: the step before ``ragtrain.dropout`` (PyTorch's dropout masks);
- ``eager + fused + cpu dropout``: what ``trainer.train_loop`` runs (``models.set_training``:
  eager attention, ``CpuDropout`` masks; ``trainer.build_optimizer``: fused AdamW), the copy
  generator with its attention mask in fp32 (as before ``CopyGenerator._mask_dtype``);
- ``... + autocast mask`` (the copy generator only): the mask in the autocast dtype, as now.

Each variant has its own model and optimizer from the same seed; the variants take turns
(``--rounds`` rounds of ``--steps`` steps each, after one untimed warm-up step) so that drift
on the machine falls on all of them; the figure is the median step time over the rounds, and
its ratio to the old step's. Run it alone: two benchmarks at once halve each other.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from ragtrain import runtime  # noqa: E402
from ragtrain.config import load_config  # noqa: E402
from ragtrain.data.corpus import Corpus  # noqa: E402
from ragtrain.dropout import CpuDropout  # noqa: E402
from ragtrain.models import set_training  # noqa: E402
from ragtrain.pipeline.paths import Paths, read_queries, read_retrieved  # noqa: E402
from ragtrain.trainer import build_optimizer, seed_everything  # noqa: E402

# (attention, fused AdamW, ragtrain's CPU dropout masks, the copy generator's autocast-dtype mask)
VARIANTS = (("sdpa", False, False, False), ("eager", False, False, False),
            ("sdpa", True, False, False), ("eager", True, False, False),
            ("eager", True, True, False), ("eager", True, True, True))


def force_attention(model: torch.nn.Module, kind: str) -> None:
    for m in model.modules():
        if hasattr(m, "set_attn_implementation") and hasattr(m, "config"):
            m.set_attn_implementation(kind)


class Runner:
    """One variant: a model, its optimizer and a step function over micro-batch indices."""

    def __init__(self, make: Callable[[], tuple[torch.nn.Module, Callable[[int], torch.Tensor],
                                                 dict[str, float]]],
                 attention: str, fused: bool, cpu_dropout: bool, autocast_mask: bool,
                 lr: float) -> None:
        seed_everything(0)
        self.model, self.loss, param_lrs = make()
        if hasattr(self.model, "autocast_mask"):  # the copy generator
            self.model.autocast_mask = autocast_mask
        set_training(self.model, True)
        force_attention(self.model, attention)
        if not cpu_dropout:  # back to PyTorch's own dropout layers
            for m in self.model.modules():
                if type(m) is CpuDropout:
                    m.__class__ = torch.nn.Dropout
        opt = build_optimizer(self.model, lr, 0.01, param_lrs)
        if not fused:
            opt = torch.optim.AdamW(opt.param_groups, lr=lr, fused=False)
        self.opt = opt

    def step(self, i: int) -> None:
        torch.manual_seed(i)
        self.loss(i).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def compare(name: str, make: Callable, lr: float, steps: int, rounds: int,
            variants: tuple[tuple[str, bool, bool, bool], ...] = VARIANTS) -> None:
    runners = {v: Runner(make, *v, lr=lr) for v in variants}
    for r in runners.values():
        r.step(steps)  # warm-up: allocator, oneDNN kernels (a batch outside the timed ones)
    times: dict[tuple[str, bool, bool, bool], list[float]] = {v: [] for v in variants}
    for _ in range(rounds):
        for v, r in runners.items():
            t0 = time.perf_counter()
            for i in range(steps):
                r.step(i)
            times[v].append((time.perf_counter() - t0) / steps)
    base = statistics.median(times[variants[0]])
    print(f"\n{name}: s/step (median of {rounds} rounds x {steps} steps), speed vs sdpa + "
          "foreach")
    for (attn, fused, cpu_dropout, autocast_mask), t in times.items():
        med = statistics.median(t)
        label = (f"{attn} + {'fused' if fused else 'foreach'}"
                 + (" + cpu dropout" if cpu_dropout else "")
                 + (" + autocast mask" if autocast_mask else ""))
        print(f"  {label:46s} {med:7.3f}   {base / med:5.2f}x")


def generator_case(root: Path) -> tuple[Callable, float]:
    from ragtrain.generation.generator import Generator
    from ragtrain.generation.training import epoch_examples

    cfg = load_config(root / "params.yaml")
    paths = Paths(root)
    gc = cfg.generator
    corpus = Corpus.load(paths.corpus)
    rows = read_queries(paths, "train")
    retrieved = read_retrieved(paths, "train")
    amp = runtime.amp_dtype(gc.precision)
    encoded: list = []

    def make() -> tuple[torch.nn.Module, Callable[[int], torch.Tensor], dict[str, float]]:
        gen = Generator.from_pretrained(gc)
        if not encoded:  # epoch 0's batches, as train_generator orders them
            encoded.extend(epoch_examples(gen, rows, retrieved, corpus, gc,
                                          top_k=cfg.retriever.top_k, seed=cfg.seed, epoch=0))

        def loss(i: int) -> torch.Tensor:
            with runtime.autocast(amp):
                return gen.loss(gen.collate(encoded[i * gc.batch_size:(i + 1) * gc.batch_size]))

        return gen.model, loss, {p: gc.new_params_lr for p in gen.new_param_prefixes()}

    return make, gc.lr


def retriever_case(root: Path, attention_dropout: bool | None = None) -> tuple[Callable, float]:
    from ragtrain.retrieval.encoder import BiEncoder, EncoderSpec
    from ragtrain.retrieval.training import make_loss_fn

    cfg = load_config(root / "params.yaml")
    rc = dataclasses.replace(cfg.retriever, hard_negatives="none")
    if attention_dropout is not None:  # --attention-dropout: the bi-encoder's other setting
        rc = dataclasses.replace(rc, attention_dropout=attention_dropout)
    paths = Paths(root)
    corpus = Corpus.load(paths.corpus)
    rows = [r for r in read_queries(paths, "train") if r.get("gold_passage_ids")]
    amp = runtime.amp_dtype(rc.precision)

    def make() -> tuple[torch.nn.Module, Callable[[int], torch.Tensor], dict[str, float]]:
        model = BiEncoder.from_pretrained(EncoderSpec.from_config(rc),
                                          attention_dropout=rc.attention_dropout)
        fn = make_loss_fn(model, corpus, rows, [[] for _ in rows], rc, seed=cfg.seed, bf16=amp)
        return model, lambda i: fn(i)[0], {}

    return make, rc.lr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, default=Path("."))
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", choices=["generator", "retriever"], default=None)
    ap.add_argument("--attention-dropout", choices=["on", "off"], default=None,
                    help="the bi-encoder's attention-probability dropout (default: the run's "
                         "retriever.attention_dropout)")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    root = args.root.resolve()
    cases = {"copy generator (train_generator)": generator_case,
             "bi-encoder (train_retriever)": retriever_case}
    for name, case in cases.items():
        if args.only and not name.startswith("copy" if args.only == "generator" else "bi"):
            continue
        make, lr = (case(root) if case is generator_case or args.attention_dropout is None
                    else case(root, args.attention_dropout == "on"))
        compare(name, make, lr, args.steps, args.rounds,
                VARIANTS if case is generator_case else VARIANTS[:-1])


if __name__ == "__main__":
    main()
