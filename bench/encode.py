"""Encoding benchmark: passages/s and recall@5 of the trained bi-encoder through PyTorch and ONNX
Runtime (fp32 and dynamic int8), beside ``SentenceTransformer.encode`` on the same texts.

    pip install -e .[onnx]                      # onnx + onnxruntime (not in the default install)
    python bench/encode.py --root <a project after make demo> [--passages 1024]

Every path encodes the same passages (the corpus's first ``--passages``, title + text, sorted by
length, 256 tokens) with 2 threads, in its own batches: 64 for the torch paths (build-index's
default), 8 for ONNX Runtime (``ONNX_BATCH``: its fastest here); sentence-transformers runs at
both, and each path's ratio is against it at the same batch size. Passages/s are timed after a
warm-up batch.
Quality: the test questions are searched exactly over the whole corpus encoded by that path
(queries too), recall@5 against the PyTorch fp32 path's, and the smallest cosine between a
path's passage embeddings and fp32's.

- sentence-transformers: ``SentenceTransformer(all-MiniLM-L6-v2).encode`` (the untrained model
  it loads; same architecture and lengths: a speed reference only);
- torch fp32 / bf16: ``BiEncoder.encode_passages`` (what build-index runs; bf16 autocast where
  the CPU has it, the pipeline's default);
- onnx fp32 / int8: ``retriever.runtime: onnx | onnx_int8`` (``BiEncoder.use_runtime``: the
  towers exported with ``torch.onnx.export``, attention fused by onnxruntime's transformer
  optimizer, int8 by ``quantize_dynamic``, weights per channel; retrieval/onnx_runtime.py).

Run it alone: two benchmarks at once halve each other.
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ragtrain import runtime  # noqa: E402
from ragtrain.data.corpus import Corpus  # noqa: E402
from ragtrain.errors import RagtrainError  # noqa: E402
from ragtrain.io import read_jsonl  # noqa: E402
from ragtrain.retrieval.encoder import BiEncoder  # noqa: E402
from ragtrain.retrieval.onnx_runtime import ONNX_BATCH  # noqa: E402
from ragtrain.retrieval.passage_text import passage_inputs  # noqa: E402
from ragtrain.retrieval.training import exact_search, labelled  # noqa: E402

BATCH, MAX_LEN = 64, 256


def timed(fn: object, texts: list[str]) -> tuple[float, np.ndarray]:
    fn(texts[:BATCH])  # warm-up
    t0 = time.perf_counter()
    e = fn(texts)
    return len(texts) / (time.perf_counter() - t0), e


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path("."))
    ap.add_argument("--passages", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    corpus = Corpus.load(a.root / "data/prepared/corpus.jsonl")
    test = labelled(read_jsonl(a.root / "data/prepared/test.jsonl"))
    model = BiEncoder.load(a.root / "artifacts/retriever")
    all_texts = passage_inputs(corpus.passages)
    texts = all_texts[:a.passages]
    questions = [r["question"] for r in test]
    # name -> (batch size, passage encoder, query encoder)
    paths: dict[str, tuple[int, object, object]] = {}

    def encoder_path(m: BiEncoder, bf16: bool) -> tuple[int, object, object]:
        def p(t: list[str]) -> np.ndarray:
            with runtime.autocast(bf16):
                return m.encode_passages(t, BATCH)

        def q(t: list[str]) -> np.ndarray:
            with runtime.autocast(bf16):
                return m.encode_queries(t, BATCH)
        return (ONNX_BATCH if m.onnx else BATCH), p, q

    paths["torch fp32"] = encoder_path(model, False)
    if runtime.cpu_has_bf16():
        paths["torch bf16"] = encoder_path(model, True)
    try:
        for name in ("onnx", "onnx_int8"):
            paths[name] = encoder_path(copy.deepcopy(model).use_runtime(name), False)
    except RagtrainError as e:
        print(f"onnx paths skipped: {e}")
    results: dict[str, tuple[int, float, np.ndarray, np.ndarray]] = {}
    for name, (bs, p, q) in paths.items():
        speed, _ = timed(p, texts)
        results[name] = (bs, speed, p(all_texts), q(questions))
    st_speed: dict[int, float] = {}
    try:
        from sentence_transformers import SentenceTransformer

        from ragtrain.models import resolve_model_path

        st = SentenceTransformer(str(resolve_model_path("all-MiniLM-L6-v2")), device="cpu")
        st.max_seq_length = MAX_LEN
        for bs in sorted({r[0] for r in results.values()}, reverse=True):
            st_speed[bs], _ = timed(lambda t, bs=bs: st.encode(t, batch_size=bs), texts)
    except ImportError as e:
        print(f"sentence-transformers skipped: {e}")
    gold = [r["gold_passage_ids"] for r in test]
    base = results["torch fp32"][2]
    print(f"{len(texts)} passages, {a.threads} threads; recall@5 on {len(test)} test questions "
          f"over {len(all_texts)} passages; ratios against sentence-transformers at the same "
          "batch size")
    for bs, speed in st_speed.items():
        print(f"  {'sentence-transformers':>22} (batch {bs:2d}): {speed:7.1f} passages/s")
    for name, (bs, speed, emb, q) in results.items():
        _, ranked = exact_search(q, emb, corpus.ids, 5)
        r5 = float(np.mean([bool(set(r) & set(g)) for r, g in zip(ranked, gold, strict=True)]))
        worst = float((emb * base).sum(axis=1).min())
        ratio = f" ({speed / st_speed[bs]:.2f}x)" if bs in st_speed else ""
        print(f"  {name:>22} (batch {bs:2d}): {speed:7.1f} passages/s{ratio}  recall@5 {r5:.4f}"
              f"  min cosine to fp32 {worst:.4f}")


if __name__ == "__main__":
    main()
