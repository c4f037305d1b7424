"""Trains a tiny retriever or generator, in one process or as one rank of ``torchrun``, and (rank
0) writes its weights and loss curve: what tests/test_ddp.py compares.

    python tests/ddp_worker.py KIND VARIANT MODEL_DIR OUT_DIR
    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/ddp_worker.py ...

KIND: retriever, reranker, generator, or refresh (joint training's index refresh). VARIANT:
``even`` (batches of 5 split 3 + 2, two micro-batches accumulated) or ``tail`` (micro-batches
smaller than the world: the idle rank computes with weight 0). Environment: DDP_CRASH_AT=STEP
makes rank 0 fail once that step is logged (torchrun then stops every rank); DDP_RESUME=1
resumes from the checkpoint folder; DDP_DEVICE=cuda trains the retriever on this rank's GPU
(bench/gpu_check.py: DDP over nccl).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from ragtrain import distributed
from ragtrain.config import GeneratorConfig, RetrieverConfig
from ragtrain.data.corpus import Corpus, Passage

TOPICS = ["apple", "river", "castle", "violin", "rocket", "garden", "pirate", "glacier",
          "comet", "harbor"]


def no_dropout(model: torch.nn.Module) -> None:
    """Dropout off: one process and N ranks then compute the same function of the batch."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0


def toy() -> tuple[Corpus, list[dict], list[dict]]:
    ids = [f"p{i}" for i in range(len(TOPICS))]
    texts = [f"A passage about the {t}, and the {t} again, near the {TOPICS[i - 1]}."
             for i, t in enumerate(TOPICS)]
    corpus = Corpus([Passage(i, "", t) for i, t in zip(ids, texts, strict=True)])
    rows = [{"id": f"q{i}{j}", "question": f"{w} is said of the {t}?", "answers": [t],
             "gold_passage_ids": [ids[i]], "doc_id": f"d{i // 2}"}
            for i, t in enumerate(TOPICS) for j, w in enumerate(["what", "which", "who"])]
    return corpus, rows, rows[::3]


def train_retriever(model_dir: str, ckpt: Path, variant: str) -> tuple[torch.nn.Module, list]:
    from ragtrain.retrieval.bm25 import BM25Retriever
    from ragtrain.retrieval.encoder import BiEncoder, EncoderSpec
    from ragtrain.retrieval.passage_text import passage_inputs
    from ragtrain.retrieval.training import train_retriever

    corpus, train, dev = toy()
    # even: 5 passages x up to 2 questions a batch, one BM25 hard negative each (the columns
    # are deduplicated and false negatives masked), uneven shares over 2 ranks, accumulation;
    # tail: batches of 3, 3, 3, 1 passages with one question and no negatives: the last one
    # leaves a rank without a question or a passage
    even = variant == "even"
    cfg = dataclasses.replace(
        RetrieverConfig(), model_name=model_dir, shared_encoder=False,
        batch_size=5 if even else 3, questions_per_passage=2 if even else 1, lr=1e-3,
        max_steps=3 if even else 4, grad_accum_steps=2 if even else 1,
        hard_negatives="bm25" if even else "none", hard_negatives_per_query=1, eval_every=2,
        warmup_ratio=0.0, precision="fp32", checkpoint_every=2)
    torch.manual_seed(0)
    model = BiEncoder.from_pretrained(EncoderSpec.from_config(cfg))
    no_dropout(model)
    if os.environ.get("DDP_DEVICE") == "cuda":
        distributed.init()  # binds this rank to its GPU (LOCAL_RANK)
        model.to("cuda")
    bm25 = BM25Retriever.build(passage_inputs(corpus.passages), corpus.ids)
    log: list = []
    crash_at = int(os.environ.get("DDP_CRASH_AT", "0"))

    def on_step(step: int, logs: dict) -> None:
        log.append([step, dict(logs)])
        if step == crash_at and "train/loss" in logs:
            raise SystemExit(f"rank {distributed.rank()}: crashed at step {step}")

    train_retriever(model, corpus, train, dev, cfg, seed=0, ckpt_dir=ckpt, bm25=bm25,
                    progress=False, on_step=on_step, resume=os.environ.get("DDP_RESUME") == "1")
    return model, log


def train_reranker(model_dir: str, ckpt: Path, variant: str) -> tuple[torch.nn.Module, list]:
    from ragtrain.config import RerankerConfig
    from ragtrain.retrieval.bm25 import BM25Retriever
    from ragtrain.retrieval.passage_text import passage_inputs
    from ragtrain.retrieval.reranker import Reranker, RerankerSpec
    from ragtrain.retrieval.reranker_training import train_reranker

    corpus, train, dev = toy()
    # even: 5 questions a batch, each with its gold and 3 BM25 negatives; tail: 1 question
    cfg = RerankerConfig(enabled=True, model_name=model_dir, max_length=48, candidates=4,
                         train_candidates=4, negatives_depth=6,
                         batch_questions=5 if variant == "even" else 1, grad_accum_steps=2,
                         lr=1e-3, head_lr=1e-3, warmup_ratio=0.0, max_steps=3, eval_every=2,
                         dev_questions=0, precision="fp32", checkpoint_every=2)
    model = Reranker.from_pretrained(RerankerSpec.from_config(cfg), seed=0)
    no_dropout(model)
    bm25 = BM25Retriever.build(passage_inputs(corpus.passages), corpus.ids)
    log: list = []
    train_reranker(model, corpus, train, dev, cfg, bm25=bm25, seed=0, ckpt_dir=ckpt,
                   progress=False, on_step=lambda s, d: log.append([s, dict(d)]))
    return model, log


