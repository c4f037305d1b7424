"""The GPU check (``bench/gpu_check.sh`` runs it): what a CPU machine cannot test, in minutes.

1. a retriever training step (the contrastive loss, the shared training loop) in bf16 autocast
   on CUDA: the bi-encoder is built on the GPU (``runtime.device()``), the loss is finite, the
   weights move, and the step's loss matches fp32 on the same batch to bf16's precision;
2. a generator (copy kind) training step the same way, from a batch built on the CPU as the
   stage builds it, then KV-cached answers on the GPU; the reranker built there scores pairs;
3. faiss-gpu: flat and IVF-PQ indexes built on the GPU return the CPU index's top-k (flat: the
   same ids; IVF-PQ: recall@10 against the CPU's exact search within 0.02 of the CPU IVF-PQ's);
4. DDP over nccl when there are 2+ GPUs: 2 processes reach 1 process's weights
   (``tests/ddp_worker.py``, as ``tests/test_ddp.py`` does over gloo).

Each check prints PASS, FAIL or SKIP (with the reason) and its seconds; the exit status is 1 when
one failed. Models are the bundled MiniLM when installed, else a tiny BERT built here (no hub).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.ddp_worker

import numpy as np  # noqa: E402
import torch  # noqa: E402

RESULTS: list[tuple[str, str, float, str]] = []


def check(name: str) -> Callable[[Callable[[], str]], Callable[[], str]]:
    def wrap(fn: Callable[[], str]) -> Callable[[], str]:
        t0 = time.perf_counter()
        try:
            note = fn()
            status = "SKIP" if note.startswith("skip") else "PASS"
        except Exception as e:  # noqa: BLE001 (every failure is reported, then the next check)
            status, note = "FAIL", f"{type(e).__name__}: {e}"
            traceback.print_exc()
        RESULTS.append((name, status, time.perf_counter() - t0, note))
        print(f"{status} {name} ({time.perf_counter() - t0:.1f} s): {note}", flush=True)
        return fn
    return wrap


def model_dir(tmp: Path) -> str:
    """The bundled MiniLM, or a tiny random BERT with MiniLM's tokenizer when absent."""
    from ragtrain.models import resolve_model_path

    try:
        return str(resolve_model_path("all-MiniLM-L6-v2"))
    except Exception:  # noqa: BLE001
        from transformers import BertConfig, BertModel, BertTokenizerFast

        out = tmp / "tiny_bert"
        vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz",
                 "the", "a", "of", "river", "castle", "who", "what", "is", "?", ".", ","]
        out.mkdir()
        (out / "vocab.txt").write_text("\n".join(vocab) + "\n")
        BertTokenizerFast(str(out / "vocab.txt")).save_pretrained(out)
        BertModel(BertConfig(vocab_size=len(vocab), hidden_size=64, num_hidden_layers=2,
                             num_attention_heads=2, intermediate_size=128)).save_pretrained(out)
        return str(out)


