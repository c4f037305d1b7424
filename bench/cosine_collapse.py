"""The cosine loss `L = 1 - cos(e_q, e_gold)` against the contrastive default, same budget.

    python bench/cosine_collapse.py [--steps 30]     # after `make demo` (uses data/prepared)

Trains two retrievers from the same start for the same steps, one per loss, and prints test
recall@1/5 and how spread out the passage embeddings are (mean cosine between random passage
pairs: 1.0 would be a total collapse, where every passage looks the same).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import numpy as np

from ragtrain import runtime
from ragtrain.config import load_config
from ragtrain.data.corpus import Corpus
from ragtrain.io import read_jsonl
from ragtrain.pipeline.paths import Paths
from ragtrain.retrieval.encoder import BiEncoder, EncoderSpec
from ragtrain.retrieval.metrics import evaluate_retrieval
from ragtrain.retrieval.passage_text import passage_inputs
from ragtrain.retrieval.training import exact_search, labelled, train_retriever


def score(model: BiEncoder, corpus: Corpus, rows: list[dict], bf16: bool) -> tuple[dict, float]:
    with runtime.autocast(bf16):
        p = model.encode_passages(passage_inputs(corpus.passages), 64)
        q = model.encode_queries([r["question"] for r in rows], 128)
    m, _ = evaluate_retrieval(exact_search(q, p, corpus.ids, 5)[1],
                              [r["gold_passage_ids"] for r in rows], ks=(1, 5))
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, len(p), 5000), rng.integers(0, len(p), 5000)
    return m, float(np.mean(np.sum(p[a] * p[b], axis=1)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args(argv)
    cfg = load_config(Path("params.yaml"))
    paths = Paths()
    corpus = Corpus.load(paths.corpus)
    train = read_jsonl(paths.queries("train"))
    test = labelled(read_jsonl(paths.queries("test")))
    bf16 = runtime.use_bf16(cfg.retriever.precision)
    base = BiEncoder.from_pretrained(EncoderSpec.from_config(cfg.retriever))
    results = {"untrained": score(base, corpus, test, bf16)}
    for loss in ("in_batch_nll", "cosine"):
        rc = dataclasses.replace(cfg.retriever, loss=loss, max_steps=args.steps, eval_every=0)
        model = BiEncoder.from_pretrained(EncoderSpec.from_config(rc))
        with tempfile.TemporaryDirectory() as tmp:
            train_retriever(model, corpus, train, [], rc, seed=cfg.seed, ckpt_dir=Path(tmp),
                            progress=False)
        results[loss] = score(model, corpus, test, bf16)
    print(f"test split, {len(test)} questions, {args.steps} steps per loss")
    print(f"{'':14s}{'R@1':>8s}{'R@5':>8s}{'mean cos(passage, passage)':>30s}")
    for name, (m, spread) in results.items():
        print(f"{name:14s}{m['test/recall_at_1']:8.3f}{m['test/recall_at_5']:8.3f}{spread:30.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
