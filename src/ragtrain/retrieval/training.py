"""Supervised retriever training on (question, gold passage) pairs, and dense evaluation."""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ragtrain import distributed, runtime, trainer
from ragtrain.config import RetrieverConfig
from ragtrain.data.corpus import Corpus
from ragtrain.errors import ConfigError, DataError
from ragtrain.retrieval import losses
from ragtrain.retrieval.distill import TeacherScores, distill_negatives
from ragtrain.retrieval.encoder import BiEncoder
from ragtrain.retrieval.grad_cache import grad_cached_loss
from ragtrain.retrieval.metrics import evaluate_retrieval
from ragtrain.retrieval.mining import mine_hard_negatives
from ragtrain.retrieval.passage_text import passage_inputs


def labelled(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Questions that have a gold passage (unlabelled ones cannot train or score retrieval)."""
    return [r for r in rows if r["gold_passage_ids"]]


def exact_search(q: np.ndarray, p: np.ndarray, ids: Sequence[str],
                 k: int) -> tuple[np.ndarray, list[list[str]]]:
    """Brute-force inner-product top-k: scores # (n_queries, k) and ids."""
    k = min(k, p.shape[0])
    s = q @ p.T  # (n_queries, n_passages)
    top = np.argpartition(-s, k - 1, axis=1)[:, :k]
    order = np.take_along_axis(s, top, 1).argsort(axis=1, kind="stable")[:, ::-1]
    top = np.take_along_axis(top, order, 1)
    return np.take_along_axis(s, top, 1), [[ids[j] for j in row] for row in top]


def evaluate_dense(model: BiEncoder, corpus: Corpus, rows: Sequence[dict[str, Any]], *,
                   split: str, ks: Sequence[int] = (1, 5, 20, 100), cutoff: int = 10,
                   batch_size: int = 64, bf16: bool = False,
                   passage_emb: np.ndarray | None = None) -> dict[str, float]:
    """Exact dense retrieval metrics of ``model`` on labelled ``rows`` over the whole corpus."""
    with runtime.autocast(bf16):
        p = passage_emb if passage_emb is not None else model.encode_passages(
            passage_inputs(corpus.passages), batch_size)
        q = model.encode_queries([r["question"] for r in rows], batch_size)
    _, ranked = exact_search(q, p, corpus.ids, max(max(ks), cutoff))
    metrics, _ = evaluate_retrieval(ranked, [r["gold_passage_ids"] for r in rows], ks=ks,
                                    rank_cutoff=cutoff, split=split)
    return metrics


def run_signature(cfg: RetrieverConfig, seed: int, *parts: str) -> str:
    """Identifies a training run: a checkpoint is resumed only by a run with the same one."""
    h = hashlib.sha256(json.dumps([asdict(cfg), seed], sort_keys=True).encode())
    for p in parts:
        h.update(p.encode())
    return h.hexdigest()


def mine(model: BiEncoder, corpus: Corpus, rows: Sequence[dict[str, Any]],
         cfg: RetrieverConfig, *, bm25: Any | None, bf16: bool) -> list[list[str]]:
    """Hard negatives per question, by cfg.hard_negatives (bm25, dense or both, interleaved)."""
    n, depth = cfg.hard_negatives_per_query, cfg.hard_negative_depth
    if cfg.hard_negatives == "none" or n == 0:
        return [[] for _ in rows]
    gold = [r["gold_passage_ids"] for r in rows]
    answers = [r["answers"] for r in rows]
    questions = [r["question"] for r in rows]
    k = min(depth, len(corpus.ids))
    pools: list[list[list[str]]] = []
    if cfg.hard_negatives in ("bm25", "both"):
        if bm25 is None:
            raise ValueError("bm25 hard negatives need a BM25 index")
        _, ranked = bm25.search(questions, k)
        pools.append(mine_hard_negatives(ranked, gold, answers, corpus.text_by_id, n))
    if cfg.hard_negatives in ("dense", "both"):
        with runtime.autocast(bf16):
            p = model.encode_passages(passage_inputs(corpus.passages), 64)
            q = model.encode_queries(questions, 64)
        scores, ranked = exact_search(q, p, corpus.ids, k)
        pos = {pid: i for i, pid in enumerate(corpus.ids)}
        gold_scores = [max(float(q[i] @ p[pos[g]]) for g in gold[i]) for i in range(len(rows))]
        pools.append(mine_hard_negatives(ranked, gold, answers, corpus.text_by_id, n,
                                         ranked_scores=scores, gold_scores=gold_scores,
                                         margin=cfg.hard_negative_margin))
    mixed = []
    for i in range(len(rows)):
        seen: list[str] = []
        for cands in zip(*(pool[i] for pool in pools), strict=False):
            seen += [c for c in cands if c not in seen]
        mixed.append(seen[:n])
    return mixed


@dataclass
class Batches:
    """Training batches of passages, each with some of its questions.

    A batch holds ``batch_size`` gold passages; each brings up to ``questions_per_passage`` of
    its training questions (sampled per step), and all of them share that passage's column, so
    one passage forward pass serves several questions. With ``group_by_document > 0``, runs of
    that many passages come from the same document: in-batch negatives from the same article
    are hard negatives at no extra cost. Batch ``i`` is a pure function of (seed, i).
    """

    passage_ids: list[str]
    rows_of: dict[str, list[int]]
    doc_of: dict[str, str]
    batch_size: int
    questions_per_passage: int
    group_by_document: int
    seed: int
    _orders: dict[int, list[str]] = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, rows: Sequence[dict[str, Any]], cfg: RetrieverConfig,
              seed: int) -> Batches:
        rows_of: dict[str, list[int]] = {}
        doc_of: dict[str, str] = {}
        for i, r in enumerate(rows):
            pid = r["gold_passage_ids"][0]
            rows_of.setdefault(pid, []).append(i)
            doc_of[pid] = r.get("doc_id", pid)
        return cls(sorted(rows_of), rows_of, doc_of, cfg.batch_size,
                   cfg.questions_per_passage, cfg.group_by_document, seed)

    @property
    def per_epoch(self) -> int:
        return math.ceil(len(self.passage_ids) / self.batch_size)

    def epoch(self, e: int) -> list[str]:
        """The passage order of epoch ``e`` (cached)."""
        if e not in self._orders:
            self._orders = {e: self._order(e)}
        return self._orders[e]

    def _order(self, e: int) -> list[str]:
        rng = np.random.default_rng([self.seed, e])
        if not self.group_by_document:
            return [self.passage_ids[i] for i in rng.permutation(len(self.passage_ids))]
        by_doc: dict[str, list[str]] = {}
        for pid in self.passage_ids:
            by_doc.setdefault(self.doc_of[pid], []).append(pid)
        blocks: list[list[str]] = []
        for d in sorted(by_doc):
            ps = [by_doc[d][i] for i in rng.permutation(len(by_doc[d]))]
            blocks += [ps[i : i + self.group_by_document]
                       for i in range(0, len(ps), self.group_by_document)]
        return [p for b in rng.permutation(len(blocks)) for p in blocks[b]]

    def __call__(self, i: int) -> tuple[list[str], list[int], list[int]]:
        """Micro-batch i: its passages, question row indices, and each question's column."""
        e, b = divmod(i, self.per_epoch)
        pids = self.epoch(e)[b * self.batch_size : (b + 1) * self.batch_size]
        rng = np.random.default_rng([self.seed, 1, i])
        rows, targets = [], []
        for c, pid in enumerate(pids):
            cand = self.rows_of[pid]
            for j in rng.permutation(len(cand))[: self.questions_per_passage]:
                rows.append(cand[j])
                targets.append(c)
        return pids, rows, targets


