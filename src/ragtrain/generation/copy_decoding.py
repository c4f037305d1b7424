"""Decoding for the ``copy`` generator: greedy and beam search, KV-cached.

``constrained`` decoding may only start a passage span, extend it or stop where a word ends, so
a step needs the probability of those few tokens, not of the whole vocabulary. ``SpanScores``
gives log p of the token at each source position and of the end token, by the same mixture as
``CopyGenerator.next_from_states``: the vocabulary part needs only the log-softmax normaliser
(one logsumexp over the LM head's logits), and the copy part sums the attention over the
positions that hold the same token. So a step costs (rows x source) work, not a dozen passes over
(rows x 30,522) arrays (``BENCHMARKS.md``: decoding). ``greedy`` decoding (unconstrained) still
takes the whole distribution.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from ragtrain.generation.generator import Prediction

if TYPE_CHECKING:
    from ragtrain.generation.copy import CopyBackend, CopyGenerator


class SpanScores:
    """Per source row: log p(next token) at every source position (the token found there) and
    of the end token, from the last target state."""

    def __init__(self, model: CopyGenerator, hs: torch.Tensor, src: torch.Tensor,
                 copyable: torch.Tensor, eos: int) -> None:
        self.model, self.hs, self.src, self.copyable, self.eos = model, hs, src, copyable, eos
        self.keys = model.copy_k(hs)  # the copy head's source keys: once, not at every step
        # each position's group: the first position holding the same token
        self.group = (src[:, :, None] == src[:, None, :]).byte().argmax(-1)
        self.pos = torch.arange(src.shape[1], device=src.device)
        # (R,S+1): the token each candidate column stands for (the positions', then the end)
        self.tokens = torch.cat([src, torch.full_like(src[:, :1], eos)], 1)

    def repeat(self, k: int) -> None:
        """Each row repeated ``k`` times in place (beam search's hypotheses)."""
        self.hs, self.src, self.copyable, self.keys, self.group, self.tokens = (
            x.repeat_interleave(k, 0) for x in (self.hs, self.src, self.copyable, self.keys,
                                                 self.group, self.tokens))

    def __call__(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(R,S) log p of the token at each source position and (R,) log p(end) given the
        target state ``h`` (R,1,H): ``next_from_states(...)`` gathered at ``src`` and ``eos``."""
        m = self.model
        logits = m.vocab_logits(h)[:, 0]
        lse = torch.logsumexp(logits.float(), -1, keepdim=True)
        log_pv = torch.cat([logits.gather(1, self.src), logits[:, self.eos, None]], 1).float() - lse
        log_a, lg, lng = m.copy_parts(self.hs, h, self.copyable, self.keys)
        a = (log_a[:, 0].exp() * self.copyable).float()
        p_copy = torch.zeros_like(a).scatter_add_(1, self.group, a).gather(1, self.group)
        p_copy = torch.cat([p_copy, (a * (self.src == self.eos)).sum(1, keepdim=True)], 1)
        lp = m.mix(log_pv, p_copy, lg, lng)
        return lp[:, :-1], lp[:, -1]

    def candidates(self, lp: torch.Tensor, lp_end: torch.Tensor, nxt: torch.Tensor,
                   end_ok: torch.Tensor) -> torch.Tensor:
        """(R,S+1) scores of the allowed next tokens: each token once (at the first position of
        ``nxt`` that holds it), the end token last; -inf elsewhere."""
        n = self.pos.shape[0]
        first = torch.full_like(self.group, n).scatter_reduce_(
            1, self.group, torch.where(nxt, self.pos, n), "amin")
        keep = nxt & (first.gather(1, self.group) == self.pos)
        return torch.cat([lp.masked_fill(~keep, -math.inf),
                          lp_end.masked_fill(~end_ok, -math.inf)[:, None]], 1)


def greedy(g: CopyBackend, chunk: list[dict[str, Any]], decoding: str) -> list[Prediction]:
    """One answer per source, the most likely token at each step (``constrained``: among
    those that extend a passage span or end it at a word's end)."""
    model, eos, longest = g.model, g.tok.sep_token_id, g.spec.max_answer_tokens
    srcs, batch, can_end, (hs, h, cache) = g.start_decoding(chunk)
    b, src, copyable, dev = len(srcs), batch["src"], batch["copyable"], batch["src"].device
    spans = SpanScores(model, hs, src, copyable, eos) if decoding == "constrained" else None
    keys = model.copy_k(hs) if spans is None else spans.keys  # once, not at every step
    done = torch.zeros(b, dtype=torch.bool, device=dev)
    logp_sum, n_tok = torch.zeros(b, device=dev), torch.zeros(b, device=dev)
    cand = torch.zeros_like(copyable)  # (B,S): positions where the current span ends
    out_tokens: list[list[int]] = [[] for _ in range(b)]
    y = torch.zeros(b, dtype=torch.long, device=dev)
    for step in range(longest + 1):
        if step:
            h, cache = model.step(y, cache, batch["src_mask"], step)
        if spans is not None:  # constrained
            if step == 0:
                nxt, end_ok = copyable, torch.zeros_like(done)
            else:  # extend the span; stop only where it may end (never inside a word)
                nxt = torch.zeros_like(cand)
                nxt[:, 1:] = cand[:, :-1] & copyable[:, 1:]
                end_ok = (cand & can_end).any(1)
            if step == longest:
                nxt, end_ok = torch.zeros_like(nxt), torch.ones_like(done)
            lp, lp_end = spans(h)
            if step == 0:
                null = lp_end.float()
            scores = spans.candidates(lp, lp_end, nxt, end_ok)
            y_lp, col = scores.max(-1)
            y = spans.tokens.gather(1, col[:, None]).squeeze(1)
        else:
            lp = model.next_from_states(hs, h, src, copyable, keys).float()
            if step == 0:
                null = lp[:, eos]
            if step == longest:
                lp = torch.full_like(lp, -math.inf)
                lp[:, eos] = 0.0
            y = lp.argmax(-1)
            y_lp = lp.gather(1, y[:, None]).squeeze(1)
        for i in range(b):
            if done[i]:
                continue
            if y[i].item() == eos:
                done[i] = True
            else:
                out_tokens[i].append(int(y[i]))
            logp_sum[i] += y_lp[i]
            n_tok[i] += 1
        if decoding == "constrained":
            cand = nxt & (src == y[:, None]) & ~done[:, None] | (cand & done[:, None])
        if bool(done.all()):
            break
    preds = []
    for i, s in enumerate(srcs):
        text, passage = g.copy_text(s, out_tokens[i], cand[i] if decoding == "constrained"
                                    else None)
        preds.append(Prediction(text, float(logp_sum[i] / n_tok[i].clamp(min=1)), passage,
                                s.question_cut, float(null[i])))
    return preds


def beam(g: CopyBackend, chunk: list[dict[str, Any]], k: int) -> list[Prediction]:
    """Constrained beam search: ``k`` passage-span hypotheses per source; the finished one
    with the best mean token log-prob (EOS counted, as greedy scores) is kept. A source
    stops once no live one can beat it: at best an extension scores sum / (longest + 1)."""
    model, eos = g.model, g.tok.sep_token_id
    srcs, batch, can_end, (hs, h, cache) = g.start_decoding(chunk)
    b, longest = len(srcs), g.spec.max_answer_tokens
    src, copyable, src_mask = batch["src"], batch["copyable"], batch["src_mask"]
    spans = SpanScores(model, hs, src, copyable, eos)
    lp0, null = spans(h)  # null: log p(end) first, the empty answer (never decoded)
    first = spans.candidates(lp0, null, copyable, torch.zeros_like(copyable[:, 0]))[:, :-1]
    if first.shape[1] < k:  # fewer positions than beams: the rest are dead fillers
        first = torch.cat([first, first.new_full((b, k - first.shape[1]), -math.inf)], 1)
    first_lp, at = first.topk(k, -1)
    first_tok = src.gather(1, at.clamp(max=src.shape[1] - 1))
    spans.repeat(k)
    src, copyable, src_mask, can_end = (x.repeat_interleave(k, 0)
                                        for x in (src, copyable, src_mask, can_end))
    cache.batch_repeat_interleave(k)
    y, score = first_tok.flatten(), first_lp.flatten()
    toks: list[list[int]] = [[int(t)] for t in y]
    ends = copyable & (src == y[:, None])  # per hypothesis: where its span may end now
    best: list[tuple[float, list[int], torch.Tensor] | None] = [None] * b
    width = src.shape[1] + 1  # candidate columns per hypothesis: the positions and the end
    for step in range(1, longest + 1):
        h, cache = model.step(y, cache, src_mask, step)
        nxt = torch.zeros_like(ends)
        if step < longest:
            nxt[:, 1:] = ends[:, :-1] & copyable[:, 1:]
        end_ok = (ends & can_end).any(1) | (step == longest)
        total = (score[:, None] + spans.candidates(*spans(h), nxt, end_ok)).view(b, -1)
        top, idx = total.topk(2 * k, -1)
        cand_tok = spans.tokens.view(b, -1).gather(1, idx)
        rows, ys, scores = [], [], []
        for i in range(b):
            alive: list[tuple[int, int, float]] = []
            for rank, (sc, j, t) in enumerate(zip(top[i].tolist(), idx[i].tolist(),
                                                  cand_tok[i].tolist(), strict=True)):
                if sc == -math.inf or (len(alive) == k and rank >= k):
                    break
                row = i * k + j // width
                if t != eos:
                    if len(alive) < k:
                        alive.append((row, t, sc))
                elif rank < k:  # a finished hypothesis among the k best
                    mean = sc / (len(toks[row]) + 1)
                    if best[i] is None or mean > best[i][0]:  # type: ignore[index]
                        best[i] = (mean, toks[row], ends[row].clone())
            found = best[i]
            if found is not None and all(a[2] / (longest + 1) <= found[0] for a in alive):
                alive = []  # no extension can beat the best finished answer
            # a hypothesis keeps its parent's slot where it can, so the key/value cache is
            # only reordered when a beam branches; free slots hold dead fillers
            slots: list[tuple[int, int, float] | None] = [None] * k
            later = []
            for a in alive:
                if slots[a[0] - i * k] is None:
                    slots[a[0] - i * k] = a
                else:
                    later.append(a)
            for j in (j for j in range(k) if slots[j] is None):
                slots[j] = later.pop() if later else (i * k + j, eos, -math.inf)
            rows += [a[0] for a in slots]  # type: ignore[index]
            ys += [a[1] for a in slots]  # type: ignore[index]
            scores += [a[2] for a in slots]  # type: ignore[index]
        score = torch.tensor(scores, device=src.device)
        if bool((score == -math.inf).all()):
            break
        y = torch.tensor(ys, device=src.device)
        if rows != list(range(b * k)):
            cache.reorder_cache(torch.tensor(rows, device=src.device))
        ends = nxt[rows] & (src[rows] == y[:, None])
        toks = [toks[r] + [t] for r, t in zip(rows, ys, strict=True)]
    preds = []
    for s, found, nl in zip(srcs, best, null.tolist(), strict=True):  # None: no passage token
        text, passage = g.copy_text(s, found[1], found[2]) if found else ("", -1)
        preds.append(Prediction(text, found[0] if found else -math.inf, passage,
                                s.question_cut, float(nl)))
    return preds
