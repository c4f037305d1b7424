"""Extractive reader baseline, side by side with the generator, in one run.

    python bench/reader.py            # after `dvc repro` (uses data/prepared, artifacts/, metrics/)

Trains ``ragtrain.reader`` (``AutoModelForQuestionAnswering`` on the same MiniLM warm start as
the copy generator) SQuAD-style on the train split's (question, gold passage, answer), then
answers the held-out split from the same retrieved passages the generator reads
(``retriever.top_k`` of artifacts/retrieved/<split>.jsonl) and from the gold passage. Prints its
EM / F1 / accuracy and training time beside the generator's (metrics/generator.json,
metrics/train_generator.json). A baseline, not the generator: it can only point into a passage.

Run it alone: two trainings at once halve each other.
"""

from __future__ import annotations

import argparse
import json
import os
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
from ragtrain.generation.reader import Reader, ReaderConfig, evaluate_reader, train_reader  # noqa: E402
from ragtrain.io import read_jsonl  # noqa: E402
from ragtrain.pipeline.paths import Paths, read_retrieved  # noqa: E402
from ragtrain.pipeline.timing import read_timings  # noqa: E402
from ragtrain.trainer import seed_everything  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--max-steps", type=int, default=0, help="0 = epochs decide")
    ap.add_argument("--model", default="all-MiniLM-L6-v2")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--out", type=Path, help="also write the figures here (JSON)")
    args = ap.parse_args(argv)
    cfg = load_config(args.params)
    paths = Paths()
    split = cfg.evaluation.split
    corpus = Corpus.load(paths.corpus)
    train_rows = read_jsonl(paths.queries("train"))
    test_rows = read_jsonl(paths.queries(split))
    retrieved = read_retrieved(paths, split)
    rc = ReaderConfig(model_name=args.model, epochs=args.epochs, max_steps=args.max_steps)
    bf16 = runtime.use_bf16(rc.precision)
    seed_everything(cfg.seed)
    reader = Reader.from_pretrained(rc)
    print(f"reader {rc.model_name}: {len(train_rows)} train questions, {rc.epochs} epochs, "
          f"batch {rc.batch_size}, {torch.get_num_threads()} threads, bf16 {bf16}")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        state = train_reader(reader, train_rows, corpus, seed=cfg.seed, ckpt_dir=Path(tmp))
    train_s = time.perf_counter() - t0
    qs = [r["question"] for r in test_rows]
    refs = [r["answers"] for r in test_rows]
    k = cfg.retriever.top_k
    top = [[corpus[p].text for p in retrieved[r["id"]][:k]] for r in test_rows]
    gold = [[corpus[r["gold_passage_ids"][0]].text] for r in test_rows]
    t0 = time.perf_counter()
    m, _ = evaluate_reader(reader, qs, top, refs, prefix=f"{split}/reader", bf16=bf16)
    m[f"{split}/reader/answers_per_s"] = len(qs) / (time.perf_counter() - t0)
    g, _ = evaluate_reader(reader, qs, gold, refs, prefix=f"{split}/reader/gold_passage",
                           bf16=bf16)
    m.update(g)
    m["reader/train_steps"] = state.step
    m["reader/train_seconds"] = round(train_s, 1)

    gen = json.loads(paths.generator_metrics.read_text()) if paths.generator_metrics.exists() \
        else {}
    tg = paths.generator_train_metrics
    gen_train = json.loads(tg.read_text()) if tg.exists() else {}
    print(f"\n{split} split, {len(qs)} questions, top-{k} retrieved passages unless noted\n")
    print("| model | EM | F1 | accuracy | EM / F1, gold passage | training |")
    print("|---|---|---|---|---|---|")

    def row(name: str, d: dict, pre: str, secs: float | None, steps: float | None) -> None:
        if f"{pre}/em" not in d:
            print(f"| {name} | (no metrics/generator.json) | | | | |")
            return
        t = f"{secs / 60:.1f} min, {int(steps)} steps" if secs else "?"
        print(f"| {name} | {d[f'{pre}/em']:.2f} | {d[f'{pre}/f1']:.2f} | "
              f"{d[f'{pre}/accuracy']:.2f} | {d[f'{pre}/gold_passage/em']:.2f} / "
              f"{d[f'{pre}/gold_passage/f1']:.2f} | {t} |")

    timings = read_timings(paths.timings)
    row("copy generator (ragtrain default)", gen, split,
        timings.get("train_generator/train_seconds"),
        gen_train.get("train/steps"))
    row(f"extractive reader (baseline, {rc.epochs} epochs)", m, f"{split}/reader", train_s,
        state.step)
    if args.out:
        args.out.write_text(json.dumps(m, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