def make_loss_fn(model: BiEncoder, corpus: Corpus, rows: Sequence[dict[str, Any]],
                 negatives: Sequence[Sequence[str]], cfg: RetrieverConfig, *, seed: int,
                 bf16: bool | torch.dtype | None, teacher: TeacherScores | None = None
                 ) -> Callable[[int], tuple[torch.Tensor, int]]:
    """loss_fn(micro_batch_index) for trainer.train_loop; the batch is fixed by the index.

    Under torchrun each rank embeds its share of the batch's questions and of its passage
    columns; the columns of all ranks are gathered (with their gradient), so every question is
    scored against the global batch's passages, as in one process."""
    text = dict(zip(corpus.ids, passage_inputs(corpus.passages), strict=True))
    gold = [set(r["gold_passage_ids"]) for r in rows]
    batches = Batches.build(rows, cfg, seed)
    loss = losses.get_loss(cfg.loss)
    if loss.uses_teacher and teacher is None:
        raise ValueError(f"retriever.loss {cfg.loss!r} needs the teacher's scores")
    if cfg.grad_cache_chunk and distributed.world_size() > 1:
        raise ConfigError("retriever.grad_cache_chunk: does not run under torchrun yet; set it "
                          "to 0, or train in one process")

    def loss_fn(i: int) -> tuple[torch.Tensor, int]:
        pids, idx, targets = batches(i)
        columns, mask = pids, None
        if loss.uses_negatives:  # the batch's passages first: targets index into them
            columns = list(dict.fromkeys(pids + [n for j in idx for n in negatives[j]]))
            mask = losses.false_negative_mask([gold[j] for j in idx], columns, targets)
        questions = [rows[j]["question"] for j in idx]
        dev = next(model.parameters()).device  # a GPU's, when the model was moved there
        t = torch.tensor(targets, device=dev)
        mask = None if mask is None else mask.to(dev)
        fn = loss.fn
        if loss.uses_teacher and teacher is not None:  # (B, P) logits, NaN: not scored
            own = [teacher[rows[j]["id"]] for j in idx]
            scores = torch.tensor([[s.get(c, math.nan) for c in columns] for s in own],
                                  device=dev)
            fn = functools.partial(fn, teacher=scores, weight=cfg.distill_weight,
                                   teacher_temperature=cfg.distill_temperature)
        if distributed.world_size() > 1:  # this rank's questions against all ranks' columns
            mine = distributed.work(len(idx))
            cols = distributed.work(len(columns))
            with runtime.autocast(bf16):
                q = model.forward_queries(questions[mine.start:mine.stop])
                p = distributed.gather_rows(model.forward_passages(
                    [text[c] for c in columns[cols.start:cols.stop]]), len(columns))
            if "teacher" in getattr(fn, "keywords", {}):
                fn = functools.partial(fn, teacher=fn.keywords["teacher"][mine.start:mine.stop])
            return fn(q, p, t[mine.start:mine.stop], cfg.temperature,
                      None if mask is None else mask[mine.start:mine.stop]), \
                distributed.weight(len(idx), len(mine))
        if cfg.grad_cache_chunk:  # the same gradient, chunk-sized activations (grad_cache.py)
            return grad_cached_loss(
                [(lambda x: model.forward_queries(list(x)), questions),
                 (lambda x: model.forward_passages(list(x)), [text[c] for c in columns])],
                lambda q, p: fn(q, p, t, cfg.temperature, mask), cfg.grad_cache_chunk,
                context=lambda: runtime.autocast(bf16)), len(idx)
        with runtime.autocast(bf16):
            q = model.forward_queries(questions)
            p = model.forward_passages([text[c] for c in columns])
        return fn(q, p, t, cfg.temperature, mask), len(idx)

    return loss_fn


