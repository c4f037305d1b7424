"""DDP benchmark: the retriever's training step in one process and as 2 torchrun processes at the
same global batch, and what the cross-rank communication costs inside the 2-process step.

    python bench/ddp.py --root /work/ref      # a project after `dvc repro prepare`
    python bench/ddp.py --root . --steps 4 --warmup 1   # shorter

It prints, side by side (the same data, params.yaml's retriever.*, the same global batch):

1. seconds per optimizer step: 1 process with all the cores' threads, vs 2 processes (torchrun,
   gloo) with half the threads each;
2. inside the 2-process step: the all-gather of the passage embeddings (forward and backward,
   at the step's size, timed in a loop on both ranks) and the all-reduce of one step's
   gradients (a tensor of the model's size, what DDP's buckets carry), each as a share of the
   step. The issue's target: the all-gather under 10% of a step.

On one machine the ranks share its cores, so (1) shows the cost of splitting, not a scale-out;
on N machines or GPUs each rank has its own. Run it alone: two benchmarks halve each other.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]


def child(root: Path, steps: int, warmup: int, out: Path) -> None:
    """One measurement run (1 process, or a torchrun rank): per-step times -> ``out`` (rank 0)."""
    import torch

    from ragtrain import distributed
    from ragtrain.config import load_config
    from ragtrain.data.corpus import Corpus
    from ragtrain.io import read_jsonl
    from ragtrain.retrieval.encoder import BiEncoder, EncoderSpec
    from ragtrain.retrieval.training import Batches, labelled, train_retriever

    cfg = load_config(ROOT / "params.yaml").retriever
    cfg = dataclasses.replace(cfg, max_steps=warmup + steps, checkpoint_every=10**9,
                              eval_every=0, hard_negatives="none" if cfg.loss == "distill"
                              else cfg.hard_negatives,
                              loss="in_batch_nll" if cfg.loss == "distill" else cfg.loss)
    prep = root / "data/prepared"
    corpus = Corpus.load(prep / "corpus.jsonl")
    train = labelled(read_jsonl(prep / "train.jsonl"))
    model = BiEncoder.from_pretrained(EncoderSpec.from_config(cfg),
                                      attention_dropout=cfg.attention_dropout)
    stamps: list[float] = []
    with tempfile.TemporaryDirectory() as ckpt:
        train_retriever(model, corpus, train, [], cfg, seed=0, ckpt_dir=Path(ckpt),
                        progress=False, on_step=lambda s, d: stamps.append(time.perf_counter()))
    step_s = 0.0  # rank 0's steps (the trainer reports on rank 0 only)
    if stamps:
        step_s = (stamps[-1] - stamps[warmup - 1]) / steps if warmup else \
            (stamps[-1] - stamps[0]) / max(1, steps - 1)
    result = {"world_size": distributed.world_size(), "threads": torch.get_num_threads(),
              "step_s": step_s}
    if distributed.world_size() > 1:
        # the all-gather at this step's size: each rank's share of a batch's passage columns
        # (the batch's gold passages; hard negatives add columns when configured)
        batches = Batches.build(train, cfg, 0)
        n = max(len(batches(i)[0]) for i in range(warmup + steps))
        n *= 1 + (cfg.hard_negatives_per_query if cfg.hard_negatives != "none" else 0)
        dim = model.passage.model.config.hidden_size
        x = torch.randn(len(distributed.share(n)), dim, requires_grad=True)
        reps = 50
        distributed.barrier()
        t0 = time.perf_counter()
        for _ in range(reps):
            distributed.gather_rows(x, n).square().sum().backward()
        result["gather_s"] = (time.perf_counter() - t0) / reps
        result["gather_rows"] = n
        # one step's gradient all-reduce: the model's size in fp32
        import torch.distributed as dist

        g = torch.zeros(sum(p.numel() for p in model.parameters() if p.requires_grad))
        distributed.barrier()
        t0 = time.perf_counter()
        for _ in range(5):
            dist.all_reduce(g)
        result["allreduce_s"] = (time.perf_counter() - t0) / 5
        result["params"] = g.numel()
    if distributed.is_main():
        out.write_text(json.dumps(result))


def run(nproc: int, root: Path, steps: int, warmup: int, tmp: Path) -> dict:
    out = tmp / f"ddp{nproc}.json"
    cores = len(os.sched_getaffinity(0))
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // nproc)),
           "PYTHONPATH": str(ROOT)}
    args = [__file__, "--child", "--root", str(root), "--steps", str(steps),
            "--warmup", str(warmup), "--out", str(out)]
    cmd = [sys.executable, *args] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={nproc}", *args]
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path("."), help="a project with data/prepared")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.root.resolve(), a.steps, a.warmup, a.out)
        return
    with tempfile.TemporaryDirectory() as tmp:
        one = run(1, a.root.resolve(), a.steps, a.warmup, Path(tmp))
        two = run(2, a.root.resolve(), a.steps, a.warmup, Path(tmp))
    print(f"retriever step, same global batch ({a.steps} steps after {a.warmup} warm-up)")
    print(f"  1 process  x {one['threads']} threads: {one['step_s']:.3f} s/step")
    print(f"  2 processes x {two['threads']} thread(s): {two['step_s']:.3f} s/step "
          f"({two['step_s'] / one['step_s']:.2f}x the 1-process time)")
    print(f"  all-gather of {two['gather_rows']} passage embeddings, forward + backward: "
          f"{two['gather_s'] * 1e3:.2f} ms = {two['gather_s'] / two['step_s']:.2%} of a step "
          f"(target < 10%)")
    print(f"  all-reduce of {two['params'] / 1e6:.1f}M gradients (DDP's buckets): "
          f"{two['allreduce_s'] * 1e3:.1f} ms = {two['allreduce_s'] / two['step_s']:.1%} of a "
          f"step")


if __name__ == "__main__":
    main()
