"""Reranker training: listwise softmax cross-entropy over each train question's candidates.

Each training question gets its gold passage and ``train_candidates - 1`` negatives drawn from
BM25's top ``negatives_depth``, excluding its gold passages and any passage containing an answer
string (``mining.mine_hard_negatives``: DPR's token match; likely false negatives). A windowed
reranker (``window_words``) trains on windows instead: the positive is the gold passage's first
window holding an answer (else its best BM25 window), the negatives BM25's top windows over all
windows, less those of gold passages or holding an answer. The draw and
the batch order are fixed by (seed, epoch), so a resumed run sees the same batches. A batch is
``batch_questions`` questions of similar length (less padding) x their candidates. Model
selection: reranked recall@1 on dev questions over BM25's top ``candidates`` passages.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ragtrain import distributed, runtime, trainer
from ragtrain.config import RerankerConfig
from ragtrain.data.corpus import Corpus
from ragtrain.errors import DataError
from ragtrain.retrieval.bm25 import BM25Retriever
from ragtrain.retrieval.losses import listwise_softmax_ce
from ragtrain.retrieval.metrics import answer_in_passage, evaluate_retrieval
from ragtrain.retrieval.mining import mine_hard_negatives
from ragtrain.retrieval.passage_text import passage_input
from ragtrain.retrieval.reranker import (
    PassageText,
    Reranker,
    RerankerSpec,
    apply_fusion,
    passage_texts,
)
from ragtrain.retrieval.windows import word_windows

POOL_BATCHES = 50  # length grouping: sort within pools of this many batches


def labelled(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Questions with a gold passage (the others cannot train or score a reranker)."""
    return [r for r in rows if r["gold_passage_ids"]]


def negative_pools(rows: Sequence[Mapping[str, Any]], ranked: Sequence[Sequence[str]],
                   corpus: Corpus) -> list[list[str]]:
    """Each question's negatives, first-stage order: its ranked list without gold passages or
    passages containing an answer."""
    return mine_hard_negatives(ranked, [r["gold_passage_ids"] for r in rows],
                               [r.get("answers") or [] for r in rows], corpus.text_by_id,
                               n=max((len(x) for x in ranked), default=0))


def window_candidates(rows: Sequence[Mapping[str, Any]], corpus: Corpus, spec: RerankerSpec,
                      bm25: BM25Retriever, depth: int
                      ) -> tuple[list[str], list[list[str]], dict[str, str]]:
    """A windowed reranker's training lists: per question its positive window and its negative
    pool (BM25 order), and every window's input text, by window id (``<passage id>#<n>``).
    Windows are indexed by a BM25 of the passage index's settings; answers are matched in a
    window's own words (not its passage's title, as for whole passages)."""
    window_ids: dict[str, list[str]] = {}
    by_id: dict[str, str] = {}  # what the reranker reads (as ``passage_texts``)
    words: dict[str, str] = {}  # the window's own words: where answers are matched
    for p in corpus.passages:
        ids = window_ids[p.passage_id] = []
        for j, w in enumerate(word_windows(p.text, spec.window_words, spec.window_stride)):
            ids.append(f"{p.passage_id}#{j}")
            by_id[ids[-1]], words[ids[-1]] = passage_input(p.title, w), w
    m = bm25.meta
    windows = BM25Retriever.build(list(by_id.values()), list(by_id), k1=m["k1"], b=m["b"],
                                  stopwords=m["stopwords"], stemmer=m["stemmer"])
    questions = [r["question"] for r in rows]
    gold = [[w for g in r["gold_passage_ids"] for w in window_ids[g]] for r in rows]
    row_of = {w: i for i, w in enumerate(windows.passage_ids)}
    positives = []
    for q, r, g in zip(questions, rows, gold, strict=True):
        hit = [w for w in g if answer_in_passage(r.get("answers") or [], words[w])]
        if not hit:  # no window holds an answer string (e.g. abstractive answers)
            s = windows.scores(q)  # (n_windows,)
            hit = [max(g, key=lambda w: float(s[row_of[w]]))]  # ties: the first window
        positives.append(hit[0])
    _, ranked = windows.search(questions, min(depth, len(by_id)))
    pools = mine_hard_negatives(ranked, gold, [r.get("answers") or [] for r in rows], words,
                                n=depth)
    return positives, pools, by_id


def run_signature(cfg: RerankerConfig, seed: int, *parts: str) -> str:
    """Identifies a training run: a checkpoint is resumed only by a run with the same one (the
    keys only reranking at inference reads, ``RerankerConfig.INFERENCE_ONLY``, left out)."""
    trained = {f.name: getattr(cfg, f.name) for f in fields(cfg)
               if f.name not in cfg.INFERENCE_ONLY}
    h = hashlib.sha256(json.dumps([trained, seed], sort_keys=True).encode())
    for p in parts:
        h.update(p.encode())
    return h.hexdigest()