def total_steps(rows: Sequence[dict[str, Any]], cfg: RetrieverConfig) -> int:
    n_passages = len({r["gold_passage_ids"][0] for r in rows})
    per_epoch = math.ceil(math.ceil(n_passages / cfg.batch_size) / cfg.grad_accum_steps)
    return cfg.max_steps or cfg.epochs * per_epoch


def train_retriever(
    model: BiEncoder,
    corpus: Corpus,
    train_rows: Sequence[dict[str, Any]],
    dev_rows: Sequence[dict[str, Any]],
    cfg: RetrieverConfig,
    *,
    seed: int,
    ckpt_dir: Path,
    resume: bool = False,
    bm25: Any | None = None,
    on_step: Callable[[int, Mapping[str, float]], None] | None = None,
    progress: bool = True,
    signature_parts: Sequence[str] = (),
    teacher: TeacherScores | None = None,
) -> trainer.TrainState:
    """Train ``model`` in place; it ends holding the best dev weights (or the last ones).

    ``teacher`` (loss distill): the reranker's scores per train question id; its candidates are
    the hard negatives (``cfg.hard_negatives`` is not mined then)."""
    trainer.seed_everything(seed)
    rows = labelled(train_rows)
    dev = labelled(dev_rows)
    if not rows:
        raise DataError("no training question has a gold passage")
    amp = runtime.amp_dtype(cfg.precision)  # training autocast: bf16, fp16 (loss scaled) or none
    bf16 = amp == torch.bfloat16  # mining and dev encoding
    negatives = (distill_negatives(rows, teacher, cfg.hard_negatives_per_query)
                 if teacher is not None else mine(model, corpus, rows, cfg, bm25=bm25, bf16=bf16))
    signature = run_signature(cfg, seed, model.fingerprint(), *signature_parts)
    resumed = trainer.prepare_ckpt_dir(ckpt_dir, signature, resume)
    loop = trainer.LoopConfig(
        total_steps=total_steps(rows, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay,
        warmup_ratio=cfg.warmup_ratio, grad_clip=cfg.grad_clip,
        grad_accum_steps=cfg.grad_accum_steps, checkpoint_every=cfg.checkpoint_every,
        eval_every=cfg.eval_every, patience=cfg.early_stopping_patience, seed=seed,
        progress=progress, fp16=amp == torch.float16)
    evaluate = None
    if dev:
        def evaluate() -> dict[str, float]:
            return evaluate_dense(model, corpus, dev, split="dev", bf16=bf16,
                                  batch_size=64)

    return trainer.train_loop(
        model, make_loss_fn(model, corpus, rows, negatives, cfg, seed=seed, bf16=amp,
                            teacher=teacher), loop,
        ckpt_dir=ckpt_dir, signature=signature, resume=resumed, evaluate=evaluate,
        select_metric="dev/recall_at_1", on_step=on_step)
