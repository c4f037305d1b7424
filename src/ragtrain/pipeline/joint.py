"""The joint stage (train_rag): the pipeline-trained query encoder and generator trained further
as one RAG model (``generation/joint.py``), then evaluated beside the pipeline-trained pair on
the same questions; or, when ``joint.enabled`` is false, the marker that says so."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ragtrain.config import Config, IndexConfig, to_dict
from ragtrain.io import atomic_path, atomic_write_json, sha256_file
from ragtrain.pipeline.code import code_hashes
from ragtrain.pipeline.paths import Paths, read_queries

DISABLED_FILE = "DISABLED.json"


def joint_dir(paths: Paths) -> Path:
    """artifacts/rag_joint: {retriever, generator, joint.json} (or DISABLED.json)."""
    return paths.root / "artifacts/rag_joint"


def joint_checkpoints(paths: Paths) -> Path:
    return paths.root / "checkpoints/rag_joint"  # not a DVC out: it must survive a killed run


def joint_metrics(paths: Paths) -> Path:
    return paths.metrics / "train_rag.json"


def joint_plot(paths: Paths) -> Path:
    return paths.root / "plots/train_rag.json"


def write_disabled(paths: Paths) -> dict[str, Any]:
    """artifacts/rag_joint/DISABLED.json and the (empty) metrics and plot files DVC expects."""
    with atomic_path(joint_dir(paths)) as tmp:
        tmp.mkdir()
        atomic_write_json(tmp / DISABLED_FILE, {
            "enabled": False,
            "reason": "joint.enabled is false in params.yaml: the retriever and generator were "
                      "not trained jointly; set it to true and rerun `dvc repro`"})
    metrics = {"joint/enabled": 0, "train/steps": 0}
    atomic_write_json(joint_metrics(paths), metrics)
    atomic_write_json(joint_plot(paths), [])
    return metrics


def run_train_rag(cfg: Config, paths: Paths, *, resume: bool = True,
                  on_step: Callable[[int, Mapping[str, float]], None] | None = None,
                  progress: bool = True) -> dict[str, Any]:
    """Train the query encoder and the generator jointly by RAG's marginal likelihood over the
    fixed index's top-k passages (dev F1 picks the best checkpoint) -> artifacts/rag_joint;
    then dev / test recall@k of both query encoders and test EM / F1 of both RAG models (each
    generator reading its own dense retriever's top passage) -> metrics/train_rag.json."""
    jc = cfg.joint
    if not jc.enabled:
        return write_disabled(paths)
    import copy

    import numpy as np
    import torch

    from ragtrain import distributed, runtime
    from ragtrain.data.corpus import Corpus
    from ragtrain.errors import RagtrainError
    from ragtrain.generation.generator import Generator
    from ragtrain.generation.joint import FixedPassages, JointRAG, evaluate_joint, train_joint
    from ragtrain.generation.joint_refresh import IndexRefresh, encode_corpus
    from ragtrain.pipeline.history import TrainingRecord
    from ragtrain.retrieval.encoder import BiEncoder, EncoderSpec, Tower
    from ragtrain.retrieval.index import build_index, load_index
    from ragtrain.retrieval.search import Retriever
    from ragtrain.retrieval.windows import passage_windows
    from ragtrain.trainer import prepare_ckpt_dir, seed_everything

    if (paths.generator / DISABLED_FILE).exists():
        raise RagtrainError(f"{paths.generator / DISABLED_FILE}: joint.enabled is true but no "
                            "generator was trained (data without answers, or "
                            "generator.enabled: false)")
    corpus = Corpus.load(paths.corpus)
    split = cfg.evaluation.split
    train, dev = read_queries(paths, "train"), read_queries(paths, "dev")
    test = read_queries(paths, split)
    corpus_sha = sha256_file(paths.corpus)
    retriever = BiEncoder.load(paths.retriever)
    fp = retriever.fingerprint()
    meta = json.loads((paths.embeddings / "meta.json").read_text())
    if meta.get("encoder_fingerprint") != fp or meta.get("corpus_sha256") != corpus_sha:
        raise RagtrainError(f"{paths.embeddings}: built by another encoder or corpus than "
                            f"{paths.retriever}; rerun `ragtrain build-index`")
    emb = torch.from_numpy(np.load(paths.embeddings / "embeddings.npy"))
    index = load_index(paths.index, expect_encoder_fingerprint=fp,
                       expect_corpus_sha256=corpus_sha, device=cfg.index.device,
                       mmap=cfg.index.mmap)

    # the rows of the embeddings: a passage each, or its windows (index.window_words), as
    # build-index encoded them; their texts are what a trained passage tower re-encodes
    windows = IndexConfig(kind="flat", device="cpu",
                          window_words=index.meta.params.get("window_words", 0),
                          window_stride=index.meta.params.get("window_stride", 0))
    texts, owners = passage_windows(corpus.passages, windows.window_words, windows.window_stride)
    if owners != meta["passage_ids"]:
        raise RagtrainError(f"{paths.embeddings}: its rows are not the corpus's passages or "
                            f"windows as {paths.index} holds them; rerun `ragtrain build-index`")
    n_passages = index.meta.n_passages

    def rag_of(query: Tower, gen: Generator, passage: Tower | None = None) -> JointRAG:
        return JointRAG(query, retriever.tokenizer, retriever.spec.query_max_length, gen,
                        FixedPassages(meta["passage_ids"], emb, index), corpus, jc,
                        passage=passage, passage_max_length=retriever.spec.passage_max_length,
                        passage_texts=texts)

    bf16 = runtime.use_bf16(jc.precision)
    ks, cutoff = sorted({1, 5, *cfg.evaluation.recall_ks}), cfg.evaluation.rank_cutoff

    hybrid = (Retriever.load("hybrid", cfg.retriever, encoder_dir=paths.retriever,
                             index_dir=paths.index, bm25_dir=paths.bm25,
                             corpus_sha256=corpus_sha, index_cfg=cfg.index)
              if cfg.retriever.kind == "hybrid" else None)

    def evaluate(rag: JointRAG, name: str) -> dict[str, float]:
        """Dense retrieval by the model's query tower (the generator reading the top passage);
        with ``retriever.kind: hybrid``, also as the RAG model retrieves (``{name}_hybrid``:
        fused with BM25, the generator reading ``retriever.top_k`` passages, as `evaluate`)."""
        out: dict[str, float] = {}
        if hybrid is not None:
            if rag.passages.index is None:  # refreshed embeddings: fused with BM25 too
                hybrid.index = build_index(  # the same rows: passages or windows
                    rag.passages.emb.numpy(), rag.passages.ids, windows,
                    corpus_sha256=corpus_sha, encoder_fingerprint="")
            hybrid.encoder = BiEncoder(rag.model.query, retriever.passage, retriever.tokenizer,
                                       retriever.spec)
        for s, rows in (("dev", dev), (split, test)):
            if not rows:
                continue
            kw = {"prefix": s, "ks": ks, "cutoff": cutoff, "answers": s == split,
                  "batch_size": jc.eval_batch_size, "bf16": bf16}
            m = evaluate_joint(rag, rows, **kw)
            out.update({f"{s}/{name}/{k.split('/', 1)[1]}": v for k, v in m.items()})
            if hybrid is not None:
                ranked = hybrid.search_all([r["question"] for r in rows],
                                           min(max(*ks, cutoff), n_passages))["hybrid"][1]
                m = evaluate_joint(rag, rows, **kw, ranked=ranked,
                                   n_passages=cfg.retriever.top_k)
                out.update({f"{s}/{name}_hybrid/{k.split('/', 1)[1]}": v for k, v in m.items()})
        return out

    # the pipeline-trained pair first, on the same questions and passages (the baseline)
    gen_file = paths.generator / "model.safetensors"
    metrics = evaluate(rag_of(retriever.query_tower, Generator.load(paths.generator)),
                       "pipeline") if distributed.is_main() else {}
    seed_everything(cfg.seed)
    gen = Generator.load(paths.generator)
    rag = rag_of(copy.deepcopy(retriever.query_tower), gen,
                 copy.deepcopy(retriever.passage) if jc.train_passages else None)
    signature = json.dumps([to_dict(jc), cfg.seed, corpus_sha, fp,
                            sha256_file(paths.queries("train")), sha256_file(paths.queries("dev")),
                            sha256_file(paths.embeddings / "embeddings.npy"),
                            sha256_file(gen_file) if gen_file.exists() else "",
                            *code_hashes(run_train_rag)])
    ckpt = joint_checkpoints(paths)
    resumed = prepare_ckpt_dir(ckpt, signature, resume)
    record = TrainingRecord(on_step)
    refresh = IndexRefresh(rag, jc.refresh_every, ckpt, dev, k=jc.top_k, bf16=bf16,
                           on_refresh=record) if jc.refresh_every else None
    state = train_joint(rag, train, dev, jc, seed=cfg.seed, ckpt_dir=ckpt, resume=resumed,
                        signature=signature, on_step=record, progress=progress, refresh=refresh)
    if rag.model.passage is not None:  # the final passage tower's embeddings, saved below
        rag.passages.emb = encode_corpus(rag, bf16=bf16)  # under torchrun: by every rank
        rag.passages.index = None
    if not distributed.is_main():  # torchrun: rank 0 alone writes the outputs
        return {}
    if refresh is not None:
        metrics.update({"refresh/count": refresh.count, "refresh/seconds": refresh.seconds,
                        **refresh.last})
    metrics.update(evaluate(rag, "joint"))
    # the saved retriever: the trained query tower beside the pipeline's passage tower, so the
    # passage embeddings (artifacts/embeddings) and the index stay valid for it (or, with
    # joint.train_passages, the trained passage tower and its own embeddings)
    spec = EncoderSpec(**{**to_dict(retriever.spec), "shared_encoder": False})
    joint = BiEncoder(rag.model.query, rag.model.passage or retriever.passage,
                      retriever.tokenizer, spec)
    with atomic_path(joint_dir(paths)) as tmp:
        tmp.mkdir()
        joint.save(tmp / "retriever")
        gen.save(tmp / "generator")
        if rag.model.passage is not None:  # the passage tower trained: its own embeddings
            (tmp / "embeddings").mkdir()
            np.save(tmp / "embeddings/embeddings.npy", rag.passages.emb.numpy())
            atomic_write_json(tmp / "embeddings/meta.json", {
                "passage_ids": meta["passage_ids"], "dim": int(rag.passages.emb.shape[1]),
                "encoder_fingerprint": joint.fingerprint(), "corpus_sha256": corpus_sha})
        atomic_write_json(tmp / "joint.json", {
            **to_dict(jc), "index": str(paths.index), "passage_embeddings": str(
                paths.embeddings if rag.model.passage is None
                else joint_dir(paths) / "embeddings"),
            "pipeline_encoder_fingerprint": fp, "evaluation_split": split})
    return record.finish(
        state, select="dev/f1", metrics_file=joint_metrics(paths), plot_file=joint_plot(paths),
        timings_file=paths.timings, stage="train_rag",
        extra={"joint/enabled": 1, **{k: round(v, 4) for k, v in metrics.items()},
               "train/questions": state.step * jc.batch_size * jc.grad_accum_steps})
