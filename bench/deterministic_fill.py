"""What PyTorch's deterministic mode costs a training step when it NaN-fills new tensors.

    python bench/deterministic_fill.py --root <a project after make demo> [--steps 8 --rounds 4]

``torch.use_deterministic_algorithms(True)`` also sets
``torch.utils.deterministic.fill_uninitialized_memory``: every ``torch.empty`` (each
activation, gradient and workspace a step allocates) is written with NaN first, so that a
kernel reading memory it never wrote would show it. ``trainer.seed_everything`` keeps the
deterministic algorithms and turns the fill off. This prints, in one run, the step of

- the copy generator (``train_generator``: the pipeline's own epoch-0 batches, as
  ``bench/train_step.py`` builds them), and
- the reranker (``train_reranker``: its epoch-0 batches of window pairs from BM25, as the stage
  builds them; needs ``artifacts/bm25``),

each as ``trainer.train_loop`` runs it (eager attention, CPU dropout, fused AdamW, bf16
autocast), with the fill on and off: one model per case, the two settings taking turns for
``--rounds`` rounds of ``--steps`` steps (the median), and their ratio. The weights a run
ends with do not depend on the fill (checked on the reference run: byte-identical outputs).
Run it alone (two benchmarks at once halve each other), under jemalloc as the stages run:
``LD_PRELOAD=<libjemalloc.so.2> MALLOC_CONF=<ragtrain.allocator.JEMALLOC_CONF>``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.utils.deterministic  # noqa: E402

from ragtrain import runtime  # noqa: E402
from ragtrain.config import load_config  # noqa: E402
from ragtrain.data.corpus import Corpus  # noqa: E402
from ragtrain.pipeline.paths import Paths, read_queries  # noqa: E402
from train_step import Runner, generator_case  # noqa: E402


def reranker_case(root: Path) -> tuple[Callable, float]:
    from ragtrain.retrieval import reranker_training as rt
    from ragtrain.retrieval.bm25 import BM25Retriever
    from ragtrain.retrieval.reranker import Reranker, RerankerSpec, passage_texts

    cfg = load_config(root / "params.yaml")
    rk = cfg.reranker
    paths = Paths(root)
    corpus = Corpus.load(paths.corpus)
    rows = rt.labelled(read_queries(paths, "train"))
    questions = [r["question"] for r in rows]
    bm25 = BM25Retriever.load(paths.bm25)

    def make() -> tuple[torch.nn.Module, Callable[[int], torch.Tensor], dict[str, float]]:
        model = Reranker.from_pretrained(RerankerSpec.from_config(rk), seed=cfg.seed)
        batches, texts = rt.training_batches(model, corpus, rows, rk,
                                             passage_texts(corpus, model.spec), bm25=bm25,
                                             seed=cfg.seed)
        fn = rt.make_loss_fn(model, questions, texts, batches, runtime.amp_dtype(rk.precision))
        return model, lambda i: fn(i)[0], {p: rk.head_lr for p in model.new_params}

    return make, rk.lr


def compare(name: str, make: Callable, lr: float, steps: int, rounds: int) -> None:
    runner = Runner(make, "eager", True, True, True, lr=lr)  # the step train_loop runs
    runner.step(steps)  # warm-up: allocator, oneDNN kernels (a batch outside the timed ones)
    times: dict[bool, list[float]] = {True: [], False: []}
    for r in range(rounds):
        for fill in ((True, False) if r % 2 == 0 else (False, True)):
            torch.utils.deterministic.fill_uninitialized_memory = fill
            t0 = time.perf_counter()
            for i in range(steps):
                runner.step(i)
            times[fill].append((time.perf_counter() - t0) / steps)
    on, off = statistics.median(times[True]), statistics.median(times[False])
    print(f"\n{name}: s/step (median of {rounds} rounds x {steps} steps)")
    print(f"  NaN fill on  (deterministic mode's default) {on:7.3f}")
    print(f"  NaN fill off (trainer.seed_everything)      {off:7.3f}   {on / off:5.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, default=Path("."))
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--only", choices=["generator", "reranker"], default=None)
    args = ap.parse_args()
    root = args.root.resolve()
    cases = {"generator": ("copy generator (train_generator)", generator_case),
             "reranker": ("reranker (train_reranker)", reranker_case)}
    for key, (name, case) in cases.items():
        if args.only in (None, key):
            make, lr = case(root)
            compare(name, make, lr, args.steps, args.rounds)


if __name__ == "__main__":
    main()