@dataclass
class CandidateBatches:
    """Training batches: lists of (question row, [gold, negative, ...]).

    Per epoch, each question draws ``n_candidates - 1`` negatives from its pool (all of it when
    shorter: its list is shorter, masked in the loss); questions are shuffled, sorted by length
    within pools of ``POOL_BATCHES`` batches, cut into batches of ``batch_questions``, and the
    batches shuffled. Batch ``i`` is a pure function of (seed, i).
    """

    gold: list[str]
    pools: list[list[str]]
    lengths: list[int]  # per question: its longest (question, candidate) pair in tokens
    n_candidates: int
    batch_questions: int
    seed: int
    _epochs: dict[int, list[list[tuple[int, list[str]]]]] = field(default_factory=dict,
                                                                  repr=False)

    @property
    def per_epoch(self) -> int:
        return math.ceil(len(self.gold) / self.batch_questions)

    def epoch(self, e: int) -> list[list[tuple[int, list[str]]]]:
        """The batches of epoch ``e`` (cached)."""
        if e not in self._epochs:
            self._epochs = {e: self._build(e)}
        return self._epochs[e]

    def _build(self, e: int) -> list[list[tuple[int, list[str]]]]:
        rng = np.random.default_rng([self.seed, e])
        items = []
        for i in rng.permutation(len(self.gold)).tolist():
            pool = self.pools[i]
            k = min(self.n_candidates - 1, len(pool))
            pick = sorted(rng.choice(len(pool), size=k, replace=False).tolist()) if k else []
            items.append((i, [self.gold[i], *(pool[j] for j in pick)]))
        bq = self.batch_questions
        batches: list[list[tuple[int, list[str]]]] = []
        for start in range(0, len(items), POOL_BATCHES * bq):
            chunk = sorted(items[start:start + POOL_BATCHES * bq],
                           key=lambda it: self.lengths[it[0]])
            batches += [chunk[j:j + bq] for j in range(0, len(chunk), bq)]
        return [batches[j] for j in rng.permutation(len(batches))]

    def __call__(self, i: int) -> list[tuple[int, list[str]]]:
        e, b = divmod(i, self.per_epoch)
        return self.epoch(e)[b]


def pair_lengths(model: Reranker, questions: Sequence[str], candidates: Sequence[Sequence[str]],
                 texts: Mapping[str, str]) -> list[int]:
    """Per question, the token length of its longest pair (capped at max_length)."""
    tok = model.tokenizer
    needed = sorted({p for row in candidates for p in row})
    p_len = dict(zip(needed, (len(x) for x in tok([texts[p] for p in needed],
                                                   add_special_tokens=False)["input_ids"]),
                     strict=True))
    q_len = [len(x) for x in tok(list(questions), add_special_tokens=False)["input_ids"]]
    return [min(model.spec.max_length, q + max((p_len[p] for p in row), default=0) + 3)
            for q, row in zip(q_len, candidates, strict=True)]


def training_batches(model: Reranker, corpus: Corpus, rows: Sequence[Mapping[str, Any]],
                     cfg: RerankerConfig, texts: Mapping[str, PassageText], *, bm25: Any,
                     seed: int) -> tuple[CandidateBatches, dict[str, str]]:
    """The training batches of labelled ``rows`` and the input text of each candidate id:
    windows (``window_candidates``) or whole passages (``texts``, from ``passage_texts``) with
    BM25's top ``negatives_depth`` as negative pools."""
    questions = [r["question"] for r in rows]
    if model.spec.window_words:
        gold, pools, train_texts = window_candidates(rows, corpus, model.spec, bm25,
                                                     cfg.negatives_depth)
    else:
        _, ranked = bm25.search(questions, min(cfg.negatives_depth, len(corpus)))
        pools = negative_pools(rows, ranked, corpus)
        gold = [r["gold_passage_ids"][0] for r in rows]
        train_texts = {pid: t[0] for pid, t in texts.items()}
    lists = [[g, *pool] for g, pool in zip(gold, pools, strict=True)]
    return CandidateBatches(gold, pools, pair_lengths(model, questions, lists, train_texts),
                            cfg.train_candidates, cfg.batch_questions, seed), train_texts


def make_loss_fn(model: Reranker, questions: Sequence[str], texts: Mapping[str, str],
                 batches: CandidateBatches, amp: torch.dtype | None
                 ) -> Callable[[int], tuple[torch.Tensor, int]]:
    """loss_fn(micro_batch_index) for trainer.train_loop; the batch is fixed by the index."""

    def loss_fn(i: int) -> tuple[torch.Tensor, int]:
        everyone = batches(i)
        batch = distributed.shard(everyone)  # under torchrun: this rank's questions
        n = max(len(c) for _, c in batch)
        rows = [r for r, (_, c) in enumerate(batch) for _ in c]
        cols = [j for _, c in batch for j in range(len(c))]
        with runtime.autocast(amp):
            logits = model.forward_pairs([questions[q] for q, c in batch for _ in c],
                                         [texts[p] for _, c in batch for p in c])  # (pairs,)
        index = (torch.tensor(rows), torch.tensor(cols))
        scores = logits.new_zeros((len(batch), n)).index_put(index, logits)  # (Q, N)
        mask = torch.ones((len(batch), n), dtype=torch.bool).index_put(
            index, torch.tensor(False))  # True: no candidate in that slot
        targets = torch.zeros(len(batch), dtype=torch.long)  # the gold is column 0
        return listwise_softmax_ce(scores, targets.to(scores.device), mask.to(scores.device)), \
            int(distributed.weight(len(everyone), len(batch)))

    return loss_fn


