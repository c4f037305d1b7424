"""Distillation from the reranker into the bi-encoder, against the plain contrastive loss.

    python bench/distill.py --root <run with a trained reranker> [--negatives 3]
        [--use 1] [--weight 1.0] [--teacher-temperature 1.0] [--no-baseline]

1. the reranker (``<root>/artifacts/reranker``) scores each train question's gold passage and
   ``--negatives`` BM25 negatives (the teacher_scores stage's code), cached in
   ``<root>/bench-distill/scores_n<N>.jsonl``;
2. two bi-encoders train from the same start with the params.yaml retriever settings: the
   contrastive loss (baseline) and ``loss: distill`` with ``--use`` of those negatives;
3. dev and test dense R@1 / R@5 over the whole corpus, side by side.

Run it alone: training times are only comparable on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from ragtrain import runtime  # noqa: E402
from ragtrain.config import load_config  # noqa: E402
from ragtrain.data.corpus import Corpus  # noqa: E402
from ragtrain.io import read_jsonl, write_jsonl  # noqa: E402
from ragtrain.retrieval.bm25 import BM25Retriever  # noqa: E402
from ragtrain.retrieval.distill import (  # noqa: E402
    read_teacher_scores,
    score_candidates,
    teacher_candidates,
)
from ragtrain.retrieval.encoder import BiEncoder, EncoderSpec  # noqa: E402
from ragtrain.retrieval.passage_text import passage_inputs  # noqa: E402
from ragtrain.retrieval.reranker import Reranker  # noqa: E402
from ragtrain.retrieval.training import evaluate_dense, labelled, train_retriever  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--negatives", type=int, default=3)
    ap.add_argument("--use", type=int, default=1, help="teacher negatives per question used")
    ap.add_argument("--weight", type=float, default=1.0)
    ap.add_argument("--teacher-temperature", type=float, default=1.0)
    ap.add_argument("--no-baseline", action="store_true")
    a = ap.parse_args()
    cfg = load_config(Path(__file__).resolve().parents[1] / "params.yaml")
    prep = a.root / "data/prepared"
    corpus = Corpus.load(prep / "corpus.jsonl")
    train, dev = read_jsonl(prep / "train.jsonl"), read_jsonl(prep / "dev.jsonl")
    test = labelled(read_jsonl(prep / "test.jsonl"))
    out = a.root / "bench-distill"
    out.mkdir(exist_ok=True)
    scores = out / f"scores_n{a.negatives}.jsonl"
    if not scores.exists():
        rows = labelled(train)
        bm25 = BM25Retriever.build(passage_inputs(corpus.passages), corpus.ids)
        t0 = time.perf_counter()
        cands = teacher_candidates(rows, corpus, bm25, depth=cfg.retriever.hard_negative_depth,
                                   n=a.negatives)
        write_jsonl(scores, score_candidates(
            Reranker.load(a.root / "artifacts/reranker"), rows, corpus, cands,
            batch_size=cfg.reranker.eval_batch_size, bf16=runtime.use_bf16("auto")))
        n_pairs = sum(len(c) for c in cands)
        print(f"teacher: {n_pairs} pairs in {time.perf_counter() - t0:.0f} s")
    teacher = read_teacher_scores(scores, corpus.ids)
    bf16 = runtime.use_bf16(cfg.retriever.precision)
    runs = [] if a.no_baseline else [("contrastive (baseline)", cfg.retriever, None)]
    runs.append((f"distill (use {a.use}, w {a.weight}, T {a.teacher_temperature})",
                 dataclasses.replace(cfg.retriever, loss="distill", hard_negatives_per_query=a.use,
                                     distill_weight=a.weight,
                                     distill_temperature=a.teacher_temperature), teacher))
    print(f"{'run':44s}{'train s':>9s}{'dev R@1':>9s}{'test R@1':>10s}{'test R@5':>10s}")
    for i, (label, rc, t) in enumerate(runs):
        model = BiEncoder.from_pretrained(EncoderSpec.from_config(rc),
                                          attention_dropout=rc.attention_dropout)
        t0 = time.perf_counter()
        train_retriever(model, corpus, train, dev, rc, seed=cfg.seed, resume=False,
                        ckpt_dir=out / f"ckpt-{i}", teacher=t, progress=False)
        secs = time.perf_counter() - t0
        d = evaluate_dense(model, corpus, labelled(dev), split="dev", bf16=bf16)
        m = evaluate_dense(model, corpus, test, split="test", bf16=bf16)
        print(f"{label:44s}{secs:9.0f}{d['dev/recall_at_1']:9.4f}{m['test/recall_at_1']:10.4f}"
              f"{m['test/recall_at_5']:10.4f}", flush=True)


if __name__ == "__main__":
    main()
