"""Choose the hybrid fusion on the DEV split (never on test): RRF k and weighted-fusion weight.

    python bench/tune_hybrid.py      # after `dvc repro`; prints dev figures per setting
"""

from __future__ import annotations

import sys
from pathlib import Path

from ragtrain.config import load_config
from ragtrain.io import read_jsonl
from ragtrain.pipeline.paths import Paths
from ragtrain.retrieval import fusion
from ragtrain.retrieval.metrics import evaluate_retrieval
from ragtrain.retrieval.search import Retriever
from ragtrain.retrieval.training import labelled


def main() -> int:
    cfg = load_config(Path("params.yaml"))
    paths = Paths()
    rows = labelled(read_jsonl(paths.queries("dev")))
    questions = [r["question"] for r in rows]
    gold = [r["gold_passage_ids"] for r in rows]
    r = Retriever.load("hybrid", cfg.retriever, encoder_dir=paths.retriever,
                       index_dir=paths.index, bm25_dir=paths.bm25)
    depth = cfg.retriever.hybrid.depth
    ds, di = r.dense(questions, depth)
    assert r.bm25 is not None
    bs, bi = r.bm25.search(questions, depth)

    def show(name: str, ids: list[list[str]]) -> None:
        m, _ = evaluate_retrieval(ids, gold, split="dev", ks=(1, 5, 20))
        print(f"{name:24s} R@1 {m['dev/recall_at_1']:.4f}  R@5 {m['dev/recall_at_5']:.4f}  "
              f"R@20 {m['dev/recall_at_20']:.4f}  MRR@10 {m['dev/mrr_at_10']:.4f}")

    print(f"dev: {len(rows)} questions")
    show("bm25", bi)
    show("dense", di)
    for k in (1, 5, 10, 20, 60):
        show(f"rrf k={k}", fusion.reciprocal_rank_fusion(
            [[a, b] for a, b in zip(di, bi, strict=True)], top_k=20, k=k)[1])
    for w in (0.2, 0.3, 0.4, 0.5, 0.6, 0.7):
        show(f"weighted w_dense={w}", fusion.weighted_score_fusion(
            ds, di, bs, bi, dense_weight=w, top_k=20)[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
