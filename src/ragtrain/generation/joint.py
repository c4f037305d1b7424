"""RAG trained as one model: the answer's likelihood marginalised over retrieved passages, its
gradient reaching the query encoder through the passage scores (Lewis et al. 2020).

For each question the trainable query encoder embeds it, the fixed index gives its top-k
passages, ``p(z|x) = softmax(e_q · e_z / temperature)`` over them with the fixed passage
embeddings (``artifacts/embeddings``; with ``index.window_words``, ``e_z`` is the passage's
best-scoring window, as the index scores it), and the generator reads each whole passage alone
(``Generator.passage_log_probs``); the loss is RAG-Sequence or RAG-Token (``marginal.py``), plus
an optional ``1 - cos(e_q, e_gold)`` term. The passage encoder and index stay fixed, as in the
RAG paper; the query encoder and the generator train, in one module (``JointModel``) so the
shared loop (``trainer.py``) checkpoints, resumes and clips them together.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ragtrain import distributed, runtime
from ragtrain.config import JointConfig
from ragtrain.data.corpus import Passage
from ragtrain.evaluation.answers import score_answers
from ragtrain.generation.generator import Example, Generator, Prediction
from ragtrain.generation.marginal import get_marginal
from ragtrain.retrieval.encoder import Tower, encode
from ragtrain.retrieval.metrics import evaluate_retrieval
from ragtrain.retrieval.windows import search_passages
from ragtrain.trainer import LoopConfig, TrainState, build_optimizer, train_loop


def exact_top(q: torch.Tensor, emb: torch.Tensor, k: int) -> list[list[int]]:
    """Rows of the top-k inner products of each query # (B, k), best first."""
    return torch.topk(q.float() @ emb.T, k, dim=1).indices.tolist()  # (B, n) -> (B, k)


class JointModel(nn.Module):
    """What joint training updates: the query tower and the generator's model (one module, so
    one optimizer, one gradient clip and one checkpoint hold both)."""

    def __init__(self, query: Tower, generator: nn.Module, passage: Tower | None = None) -> None:
        super().__init__()
        self.query = query
        self.generator = generator
        self.passage = passage  # index refresh only: the passage tower trains too


@dataclass
class FixedPassages:
    """The frozen passage side: the vectors # (n, D) as build_index wrote them (one per passage,
    or one per window of each: ``index.window_words``), the passage id of each row (a passage's
    windows in one run), and the index searched with them (``None``: exact search over ``emb``).
    A passage scores by its best window (MaxP), so the rows of the top-k are each passage's best.
    """

    ids: list[str]
    emb: torch.Tensor  # (n, D) float32, no gradient
    index: Any | None = None  # a retrieval.index.DenseIndex built from the same embeddings

    def __post_init__(self) -> None:
        self.emb = self.emb.detach().float()
        self.spans: dict[str, tuple[int, int]] = {}  # passage id -> its rows [start, end)
        for i, pid in enumerate(self.ids):
            start, end = self.spans.get(pid, (i, i))
            if end != i:
                raise ValueError(f"passage {pid!r}: its rows are not one run")
            self.spans[pid] = (start, i + 1)

    @property
    def n_passages(self) -> int:
        return len(self.spans)

    def top_ids(self, q: torch.Tensor, k: int, emb: torch.Tensor | None = None
                ) -> list[list[str]]:
        """Each query's top-k passage ids by exact inner products with ``emb`` (rows aligned
        with ``ids``; default the fixed ones) # (B, k), best first; with windows a passage
        scores by its best row (``windows.py``)."""
        emb = self.emb if emb is None else emb
        if self.n_passages == len(self.ids):
            return [[self.ids[j] for j in row] for row in exact_top(q, emb, k)]
        with torch.autocast("cpu", enabled=False):  # fp32 scores under a bf16 evaluation too
            scores = q.float() @ emb.T  # (B, n_vectors)

        def vectors(m: int) -> tuple[np.ndarray, list[list[str]]]:
            s, rows = torch.topk(scores, m, dim=1)
            return s.numpy(), [[self.ids[j] for j in row] for row in rows.tolist()]

        return search_passages(vectors, k, len(self.ids))[1]

    def best_rows(self, q: torch.Tensor, pids: Sequence[Sequence[str]]) -> list[list[int]]:
        """The row of each query's passages that scores best with it (its only row, without
        windows) # (B, k)."""
        out = []
        for qi, row in zip(q.detach().float(), pids, strict=True):
            picked = []
            for pid in row:
                a, b = self.spans[pid]
                picked.append(a if b - a == 1 else a + int(torch.argmax(self.emb[a:b] @ qi)))
            out.append(picked)
        return out

    def top(self, q: np.ndarray, k: int) -> list[list[int]]:
        """Rows of the top-k passages of each query # (B, k), best first (k distinct
        passages, each by its best window)."""
        if self.index is not None:
            from ragtrain.retrieval.index import search

            _, ids = search(self.index, q, k)
            if all(len(row) == k for row in ids):  # IVF may find fewer: then search exactly
                return self.best_rows(torch.from_numpy(q), ids)
        qt = torch.from_numpy(q)
        return self.best_rows(qt, self.top_ids(qt, k))