def train_generator(model_dir: str, ckpt: Path, variant: str) -> tuple[torch.nn.Module, list]:
    from ragtrain.generation.generator import Generator
    from ragtrain.generation.training import train_generator

    corpus, train, dev = toy()
    cfg = GeneratorConfig(model_name=model_dir, max_source_tokens=64, max_answer_tokens=8,
                          batch_size=5 if variant == "even" else 1, grad_accum_steps=2,
                          lr=1e-3, warmup_ratio=0.0,
                          max_steps=3, eval_every=2, checkpoint_every=2, precision="fp32")
    torch.manual_seed(0)
    gen = Generator.from_pretrained(cfg)
    no_dropout(gen.model)
    retrieved = {r["id"]: [r["gold_passage_ids"][0], "p0"] for r in train}
    passages = {p.passage_id: p for p in corpus.passages}
    log: list = []
    ckpt.mkdir(parents=True, exist_ok=True)  # the stage's prepare_ckpt_dir makes it
    train_generator(gen, train, dev, retrieved, passages, cfg, top_k=1, seed=0, ckpt_dir=ckpt,
                    resume=False, signature="ddp", progress=False,
                    on_step=lambda s, d: log.append([s, dict(d)]))
    return gen.model, log


def refresh_index(model_dir: str, ckpt: Path, variant: str) -> tuple[torch.nn.Module, list]:
    """Joint training's index refresh at step 1 (twice: the second is a no-op), then as a resumed
    run (a fresh ``IndexRefresh``); each rank writes the matrix it holds and the passages it
    encoded (``rank<r>.npy``, ``rank<r>.json`` beside the checkpoint folder)."""
    import numpy as np

    from ragtrain.config import JointConfig
    from ragtrain.generation import joint_refresh
    from ragtrain.generation.generator import Generator
    from ragtrain.generation.joint import FixedPassages, JointRAG
    from ragtrain.retrieval.encoder import BiEncoder, EncoderSpec
    from ragtrain.retrieval.passage_text import passage_inputs

    corpus, _, dev = toy()
    torch.manual_seed(0)
    bi = BiEncoder.from_pretrained(EncoderSpec(model_dir, shared_encoder=False))
    gen = Generator.from_pretrained(GeneratorConfig(model_name=model_dir, max_source_tokens=64,
                                                    max_answer_tokens=8))
    stale = torch.zeros(len(corpus.ids), bi.passage.model.config.hidden_size)
    rag = JointRAG(bi.query_tower, bi.tokenizer, 32, gen, FixedPassages(corpus.ids, stale),
                   {p.passage_id: p for p in corpus.passages}, JointConfig(top_k=2),
                   passage=bi.passage, passage_texts=passage_inputs(corpus.passages),
                   passage_max_length=48)
    encoded: list[int] = []  # the passages each call of the passage tower encoded
    plain = joint_refresh.encode

    def counted(tower: torch.nn.Module, tok: object, texts: list[str], *a: int) -> np.ndarray:
        if tower is bi.passage:
            encoded.append(len(texts))
        return plain(tower, tok, texts, *a)

    joint_refresh.encode = counted
    log: list = []
    ckpt.mkdir(parents=True, exist_ok=True)
    refresh = joint_refresh.IndexRefresh(rag, 1, ckpt, dev, k=2, batch_size=4,
                                         on_refresh=lambda s, d: log.append([s, dict(d)]))
    refresh(1)
    refresh(1)  # the same step: nothing to do
    fresh = rag.passages.emb.clone()
    rag.passages.emb = stale
    joint_refresh.IndexRefresh(rag, 1, ckpt, dev, k=2)(1)  # resumed: the saved matrix
    r = distributed.rank()
    np.save(ckpt.parent / f"rank{r}.npy", fresh.numpy())
    (ckpt.parent / f"rank{r}.json").write_text(json.dumps({
        "encoded": encoded, "resumed_equal": bool(rag.passages.emb.equal(fresh)),
        "files": sorted(f.name for f in ckpt.iterdir())}))
    return rag.model, log


def main() -> None:
    kind, variant, model_dir, out = sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4])
    fn = {"retriever": train_retriever, "reranker": train_reranker,
          "generator": train_generator, "refresh": refresh_index}[kind]
    model, log = fn(model_dir, out / "ckpt", variant)
    if distributed.is_main():
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                  str(out / "weights.safetensors"))
        (out / "log.json").write_text(json.dumps(
            {"world_size": distributed.world_size(), "threads": torch.get_num_threads(),
             "omp": os.environ.get("OMP_NUM_THREADS"), "log": log}))


if __name__ == "__main__":
    main()
