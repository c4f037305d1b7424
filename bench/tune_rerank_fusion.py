"""Choose ``reranker.fuse_weight`` and ``reranker.max_windows`` on the DEV split (never on test).

    python bench/tune_rerank_fusion.py      # after `dvc repro` with reranker.enabled: true

The first stage (``retriever.kind``, as ``retrieve`` runs it) gives each dev question its top
``reranker.candidates`` passages; the trained reranker scores every window of them once; a
passage scores its best window among all of them or among its ``max_windows`` lexical best
(``lexical_windows``: what reranking with that setting reads), and the fused order
``w * minmax(reranker) + (1 - w) * minmax(first stage)`` is scored for each weight w (1.0: the
reranker alone, 0.0: the first stage's own order). Prints dev R@1 / R@5 / MRR@10 per setting
and the pairs the cross-encoder reads with it (its reranking time is proportional).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402

from ragtrain import runtime  # noqa: E402
from ragtrain.config import load_config  # noqa: E402
from ragtrain.data.corpus import Corpus  # noqa: E402
from ragtrain.io import read_jsonl  # noqa: E402
from ragtrain.pipeline.paths import Paths  # noqa: E402
from ragtrain.retrieval.metrics import evaluate_retrieval  # noqa: E402
from ragtrain.retrieval.reranker import (  # noqa: E402
    Reranker,
    apply_fusion,
    lexical_windows,
    passage_texts,
)
from ragtrain.retrieval.search import Retriever  # noqa: E402
from ragtrain.retrieval.training import labelled  # noqa: E402

WEIGHTS = (0.0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
MAX_WINDOWS = (0, 1, 2, 3)  # 0 = every window


def best_of(questions: Sequence[str], lists: Sequence[Sequence[Sequence[str]]],
            window_scores: Sequence[np.ndarray], n: int) -> tuple[list[np.ndarray], int]:
    """Per question, each passage's best window score among ``lexical_windows(.., n)``, and
    the number of (question, window) pairs that reading costs."""
    out, pairs = [], 0
    for q, plist, ws in zip(questions, lists, window_scores, strict=True):
        starts = np.cumsum([0, *[len(p) for p in plist]])
        keep = lexical_windows(q, plist, n)
        pairs += sum(len(k) for k in keep)
        out.append(np.array([ws[s + np.array(k)].max() for s, k in zip(starts, keep, strict=False)],
                            dtype=np.float32))
    return out, pairs


def main() -> int:
    cfg = load_config(Path("params.yaml"))
    paths = Paths()
    rk = cfg.reranker
    rows = labelled(read_jsonl(paths.queries("dev")))
    questions = [r["question"] for r in rows]
    gold = [r["gold_passage_ids"] for r in rows]
    corpus = Corpus.load(paths.corpus)
    first = Retriever.load(cfg.retriever.kind, cfg.retriever, encoder_dir=paths.retriever,
                           index_dir=paths.index, bm25_dir=paths.bm25)
    k = min(rk.candidates, len(corpus.ids))
    scores, ids = first.search(questions, k)
    reranker = Reranker.load(paths.reranker)
    texts = passage_texts(corpus, reranker.spec)  # whole passages or windows, as it was trained
    lists = [[texts[p] for p in row] for row in ids]
    # every window once, each as its own "passage": one score per window
    window_scores = reranker.score(questions, [[w for p in plist for w in p] for plist in lists],
                                   batch_size=rk.eval_batch_size,
                                   bf16=runtime.use_bf16(rk.precision), progress=False)
    print(f"dev: {len(rows)} questions, {cfg.retriever.kind} top {k} reranked")
    for n in MAX_WINDOWS if reranker.spec.window_words else (0,):
        r, pairs = best_of(questions, lists, window_scores, n)
        for w in WEIGHTS:
            m, _ = evaluate_retrieval(apply_fusion(r, scores, ids, w)[1], gold, split="dev",
                                      ks=(1, 5), rank_cutoff=10)
            print(f"max_windows {n}  pairs {pairs:6d}  fuse_weight {w:.1f}   "
                  f"R@1 {m['dev/recall_at_1']:.4f}  R@5 {m['dev/recall_at_5']:.4f}  "
                  f"MRR@10 {m['dev/mrr_at_10']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
