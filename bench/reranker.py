"""Reranker benchmark: ragtrain's cross-encoder beside sentence-transformers' CrossEncoder.

    python bench/reranker.py                 # after `dvc repro build_bm25` (data/prepared,
                                             # artifacts/bm25); both sides use reranker.*
    python bench/reranker.py --steps 2 --rerank-questions 4 --root /tmp/tiny  # a smoke run

1. training throughput (pairs/s): ragtrain's reranker step (length-grouped batches of
   ``batch_questions`` questions x ``train_candidates`` BM25 candidates, listwise softmax
   cross-entropy, AdamW with a head LR) vs ``CrossEncoderTrainer`` with ``ListNetLoss`` (the
   gold labelled 1, the negatives 0) on the same pairs, model, max length and batch size (in
   its own batch order). Both with attention-probability dropout off unless
   ``--st-default-dropout``;
2. reranking throughput (pairs/s): ``Reranker.score`` (fp32, as configured, and on ONNX Runtime
   fp32 / int8: ``reranker.runtime``, batches of 8) vs ``CrossEncoder.predict`` on the same
   (question, BM25 top ``candidates``) pairs, at ``eval_batch_size`` and at 8; the ONNX paths'
   largest score difference from torch fp32 beside them.

Timings are wall-clock after ``--warmup`` steps; compare the ratios, not the absolute numbers.
Run it alone: two benchmarks at once halve each other.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ragtrain import runtime, trainer  # noqa: E402
from ragtrain.config import load_config  # noqa: E402
from ragtrain.data.corpus import Corpus  # noqa: E402
from ragtrain.errors import RagtrainError  # noqa: E402
from ragtrain.io import read_jsonl  # noqa: E402
from ragtrain.models import resolve_model_path  # noqa: E402
from ragtrain.pipeline.paths import Paths  # noqa: E402
from ragtrain.retrieval.bm25 import BM25Retriever  # noqa: E402
from ragtrain.retrieval.onnx_runtime import ONNX_BATCH  # noqa: E402
from ragtrain.retrieval.reranker import Reranker, RerankerSpec, passage_texts  # noqa: E402
from ragtrain.retrieval.reranker_training import (  # noqa: E402
    CandidateBatches,
    labelled,
    make_loss_fn,
    negative_pools,
    pair_lengths,
)


def whole_passages(corpus: Corpus, rk) -> dict[str, str]:
    """Each passage's whole text: both sides score the same (question, passage) pairs (a
    windowed reranker's pairs are its windows; the pair throughput is what is compared)."""
    return {p: t[0] for p, t in passage_texts(corpus, RerankerSpec(rk.model_name,
                                                                    rk.max_length)).items()}


def training(cfg, corpus: Corpus, rows: list[dict], bm25: BM25Retriever, steps: int,
             warmup: int, st_default_dropout: bool) -> None:
    from datasets import Dataset
    from sentence_transformers.cross_encoder import (
        CrossEncoder,
        CrossEncoderTrainer,
        CrossEncoderTrainingArguments,
        losses,
    )
    from transformers import TrainerCallback

    rk = cfg.reranker
    amp = runtime.amp_dtype(rk.precision)
    texts = whole_passages(corpus, rk)
    questions = [r["question"] for r in rows]
    _, ranked = bm25.search(questions, min(rk.negatives_depth, len(corpus)))
    pools = negative_pools(rows, ranked, corpus)
    gold = [r["gold_passage_ids"][0] for r in rows]
    model = Reranker.from_pretrained(RerankerSpec.from_config(rk), seed=cfg.seed)
    lists = [[g, *p] for g, p in zip(gold, pools, strict=True)]
    batches = CandidateBatches(gold, pools, pair_lengths(model, questions, lists, texts),
                               rk.train_candidates, rk.batch_questions, cfg.seed)
    n = warmup + steps
    if n > batches.per_epoch:
        sys.exit(f"--steps + --warmup ({n}) exceed one epoch ({batches.per_epoch} batches)")
    used = [batches(i) for i in range(n)]
    pairs = [len(c) for b in used[warmup:] for _, c in b]

    # ragtrain: the training step of the loop (forward, listwise loss, backward, clip, AdamW)
    loss_fn = make_loss_fn(model, questions, texts, batches, amp)
    opt = trainer.build_optimizer(model, rk.lr, rk.weight_decay,
                                  {p: rk.head_lr for p in model.new_params})
    model.train()
    for i in range(n):
        if i == warmup:
            t = time.perf_counter()
        loss, _ = loss_fn(i)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), rk.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    ours = sum(pairs) / (time.perf_counter() - t)

    # sentence-transformers: the same questions and candidate lists, ListNet over each list
    items = [it for b in used for it in b]
    ds = Dataset.from_dict({
        "query": [questions[q] for q, _ in items],
        "docs": [[texts[p] for p in c] for _, c in items],
        "labels": [[1.0] + [0.0] * (len(c) - 1) for _, c in items]})
    kw = {} if st_default_dropout else {"config_kwargs": {"attention_probs_dropout_prob": 0.0}}
    ce = CrossEncoder(resolve_model_path(rk.model_name), num_labels=1, max_length=rk.max_length,
                      device="cpu", **kw)
    marks: dict[int, float] = {}

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):  # noqa: ANN001, ANN003
            if state.global_step == warmup:
                marks[warmup] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001, ANN003
            marks[state.global_step] = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp:
        args = CrossEncoderTrainingArguments(
            output_dir=tmp, per_device_train_batch_size=rk.batch_questions, max_steps=n,
            learning_rate=rk.lr, weight_decay=rk.weight_decay, max_grad_norm=rk.grad_clip,
            bf16=amp == torch.bfloat16, report_to=[], save_strategy="no",
            logging_strategy="no", seed=cfg.seed, use_cpu=True, disable_tqdm=True)
        tr = CrossEncoderTrainer(model=ce, args=args, train_dataset=ds,
                                 loss=losses.ListNetLoss(ce), callbacks=[Clock()])
        tr.train()
    # ST shuffles the questions: its timed steps see other lists; count pairs per list mean
    theirs = (steps * rk.batch_questions * sum(len(c) for _, c in items) / len(items)
              / (marks[n] - marks[warmup]))
    print(f"\n## 1. Training throughput ({steps} steps after {warmup} warm-up, "
          f"{rk.batch_questions} questions x <= {rk.train_candidates} candidates, "
          f"max {rk.max_length} tokens, autocast={amp})")
    print(f"ragtrain reranker step (length-grouped):             {ours:8.1f} pairs/s")
    print(f"sentence-transformers CrossEncoderTrainer + ListNet: {theirs:8.1f} pairs/s"
          f"{' (ST default dropout)' if st_default_dropout else ''}")
    print(f"ratio ragtrain / sentence-transformers: {ours / theirs:.2f}  (goal >= 1.0)")


