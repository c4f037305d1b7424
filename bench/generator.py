"""Generator benchmark: figures side by side with their baselines, in one run.

    python bench/generator.py --steps 30      # after `dvc repro` (uses data/prepared, artifacts/)

1. training throughput (examples/s) of ragtrain's loop vs the Hugging Face ``Trainer`` on the
   same model (the configured generator), the same encoded examples in the same batches and
   order, batch size, optimizer settings and precision, each after one untimed warm-up step;
2. answers/s at inference: constrained decoding with the KV cache (what ragtrain runs) vs the
   same decoding recomputing the whole prefix at every step (no cache);
3. with ``--quality``: EM / F1 of the trained generator on the held-out split with retrieved
   passages and with the gold passage, and of the sliding-window baseline (from
   metrics/generator.json when present).

Timings are wall-clock on this machine; compare the ratios, not the absolute numbers. Run it
alone: two benchmarks at once halve each other.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from ragtrain import runtime  # noqa: E402
from ragtrain.config import load_config  # noqa: E402
from ragtrain.data.corpus import Corpus  # noqa: E402
from ragtrain.generation.copy import CopyGenerator  # noqa: E402
from ragtrain.generation.generator import Generator  # noqa: E402
from ragtrain.generation.training import make_examples  # noqa: E402
from ragtrain.io import read_jsonl  # noqa: E402
from ragtrain.pipeline.paths import Paths, read_retrieved  # noqa: E402
from ragtrain.trainer import LoopConfig, build_optimizer, seed_everything, train_loop  # noqa: E402


def examples(cfg, paths: Paths, n: int, seed: int = 0) -> list:
    corpus = Corpus.load(paths.corpus)
    rows = read_jsonl(paths.queries("train"))[:n]
    retrieved = read_retrieved(paths, "train")
    return make_examples(rows, retrieved, corpus, cfg.retriever.top_k,
                         gold_share=cfg.generator.gold_share, rng=random.Random(seed))


def ours(cfg, encoded: list, steps: int) -> float:
    gc = cfg.generator
    seed_everything(0)
    gen = Generator.from_pretrained(gc)
    bs = gc.batch_size
    bf16 = runtime.use_bf16(gc.precision)

    def loss_fn(micro: int) -> tuple[torch.Tensor, int]:
        chunk = encoded[(micro * bs) % len(encoded):][:bs]
        with runtime.autocast(bf16):
            return gen.loss(gen.collate(chunk)), len(chunk)

    loop = LoopConfig(total_steps=steps, lr=gc.lr, weight_decay=gc.weight_decay,
                      warmup_ratio=gc.warmup_ratio, grad_clip=gc.grad_clip,
                      checkpoint_every=10**9, progress=False)
    opt = build_optimizer(gen.model, gc.lr, gc.weight_decay,
                          {p: gc.new_params_lr for p in gen.new_param_prefixes()})
    loss_fn(0)  # warm-up (allocator, oneDNN kernels), not timed
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        train_loop(gen.model, loss_fn, loop, ckpt_dir=Path(tmp), signature="bench",
                   resume=False, optimizer=opt)
        return steps * bs / (time.perf_counter() - t0)


def hf_trainer(cfg, encoded: list, steps: int) -> float:
    from transformers import Trainer, TrainingArguments

    gc = cfg.generator
    seed_everything(0)
    gen = Generator.from_pretrained(gc)

    class Wrapped(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = gen.model

        def forward(self, **batch: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"loss": gen.loss(batch)}

    class Data(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(encoded)

        def __getitem__(self, i: int) -> dict:
            return encoded[i]

    bf16 = runtime.use_bf16(gc.precision)
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=gc.batch_size, max_steps=steps,
            learning_rate=gc.lr, weight_decay=gc.weight_decay, warmup_steps=int(
                gc.warmup_ratio * steps), max_grad_norm=gc.grad_clip, bf16=bf16, use_cpu=True,
            report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True,
            dataloader_num_workers=0, remove_unused_columns=False, seed=0,
            train_sampling_strategy="sequential")  # the same batches, in the same order as ours
        model = Wrapped()
        trainer = Trainer(model=model, args=args, train_dataset=Data(),
                          data_collator=lambda b: gen.collate(b))
        with runtime.autocast(bf16):  # warm-up (allocator, oneDNN kernels), not timed, as ours
            model(**gen.collate(encoded[:gc.batch_size]))["loss"].backward()
        gen.model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        trainer.train()
        return steps * gc.batch_size / (time.perf_counter() - t0)


def answers_per_s(gen: Generator, exs: list, cached: bool) -> float:
    bf16 = runtime.use_bf16("auto")
    if cached:
        t0 = time.perf_counter()
        gen.answer(exs, 32, bf16=bf16)
        return len(exs) / (time.perf_counter() - t0)
    # no cache: the whole source + answer prefix recomputed for every generated token
    model = gen.model
    assert isinstance(model, CopyGenerator)
    t0 = time.perf_counter()
    with torch.no_grad(), runtime.autocast(bf16):
        for b in range(0, len(exs), 32):
            enc = [gen.encode(e, with_target=False) for e in exs[b: b + 32]]
            batch = gen.collate(enc)
            tokens = torch.full((len(enc), 1), gen.tok.cls_token_id)
            for _ in range(gen.spec.max_answer_tokens):
                hs, ht = model.states(batch["src"], batch["src_mask"], tokens,
                                      torch.ones_like(tokens))
                lp = model.next_from_states(hs, ht[:, -1:], batch["src"], batch["copyable"])
                y = lp.argmax(-1)
                tokens = torch.cat([tokens, y[:, None]], 1)
                if bool((y == gen.tok.sep_token_id).all()):
                    break
    return len(exs) / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps per trainer")
    ap.add_argument("--answers", type=int, default=128, help="questions for answers/s")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = ap.parse_args(argv)
    cfg = load_config(args.params)
    paths = Paths()
    n = args.steps * cfg.generator.batch_size + cfg.generator.batch_size
    exs = examples(cfg, paths, n)
    tok_gen = Generator.from_pretrained(cfg.generator)
    encoded = [tok_gen.encode(e) for e in exs]
    print(f"generator {cfg.generator.kind} ({cfg.generator.model_name}), batch "
          f"{cfg.generator.batch_size}, top-{cfg.retriever.top_k} passages, "
          f"{cfg.generator.max_source_tokens} source tokens, {args.steps} steps, "
          f"{torch.get_num_threads()} threads")
    hf = hf_trainer(cfg, encoded, args.steps)
    ex = ours(cfg, encoded, args.steps)
    print(f"training examples/s: ragtrain {ex:.2f}  HF Trainer {hf:.2f}  ratio {ex / hf:.2f}")
    if cfg.generator.kind == "copy" and paths.generator.exists():
        gen = Generator.load(paths.generator)
        test = examples(cfg, paths, args.answers)  # train rows: only timing here
        cached = answers_per_s(gen, test, cached=True)
        plain = answers_per_s(gen, test, cached=False)
        print(f"answers/s (batch 32): KV cache {cached:.1f}  no cache {plain:.1f}  ratio "
              f"{cached / plain:.2f}")
    if paths.generator_metrics.exists():
        m = json.loads(paths.generator_metrics.read_text())
        s = cfg.evaluation.split
        for name, label in (("", "retrieved passages"), ("gold_passage/", "gold passage"),
                            ("untrained/", "untrained generator"),
                            ("baseline_window/", "sliding-window baseline")):
            print(f"{s} {label:24s} EM {m[f'{s}/{name}em']:6.2f}  F1 {m[f'{s}/{name}f1']:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
