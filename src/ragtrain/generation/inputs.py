"""Generator inputs: the copy model's source with its token-to-passage map, and the prompt of the
seq2seq / causal kinds.

Passages share the source token budget fairly (``fair_shares``): a short passage leaves its unused
share to the others; each passage is cut from its end.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ragtrain.data.corpus import Passage
from ragtrain.generation.generator import GeneratorError


def fair_shares(lengths: Sequence[int], budget: int) -> list[int]:
    """Split ``budget`` tokens among passages of ``lengths``: equal shares, a short passage's
    unused share going to the others (water-filling). Sum <= budget; share_i <= lengths_i."""
    shares = [0] * len(lengths)
    remaining = max(0, budget)
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    for rank, i in enumerate(order):
        give = min(lengths[i], remaining // (len(order) - rank))
        shares[i] = give
        remaining -= give
    return shares


@dataclass
class CopySource:
    """One encoded copy-model input, with what is needed to map tokens back to passage text."""

    ids: list[int]
    copyable: list[bool]  # passage tokens (what the copy head may point at)
    spans: list[tuple[int, int, int]]  # per token: (passage index, char start, char end) or -1
    texts: list[str]  # the passages' texts
    kept_chars: list[int]  # per passage: characters kept after truncation
    question_cut: bool = False


def word_ends(src: CopySource) -> list[bool]:
    """Per source position: may a copied span end there? Not inside a word: where the next
    token of the same passage continues it (no gap between them, letters or digits on both
    sides), as "homeschool" + "##ing" or "1990" + "##s"; before punctuation it may."""
    out = []
    for i, (p, _, t) in enumerate(src.spans):
        q, s2, _ = src.spans[i + 1] if i + 1 < len(src.spans) else (-1, 0, 0)
        text = src.texts[p] if p >= 0 else ""
        inside = (p >= 0 and q == p and s2 == t and 0 < t < len(text)
                  and text[t - 1].isalnum() and text[t].isalnum())
        out.append(not inside)
    return out


def clean_title(title: str) -> str:
    """The title as prompt text: underscores (SQuAD article names) become spaces."""
    return title.replace("_", " ").strip()


def build_copy_source(tok: Any, question: str, passages: Sequence[Passage], max_source: int,
                      max_question: int) -> CopySource:
    """``[CLS] question [SEP] p1 [SEP] p2 [SEP] ...`` within ``max_source`` tokens."""
    # whole texts first, cut below (verbose=False: no "longer than the maximum" warning)
    q = tok(question, add_special_tokens=False, verbose=False)["input_ids"]
    question_cut = len(q) > max_question
    q = q[:max_question]
    enc = [tok(p.text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
           for p in passages]
    budget = max_source - len(q) - 2 - len(passages)
    if budget < len(passages):
        raise GeneratorError(
            f"generator.max_source_tokens ({max_source}) leaves no room for {len(passages)} "
            f"passages after a {len(q)}-token question; raise it or lower generator.top_k")
    shares = fair_shares([len(e["input_ids"]) for e in enc], budget)
    ids = [tok.cls_token_id, *q, tok.sep_token_id]
    copyable = [False] * len(ids)
    spans: list[tuple[int, int, int]] = [(-1, 0, 0)] * len(ids)
    kept: list[int] = []
    for p, (e, n) in enumerate(zip(enc, shares, strict=True)):
        ids += e["input_ids"][:n]
        copyable += [True] * n
        offs = e["offset_mapping"][:n]
        spans += [(p, s, t) for s, t in offs]
        kept.append(offs[-1][1] if n else 0)
        ids.append(tok.sep_token_id)
        copyable.append(False)
        spans.append((-1, 0, 0))
    return CopySource(ids, copyable, spans, [psg.text for psg in passages], kept, question_cut)


def holds_answer(text: str, answer: str) -> bool:
    """Whether ``text`` holds the answer's text, case-insensitive: where the copy model can copy
    it from (``copy_target``'s search), not evaluation's token-level ``answer_in_passage``."""
    return answer.lower() in text.lower()


def copy_target(src: CopySource, answer: str, tok: Any) -> list[int]:
    """The answer's token ids: the passage tokens covering its first occurrence in the kept part
    of a passage (so it can be copied exactly), else the answer tokenized alone."""
    for p, text in enumerate(src.texts):
        for hay, needle in ((text, answer), (text.lower(), answer.lower())):
            start = hay.find(needle)
            if start < 0 or start + len(needle) > src.kept_chars[p]:
                continue
            end = start + len(needle)
            pos = [i for i, (pi, s, t) in enumerate(src.spans) if pi == p and s < end and t > start]
            if pos:
                return [src.ids[i] for i in pos]
    return tok(answer, add_special_tokens=False)["input_ids"]


def render_prompt(template: str, question: str, passages: Sequence[Passage], tok: Any,
                  max_source: int, max_question: int) -> tuple[str, bool]:
    """The seq2seq / causal prompt: passages cut to fair shares of the budget left by the
    question and the template's own tokens."""
    q_ids = tok(question, add_special_tokens=False)["input_ids"]
    question_cut = len(q_ids) > max_question
    if question_cut:
        question = tok.decode(q_ids[:max_question])
    bare = template.format(question=question, context="")
    overhead = len(tok(bare)["input_ids"]) + 4 * len(passages)
    texts = [f"{clean_title(p.title)}: {p.text}" if p.title else p.text for p in passages]
    enc = [tok(x, add_special_tokens=False, return_offsets_mapping=True) for x in texts]
    shares = fair_shares([len(e["input_ids"]) for e in enc], max_source - overhead)
    parts = []
    for full, e, n in zip(texts, enc, shares, strict=True):
        if n < len(e["input_ids"]):
            full = full[: e["offset_mapping"][n - 1][1]] if n else ""
        parts.append(full)
    return template.format(question=question, context="\n\n".join(parts)), question_cut
