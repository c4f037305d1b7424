"""Does training memory stay bounded? Resident memory per epoch under each allocator.

The backward passes of bf16 training leave memory behind that jemalloc without decay (the
setting the stage commands use, ``ragtrain/allocator.py``) never hands back; the training loop
therefore calls ``allocator.release_free_memory()`` at every checkpoint and dev evaluation.
This script trains the run's copy generator on its first ``--questions`` training questions for
``--epochs`` epochs (forward, backward, AdamW, bf16 autocast, as ``train_generator`` does) in a
child process per setting, and prints the resident memory after each epoch:

- glibc's malloc;
- jemalloc with the stage commands' settings, no purge;
- the same, purged after each epoch (what the training loop does every 100 steps).

    python bench/train_memory.py --root <finished run> [--questions 672] [--epochs 4]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from ragtrain import allocator  # noqa: E402


def rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9


def child(root: Path, questions: int, epochs: int, purge: bool) -> None:
    import torch

    from ragtrain import runtime
    from ragtrain.config import load_config
    from ragtrain.data.corpus import Corpus
    from ragtrain.generation.generator import Generator
    from ragtrain.generation.training import epoch_examples
    from ragtrain.pipeline.paths import Paths, read_queries, read_retrieved
    from ragtrain.trainer import build_optimizer

    cfg = load_config(root / "params.yaml")
    gc = cfg.generator
    paths = Paths(root)
    gen = Generator.load(paths.generator)
    corpus = Corpus.load(paths.corpus)
    rows = read_queries(paths, "train")[:questions]
    ret = read_retrieved(paths, "train")
    model = gen.model
    model.train()
    opt = build_optimizer(model, gc.lr, gc.weight_decay)
    torch.manual_seed(0)
    for e in range(epochs):
        t0 = time.perf_counter()
        exs = epoch_examples(gen, rows, ret, corpus, gc, top_k=cfg.retriever.top_k, seed=0,
                             epoch=e)
        for b in range(0, len(exs) - gc.batch_size + 1, gc.batch_size):
            with runtime.autocast(torch.bfloat16):
                loss = gen.loss(gen.collate(exs[b:b + gc.batch_size]))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        if purge:
            allocator.release_free_memory()
        print(json.dumps({"epoch": e, "rss": rss_gb(), "s": time.perf_counter() - t0}),
              flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", type=Path, default=ROOT)
    ap.add_argument("--questions", type=int, default=672)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--child", choices=["keep", "purge"])
    args = ap.parse_args()
    if args.child:
        child(args.root, args.questions, args.epochs, args.child == "purge")
        return
    base = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF")}
    jemalloc = allocator.preload_env({**base, allocator.ENV: "auto"})
    settings = [("glibc malloc", base, "keep")]
    if jemalloc is None:
        print("jemalloc is not installed (libjemalloc2): glibc only")
    else:
        settings += [("jemalloc, no decay", jemalloc, "keep"),
                     ("jemalloc, purged each epoch", jemalloc, "purge")]
    print(f"{args.questions} training questions, {args.epochs} epochs; resident GB after each "
          "epoch (seconds per epoch)")
    for name, env, mode in settings:
        out = subprocess.run([sys.executable, __file__, "--root", str(args.root), "--questions",
                              str(args.questions), "--epochs", str(args.epochs), "--child",
                              mode], env=env, capture_output=True, text=True, check=True)
        rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
        print(f"{name:<30}" + "".join(f"{r['rss']:>7.2f} ({r['s']:.0f})" for r in rows))


if __name__ == "__main__":
    main()
