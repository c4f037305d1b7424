"""Answer generators: the question and retrieved passages in, an answer out.

Three kinds behind one interface (``Generator``):

- ``copy`` (the offline default): a BERT-style encoder warm start (the bundled all-MiniLM-L6-v2)
  used as one prefix-LM — the source ``[CLS] question [SEP] passage [SEP] passage [SEP]`` is read
  bidirectionally, the answer is written causally after it — with a copy (pointer) head: a gate
  mixes the vocabulary distribution with attention over the passage tokens,
  ``p(y) = g·p_vocab(y) + (1-g)·Σ_{s: x_s = y} a_s``; the loss is ``-Σ log p(y_i | x, y_<i)``.
  Decoding is greedy; ``constrained`` decoding may only extend a contiguous passage span or stop,
  and the answer is the passage's own text for that span (no WordPiece detokenisation artifacts).
- ``seq2seq``: any ``AutoModelForSeq2SeqLM`` (T5, BART), prompt from ``template``.
- ``causal``: any ``AutoModelForCausalLM``; the loss is masked to the answer tokens; the model's
  chat template wraps the prompt when it has one.

Passages share the source token budget fairly (``fair_shares``): a short passage leaves its unused
share to the others; each passage is cut from its end.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ragtrain import runtime
from ragtrain.config import GeneratorConfig
from ragtrain.errors import RagtrainError
from ragtrain.io import atomic_path, atomic_write_json
from ragtrain.models import _hub_error, resolve_model_path

SPEC_FILE = "generator.json"
Passage = tuple[str, str]  # (title, text)


class GeneratorError(RagtrainError):
    """A generator checkpoint or input that cannot be used."""


# --------------------------------------------------------------------------- inputs


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


def clean_title(title: str) -> str:
    return title.replace("_", " ").strip()


def build_copy_source(tok: Any, question: str, passages: Sequence[Passage], max_source: int,
                      max_question: int) -> CopySource:
    """``[CLS] question [SEP] p1 [SEP] p2 [SEP] ...`` within ``max_source`` tokens."""
    # whole texts first, cut below (verbose=False: no "longer than the maximum" warning)
    q = tok(question, add_special_tokens=False, verbose=False)["input_ids"]
    question_cut = len(q) > max_question
    q = q[:max_question]
    enc = [tok(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
           for _, text in passages]
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
    return CopySource(ids, copyable, spans, [t for _, t in passages], kept, question_cut)


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
    enc = [tok(f"{clean_title(t)}: {x}" if t else x, add_special_tokens=False,
               return_offsets_mapping=True) for t, x in passages]
    shares = fair_shares([len(e["input_ids"]) for e in enc], max_source - overhead)
    parts = []
    for (t, x), e, n in zip(passages, enc, shares, strict=True):
        full = f"{clean_title(t)}: {x}" if t else x
        if n < len(e["input_ids"]):
            full = full[: e["offset_mapping"][n - 1][1]] if n else ""
        parts.append(full)
    return template.format(question=question, context="\n\n".join(parts)), question_cut


# --------------------------------------------------------------------------- the copy model


class CopyGenerator(nn.Module):
    """An encoder used as a prefix-LM, with an LM head tied to the word embeddings and a copy
    head (query / key projections and a gate) over the passage tokens."""

    NEW_PARAMS = ("transform.", "lm_bias", "copy_q.", "copy_k.", "gate.")

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        h = backbone.config.hidden_size
        self.backbone = backbone
        eps = getattr(backbone.config, "layer_norm_eps", 1e-12)
        self.transform = nn.Sequential(nn.Linear(h, h), nn.GELU(), nn.LayerNorm(h, eps=eps))
        self.lm_bias = nn.Parameter(torch.zeros(backbone.config.vocab_size))
        self.copy_q = nn.Linear(h, h)
        self.copy_k = nn.Linear(h, h)
        self.gate = nn.Linear(h, 1)

    @property
    def max_positions(self) -> int:
        return int(self.backbone.config.max_position_embeddings)

    def _forward(self, src: torch.Tensor, src_mask: torch.Tensor, tgt: torch.Tensor,
                 tgt_mask: torch.Tensor, **kw: Any) -> Any:
        b, s = src.shape
        t = tgt.shape[1]
        dev = src.device
        src_len = src_mask.sum(1)
        pos = torch.cat([torch.arange(s, device=dev).expand(b, s),
                         src_len[:, None] + torch.arange(t, device=dev)[None]], 1)
        types = torch.cat([torch.zeros_like(src), torch.ones_like(tgt)], 1)
        allow = torch.zeros(b, s + t, s + t, dtype=torch.bool, device=dev)
        allow[:, :, :s] = src_mask[:, None, :].bool()
        causal = torch.ones(t, t, dtype=torch.bool, device=dev).tril()
        allow[:, s:, s:] = causal[None] & tgt_mask[:, None, :].bool()
        dtype = self.backbone.embeddings.word_embeddings.weight.dtype
        mask = torch.zeros(b, 1, s + t, s + t, dtype=dtype, device=dev)
        mask.masked_fill_(~allow[:, None], torch.finfo(dtype).min)
        return self.backbone(input_ids=torch.cat([src, tgt], 1), attention_mask=mask,
                             token_type_ids=types, position_ids=pos, **kw)

    def states(self, src: torch.Tensor, src_mask: torch.Tensor, tgt: torch.Tensor,
               tgt_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states of the source (B,S,H) and target (B,T,H) positions. Every position sees
        the non-pad source; target positions also see earlier target positions."""
        out = self._forward(src, src_mask, tgt, tgt_mask).last_hidden_state
        s = src.shape[1]
        return out[:, :s], out[:, s:]

    def start(self, src: torch.Tensor, src_mask: torch.Tensor, bos: int
              ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """Decoding: one pass over source + [BOS] filling the key/value cache; returns the
        source states, the BOS state (B,1,H) and the cache."""
        b, s = src.shape
        tgt = torch.full((b, 1), bos, device=src.device)
        self.backbone.config.is_decoder = True  # only so the backbone keeps a KV cache
        try:
            out = self._forward(src, src_mask, tgt, torch.ones_like(tgt), use_cache=True)
        finally:
            self.backbone.config.is_decoder = False
        h = out.last_hidden_state
        return h[:, :s], h[:, s:], out.cache

    def step(self, y: torch.Tensor, cache: Any, src_mask: torch.Tensor, t: int
             ) -> tuple[torch.Tensor, Any]:
        """Decoding: the state (B,1,H) of target token ``y`` (B,) at target position ``t``."""
        b, s = src_mask.shape
        dev = y.device
        pos = src_mask.sum(1)[:, None] + t
        allow = torch.cat([src_mask.bool(), torch.ones(b, t + 1, dtype=torch.bool, device=dev)],
                          1)
        dtype = self.backbone.embeddings.word_embeddings.weight.dtype
        mask = torch.zeros(b, 1, 1, s + t + 1, dtype=dtype, device=dev)
        mask.masked_fill_(~allow[:, None, None], torch.finfo(dtype).min)
        self.backbone.config.is_decoder = True
        try:
            out = self.backbone(input_ids=y[:, None], attention_mask=mask,
                                token_type_ids=torch.ones_like(y)[:, None], position_ids=pos,
                                cache=cache, use_cache=True)
        finally:
            self.backbone.config.is_decoder = False
        return out.last_hidden_state, out.cache

    def next_from_states(self, hs: torch.Tensor, h: torch.Tensor, src: torch.Tensor,
                         copyable: torch.Tensor) -> torch.Tensor:
        """log p(next token) over the vocabulary (B,V) from the last target state h (B,1,H)."""
        log_pv, log_a, lg, lng = self.parts(hs, h, copyable)
        a = (log_a[:, 0].exp() * copyable).float()
        p_copy = torch.zeros_like(log_pv[:, 0]).scatter_add_(1, src, a)
        p = lg.exp()[:, 0, None] * log_pv[:, 0].exp() + lng.exp()[:, 0, None] * p_copy
        return torch.log(p.clamp(min=1e-30))

    def parts(self, hs: torch.Tensor, ht: torch.Tensor, copyable: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """log p_vocab (B,T,V), log copy attention over source (B,T,S), log g, log (1-g)."""
        emb = self.backbone.embeddings.word_embeddings.weight
        logits = self.transform(ht) @ emb.t() + self.lm_bias
        log_pv = F.log_softmax(logits.float(), -1)
        scores = (self.copy_q(ht) @ self.copy_k(hs).transpose(1, 2)).float()
        scores = scores / math.sqrt(hs.shape[-1])
        scores = scores.masked_fill(~copyable[:, None, :], -1e4)  # finite: no NaN without copyables
        log_a = F.log_softmax(scores, -1)
        gate = self.gate(ht).float().squeeze(-1)
        return log_pv, log_a, F.logsigmoid(gate), F.logsigmoid(-gate)

    def token_log_probs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """log p(y_t | x, y_<t) of each target token (B,T)."""
        hs, ht = self.states(batch["src"], batch["src_mask"], batch["tgt_in"], batch["tgt_mask"])
        log_pv, log_a, lg, lng = self.parts(hs, ht, batch["copyable"])
        y = batch["tgt_out"]
        lv = log_pv.gather(-1, y[..., None]).squeeze(-1)
        match = (batch["src"][:, None, :] == y[:, :, None]) & batch["copyable"][:, None, :]
        lc = torch.logsumexp(log_a.masked_fill(~match, -math.inf), -1)
        return torch.logaddexp(lg + lv, lng + lc)

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        lp = self.token_log_probs(batch)
        m = batch["tgt_mask"].float()
        return -(lp * m).sum() / m.sum().clamp(min=1)


# --------------------------------------------------------------------------- one interface


@dataclass
class Example:
    question: str
    passages: list[Passage]
    answer: str = ""


@dataclass
class Prediction:
    answer: str
    score: float  # mean log-probability of the answer's tokens
    passage: int = -1  # the passage the answer was copied from (copy model), else -1
    question_cut: bool = False


@dataclass(frozen=True)
class GeneratorSpec:
    """What a saved generator needs to be rebuilt and fed the same inputs."""

    kind: str
    base_model: str
    max_source_tokens: int
    max_question_tokens: int
    max_answer_tokens: int
    template: str
    decoding: str
    tokenizer_sha256: str = ""
    gguf_file: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg: GeneratorConfig) -> GeneratorSpec:
        return cls(cfg.kind, cfg.model_name, cfg.max_source_tokens, cfg.max_question_tokens,
                   cfg.max_answer_tokens, cfg.template, cfg.decoding, gguf_file=cfg.gguf_file)


def tokenizer_sha256(tok: Any) -> str:
    """A fingerprint of the tokenizer's vocabulary (what binds it to a checkpoint)."""
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()


class Generator:
    """A generator of any kind: batches for training, a loss, answers, save / load."""

    def __init__(self, spec: GeneratorSpec, model: nn.Module, tok: Any) -> None:
        self.spec = spec
        self.model = model
        self.tok = tok
        n_tok, n_emb = len(tok), self._embedding_rows()
        if n_tok > n_emb:
            raise GeneratorError(
                f"generator checkpoint does not match its tokenizer: the tokenizer has {n_tok} "
                f"tokens, the model's embedding only {n_emb} rows")
        if spec.kind == "copy":
            need = spec.max_source_tokens + spec.max_answer_tokens + 1
            if need > model.max_positions:
                raise GeneratorError(
                    f"generator.max_source_tokens + max_answer_tokens + 1 = {need} exceeds the "
                    f"model's {model.max_positions} positions")
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token

    def _embedding_rows(self) -> int:
        if isinstance(self.model, CopyGenerator):
            return int(self.model.backbone.embeddings.word_embeddings.weight.shape[0])
        return int(self.model.get_input_embeddings().weight.shape[0])

    # ------------------------------------------------------------------ building

    @classmethod
    def from_pretrained(cls, cfg: GeneratorConfig) -> Generator:
        """Warm start from ``cfg.model_name`` (bundled MiniLM, a folder, or a hub name)."""
        from transformers import (
            AutoModel,
            AutoModelForCausalLM,
            AutoModelForSeq2SeqLM,
            AutoTokenizer,
        )

        path = resolve_model_path(cfg.model_name)
        kw: dict[str, Any] = {"gguf_file": cfg.gguf_file} if cfg.gguf_file else {}
        try:
            tok = AutoTokenizer.from_pretrained(path, **kw)
            if cfg.kind == "copy":
                # no attention-probability dropout: with it, SDPA falls back to the math path
                # and spends a third of a CPU step drawing the mask (hidden dropout stays)
                model: nn.Module = CopyGenerator(AutoModel.from_pretrained(
                    path, attention_probs_dropout_prob=0.0))
            elif cfg.kind == "seq2seq":
                model = AutoModelForSeq2SeqLM.from_pretrained(path, **kw)
            else:
                model = AutoModelForCausalLM.from_pretrained(path, **kw)
        except OSError as e:
            raise _hub_error(cfg.model_name, e) from None
        if cfg.kind == "copy" and (tok.cls_token_id is None or tok.sep_token_id is None):
            raise GeneratorError(f"generator.model_name {cfg.model_name!r}: the copy kind needs "
                                 "a BERT-style tokenizer with [CLS] and [SEP]")
        spec = GeneratorSpec.from_config(cfg)
        spec = GeneratorSpec(**{**asdict(spec), "tokenizer_sha256": tokenizer_sha256(tok)})
        return cls(spec, model, tok)

    def new_param_prefixes(self) -> tuple[str, ...]:
        return CopyGenerator.NEW_PARAMS if self.spec.kind == "copy" else ()

    def save(self, out: Path) -> None:
        """Weights as safetensors, the tokenizer, and ``generator.json`` (written atomically)."""
        from safetensors.torch import save_model

        with atomic_path(out) as tmp:
            tmp.mkdir()
            self.tok.save_pretrained(tmp / "tokenizer")
            if isinstance(self.model, CopyGenerator):
                self.model.backbone.config.save_pretrained(tmp / "backbone")
                save_model(self.model, str(tmp / "model.safetensors"))
            else:
                self.model.save_pretrained(tmp / "model", safe_serialization=True)
            atomic_write_json(tmp / SPEC_FILE, asdict(self.spec))

    @classmethod
    def load(cls, in_dir: Path) -> Generator:
        from safetensors.torch import load_model
        from transformers import (
            AutoConfig,
            AutoModel,
            AutoModelForCausalLM,
            AutoModelForSeq2SeqLM,
            AutoTokenizer,
        )

        spec_file = in_dir / SPEC_FILE
        if not spec_file.exists():
            raise GeneratorError(f"{spec_file}: missing; is {in_dir} a saved generator?")
        spec = GeneratorSpec(**json.loads(spec_file.read_text()))
        tok = AutoTokenizer.from_pretrained(in_dir / "tokenizer")
        if spec.tokenizer_sha256 and tokenizer_sha256(tok) != spec.tokenizer_sha256:
            raise GeneratorError(f"{in_dir}: generator checkpoint does not match its tokenizer "
                                 "(vocabulary fingerprint differs from the one saved with it)")
        if spec.kind == "copy":
            model: nn.Module = CopyGenerator(
                AutoModel.from_config(AutoConfig.from_pretrained(in_dir / "backbone")))
            try:
                load_model(model, str(in_dir / "model.safetensors"))
            except RuntimeError as e:
                raise GeneratorError(f"{in_dir}/model.safetensors: does not fit the saved "
                                     f"backbone config ({str(e).splitlines()[0]})") from None
        elif spec.kind == "seq2seq":
            model = AutoModelForSeq2SeqLM.from_pretrained(in_dir / "model")
        else:
            model = AutoModelForCausalLM.from_pretrained(in_dir / "model")
        model.eval()
        return cls(spec, model, tok)

    # ------------------------------------------------------------------ batches

    def encode(self, ex: Example, with_target: bool = True) -> dict[str, Any]:
        """One example as token ids (and its target), before padding."""
        s = self.spec
        if s.kind == "copy":
            src = build_copy_source(self.tok, ex.question, ex.passages, s.max_source_tokens,
                                    s.max_question_tokens)
            tgt = (copy_target(src, ex.answer, self.tok)[: s.max_answer_tokens]
                   if with_target else [])
            return {"src": src, "tgt": tgt}
        prompt, cut = render_prompt(s.template, ex.question, ex.passages, self.tok,
                                    s.max_source_tokens, s.max_question_tokens)
        if s.kind == "causal" and getattr(self.tok, "chat_template", None):
            prompt = self.tok.apply_chat_template([{"role": "user", "content": prompt}],
                                                  tokenize=False, add_generation_prompt=True)
            ids = self.tok(prompt, add_special_tokens=False)["input_ids"]
        else:
            ids = self.tok(prompt, add_special_tokens=s.kind == "seq2seq")["input_ids"]
        ids = ids[-s.max_source_tokens:] if s.kind == "causal" else ids[: s.max_source_tokens]
        ans = (self.tok(ex.answer, add_special_tokens=False)["input_ids"][: s.max_answer_tokens]
               if with_target else [])
        return {"ids": ids, "tgt": ans, "question_cut": cut}

    def collate(self, encoded: Sequence[dict[str, Any]], for_training: bool = True
                ) -> dict[str, torch.Tensor]:
        pad = self.tok.pad_token_id
        eos = self.tok.sep_token_id if self.spec.kind == "copy" else self.tok.eos_token_id
        if self.spec.kind == "copy":
            srcs = [e["src"] for e in encoded]
            s_len = max(len(x.ids) for x in srcs)
            tgts = [e["tgt"] for e in encoded]
            t_len = max(len(t) for t in tgts) + 1
            src = torch.full((len(srcs), s_len), pad)
            copyable = torch.zeros(len(srcs), s_len, dtype=torch.bool)
            src_mask = torch.zeros(len(srcs), s_len, dtype=torch.long)
            tgt_in = torch.full((len(srcs), t_len), pad)
            tgt_out = torch.full((len(srcs), t_len), pad)
            tgt_mask = torch.zeros(len(srcs), t_len, dtype=torch.long)
            for i, (x, t) in enumerate(zip(srcs, tgts, strict=True)):
                src[i, : len(x.ids)] = torch.tensor(x.ids)
                copyable[i, : len(x.ids)] = torch.tensor(x.copyable)
                src_mask[i, : len(x.ids)] = 1
                tgt_in[i, : len(t) + 1] = torch.tensor([self.tok.cls_token_id, *t])
                tgt_out[i, : len(t) + 1] = torch.tensor([*t, eos])
                tgt_mask[i, : len(t) + 1] = 1
            return {"src": src, "src_mask": src_mask, "copyable": copyable, "tgt_in": tgt_in,
                    "tgt_out": tgt_out, "tgt_mask": tgt_mask}
        if self.spec.kind == "seq2seq":
            ids = [e["ids"] for e in encoded]
            n = max(len(x) for x in ids)
            inp = torch.full((len(ids), n), pad)
            att = torch.zeros(len(ids), n, dtype=torch.long)
            for i, x in enumerate(ids):
                inp[i, : len(x)] = torch.tensor(x)
                att[i, : len(x)] = 1
            batch = {"input_ids": inp, "attention_mask": att}
            if for_training:
                tg = [[*e["tgt"], eos] for e in encoded]
                m = max(len(t) for t in tg)
                labels = torch.full((len(tg), m), -100)
                for i, t in enumerate(tg):
                    labels[i, : len(t)] = torch.tensor(t)
                batch["labels"] = labels
            return batch
        # causal: prompt + answer + eos, left-padded (so generation continues every row);
        # labels only on the answer and eos
        seqs, labs = [], []
        for e in encoded:
            a = [*e["tgt"], eos] if for_training else []
            seqs.append(e["ids"] + a)
            labs.append([-100] * len(e["ids"]) + a)
        n = max(len(x) for x in seqs)
        inp = torch.full((len(seqs), n), pad)
        att = torch.zeros(len(seqs), n, dtype=torch.long)
        labels = torch.full((len(seqs), n), -100)
        for i, (x, lab) in enumerate(zip(seqs, labs, strict=True)):
            inp[i, n - len(x):] = torch.tensor(x)
            att[i, n - len(x):] = 1
            labels[i, n - len(x):] = torch.tensor(lab)
        batch = {"input_ids": inp, "attention_mask": att}
        if for_training:
            batch["labels"] = labels
        return batch

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean token cross-entropy of the reference answers (answer tokens only)."""
        if isinstance(self.model, CopyGenerator):
            return self.model.loss(batch)
        out = self.model(**batch)
        return out.loss

    # ------------------------------------------------------------------ answering

    @torch.no_grad()
    def answer(self, examples: Sequence[Example], batch_size: int = 32, *,
               bf16: bool = False, decoding: str | None = None,
               progress: bool = False) -> list[Prediction]:
        from tqdm.auto import tqdm

        self.model.eval()
        # sort by length so a batch pads little; restore the order afterwards
        encoded = [self.encode(ex, with_target=False) for ex in examples]
        length = [len(e["src"].ids) if "src" in e else len(e["ids"]) for e in encoded]
        order = sorted(range(len(encoded)), key=lambda i: length[i])
        out: dict[int, Prediction] = {}
        bar = tqdm(total=len(order), disable=not progress, desc="answer", unit="q")
        for b in range(0, len(order), batch_size):
            idx = order[b: b + batch_size]
            chunk = [encoded[i] for i in idx]
            with runtime.autocast(bf16):
                if self.spec.kind == "copy":
                    got = self._answer_copy(chunk, decoding or self.spec.decoding)
                else:
                    got = self._answer_hf(chunk)
            out.update(zip(idx, got, strict=True))
            bar.update(len(idx))
        bar.close()
        return [out[i] for i in range(len(encoded))]

    def _answer_copy(self, chunk: list[dict[str, Any]], decoding: str) -> list[Prediction]:
        model = self.model
        assert isinstance(model, CopyGenerator)
        srcs: list[CopySource] = [e["src"] for e in chunk]
        batch = self.collate([{"src": s, "tgt": []} for s in srcs])
        b = len(srcs)
        eos = self.tok.sep_token_id
        src, copyable = batch["src"], batch["copyable"]
        done = torch.zeros(b, dtype=torch.bool)
        logp_sum = torch.zeros(b)
        n_tok = torch.zeros(b)
        cand = torch.zeros_like(copyable)  # (B,S): positions where the current span ends
        out_tokens: list[list[int]] = [[] for _ in range(b)]
        hs, h, cache = model.start(src, batch["src_mask"], self.tok.cls_token_id)
        y = torch.zeros(b, dtype=torch.long)
        for step in range(self.spec.max_answer_tokens + 1):
            if step:
                h, cache = model.step(y, cache, batch["src_mask"], step)
            lp = model.next_from_states(hs, h, src, copyable).float()
            if decoding == "constrained":
                if step == 0:
                    nxt = copyable
                else:
                    nxt = torch.zeros_like(cand)
                    nxt[:, 1:] = cand[:, :-1] & copyable[:, 1:]
                # the tokens at the allowed positions (scatter_add: repeated ids accumulate)
                allowed = torch.zeros_like(lp).scatter_add_(1, src, nxt.float()) > 0
                if step > 0:
                    allowed[:, eos] = True
                if step == self.spec.max_answer_tokens:
                    allowed[:] = False
                    allowed[:, eos] = True
                lp = lp.masked_fill(~allowed, -math.inf)
            elif step == self.spec.max_answer_tokens:
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
            text, passage = self._copy_text(s, out_tokens[i], cand[i] if decoding ==
                                            "constrained" else None)
            preds.append(Prediction(text, float(logp_sum[i] / n_tok[i].clamp(min=1)), passage,
                                    s.question_cut))
        return preds

    def _copy_text(self, s: CopySource, toks: list[int], ends: torch.Tensor | None
                   ) -> tuple[str, int]:
        """The answer as the passage's own text where the tokens are a passage span (snapping),
        else the tokenizer's decoding."""
        n = len(toks)
        if n == 0:
            return "", -1
        end_positions: list[int] = []
        if ends is not None:
            end_positions = [int(i) for i in torch.nonzero(ends).flatten()]
        else:  # greedy: look for the tokens as a contiguous copyable run
            for e in range(n - 1, len(s.ids)):
                if s.ids[e - n + 1: e + 1] == toks and all(s.copyable[e - n + 1: e + 1]):
                    end_positions.append(e)
                    break
        for e in end_positions:
            st = e - n + 1
            p, c0, _ = s.spans[st]
            p2, _, c1 = s.spans[e]
            if p >= 0 and p == p2:
                return s.texts[p][c0:c1].strip(), p
        return self.tok.decode(toks, skip_special_tokens=True).strip(), -1

    def _answer_hf(self, chunk: list[dict[str, Any]]) -> list[Prediction]:
        batch = self.collate(chunk, for_training=False)
        eos = self.tok.eos_token_id
        out = self.model.generate(**batch, max_new_tokens=self.spec.max_answer_tokens,
                                  do_sample=False, num_beams=1, pad_token_id=self.tok.pad_token_id,
                                  eos_token_id=eos, output_scores=True,
                                  return_dict_in_generate=True)
        seqs = out.sequences
        if self.spec.kind == "causal":
            seqs = seqs[:, batch["input_ids"].shape[1]:]
        scores = self.model.compute_transition_scores(out.sequences, out.scores,
                                                      normalize_logits=True)
        preds = []
        for i, e in enumerate(chunk):
            toks = [int(t) for t in seqs[i] if int(t) not in (self.tok.pad_token_id, eos)]
            valid = torch.isfinite(scores[i]) & (scores[i] != 0)
            sc = float(scores[i][valid].mean()) if bool(valid.any()) else 0.0
            preds.append(Prediction(self.tok.decode(toks, skip_special_tokens=True).strip(), sc,
                                    -1, e.get("question_cut", False)))
        return preds
