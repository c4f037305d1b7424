"""Encoding benchmark: passages/s and recall@5 of the trained bi-encoder through PyTorch and ONNX
Runtime (fp32 and dynamic int8), beside ``SentenceTransformer.encode`` on the same texts.

    pip install -e .[onnx]                      # onnx + onnxruntime (not in the default install)
    python bench/encode.py --root <a project after make demo> [--passages 1024]

Every path encodes the same passages (the corpus's first ``--passages``, title + text, batches of
64 sorted by length, 256 tokens) with 2 threads; passages/s are timed after a warm-up batch.
Quality: the test questions are searched exactly over the whole corpus encoded by that path
(queries too), recall@5 against the PyTorch fp32 path's, and the smallest cosine between a
path's passage embeddings and fp32's.

- sentence-transformers: ``SentenceTransformer(all-MiniLM-L6-v2).encode`` (the untrained model
  it loads; same architecture and lengths: a speed reference only);
- torch fp32 / bf16: ``BiEncoder.encode_passages`` (what build-index runs; bf16 autocast where
  the CPU has it, the pipeline's default);
- onnx fp32 / int8: the passage tower exported with ``torch.onnx.export``, its attention fused
  by ``onnxruntime.transformers.optimizer`` when that works, int8 by
  ``onnxruntime.quantization.quantize_dynamic`` (weights int8 per channel, activations
  quantized at run time).

Run it alone: two benchmarks at once halve each other.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ragtrain import runtime  # noqa: E402
from ragtrain.data.corpus import Corpus  # noqa: E402
from ragtrain.io import read_jsonl  # noqa: E402
from ragtrain.retrieval.encoder import BiEncoder, passage_inputs  # noqa: E402
from ragtrain.retrieval.training import exact_search, labelled  # noqa: E402

BATCH, MAX_LEN = 64, 256


class OnnxTower:
    """A tower exported to ONNX and run by onnxruntime; ``encode`` like ``BiEncoder``'s."""

    def __init__(self, path: Path, tokenizer: object, threads: int) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.tok = tokenizer

    def encode(self, texts: list[str], max_length: int) -> np.ndarray:
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        rows: dict[int, np.ndarray] = {}
        for b in range(0, len(order), BATCH):
            idx = order[b:b + BATCH]
            enc = self.tok([texts[i] for i in idx], padding=True, truncation=True,
                           max_length=max_length, return_tensors="np")
            e = self.session.run(None, {"input_ids": enc["input_ids"].astype(np.int64),
                                        "attention_mask": enc["attention_mask"].astype(
                                            np.int64)})[0]
            rows.update(zip(idx, e, strict=True))
        out = np.stack([rows[i] for i in range(len(texts))])
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def export(tower: torch.nn.Module, tokenizer: object, out: Path, hidden: int,
           heads: int) -> tuple[Path, Path, str]:
    """fp32 and int8 ONNX files of ``tower`` (mean pooled, normalised), and how they were made."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    class Wrap(torch.nn.Module):
        def __init__(self, t: torch.nn.Module) -> None:
            super().__init__()
            self.t = t

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.t(input_ids=input_ids, attention_mask=attention_mask)

    # eager attention exports as MatMul + Softmax, which the optimizer fuses into its Attention
    # op (the SDPA export it does not recognise)
    import copy

    tower = copy.deepcopy(tower)  # the torch paths keep their own attention
    if hasattr(tower.model, "set_attn_implementation"):
        tower.model.set_attn_implementation("eager")
    enc = tokenizer(["a passage", "another, longer passage of text"], padding=True,
                    return_tensors="pt")
    raw = out / "tower.onnx"
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
            "embedding": {0: "batch"}}
    torch.onnx.export(Wrap(tower).eval(), (enc["input_ids"], enc["attention_mask"]), str(raw),
                      input_names=["input_ids", "attention_mask"], output_names=["embedding"],
                      dynamic_axes=axes, opset_version=17, dynamo=False)
    how = "plain export"
    fp32 = raw
    try:
        from onnxruntime.transformers.optimizer import optimize_model

        opt = optimize_model(str(raw), model_type="bert", num_heads=heads, hidden_size=hidden)
        fused = out / "tower_fused.onnx"
        opt.save_model_to_file(str(fused))
        stats = opt.get_fused_operator_statistics()
        fp32, how = fused, f"fused by onnxruntime.transformers ({stats})"
    except Exception as e:  # noqa: BLE001 (the plain export still runs)
        how = f"plain export (fusion failed: {type(e).__name__}: {e})"
    int8 = out / "tower_int8.onnx"
    import onnx

    # the fused graph's contrib ops defeat shape inference: name the default tensor type
    quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8, per_channel=True,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    return fp32, int8, how


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
    cfg = model.passage.model.config
    results: dict[str, tuple[float, np.ndarray, np.ndarray]] = {}

    def torch_path(bf16: bool) -> tuple[object, object]:
        def p(t: list[str]) -> np.ndarray:
            with runtime.autocast(bf16):
                return model.encode_passages(t, BATCH)

        def q(t: list[str]) -> np.ndarray:
            with runtime.autocast(bf16):
                return model.encode_queries(t, BATCH)
        return p, q

    paths: dict[str, tuple[object, object]] = {"torch fp32": torch_path(False)}
    if runtime.cpu_has_bf16():
        paths["torch bf16"] = torch_path(True)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            fp32, int8, how = export(model.passage, model.tokenizer, Path(tmp),
                                     cfg.hidden_size, cfg.num_attention_heads)
            qfp32, qint8, _ = export(model.query_tower, model.tokenizer, Path(tmp) / "q",
                                     cfg.hidden_size, cfg.num_attention_heads) \
                if model.passage_tower is not None else (fp32, int8, how)
            print(f"onnx: {how}")
            for name, pf, qf in (("onnx fp32", fp32, qfp32), ("onnx int8", int8, qint8)):
                pt = OnnxTower(pf, model.tokenizer, a.threads)
                qt = OnnxTower(qf, model.tokenizer, a.threads)
                paths[name] = (lambda t, pt=pt: pt.encode(t, model.spec.passage_max_length),
                               lambda t, qt=qt: qt.encode(t, model.spec.query_max_length))
        except ImportError as e:
            print(f"onnx paths skipped: {e} (pip install -e .[onnx])")
        for name, (p, q) in paths.items():
            speed, _ = timed(p, texts)
            emb = p(all_texts)
            results[name] = (speed, emb, q(questions))
    st_speed = None
    try:
        from sentence_transformers import SentenceTransformer

        from ragtrain.models import resolve_model_path

        st = SentenceTransformer(str(resolve_model_path("all-MiniLM-L6-v2")), device="cpu")
        st.max_seq_length = MAX_LEN
        st_speed, _ = timed(lambda t: st.encode(t, batch_size=BATCH), texts)
    except ImportError as e:
        print(f"sentence-transformers skipped: {e}")
    gold = [r["gold_passage_ids"] for r in test]
    base = results["torch fp32"][1]
    print(f"{len(texts)} passages, {a.threads} threads; recall@5 on {len(test)} test questions "
          f"over {len(all_texts)} passages")
    if st_speed:
        print(f"  {'sentence-transformers':>22}: {st_speed:7.1f} passages/s (1.00x)")
    for name, (speed, emb, q) in results.items():
        _, ranked = exact_search(q, emb, corpus.ids, 5)
        r5 = float(np.mean([bool(set(r) & set(g)) for r, g in zip(ranked, gold, strict=True)]))
        worst = float((emb * base).sum(axis=1).min())
        ratio = f" ({speed / st_speed:.2f}x)" if st_speed else ""
        print(f"  {name:>22}: {speed:7.1f} passages/s{ratio}  recall@5 {r5:.4f}  "
              f"min cosine to fp32 {worst:.4f}")


if __name__ == "__main__":
    main()
