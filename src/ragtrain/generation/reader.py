"""An extractive span reader: a baseline reported beside the generator, never as the generator.

``AutoModelForQuestionAnswering`` on the same warm start (the bundled MiniLM by default) scores
every passage token as an answer start and end; the answer is the best-scoring span of at most
``max_answer_tokens`` tokens inside the passage, cut from the passage text by the tokenizer's
offsets. Trained SQuAD-style on (question, gold passage, answer) with the answer located in the
passage (the prepared data keeps answer strings, not offsets: the first occurrence is taken).
Passages longer than ``max_length`` are read in overlapping windows (``stride`` tokens shared),
and the best span over the windows wins.

It shows how far a model that only points into the passage gets in comparable training time: the
ceiling the copy generator approaches (see BENCHMARKS.md, ``bench/reader.py``).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ragtrain import runtime
from ragtrain.data.corpus import Passage
from ragtrain.evaluation.answers import score_answers
from ragtrain.generation.training import length_grouped
from ragtrain.models import model_load_error, resolve_model_path
from ragtrain.trainer import LoopConfig, TrainState, build_optimizer, train_loop


@dataclass(frozen=True)
class ReaderConfig:
    model_name: str = "all-MiniLM-L6-v2"
    max_length: int = 384  # question + passage window, tokens
    stride: int = 128  # tokens shared by consecutive windows of a long passage
    max_answer_tokens: int = 30
    batch_size: int = 16
    lr: float = 1.0e-4
    new_params_lr: float = 1.0e-3  # the span head (not in the warm start)
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    epochs: int = 2
    max_steps: int = 0  # 0 = epochs decide
    precision: str = "auto"


def locate_answer(passage: str, answers: Sequence[str]) -> tuple[int, int] | None:
    """Character span of the first reference found in the passage (exact, then ignoring case
    and runs of whitespace); None when no reference occurs."""
    for a in answers:
        a = a.strip()
        if a and (i := passage.find(a)) >= 0:
            return i, i + len(a)
    for a in answers:
        words = a.split()
        if not words:
            continue
        m = re.search(r"\s+".join(map(re.escape, words)), passage, flags=re.IGNORECASE)
        if m:
            return m.start(), m.end()
    return None


def best_span(start: torch.Tensor, end: torch.Tensor, context: torch.Tensor, max_tokens: int
              ) -> tuple[int, int, float]:
    """The (i, j) with i <= j < i + max_tokens, both context tokens, maximising start[i] + end[j]
    (1-D logits of one window); (-1, -1, -inf) when the window has no context token."""
    n = start.shape[0]
    idx = torch.arange(n)
    ok = (idx[None, :] >= idx[:, None]) & (idx[None, :] < idx[:, None] + max_tokens)
    ok &= context[:, None] & context[None, :]
    if not bool(ok.any()):
        return -1, -1, float("-inf")
    scores = (start.float()[:, None] + end.float()[None, :]).masked_fill(~ok, float("-inf"))
    flat = int(scores.argmax())
    return flat // n, flat % n, float(scores.view(-1)[flat])


class Reader:
    """The span model and its tokenizer (a fast tokenizer: offsets map tokens to characters)."""

    def __init__(self, cfg: ReaderConfig, model: nn.Module, tok: Any) -> None:
        if not getattr(tok, "is_fast", False):
            raise ValueError(f"reader model {cfg.model_name!r}: needs a fast tokenizer (offsets)")
        self.cfg, self.model, self.tok = cfg, model, tok

    @classmethod
    def from_pretrained(cls, cfg: ReaderConfig) -> Reader:
        from transformers import AutoModelForQuestionAnswering, AutoTokenizer

        path = resolve_model_path(cfg.model_name)
        try:
            tok = AutoTokenizer.from_pretrained(path)
            # attention dropout off, as for the copy generator (SDPA keeps its fast path)
            model = AutoModelForQuestionAnswering.from_pretrained(
                path, attention_probs_dropout_prob=0.0)
        except OSError as e:
            raise model_load_error(cfg.model_name, e) from None
        return cls(cfg, model, tok)

    def new_param_prefixes(self) -> tuple[str, ...]:
        return ("qa_outputs.",)

    # ------------------------------------------------------------------ features

    def windows(self, question: str, text: str) -> Any:
        """Tokenised (question, passage) windows with offsets and the context-token mask."""
        return self.tok(question, text, truncation="only_second", max_length=self.cfg.max_length,
                        stride=self.cfg.stride, return_overflowing_tokens=True,
                        return_offsets_mapping=True, padding=False)

    def features(self, question: str, text: str
                 ) -> list[tuple[dict[str, Any], list[tuple[int, int]], list[bool]]]:
        """Per window: the model inputs, the token offsets and which tokens are passage text."""
        enc = self.windows(question, text)
        types = enc["token_type_ids"] if "token_type_ids" in enc else None
        return [({"input_ids": enc["input_ids"][w],
                  "token_type_ids": types[w] if types is not None else None},
                 enc["offset_mapping"][w], [s == 1 for s in enc.sequence_ids(w)])
                for w in range(len(enc["input_ids"]))]

    def train_features(self, question: str, text: str, answers: Sequence[str]
                       ) -> list[dict[str, Any]]:
        """One feature per window; start/end = the answer's tokens, or 0 ([CLS]) when the answer
        is not inside that window. No feature when no reference occurs in the passage."""
        span = locate_answer(text, answers)
        if span is None:
            return []
        c0, c1 = span
        out = []
        for inputs, offs, is_ctx in self.features(question, text):
            ctx = [k for k, c in enumerate(is_ctx) if c]
            s_tok = e_tok = 0
            if ctx and offs[ctx[0]][0] <= c0 and offs[ctx[-1]][1] >= c1:
                s_tok = next(k for k in ctx if offs[k][1] > c0)
                e_tok = next(k for k in reversed(ctx) if offs[k][0] < c1)
            out.append({**inputs, "start": s_tok, "end": e_tok})
        return out

    def collate(self, feats: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        n = max(len(f["input_ids"]) for f in feats)
        pad = self.tok.pad_token_id or 0
        ids = torch.full((len(feats), n), pad, dtype=torch.long)
        mask = torch.zeros((len(feats), n), dtype=torch.long)
        types = torch.zeros((len(feats), n), dtype=torch.long)
        for i, f in enumerate(feats):
            k = len(f["input_ids"])
            ids[i, :k] = torch.tensor(f["input_ids"])
            mask[i, :k] = 1
            if f.get("token_type_ids") is not None:
                types[i, :k] = torch.tensor(f["token_type_ids"])
        batch = {"input_ids": ids, "attention_mask": mask}
        if feats[0].get("token_type_ids") is not None:
            batch["token_type_ids"] = types
        if "start" in feats[0]:
            batch["start_positions"] = torch.tensor([f["start"] for f in feats])
            batch["end_positions"] = torch.tensor([f["end"] for f in feats])
        return batch

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean of the start and end token cross-entropies (as BertForQuestionAnswering)."""
        return self.model(**batch).loss

    # ------------------------------------------------------------------ answering

    @torch.no_grad()
    def answer(self, questions: Sequence[str], passages: Sequence[Sequence[str]], *,
               batch_size: int = 32, bf16: bool = False) -> list[str]:
        """The best span over each question's passages ('' when they are all empty)."""
        self.model.eval()
        feats: list[tuple[int, str, dict[str, Any], list[tuple[int, int]], list[bool]]] = []
        for qi, (q, texts) in enumerate(zip(questions, passages, strict=True)):
            for text in texts:
                feats += [(qi, text, *f) for f in self.features(q, text)]
        best: list[tuple[float, str]] = [(float("-inf"), "")] * len(questions)
        order = sorted(range(len(feats)), key=lambda i: len(feats[i][2]["input_ids"]))
        for b in range(0, len(order), batch_size):
            chunk = [feats[i] for i in order[b:b + batch_size]]
            with runtime.autocast(bf16):
                out = self.model(**self.collate([f[2] for f in chunk]))
            for row, (qi, text, _, offs, ctx) in enumerate(chunk):
                n = len(ctx)
                i, j, s = best_span(out.start_logits[row, :n], out.end_logits[row, :n],
                                    torch.tensor(ctx), self.cfg.max_answer_tokens)
                if i >= 0 and s > best[qi][0]:
                    best[qi] = (s, text[offs[i][0]:offs[j][1]])
        return [a.strip() for _, a in best]


