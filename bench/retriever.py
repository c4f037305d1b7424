"""Retriever benchmark: figures side by side with their baselines, in one run.

    python bench/retriever.py            # after `dvc repro` (uses data/prepared, artifacts/)

1. retrieval quality on the held-out split: BM25, untrained encoder, trained, hybrid (RRF and
   weighted), from the pipeline's artifacts;
2. training throughput (questions/s) of ragtrain's loop vs sentence-transformers'
   MultipleNegativesRankingLoss trainer, same model, data and batch size;
3. corpus encoding (passages/s) vs ``SentenceTransformer.encode``;
4. FAISS search queries/s: flat vs HNSW vs IVF-PQ, with their recall@10 against flat.

Timings are wall-clock on this machine; compare the ratios, not the absolute numbers. Run it
alone: two benchmarks at once halve each other.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ragtrain import runtime  # noqa: E402
from ragtrain.config import IndexConfig, load_config  # noqa: E402
from ragtrain.data.corpus import Corpus  # noqa: E402
from ragtrain.io import read_jsonl  # noqa: E402
from ragtrain.models import resolve_model_path  # noqa: E402
from ragtrain.pipeline.paths import Paths  # noqa: E402
from ragtrain.retrieval.encoder import BiEncoder, EncoderSpec  # noqa: E402
from ragtrain.retrieval.index import build_index, search  # noqa: E402
from ragtrain.retrieval.metrics import evaluate_retrieval  # noqa: E402
from ragtrain.retrieval.passage_text import passage_inputs  # noqa: E402
from ragtrain.retrieval.search import Retriever  # noqa: E402
from ragtrain.retrieval.training import Batches, exact_search, labelled  # noqa: E402


def quality(cfg, paths: Paths, corpus: Corpus, rows: list[dict]) -> None:
    split = cfg.evaluation.split
    questions = [r["question"] for r in rows]
    gold = [r["gold_passage_ids"] for r in rows]
    ranked: dict[str, list[list[str]]] = {}
    for kind in ("bm25", "dense"):
        r = Retriever.load(kind, cfg.retriever, encoder_dir=paths.retriever,
                           index_dir=paths.index, bm25_dir=paths.bm25)
        ranked[kind if kind == "bm25" else "trained"] = r.search(questions, 100)[1]
    for fusion in ("rrf", "weighted"):
        rc = dataclasses.replace(cfg.retriever, hybrid=dataclasses.replace(
            cfg.retriever.hybrid, fusion=fusion))
        r = Retriever.load("hybrid", rc, encoder_dir=paths.retriever, index_dir=paths.index,
                           bm25_dir=paths.bm25)
        ranked[f"hybrid-{fusion}"] = r.search(questions, 100)[1]
    base = BiEncoder.from_pretrained(EncoderSpec.from_config(cfg.retriever))
    with runtime.autocast(runtime.use_bf16(cfg.retriever.precision)):
        p = base.encode_passages(passage_inputs(corpus.passages), 64)
        q = base.encode_queries(questions, 128)
    ranked["untrained"] = exact_search(q, p, corpus.ids, 100)[1]
    print(f"\n## 1. Retrieval quality: {split} split, {len(rows)} questions, "
          f"{len(corpus.ids)} passages searched")
    print(f"{'retriever':16s}{'R@1':>8s}{'R@5':>8s}{'R@20':>8s}{'R@100':>8s}{'MRR@10':>8s}")
    for name in ("bm25", "untrained", "trained", "hybrid-rrf", "hybrid-weighted"):
        m, _ = evaluate_retrieval(ranked[name], gold, split=split)
        print(f"{name:16s}" + "".join(f"{m[f'{split}/{k}']:8.3f}" for k in (
            "recall_at_1", "recall_at_5", "recall_at_20", "recall_at_100", "mrr_at_10")))


def training_throughput(cfg, corpus: Corpus, rows: list[dict], steps: int) -> None:
    """Same model, same (question, passage) pairs, same batch of questions per step."""
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
        losses,
    )

    from ragtrain import trainer
    from ragtrain.retrieval.training import make_loss_fn

    rc = dataclasses.replace(cfg.retriever, hard_negatives="none", max_steps=steps)
    batches = Batches.build(rows, rc, cfg.seed)
    # the exact pairs ragtrain's first `steps` batches train on
    pairs = []
    text = dict(zip(corpus.ids, passage_inputs(corpus.passages), strict=True))
    for i in range(steps):
        pids, idx, _ = batches(i)
        pairs += [(rows[j]["question"], text[rows[j]["gold_passage_ids"][0]]) for j in idx]
    n_q = len(pairs)
    bs = round(n_q / steps)
    bf16 = runtime.use_bf16(rc.precision)

    def ragtrain_rate(rc: object) -> float:
        model = BiEncoder.from_pretrained(EncoderSpec.from_config(rc))
        model.train()
        loss_fn = make_loss_fn(model, corpus, rows, [[] for _ in rows], rc, seed=cfg.seed,
                               bf16=bf16)
        opt = trainer.build_optimizer(model, rc.lr, rc.weight_decay)
        t, n = time.perf_counter(), 0
        for i in range(steps):
            loss, k = loss_fn(i)
            loss.backward()
            opt.step()
            opt.zero_grad()
            n += k
        return n / (time.perf_counter() - t)

    ours = ragtrain_rate(rc)
    # like for like: one question per passage, MNRL-sized batches (the loop's own efficiency)
    flat = ragtrain_rate(dataclasses.replace(rc, questions_per_passage=1, batch_size=bs,
                                             group_by_document=0))

    st = SentenceTransformer(resolve_model_path(rc.model_name), device="cpu")
    st.max_seq_length = rc.passage_max_length
    ds = Dataset.from_dict({"anchor": [a for a, _ in pairs], "positive": [p for _, p in pairs]})
    with tempfile.TemporaryDirectory() as tmp:
        args = SentenceTransformerTrainingArguments(
            output_dir=tmp, per_device_train_batch_size=bs, num_train_epochs=1,
            learning_rate=rc.lr, bf16=bf16, report_to=[], save_strategy="no",
            logging_strategy="no", dataloader_drop_last=False, seed=cfg.seed,
            use_cpu=True, disable_tqdm=True)
        tr = SentenceTransformerTrainer(model=st, args=args, train_dataset=ds,
                                        loss=losses.MultipleNegativesRankingLoss(st))
        t = time.perf_counter()
        tr.train()
        theirs = n_q / (time.perf_counter() - t)
    print(f"\n## 2. Training throughput ({n_q} questions, {steps} steps, bf16={bf16})")
    print(f"ragtrain (passage-grouped batches of {rc.batch_size} passages, ~{bs} questions): "
          f"{ours:7.1f} questions/s")
    print(f"sentence-transformers MNRL (batches of {bs} question-passage pairs):    "
          f"{theirs:7.1f} questions/s")
    print(f"ragtrain, one question per passage (batches of {bs} pairs, like MNRL):       "
          f"{flat:7.1f} questions/s")
    print(f"ratio ragtrain / sentence-transformers: {ours / theirs:.2f} as configured, "
          f"{flat / theirs:.2f} like for like  (goal >= 1.0)")


def encoding_throughput(cfg, corpus: Corpus, n: int) -> None:
    from sentence_transformers import SentenceTransformer

    texts = passage_inputs(corpus.passages[:n])
    spec = EncoderSpec.from_config(cfg.retriever)
    model = BiEncoder.from_pretrained(spec)
    st = SentenceTransformer(resolve_model_path(spec.base_model), device="cpu")
    st.max_seq_length = spec.passage_max_length
    res = {}
    for name, bf16 in (("ragtrain fp32", False), ("ragtrain bf16-autocast", True)):
        with runtime.autocast(bf16):
            t = time.perf_counter()
            model.encode_passages(texts, cfg.index.encode_batch_size)
            res[name] = n / (time.perf_counter() - t)
    t = time.perf_counter()
    st.encode(texts, batch_size=cfg.index.encode_batch_size, normalize_embeddings=True)
    res["SentenceTransformer.encode fp32"] = n / (time.perf_counter() - t)
    print(f"\n## 3. Corpus encoding ({n} passages, max {spec.passage_max_length} tokens)")
    for k, v in res.items():
        print(f"{k:34s}{v:8.1f} passages/s")
    base = res["SentenceTransformer.encode fp32"]
    print(f"ratio ragtrain fp32 / ST: {res['ragtrain fp32'] / base:.2f}; "
          f"ragtrain as configured (precision={cfg.retriever.precision}, "
          f"bf16={runtime.use_bf16(cfg.retriever.precision)}) / ST: "
          f"{res['ragtrain bf16-autocast' if runtime.use_bf16(cfg.retriever.precision) else 'ragtrain fp32'] / base:.2f}"  # noqa: E501
          "  (goal >= 1.0)")


def search_speed(paths: Paths, n_passages: int, n_queries: int, seed: int = 0) -> None:
    emb = np.load(paths.embeddings / "embeddings.npy")
    rng = np.random.default_rng(seed)
    # the real corpus, tiled with small noise up to n_passages (a larger index to search)
    reps = int(np.ceil(n_passages / len(emb)))
    x = np.concatenate([emb + (0 if r == 0 else 0.05) * rng.standard_normal(emb.shape)
                        for r in range(reps)])[:n_passages].astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[rng.choice(len(x), n_queries, replace=False)] + 0.05 * rng.standard_normal(
        (n_queries, x.shape[1]))
    q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
    ids = [str(i) for i in range(len(x))]
    results = {}
    for kind in ("flat", "hnsw", "ivfpq"):
        cfg = IndexConfig(kind=kind, ivf_nlist=256, ivf_nprobe=16, pq_m=48, device="cpu")
        t = time.perf_counter()
        idx = build_index(x, ids, cfg, corpus_sha256="bench", encoder_fingerprint="bench")
        build = time.perf_counter() - t
        t = time.perf_counter()
        _, top = search(idx, q, 10)
        results[kind] = (build, n_queries / (time.perf_counter() - t), top)
    flat = results["flat"][2]
    print(f"\n## 4. FAISS search ({n_passages} passages x {x.shape[1]}-d, {n_queries} queries, "
          f"k=10, {torch.get_num_threads()} threads)")
    print(f"{'index':8s}{'build s':>10s}{'queries/s':>12s}{'recall@10 vs flat':>20s}")
    for kind, (build, qps, top) in results.items():
        rec = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(top, flat, strict=True)])
        print(f"{kind:8s}{build:10.2f}{qps:12.0f}{rec:20.3f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--train-steps", type=int, default=8)
    ap.add_argument("--encode-passages", type=int, default=512)
    ap.add_argument("--search-passages", type=int, default=100_000)
    ap.add_argument("--search-queries", type=int, default=1000)
    ap.add_argument("--skip", nargs="*", default=[], choices=["quality", "train", "encode",
                                                              "search"])
    args = ap.parse_args(argv)
    cfg = load_config(args.params)
    paths = Paths()
    corpus = Corpus.load(paths.corpus)
    print(f"# ragtrain retriever benchmark ({os.cpu_count()} CPUs, torch "
          f"{torch.__version__}, model {cfg.retriever.model_name})")
    if "quality" not in args.skip:
        quality(cfg, paths, corpus, labelled(read_jsonl(paths.queries(cfg.evaluation.split))))
    if "train" not in args.skip:
        training_throughput(cfg, corpus, labelled(read_jsonl(paths.queries("train"))),
                            args.train_steps)
    if "encode" not in args.skip:
        encoding_throughput(cfg, corpus, args.encode_passages)
    if "search" not in args.skip:
        search_speed(paths, args.search_passages, args.search_queries)
    return 0


if __name__ == "__main__":
    sys.exit(main())
