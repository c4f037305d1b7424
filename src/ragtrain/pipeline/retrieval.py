"""The retrieval stages: BM25, the fine-tuned bi-encoder, its index, their evaluation, and the
passages every question gets (what the generator reads)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ragtrain.config import Config
from ragtrain.errors import DataError
from ragtrain.io import atomic_path, atomic_write_json, sha256_file, write_jsonl
from ragtrain.pipeline.code import code_hashes
from ragtrain.pipeline.paths import Paths, read_queries


def run_build_bm25(cfg: Config, paths: Paths) -> Path:
    """data/prepared/corpus.jsonl -> artifacts/bm25 (BM25 over title + text)."""
    from ragtrain.data.corpus import Corpus
    from ragtrain.retrieval.bm25 import BM25Retriever
    from ragtrain.retrieval.passage_text import passage_inputs

    corpus = Corpus.load(paths.corpus)
    BM25Retriever.build(passage_inputs(corpus.passages), corpus.ids,
                        corpus_sha256=sha256_file(paths.corpus)).save(paths.bm25)
    return paths.bm25


def run_train_retriever(cfg: Config, paths: Paths, *, resume: bool = True,
                        on_step: Callable[[int, Mapping[str, float]], None] | None = None,
                        progress: bool = True) -> dict[str, Any]:
    """Fine-tune the bi-encoder on train questions (dev for model selection) -> artifacts/."""
    from ragtrain import distributed
    from ragtrain.data.corpus import Corpus, check_gold_ids
    from ragtrain.pipeline.history import TrainingRecord
    from ragtrain.retrieval.bm25 import BM25Retriever
    from ragtrain.retrieval.encoder import BiEncoder, EncoderSpec
    from ragtrain.retrieval.passage_text import passage_inputs
    from ragtrain.retrieval.training import train_retriever

    rc = cfg.retriever
    corpus = Corpus.load(paths.corpus)
    train, dev = read_queries(paths, "train"), read_queries(paths, "dev")
    check_gold_ids(train, corpus, str(paths.queries("train")))
    check_gold_ids(dev, corpus, str(paths.queries("dev")))
    # BM25 for mining is rebuilt in memory (well under a second): no dependency on artifacts/
    bm25 = (BM25Retriever.build(passage_inputs(corpus.passages), corpus.ids)
            if rc.hard_negatives in ("bm25", "both") else None)
    teacher, teacher_sha = None, ""
    if rc.loss == "distill":  # the reranker's scores (stage teacher_scores)
        from ragtrain.retrieval.distill import read_teacher_scores

        scores = paths.teacher_scores / "scores.jsonl"
        if not scores.is_file():
            raise DataError(f"{scores}: missing; retriever.loss distill needs the teacher's "
                            "scores: run `dvc repro teacher_scores` (reranker.enabled: true)")
        teacher, teacher_sha = read_teacher_scores(scores, corpus.ids), sha256_file(scores)
    model = BiEncoder.from_pretrained(EncoderSpec.from_config(rc),
                                      attention_dropout=rc.attention_dropout)
    record = TrainingRecord(on_step)
    state = train_retriever(
        model, corpus, train, dev, rc, seed=cfg.seed, ckpt_dir=paths.retriever_checkpoints,
        resume=resume, bm25=bm25, on_step=record, progress=progress, teacher=teacher,
        signature_parts=[sha256_file(paths.corpus), sha256_file(paths.queries("train")),
                         sha256_file(paths.queries("dev")), teacher_sha,
                         *code_hashes(run_train_retriever)])
    if not distributed.is_main():  # torchrun: rank 0 alone writes the outputs
        return {}
    model.save(paths.retriever)
    return record.finish(state, select="dev/recall_at_1",
                         metrics_file=paths.retriever_train_metrics,
                         plot_file=paths.retriever_train_plot, timings_file=paths.timings,
                         stage="train_retriever")


def run_build_index(cfg: Config, paths: Paths) -> Path:
    """Encode the corpus (each passage, or its windows: ``index.window_words``) with the trained
    passage tower -> artifacts/embeddings, artifacts/index."""
    import numpy as np

    from ragtrain import distributed, runtime
    from ragtrain.data.corpus import Corpus
    from ragtrain.retrieval.embedding_cache import encode_with_cache
    from ragtrain.retrieval.encoder import BiEncoder
    from ragtrain.retrieval.index import build_index_from_npy, save_index
    from ragtrain.retrieval.preflight import check_index_build
    from ragtrain.retrieval.windows import passage_windows

    corpus = Corpus.load(paths.corpus)
    texts, owners = passage_windows(corpus.passages, cfg.index.window_words,
                                    cfg.index.window_stride)
    model = BiEncoder.load(paths.retriever).use_runtime(cfg.retriever.runtime)
    check_index_build(len(texts), model.passage.model.config.hidden_size, cfg.index,
                      paths.index)  # refuses before encoding when the index cannot fit
    fp = model.fingerprint()
    bf16 = runtime.use_bf16(cfg.retriever.precision)

    def encode_here(texts: list[str]) -> np.ndarray:
        with runtime.autocast(bf16):
            return model.encode_passages(texts, cfg.index.encode_batch_size,
                                         progress=distributed.is_main())

    # under torchrun (RAGTRAIN_NPROC_PER_NODE): each process encodes its share of the passages
    # to encode, rank 0 joins them and alone caches, saves and indexes them
    encode = distributed.ShardedMap(encode_here)
    if not distributed.is_main():
        encode.follow()
        return paths.index
    if cfg.index.embedding_cache:  # opt-in: reuse unchanged passages' embeddings
        precision = cfg.retriever.runtime if model.onnx else "bf16" if bf16 else "fp32"
        cache = embedding_cache(paths, fp, model.spec.pooling, precision)
        emb, stats = encode_with_cache(texts, model.spec.passage_max_length, encode, cache)
        print(f"build-index: {stats.n_encoded} of {stats.n_passages} passages encoded, "
              f"{stats.n_cached} from the embedding cache ({cache.dir})", file=sys.stderr)
    else:
        emb = encode(texts)
    encode.close()
    corpus_sha = sha256_file(paths.corpus)
    with atomic_path(paths.embeddings) as tmp:
        tmp.mkdir()
        np.save(tmp / "embeddings.npy", emb)
        atomic_write_json(tmp / "meta.json", {"passage_ids": owners, "dim": emb.shape[1],
                                              "encoder_fingerprint": fp,
                                              "corpus_sha256": corpus_sha})
    del emb  # the index is built from the saved file a chunk at a time: memory holds the index
    idx = build_index_from_npy(paths.embeddings / "embeddings.npy", owners, cfg.index,
                               corpus_sha256=corpus_sha, encoder_fingerprint=fp, seed=cfg.seed)
    save_index(idx, paths.index)
    return paths.index


def embedding_cache(paths: Paths, fingerprint: str, pooling: str, precision: str) -> Any:
    """The ``EmbeddingCache`` of this encoder (weights, pooling, tokenizer; precision: fp32,
    bf16, onnx or onnx_int8) under cache/embeddings/, outside DVC's outs so that it survives
    reruns of build_index. (Typed ``Any``: a module-level import would add embedding_cache.py
    to every stage's deps here.)"""
    from ragtrain.retrieval.embedding_cache import EmbeddingCache

    return EmbeddingCache(paths.embedding_cache, {
        "encoder_fingerprint": fingerprint, "pooling": pooling,
        "tokenizer_sha256": _tree_sha256(paths.retriever / "tokenizer"),
        "precision": precision})


def _tree_sha256(folder: Path) -> str:
    """Hex sha256 over a folder's file names and bytes (sorted): the tokenizer's identity."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(folder).as_posix()}\0{sha256_file(f)}\0".encode())
    return h.hexdigest()


def run_eval_retriever(cfg: Config, paths: Paths) -> dict[str, float]:
    """Score BM25, the untrained encoder, the trained one and the hybrid on the same held-out
    questions -> metrics/retriever.json (the configured kind unprefixed) + per-question file."""
    from ragtrain import runtime
    from ragtrain.data.corpus import Corpus, check_gold_ids
    from ragtrain.retrieval.encoder import BiEncoder, EncoderSpec
    from ragtrain.retrieval.metrics import evaluate_retrieval
    from ragtrain.retrieval.search import Retriever
    from ragtrain.retrieval.training import exact_search
    from ragtrain.retrieval.windows import passage_windows, search_passages

    ec, rc = cfg.evaluation, cfg.retriever
    split = ec.split
    corpus = Corpus.load(paths.corpus)
    rows = read_queries(paths, split)
    check_gold_ids(rows, corpus, str(paths.queries(split)))
    reranker = _load_reranker(cfg, paths)
    questions = [r["question"] for r in rows]
    k = min(max(max(ec.recall_ks), ec.rank_cutoff), len(corpus.ids))
    r = Retriever.load("hybrid", rc, encoder_dir=paths.retriever, index_dir=paths.index,
                       bm25_dir=paths.bm25, corpus_sha256=sha256_file(paths.corpus),
                       index_cfg=cfg.index)
    found = r.search_all(questions, _search_depth(cfg, k, len(corpus.ids)))
    ranked = {kind: [row[:k] for row in ids] for kind, (_, ids) in found.items()}
    if reranker is not None:  # the configured first stage's list, reranked
        ranked["reranked"] = [row[:k] for row in _rerank(cfg, reranker, corpus, questions,
                                                         *found[rc.kind])[1]]
    base = BiEncoder.from_pretrained(EncoderSpec.from_config(rc))
    texts, owners = passage_windows(corpus.passages, cfg.index.window_words,
                                    cfg.index.window_stride)  # as the index: windows or not
    with runtime.autocast(runtime.use_bf16(rc.precision)):
        p = base.encode_passages(texts, cfg.index.encode_batch_size, progress=True)
        q = base.encode_queries(questions, 128)
    ranked["untrained"] = (search_passages(lambda m: exact_search(q, p, owners, m), k, len(owners))
                           if cfg.index.window_words else exact_search(q, p, corpus.ids, k))[1]

    gold = [r["gold_passage_ids"] for r in rows]
    answers = [r["answers"] for r in rows]
    metrics: dict[str, float] = {}
    per_q: dict[str, list[dict[str, Any]]] = {}
    used = "reranked" if reranker is not None else rc.kind  # what the RAG model reads
    for name in ("bm25", "untrained", "dense", "hybrid", "reranked"):
        if name not in ranked:
            continue
        m, per_q[name] = evaluate_retrieval(ranked[name], gold, ks=ec.recall_ks,
                                            rank_cutoff=ec.rank_cutoff, split=split,
                                            passages=corpus.text_by_id, answers=answers)
        metrics.update({f"{split}/{name}/{key.split('/', 1)[1]}": v for key, v in m.items()})
        if name == used:  # the retriever the RAG model uses: unprefixed names
            metrics.update(m)
    with atomic_path(paths.retriever_predictions) as tmp:
        write_jsonl(tmp, (
            {"id": r["id"], "question": r["question"], "gold_passage_ids": r["gold_passage_ids"],
             "top_ids": ranked[used][i][:10],
             **{f"{name}_gold_rank": per_q[name][i].get("gold_rank") for name in per_q}}
            for i, r in enumerate(rows)))
    atomic_write_json(paths.retriever_metrics, metrics)
    return metrics


RETRIEVE_DEPTH = 20  # passages kept per question by `retrieve` (the generator takes top_k)


def run_retrieve(cfg: Config, paths: Paths) -> dict[str, float]:
    """Top passages of every train / dev / test question with the configured retriever (what
    the generator trains and is evaluated on) -> artifacts/retrieved/{split}.jsonl."""
    from ragtrain.data.corpus import Corpus
    from ragtrain.retrieval.search import Retriever

    rc = cfg.retriever
    corpus = Corpus.load(paths.corpus)
    reranker = _load_reranker(cfg, paths)
    r = Retriever.load(rc.kind, rc, encoder_dir=paths.retriever, index_dir=paths.index,
                       bm25_dir=paths.bm25, corpus_sha256=sha256_file(paths.corpus),
                       index_cfg=cfg.index)
    depth = min(max(RETRIEVE_DEPTH, rc.top_k), len(corpus.ids))
    stats: dict[str, float] = {}
    with atomic_path(paths.retrieved) as tmp:
        tmp.mkdir()
        for split in ("train", "dev", "test"):
            rows = read_queries(paths, split)
            if not rows:
                write_jsonl(tmp / f"{split}.jsonl", [])
                continue
            questions = [q["question"] for q in rows]
            scores, ids = r.search(questions, _search_depth(cfg, depth, len(corpus.ids)))
            first = None
            if reranker is not None:  # written best first by the fused score, the first
                first = scores, ids   # stage's list beside it (evaluate answers from both)
                scores, ids = _rerank(cfg, reranker, corpus, questions, scores, ids)
                stats[f"{split}/first_stage/answer_recall_at_{rc.top_k}"] = _answer_recall(
                    rows, first[1], corpus, rc.top_k)
            write_jsonl(tmp / f"{split}.jsonl", (
                {"id": q["id"], **_listed("", scores[i], ids[i], depth),
                 **(_listed("first_stage_", first[0][i], first[1][i], depth) if first else {})}
                for i, q in enumerate(rows)))
            stats[f"{split}/answer_recall_at_{rc.top_k}"] = _answer_recall(rows, ids, corpus,
                                                                          rc.top_k)
    return stats


def run_retrieve_unanswerable(cfg: Config, paths: Paths) -> dict[str, float]:
    """abstention.enabled: the sampled dev and test questions searched without their split's
    articles (no passage answers them) -> artifacts/unanswerable/{dev,test}.jsonl (off: its
    DISABLED.json only). The passages taken out are dropped from a first-stage list deeper by as
    many, so what is left is the search of the reduced corpus (the hybrid's min-max
    normalisation still saw them)."""
    ab, rc, stats = cfg.abstention, cfg.retriever, {}
    with atomic_path(paths.unanswerable) as out:
        out.mkdir()
        if not ab.enabled:  # before the imports below (torch, faiss): ~1.5 s of nothing
            atomic_write_json(out / "DISABLED.json", {
                "enabled": False, "reason": "abstention.enabled is false in params.yaml"})
            return {"abstention/enabled": 0}
        import numpy as np

        from ragtrain.data.corpus import Corpus
        from ragtrain.evaluation.abstention import removed_passages, sample_answered
        from ragtrain.retrieval.search import Retriever

        corpus = Corpus.load(paths.corpus)
        reranker = _load_reranker(cfg, paths)
        r = Retriever.load(rc.kind, rc, encoder_dir=paths.retriever, index_dir=paths.index,
                           bm25_dir=paths.bm25, corpus_sha256=sha256_file(paths.corpus),
                           index_cfg=cfg.index)
        depth = min(max(RETRIEVE_DEPTH, rc.top_k), len(corpus.ids))
        for split, n in (("dev", ab.dev_questions), ("test", ab.test_questions)):
            every = read_queries(paths, split)
            rows = sample_answered(every, n, cfg.seed)
            gone = removed_passages(every, corpus)
            if not rows or len(gone) >= len(corpus.ids):
                write_jsonl(out / f"{split}.jsonl", [])
                continue
            questions = [q["question"] for q in rows]
            want = _search_depth(cfg, depth, len(corpus.ids) - len(gone))
            scores, ids = r.search(questions, min(len(corpus.ids), want + len(gone)))
            kept = [[(s, p) for s, p in zip(srow, irow, strict=False) if p not in gone][:want]
                    for srow, irow in zip(scores, ids, strict=True)]
            scores = np.array([[s for s, _ in row] for row in kept])
            ids = [[p for _, p in row] for row in kept]
            if reranker is not None:
                scores, ids = _rerank(cfg, reranker, corpus, questions, scores, ids)
            write_jsonl(out / f"{split}.jsonl", (
                {"id": q["id"], "passage_ids": ids[i][:depth],
                 "scores": [round(float(x), 6) for x in scores[i][:depth]]}
                for i, q in enumerate(rows)))
            stats[f"{split}/unanswerable/answer_recall_at_{rc.top_k}"] = _answer_recall(
                rows, ids, corpus, rc.top_k)  # an answer string met by chance elsewhere
    return {"abstention/enabled": 1, **stats}


def _listed(prefix: str, scores: Any, ids: list[str], depth: int) -> dict[str, Any]:
    """A retrieved row's list: its top ``depth`` passage ids and scores (6 decimals)."""
    return {f"{prefix}{'ids' if prefix else 'passage_ids'}": ids[:depth],
            f"{prefix}scores": [round(float(x), 6) for x in scores[:depth]]}


def _answer_recall(rows: list[dict[str, Any]], ids: list[list[str]], corpus: Any,
                   k: int) -> float:
    """The share of questions with an answer string in their top k passages (joined)."""
    from ragtrain.retrieval.metrics import answer_in_passage

    hit = sum(answer_in_passage(q["answers"], " ".join(corpus.text_by_id[p] for p in ids[i][:k]))
              for i, q in enumerate(rows))
    return hit / len(rows)


def _load_reranker(cfg: Config, paths: Paths) -> Any:
    """The trained reranker when ``reranker.enabled`` (else None); a clear error when
    artifacts/reranker holds the disabled marker (train_reranker ran with it off)."""
    if not cfg.reranker.enabled:
        return None
    from ragtrain.errors import RagtrainError
    from ragtrain.retrieval.reranker import Reranker

    if paths.reranker_disabled.exists():
        raise RagtrainError(f"{paths.reranker_disabled}: reranker.enabled is true but no "
                            "reranker was trained; run `ragtrain train-reranker` (or dvc repro)")
    return Reranker.load(paths.reranker).use_runtime(cfg.reranker.runtime)


def _search_depth(cfg: Config, k: int, n_passages: int) -> int:
    """First-stage depth: ``k``, or deeper when the reranker reorders more candidates."""
    return min(max(k, cfg.reranker.candidates), n_passages) if cfg.reranker.enabled else k


def _rerank(cfg: Config, reranker: Any, corpus: Any, questions: list[str], scores: Any,
            ids: list[list[str]]) -> tuple[Any, list[list[str]]]:
    """The first stage's lists with their top ``reranker.candidates`` reranked (fused)."""
    from ragtrain import runtime
    from ragtrain.retrieval.reranker import passage_texts

    rk = cfg.reranker
    return reranker.rerank(questions, scores, ids, passage_texts(corpus, reranker.spec),
                           candidates=rk.candidates, fuse_weight=rk.fuse_weight,
                           batch_size=rk.eval_batch_size, bf16=runtime.use_bf16(rk.precision),
                           progress=True, max_windows=rk.max_windows)