class JointRAG:
    """A query tower, a generator and the fixed passages: the joint loss, retrieval, answers."""

    def __init__(self, query: Tower, tokenizer: Any, query_max_length: int, gen: Generator,
                 passages: FixedPassages, corpus: Mapping[str, Passage], cfg: JointConfig, *,
                 passage: Tower | None = None, passage_texts: Sequence[str] = (),
                 passage_max_length: int = 256) -> None:
        """``passage`` (with the encoders' ``passage_texts``, aligned with ``passages.ids``):
        a trainable passage tower scoring the retrieved passages live (index refresh)."""
        self.model = JointModel(query, gen.model, passage)
        self.passage_texts = list(passage_texts)
        self.passage_max_length = passage_max_length
        self.tokenizer = tokenizer
        self.query_max_length = query_max_length
        self.gen = gen
        self.passages = passages
        self.corpus = corpus
        self.cfg = cfg
        self.marginal = get_marginal(cfg.marginal)

    def query_embeddings(self, questions: Sequence[str]) -> torch.Tensor:
        """Trainable query embeddings # (B, D), L2-normalised (gradients flow)."""
        enc = self.tokenizer(list(questions), padding=True, truncation=True,
                             max_length=self.query_max_length, return_tensors="pt")
        return self.model.query(**enc)

    def loss(self, rows: Sequence[Mapping[str, Any]]) -> torch.Tensor:
        """The joint loss of a batch of questions (each with ``answers``)."""
        q = self.query_embeddings([r["question"] for r in rows])  # (B, D)
        k = min(self.cfg.top_k, self.passages.n_passages)
        top = self.passages.top(q.detach().float().cpu().numpy(), k)  # (B, k) rows
        if self.model.passage is None:
            p = self.passages.emb[torch.tensor(top)].to(q.device)  # (B, k, D), fixed
        else:  # live embeddings of the retrieved passages: the passage tower trains too
            enc = self.tokenizer([self.passage_texts[j] for row in top for j in row],
                                 padding=True, truncation=True,
                                 max_length=self.passage_max_length, return_tensors="pt")
            p = self.model.passage(**enc).view(len(rows), k, -1)  # (B, k, D)
        doc_logp = F.log_softmax((q.float()[:, None, :] * p).sum(-1) / self.cfg.temperature,
                                 -1)  # (B, k): log p(z | x)
        examples = [Example(r["question"], [self.corpus[self.passages.ids[j]] for j in row],
                            r["answers"][0]) for r, row in zip(rows, top, strict=True)]
        token_logp, mask = self.gen.passage_log_probs(examples)  # (B, k, T), (B, T)
        loss = self.marginal(doc_logp, token_logp, mask)
        if self.cfg.cosine_weight > 0:
            loss = loss + self.cfg.cosine_weight * self.cosine_term(q, rows)
        return loss

    def cosine_term(self, q: torch.Tensor, rows: Sequence[Mapping[str, Any]]) -> torch.Tensor:
        """Mean ``1 - cos(e_q, e_gold)`` over the questions that have a gold passage (its
        best window, with windows)."""
        pairs = [(i, g[0]) for i, r in enumerate(rows)
                 if (g := r.get("gold_passage_ids")) and g[0] in self.passages.spans]
        if not pairs:
            return q.sum() * 0.0
        qi, gold = zip(*pairs, strict=True)
        gi = [row[0] for row in self.passages.best_rows(q[list(qi)], [[g] for g in gold])]
        cos = F.cosine_similarity(q[list(qi)].float(),
                                  self.passages.emb[list(gi)].to(q.device), dim=-1)
        return (1 - cos).mean()

    def retrieve(self, questions: Sequence[str], k: int, batch_size: int = 64
                 ) -> list[list[str]]:
        """Exact top-k passage ids of each question with the current query tower."""
        q = encode(self.model.query, self.tokenizer, list(questions), self.query_max_length,
                   batch_size)
        return self.passages.top_ids(torch.from_numpy(q), min(k, self.passages.n_passages))

    def answer(self, rows: Sequence[Mapping[str, Any]], *, n_passages: int = 1,
               batch_size: int = 32, bf16: bool = False,
               ranked: Sequence[Sequence[str]] | None = None) -> list[Prediction]:
        """The generator's answers reading each question's top ``n_passages`` passages."""
        if ranked is None:
            ranked = self.retrieve([r["question"] for r in rows], n_passages)
        examples = [Example(r["question"], [self.corpus[p] for p in ids[:n_passages]])
                    for r, ids in zip(rows, ranked, strict=True)]
        return self.gen.answer(examples, batch_size, bf16=bf16)