def dev_evaluator(model: Reranker, rows: Sequence[Mapping[str, Any]], bm25: Any,
                  texts: Mapping[str, PassageText], cfg: RerankerConfig, *, bf16: bool
                  ) -> Callable[[], dict[str, float]]:
    """evaluate() -> dev metrics of the reranked BM25 top ``candidates``: ``dev/recall_at_1``
    (fused as configured: what is selected on), ``dev/alone/recall_at_1`` (the reranker alone)
    and ``dev/first_stage/recall_at_1`` (BM25)."""
    questions = [r["question"] for r in rows]
    gold = [r["gold_passage_ids"] for r in rows]
    k = min(cfg.candidates, len(texts))
    first, ids = bm25.search(questions, k)
    cutoff = min(10, k)
    base, _ = evaluate_retrieval(ids, gold, ks=(1,), rank_cutoff=cutoff, split="dev")

    def evaluate() -> dict[str, float]:
        r = model.score(questions, [[texts[p] for p in row] for row in ids],
                        batch_size=cfg.eval_batch_size, bf16=bf16)
        m, _ = evaluate_retrieval(apply_fusion(r, first, ids, cfg.fuse_weight)[1], gold,
                                  ks=(1,), rank_cutoff=cutoff, split="dev")
        alone, _ = evaluate_retrieval(apply_fusion(r, first, ids, 1.0)[1], gold, ks=(1,),
                                      rank_cutoff=cutoff, split="dev")
        return {"dev/recall_at_1": m["dev/recall_at_1"],
                f"dev/mrr_at_{cutoff}": m[f"dev/mrr_at_{cutoff}"],
                "dev/alone/recall_at_1": alone["dev/recall_at_1"],
                "dev/first_stage/recall_at_1": base["dev/recall_at_1"]}

    return evaluate


def total_steps(n_questions: int, cfg: RerankerConfig) -> int:
    per_epoch = math.ceil(math.ceil(n_questions / cfg.batch_questions) / cfg.grad_accum_steps)
    return cfg.max_steps or cfg.epochs * per_epoch


def train_reranker(
    model: Reranker,
    corpus: Corpus,
    train_rows: Sequence[Mapping[str, Any]],
    dev_rows: Sequence[Mapping[str, Any]],
    cfg: RerankerConfig,
    *,
    bm25: Any,
    seed: int,
    ckpt_dir: Path,
    resume: bool = False,
    on_step: Callable[[int, Mapping[str, float]], None] | None = None,
    progress: bool = True,
    signature_parts: Sequence[str] = (),
) -> trainer.TrainState:
    """Train ``model`` in place on BM25 candidates (``bm25.search(questions, k)``); it ends
    holding the best dev weights (or the last ones without dev questions)."""
    trainer.seed_everything(seed)
    rows = labelled(train_rows)
    if not rows:
        raise DataError("train_reranker: no training question has a gold passage")
    texts = passage_texts(corpus, model.spec)  # what dev reranking reads of each passage
    questions = [r["question"] for r in rows]
    batches, train_texts = training_batches(model, corpus, rows, cfg, texts, bm25=bm25, seed=seed)
    amp = runtime.amp_dtype(cfg.precision)  # training autocast: bf16, fp16 (loss scaled) or none
    dev = labelled(dev_rows)
    if cfg.dev_questions and len(dev) > cfg.dev_questions:
        pick = np.random.default_rng(seed).choice(len(dev), cfg.dev_questions, replace=False)
        dev = [dev[i] for i in sorted(pick.tolist())]
    evaluate = (dev_evaluator(model, dev, bm25, texts, cfg, bf16=amp == torch.bfloat16)
                if dev else None)
    signature = run_signature(cfg, seed, model.fingerprint(), *signature_parts)
    resumed = trainer.prepare_ckpt_dir(ckpt_dir, signature, resume)
    loop = trainer.LoopConfig(
        total_steps=total_steps(len(rows), cfg), lr=cfg.lr, weight_decay=cfg.weight_decay,
        warmup_ratio=cfg.warmup_ratio, grad_clip=cfg.grad_clip,
        grad_accum_steps=cfg.grad_accum_steps, checkpoint_every=cfg.checkpoint_every,
        eval_every=cfg.eval_every, patience=cfg.early_stopping_patience, seed=seed,
        progress=progress, fp16=amp == torch.float16)
    opt = trainer.build_optimizer(model, cfg.lr, cfg.weight_decay,
                                  {p: cfg.head_lr for p in model.new_params})
    return trainer.train_loop(
        model, make_loss_fn(model, questions, train_texts, batches, amp), loop, ckpt_dir=ckpt_dir,
        signature=signature, resume=resumed, evaluate=evaluate,
        select_metric="dev/recall_at_1", on_step=on_step, optimizer=opt)