def reranking(cfg, corpus: Corpus, rows: list[dict], bm25: BM25Retriever) -> None:
    from sentence_transformers.cross_encoder import CrossEncoder

    rk = cfg.reranker
    texts = whole_passages(corpus, rk)
    questions = [r["question"] for r in rows]
    _, ids = bm25.search(questions, min(rk.candidates, len(corpus)))
    lists = [[texts[p] for p in row] for row in ids]
    n = sum(len(x) for x in lists)
    model = Reranker.from_pretrained(RerankerSpec.from_config(rk), seed=cfg.seed)
    res = {}
    bf16 = runtime.use_bf16(rk.precision)
    scores = {}
    for name, use, rt in (("ragtrain Reranker.score fp32", False, "torch"),
                          (f"ragtrain Reranker.score as configured (bf16={bf16})", bf16, "torch"),
                          ("ragtrain Reranker.score onnx (batch 8)", False, "onnx"),
                          ("ragtrain Reranker.score onnx_int8 (batch 8)", False, "onnx_int8")):
        try:
            model.use_runtime(rt)
        except RagtrainError as e:
            print(f"{name} skipped: {e}")
            continue
        model.score(questions[:2], lists[:2], batch_size=rk.eval_batch_size, bf16=use)  # warm
        t = time.perf_counter()
        scores[name] = np.concatenate(model.score(questions, lists,
                                                  batch_size=rk.eval_batch_size, bf16=use))
        res[name] = n / (time.perf_counter() - t)
    model.use_runtime("torch")
    fp32 = scores["ragtrain Reranker.score fp32"]
    ce = CrossEncoder(resolve_model_path(rk.model_name), num_labels=1, max_length=rk.max_length,
                      device="cpu")
    pairs = [(q, p) for q, plist in zip(questions, lists, strict=True) for p in plist]
    ce.predict(pairs[:8], batch_size=rk.eval_batch_size)  # warm
    t = time.perf_counter()
    ce.predict(pairs, batch_size=rk.eval_batch_size, show_progress_bar=False)
    res["CrossEncoder.predict fp32"] = n / (time.perf_counter() - t)
    t = time.perf_counter()
    ce.predict(pairs, batch_size=ONNX_BATCH, show_progress_bar=False)
    res["CrossEncoder.predict fp32 (batch 8)"] = n / (time.perf_counter() - t)
    print(f"\n## 2. Reranking throughput ({len(questions)} questions x BM25 top "
          f"{rk.candidates} = {n} pairs, batches of {rk.eval_batch_size}, "
          f"{torch.get_num_threads()} threads)")
    for k, v in res.items():
        diff = (f"  max |score - fp32| {np.abs(scores[k] - fp32).max():.4f}" if "onnx" in k
                else "")
        print(f"{k:50s}{v:8.1f} pairs/s{diff}")
    base = res["CrossEncoder.predict fp32"]
    ours = list(res.values())
    print(f"ratio ragtrain fp32 / ST: {ours[0] / base:.2f}; as configured / ST: "
          f"{ours[1] / base:.2f}  (goal >= 1.0)")
    for k in (k for k in res if "onnx" in k):
        print(f"ratio {k.split('score ')[1]} / ST at batch 8: "
              f"{res[k] / res['CrossEncoder.predict fp32 (batch 8)']:.2f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path("."), help="a project after build_bm25")
    ap.add_argument("--params", type=Path, default=None, help="default: ROOT/params.yaml")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rerank-questions", type=int, default=64)
    ap.add_argument("--st-default-dropout", action="store_true",
                    help="sentence-transformers with its default attention dropout")
    ap.add_argument("--skip", nargs="*", default=[], choices=["train", "rerank"])
    args = ap.parse_args(argv)
    cfg = load_config(args.params or args.root / "params.yaml")
    paths = Paths(args.root)
    corpus = Corpus.load(paths.corpus)
    bm25 = BM25Retriever.load(paths.bm25)
    if "train" not in args.skip:
        rows = labelled(read_jsonl(paths.queries("train")))
        training(cfg, corpus, rows, bm25, args.steps, args.warmup, args.st_default_dropout)
    if "rerank" not in args.skip:
        split = cfg.evaluation.split
        rows = labelled(read_jsonl(paths.queries(split)))
        k = max(1, min(args.rerank_questions, len(rows)))
        step = max(1, math.floor(len(rows) / k))
        reranking(cfg, corpus, rows[::step][:k], bm25)
    return 0


if __name__ == "__main__":
    sys.exit(main())