def evaluate_joint(rag: JointRAG, rows: Sequence[Mapping[str, Any]], *, prefix: str,
                   ks: Sequence[int] = (1, 5), cutoff: int = 10, answers: bool = True,
                   batch_size: int = 32, bf16: bool = False, n_passages: int = 1,
                   ranked: Sequence[Sequence[str]] | None = None) -> dict[str, float]:
    """``{prefix}/recall_at_k`` (labelled rows) and, with ``answers``, ``{prefix}/em`` and
    ``/f1`` of the generator reading the top ``n_passages`` passages: of ``ranked`` when given
    (e.g. hybrid retrieval), else of the joint dense retriever over the whole corpus."""
    if ranked is None:
        with runtime.autocast(bf16):
            ranked = rag.retrieve([r["question"] for r in rows], max(*ks, cutoff))
    out: dict[str, float] = {}
    lab = [i for i, r in enumerate(rows) if r.get("gold_passage_ids")]
    if lab:
        m, _ = evaluate_retrieval([ranked[i] for i in lab],
                                  [rows[i]["gold_passage_ids"] for i in lab], ks=ks,
                                  rank_cutoff=cutoff, split=prefix)
        out.update(m)
    if answers:
        preds = rag.answer(rows, n_passages=n_passages, batch_size=batch_size, bf16=bf16,
                           ranked=ranked)
        s = score_answers([p.answer for p in preds], [r["answers"] for r in rows])
        out.update({f"{prefix}/{k}": v for k, v in s.items()})
    return out


def train_joint(
    rag: JointRAG,
    train_rows: Sequence[Mapping[str, Any]],
    dev_rows: Sequence[Mapping[str, Any]],
    cfg: JointConfig,
    *,
    seed: int,
    ckpt_dir: Path,
    resume: bool,
    signature: str,
    on_step: Callable[[int, Mapping[str, float]], None] | None = None,
    progress: bool = True,
    refresh: Callable[[int], None] | None = None,
) -> TrainState:
    """Train the query tower and the generator together; they end holding the best dev-F1
    weights (dev F1 of the generator reading the joint retriever's top passage); with
    ``eval_at_start`` the starting (pipeline-trained) pair is a candidate, kept when no step
    beats it. ``refresh`` (index refresh) is called with the optimizer step before each
    micro-batch."""
    rows = [r for r in train_rows if r.get("answers")]
    bs = cfg.batch_size
    n_batches = max(1, len(rows) // bs)  # drop the last partial batch: fixed shapes
    total = cfg.max_steps or max(1, n_batches // cfg.grad_accum_steps) * cfg.epochs
    amp = runtime.amp_dtype(cfg.precision)
    orders: dict[int, list[int]] = {}

    def order(e: int) -> list[int]:
        if e not in orders:
            orders.clear()
            orders[e] = random.Random(seed * 7919 + e).sample(range(len(rows)), len(rows))
        return orders[e]

    def loss_fn(micro: int) -> tuple[torch.Tensor, int]:
        e, b = divmod(micro, n_batches)
        chunk = [rows[i] for i in order(e)[b * bs:(b + 1) * bs]]
        if refresh is not None:
            refresh(micro // cfg.grad_accum_steps)
        mine = distributed.shard(chunk)  # under torchrun: this rank's questions
        with runtime.autocast(amp):
            return rag.loss(mine), int(distributed.weight(len(chunk), len(mine)))

    dev = [r for r in dev_rows if r.get("answers")]
    if cfg.dev_questions and len(dev) > cfg.dev_questions:
        dev = random.Random(seed).sample(dev, cfg.dev_questions)

    def evaluate() -> dict[str, float]:
        return evaluate_joint(rag, dev, prefix="dev", batch_size=cfg.eval_batch_size,
                              bf16=amp == torch.bfloat16)

    loop = LoopConfig(total_steps=total, lr=cfg.retriever_lr, weight_decay=cfg.weight_decay,
                      warmup_ratio=cfg.warmup_ratio, grad_clip=cfg.grad_clip,
                      grad_accum_steps=cfg.grad_accum_steps,
                      checkpoint_every=cfg.checkpoint_every, eval_every=cfg.eval_every,
                      patience=cfg.early_stopping_patience, seed=seed, progress=progress,
                      fp16=amp == torch.float16, eval_at_start=cfg.eval_at_start)
    opt = build_optimizer(rag.model, cfg.retriever_lr, cfg.weight_decay,
                          {"generator.": cfg.generator_lr})
    return train_loop(rag.model, loss_fn, loop, ckpt_dir=ckpt_dir, signature=signature,
                      resume=resume, evaluate=evaluate if dev else None, select_metric="dev/f1",
                      on_step=on_step, optimizer=opt)
