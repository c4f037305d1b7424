"""Choose ``reranker.fuse_weight`` on the DEV split (never on test).

    python bench/tune_rerank_fusion.py      # after `dvc repro` with reranker.enabled: true

The first stage (``retriever.kind``, as ``retrieve`` runs it) gives each dev question its top
``reranker.candidates`` passages; the trained reranker scores them once; the fused order
``w * minmax(reranker) + (1 - w) * minmax(first stage)`` is scored for each weight w (1.0: the
reranker alone, 0.0: the first stage's own order). Prints dev R@1 / R@5 / MRR@10 per weight.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from ragtrain import runtime  # noqa: E402
from ragtrain.config import load_config  # noqa: E402
from ragtrain.data.corpus import Corpus  # noqa: E402
from ragtrain.io import read_jsonl  # noqa: E402
from ragtrain.pipeline.paths import Paths  # noqa: E402
from ragtrain.retrieval.metrics import evaluate_retrieval  # noqa: E402
from ragtrain.retrieval.reranker import Reranker, apply_fusion, passage_texts  # noqa: E402
from ragtrain.retrieval.search import Retriever  # noqa: E402
from ragtrain.retrieval.training import labelled  # noqa: E402

WEIGHTS = (0.0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


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
    r = reranker.score(questions, [[texts[p] for p in row] for row in ids],
                       batch_size=rk.eval_batch_size, bf16=runtime.use_bf16(rk.precision),
                       progress=False)
    print(f"dev: {len(rows)} questions, {cfg.retriever.kind} top {k} reranked")
    for w in WEIGHTS:
        m, _ = evaluate_retrieval(apply_fusion(r, scores, ids, w)[1], gold, split="dev",
                                  ks=(1, 5), rank_cutoff=10)
        print(f"fuse_weight {w:.1f}   R@1 {m['dev/recall_at_1']:.4f}  "
              f"R@5 {m['dev/recall_at_5']:.4f}  MRR@10 {m['dev/mrr_at_10']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