def main() -> int:
    if not torch.cuda.is_available():
        print("FAIL: no CUDA device (torch.cuda.is_available() is False); run this on a GPU "
              "machine")
        return 1
    print(f"torch {torch.__version__}, {torch.cuda.device_count()} x "
          f"{torch.cuda.get_device_name(0)}, bf16: {torch.cuda.is_bf16_supported()}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    mdir = model_dir(tmp)

    @check("retriever step, bf16 on CUDA")
    def _retriever() -> str:
        from ragtrain import runtime
        from ragtrain.config import RetrieverConfig
        from ragtrain.retrieval import losses
        from ragtrain.retrieval.encoder import BiEncoder, EncoderSpec

        cfg = dataclasses.replace(RetrieverConfig(), model_name=mdir)
        from tests.ddp_worker import no_dropout

        model = BiEncoder.from_pretrained(EncoderSpec.from_config(cfg))
        place = next(model.parameters()).device
        assert place.type == "cuda", f"the bi-encoder was built on {place}, not the GPU"
        model.train()
        no_dropout(model)  # the bf16 and fp32 losses compare the same function
        qs = [f"what is said of the river number {i}?" for i in range(8)]
        ps = [f"the river number {i} runs by the castle of the valley." for i in range(8)]
        t = torch.arange(8, device="cuda")
        fn = losses.get_loss("in_batch_nll").fn
        with torch.no_grad():
            fp32 = float(fn(model.forward_queries(qs), model.forward_passages(ps), t, 0.05))
        before = {k: v.clone() for k, v in model.state_dict().items()}
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        with runtime.autocast(torch.bfloat16):
            q, p = model.forward_queries(qs), model.forward_passages(ps)
        loss = fn(q, p, t, 0.05)
        loss.backward()
        opt.step()
        moved = sum(not torch.equal(before[k], v) for k, v in model.state_dict().items())
        assert q.device.type == "cuda" and torch.isfinite(loss), loss
        assert abs(float(loss) - fp32) < 0.05 * max(1.0, abs(fp32)), (float(loss), fp32)
        assert moved > 10, moved
        return f"loss bf16 {float(loss):.4f} vs fp32 {fp32:.4f}; {moved} tensors moved"

    @check("generator step (copy), bf16 on CUDA")
    def _generator() -> str:
        from ragtrain import runtime
        from ragtrain.config import GeneratorConfig
        from ragtrain.data.corpus import Passage
        from ragtrain.generation.generator import Example, Generator

        gen = Generator.from_pretrained(GeneratorConfig(model_name=mdir, max_source_tokens=96,
                                                        max_answer_tokens=8))
        place = next(gen.model.parameters()).device
        assert place.type == "cuda", f"the copy generator was built on {place}, not the GPU"
        gen.model.train()
        exs = [Example(f"what is the river number {i}?",
                       [Passage(f"p{i}", "", f"the river number {i} is the seine.")], "the seine")
               for i in range(4)]
        batch = gen.collate([gen.encode(x) for x in exs])  # on the CPU, as the stage builds it
        opt = torch.optim.AdamW(gen.model.parameters(), lr=1e-4)
        with runtime.autocast(torch.bfloat16):
            loss = gen.loss(batch)
        loss.backward()
        opt.step()
        assert loss.device.type == "cuda" and torch.isfinite(loss), loss
        answers = [p.answer for p in gen.answer(exs, 4, bf16=True)]  # KV-cached decoding
        return f"loss {float(loss):.4f}; answers {answers}"

    @check("reranker on CUDA: built there, scores pairs")
    def _reranker() -> str:
        from ragtrain.retrieval.reranker import Reranker, RerankerSpec

        rr = Reranker.from_pretrained(RerankerSpec(mdir, 128))
        place = next(rr.parameters()).device
        assert place.type == "cuda", f"the reranker was built on {place}, not the GPU"
        logits = rr.forward_pairs(["what is the river?"] * 2,
                                  ["the river is the seine.", "a castle."])
        scores = rr.score(["what is the river?"], [["the river is the seine.", "a castle."]],
                          bf16=True)
        assert logits.device.type == "cuda" and torch.isfinite(logits).all(), logits
        return f"logits {logits.tolist()}; scores {scores}"

    @check("faiss-gpu index build and search vs faiss-cpu")
    def _faiss() -> str:
        import faiss

        if faiss.get_num_gpus() < 1:
            return "skip: this faiss has no GPU support (install faiss-gpu, or the [gpu] extra)"
        from ragtrain.config import IndexConfig
        from ragtrain.retrieval.index import build_index, search

        rng = np.random.default_rng(0)
        x = rng.standard_normal((20_000, 384)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        q = x[rng.choice(len(x), 200, replace=False)] + 0.1 * rng.standard_normal(
            (200, 384)).astype(np.float32)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        ids = [str(i) for i in range(len(x))]
        kw = {"corpus_sha256": "", "encoder_fingerprint": ""}
        out = []
        exact = None
        for kind in ("flat", "ivfpq"):
            got = {}
            for dev in ("cpu", "gpu"):
                cfg = IndexConfig(kind=kind, device=dev, ivf_nlist=128, ivf_nprobe=16)
                idx = build_index(x, ids, cfg, **kw)
                assert idx.device == dev, (kind, dev, idx.device)
                got[dev] = search(idx, q, 10)[1]
            if kind == "flat":
                exact = got["cpu"]
                same = np.mean([a == b for a, b in zip(got["cpu"], got["gpu"], strict=True)])
                assert same >= 0.99, same
                out.append(f"flat: {same:.3f} of queries with the same top-10")
            else:
                rec = {d: np.mean([len(set(a) & set(e)) / 10 for a, e in zip(
                    got[d], exact, strict=True)]) for d in got}
                assert abs(rec["gpu"] - rec["cpu"]) <= 0.02, rec
                out.append(f"ivfpq recall@10 cpu {rec['cpu']:.3f} gpu {rec['gpu']:.3f}")
        return "; ".join(out)

    @check("DDP over nccl, 2 processes vs 1")
    def _ddp() -> str:
        if torch.cuda.device_count() < 2:
            return f"skip: {torch.cuda.device_count()} GPU (DDP over nccl needs 2+)"
        from safetensors.torch import load_file

        worker = ROOT / "tests/ddp_worker.py"
        logs = {}
        for n in (1, 2):
            out = tmp / f"ddp{n}"
            out.mkdir()
            launch = [sys.executable] if n == 1 else [
                sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc-per-node={n}"]
            subprocess.run([*launch, str(worker), "retriever", "even", mdir, str(out)],
                           check=True, env={**os.environ, "PYTHONPATH": str(ROOT),
                                            "DDP_DEVICE": "cuda"})
            logs[n] = json.loads((out / "log.json").read_text())
        w1 = load_file(str(tmp / "ddp1/weights.safetensors"))
        w2 = load_file(str(tmp / "ddp2/weights.safetensors"))
        diff = max(float((w1[k].float() - w2[k].float()).abs().max()) for k in w1)
        assert logs[2]["world_size"] == 2 and diff < 1e-3, diff
        return f"max weight difference {diff:.2e}"

    failed = [r for r in RESULTS if r[1] == "FAIL"]
    print(f"{len(RESULTS) - len(failed)} of {len(RESULTS)} checks passed or skipped"
          + (f"; failed: {', '.join(r[0] for r in failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