def train_reader(reader: Reader, rows: Sequence[Mapping[str, Any]],
                 corpus: Mapping[str, Passage], *, seed: int, ckpt_dir: Path,
                 on_step: Callable[[int, Mapping[str, float]], None] | None = None,
                 progress: bool = True) -> TrainState:
    """Fine-tune on (question, gold passage, answer) features; the data order is fixed by the
    seed. Questions whose answers do not occur in the gold passage are skipped."""
    cfg = reader.cfg
    feats = [f for r in rows if r.get("gold_passage_ids")
             for f in reader.train_features(r["question"], corpus[r["gold_passage_ids"][0]].text,
                                            r.get("answers") or [])]
    if not feats:
        raise ValueError("no training feature: no reference answer occurs in a gold passage")
    bs = cfg.batch_size
    amp = runtime.amp_dtype(cfg.precision)
    per_epoch = max(1, len(feats) // bs)
    total = cfg.max_steps or per_epoch * cfg.epochs
    epochs: dict[int, list[dict[str, Any]]] = {}

    def loss_fn(micro: int) -> tuple[torch.Tensor, int]:
        e, b = divmod(micro, per_epoch)
        if e not in epochs:  # shuffled by the seed and the epoch, length-grouped batches
            epochs.clear()
            rng = random.Random(seed * 7919 + e)
            order = list(range(len(feats)))
            rng.shuffle(order)
            epochs[e] = length_grouped([feats[k] for k in order], bs, rng,
                                       length=lambda f: len(f["input_ids"]))
        chunk = epochs[e][b * bs:(b + 1) * bs]
        with runtime.autocast(amp):
            return reader.loss(reader.collate(chunk)), len(chunk)

    reader.model.train()
    loop = LoopConfig(total_steps=total, lr=cfg.lr, weight_decay=cfg.weight_decay,
                      warmup_ratio=cfg.warmup_ratio, checkpoint_every=10**9, seed=seed,
                      progress=progress, fp16=amp == torch.float16)
    opt = build_optimizer(reader.model, cfg.lr, cfg.weight_decay,
                          {p: cfg.new_params_lr for p in reader.new_param_prefixes()})
    return train_loop(reader.model, loss_fn, loop, ckpt_dir=ckpt_dir, signature="reader",
                      resume=False, on_step=on_step, optimizer=opt)


def evaluate_reader(reader: Reader, questions: Sequence[str], passages: Sequence[Sequence[str]],
                    references: Sequence[Sequence[str]], *, prefix: str, bf16: bool
                    ) -> tuple[dict[str, float], list[str]]:
    preds = reader.answer(questions, passages, bf16=bf16)
    return {f"{prefix}/{k}": v for k, v in score_answers(preds, references).items()}, preds
