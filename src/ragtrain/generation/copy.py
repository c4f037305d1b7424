"""The ``copy`` generator: a BERT-style encoder used as one prefix-LM with a copy (pointer) head.

The warm start is a BERT-style encoder (the bundled all-MiniLM-L6-v2). The source
``[CLS] question [SEP] passage [SEP] passage [SEP]`` is read bidirectionally and the answer is
written causally after it. A gate mixes the vocabulary distribution with attention over the
passage tokens, ``p(y) = g·p_vocab(y) + (1-g)·Σ_{s: x_s = y} a_s``; the loss is
``-Σ log p(y_i | x, y_<i)``. Decoding (``copy_decoding``: greedy or beam search) is KV-cached;
``constrained`` decoding may only extend a contiguous passage span or stop, and the answer is the
passage's own text for that span (no WordPiece detokenisation artifacts).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ragtrain import runtime
from ragtrain.generation import copy_decoding
from ragtrain.generation.generator import (
    Example,
    Generator,
    GeneratorError,
    GeneratorSpec,
    Prediction,
    on_device,
)
from ragtrain.generation.inputs import (
    CopySource,
    build_copy_source,
    copy_target,
    holds_answer,
    word_ends,
)
from ragtrain.models import additive_mask, one_token_attention


class CopyGenerator(nn.Module):
    """An encoder used as a prefix-LM, with an LM head tied to the word embeddings and a copy
    head (query / key projections and a gate) over the passage tokens."""

    NEW_PARAMS = ("transform.", "lm_bias", "copy_q.", "copy_k.", "gate.")
    autocast_mask = True  # see _mask_dtype

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

    def _mask_dtype(self, device: torch.device) -> torch.dtype:
        """The additive attention mask's dtype: under autocast, the autocast dtype (the scores'
        own; an fp32 mask promotes the attention-sized add, softmax and their backward to fp32
        and casts back: 1.07x a copy generator training step on 2 CPU cores), else the
        weights'. ``autocast_mask = False``: always the weights' (``bench/train_step.py``)."""
        if self.autocast_mask and torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
        return self.backbone.embeddings.word_embeddings.weight.dtype

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
        mask = additive_mask(allow[:, None], self._mask_dtype(dev))
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
        b, dev = src_mask.shape[0], y.device
        pos = src_mask.sum(1)[:, None] + t
        allow = torch.cat([src_mask.bool(), torch.ones(b, t + 1, dtype=torch.bool, device=dev)], 1)
        mask = additive_mask(allow[:, None, None], self._mask_dtype(dev))
        self.backbone.config.is_decoder = True
        try:
            with one_token_attention(self.backbone):  # eager: faster for one query on a CPU
                out = self.backbone(input_ids=y[:, None], attention_mask=mask, cache=cache,
                                    token_type_ids=torch.ones_like(y)[:, None],
                                    position_ids=pos, use_cache=True)
        finally:
            self.backbone.config.is_decoder = False
        return out.last_hidden_state, out.cache

    def next_from_states(self, hs: torch.Tensor, h: torch.Tensor, src: torch.Tensor,
                         copyable: torch.Tensor, keys: torch.Tensor | None = None) -> torch.Tensor:
        """log p(next token) over the vocabulary (B,V) from the last target state h (B,1,H);
        ``keys``: ``copy_k(hs)``, computed once per decoding by the caller (else here)."""
        log_pv, log_a, lg, lng = self.parts(hs, h, copyable, keys)
        a = (log_a[:, 0].exp() * copyable).float()
        p_copy = torch.zeros_like(log_pv[:, 0]).scatter_add_(1, src, a)
        return self.mix(log_pv[:, 0], p_copy, lg, lng)

    @staticmethod
    def mix(log_pv: torch.Tensor, p_copy: torch.Tensor, lg: torch.Tensor, lng: torch.Tensor
            ) -> torch.Tensor:
        """log(g·p_vocab + (1-g)·p_copy) of one step's (B,N) tokens; ``lg``, ``lng``: log g and
        log (1-g) of the step, (B,1)."""
        p = lg.exp()[:, 0, None] * log_pv.exp() + lng.exp()[:, 0, None] * p_copy
        return torch.log(p.clamp(min=1e-30))

    def vocab_logits(self, ht: torch.Tensor) -> torch.Tensor:
        """The LM head's logits (B,T,V) of target states ``ht``."""
        emb = self.backbone.embeddings.word_embeddings.weight
        # F.linear(x, emb), not x @ emb.t(): autocast casts a weight once per context and reuses
        # it, but a view (emb.t()) it casts anew at every decoding step (5.6 ms each on 2 cores)
        return F.linear(self.transform(ht), emb) + self.lm_bias

    def copy_parts(self, hs: torch.Tensor, ht: torch.Tensor, copyable: torch.Tensor,
                   keys: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """log copy attention over source (B,T,S), log g, log (1-g)."""
        scores = (self.copy_q(ht) @ (self.copy_k(hs) if keys is None else keys).transpose(1, 2)
                  ).float()
        scores = scores / math.sqrt(hs.shape[-1])
        scores = scores.masked_fill(~copyable[:, None, :], -1e4)  # finite: no NaN without copyables
        gate = self.gate(ht).float().squeeze(-1)
        return F.log_softmax(scores, -1), F.logsigmoid(gate), F.logsigmoid(-gate)

    def parts(self, hs: torch.Tensor, ht: torch.Tensor, copyable: torch.Tensor,
              keys: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """log p_vocab (B,T,V), log copy attention over source (B,T,S), log g, log (1-g)."""
        return (F.log_softmax(self.vocab_logits(ht).float(), -1),
                *self.copy_parts(hs, ht, copyable, keys))

    def token_log_probs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """log p(y_t | x, y_<t) of each target token (B,T), on the model's device; the values at
        padded target positions mean nothing (callers mask them). The LM head and its
        log-softmax run on the real target rows alone: answers are short and a batch's targets
        pad to its longest, so about 6 in 10 target rows are padding in SQuAD training."""
        batch = on_device(self, batch)
        hs, ht = self.states(batch["src"], batch["src_mask"], batch["tgt_in"], batch["tgt_mask"])
        log_a, lg, lng = self.copy_parts(hs, ht, batch["copyable"])
        y, real = batch["tgt_out"], batch["tgt_mask"].bool()
        lv = torch.zeros(y.shape, dtype=torch.float32, device=y.device)
        lv[real] = -F.cross_entropy(self.vocab_logits(ht[real]).float(), y[real], reduction="none")
        match = (batch["src"][:, None, :] == y[:, :, None]) & batch["copyable"][:, None, :]
        lc = torch.logsumexp(log_a.masked_fill(~match, -math.inf), -1)
        return torch.logaddexp(lg + lv, lng + lc)

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        lp = self.token_log_probs(batch)
        m = batch["tgt_mask"].to(lp.device).float()
        return -(lp * m).sum() / m.sum().clamp(min=1)


class CopyBackend(Generator):
    """The ``copy`` kind: ``CopyGenerator`` on a BERT-style tokenizer ([CLS] / [SEP])."""

    model: CopyGenerator

    def __init__(self, spec: GeneratorSpec, model: nn.Module, tok: Any) -> None:
        super().__init__(spec, model, tok)
        self.model.to(runtime.device())  # a GPU when there is one

    def _check_positions(self) -> None:
        need = self.spec.max_source_tokens + self.spec.max_answer_tokens + 1
        if need > self.model.max_positions:
            raise GeneratorError(
                f"generator.max_source_tokens + max_answer_tokens + 1 = {need} exceeds the "
                f"model's {self.model.max_positions} positions")

    @classmethod
    def _check_tokenizer(cls, tok: Any, model_name: str) -> None:
        if tok.cls_token_id is None or tok.sep_token_id is None:
            raise GeneratorError(f"generator.model_name {model_name!r}: the copy kind needs "
                                 "a BERT-style tokenizer with [CLS] and [SEP]")

    @classmethod
    def _pretrained_model(cls, path: str, kw: dict[str, Any]) -> nn.Module:
        from transformers import AutoModel

        # no attention-probability dropout: with it, SDPA falls back to the math path
        # and spends a third of a CPU step drawing the mask (hidden dropout stays)
        return CopyGenerator(AutoModel.from_pretrained(path, attention_probs_dropout_prob=0.0))

    @classmethod
    def _saved_model(cls, in_dir: Path) -> nn.Module:
        from safetensors.torch import load_model
        from transformers import AutoConfig, AutoModel

        backbone = AutoModel.from_config(AutoConfig.from_pretrained(in_dir / "backbone"))
        model = CopyGenerator(backbone)
        try:
            load_model(model, str(in_dir / "model.safetensors"))
        except RuntimeError as e:
            raise GeneratorError(f"{in_dir}/model.safetensors: does not fit the saved "
                                 f"backbone config ({str(e).splitlines()[0]})") from None
        return model

    def _save_model(self, tmp: Path) -> None:
        from safetensors.torch import save_model

        self.model.backbone.config.save_pretrained(tmp / "backbone")
        save_model(self.model, str(tmp / "model.safetensors"))

    def _embedding_rows(self) -> int:
        return int(self.model.backbone.embeddings.word_embeddings.weight.shape[0])

    def new_param_prefixes(self) -> tuple[str, ...]:
        return CopyGenerator.NEW_PARAMS

    # ------------------------------------------------------------------ batches

    def encode(self, ex: Example, with_target: bool = True) -> dict[str, Any]:
        s = self.spec
        src = build_copy_source(self.tok, ex.question, ex.passages, s.max_source_tokens,
                                s.max_question_tokens)
        tgt = copy_target(src, ex.answer, self.tok)[: s.max_answer_tokens] if with_target else []
        return {"src": src, "tgt": tgt}

    def source_length(self, encoded: dict[str, Any]) -> int:
        return len(encoded["src"].ids)

    def collate(self, encoded: Sequence[dict[str, Any]], for_training: bool = True
                ) -> dict[str, torch.Tensor]:
        pad, eos = self.tok.pad_token_id, self.tok.sep_token_id
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

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model.loss(batch)

    def target_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["tgt_mask"].sum())

    def passage_log_probs(self, examples: Sequence[Example]
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each (question, passage z) read alone; one answer target per question under every
        passage: the tokens of the best-ranked passage that holds the answer, else of the first
        (so with k = 1 it is exactly the target ``loss`` trains on)."""
        ks = {len(ex.passages) for ex in examples}
        if len(ks) != 1:
            raise GeneratorError(f"passage_log_probs: every example needs the same number of "
                                 f"passages, got {sorted(ks)}")
        k = ks.pop()
        encoded: list[dict[str, Any]] = []
        for ex in examples:
            per = [self.encode(Example(ex.question, [p], ex.answer)) for p in ex.passages]
            has = [i for i, p in enumerate(ex.passages) if holds_answer(p.text, ex.answer)]
            tgt = per[has[0] if has and ex.answer else 0]["tgt"]
            encoded += [{"src": e["src"], "tgt": tgt} for e in per]
        batch = self.collate(encoded)
        lp = self.model.token_log_probs(batch)  # (N*k, T)
        n = len(examples)
        return lp.view(n, k, -1), batch["tgt_mask"].to(lp.device).view(n, k, -1)[:, 0].bool()

    # ------------------------------------------------------------------ answering

    def _answer_batch(self, chunk: list[dict[str, Any]], decoding: str) -> list[Prediction]:
        if decoding == "constrained" and self.spec.num_beams > 1:
            return copy_decoding.beam(self, chunk, self.spec.num_beams)
        return copy_decoding.greedy(self, chunk, decoding)

    def start_decoding(self, chunk: list[dict[str, Any]]
                       ) -> tuple[list[CopySource], dict[str, torch.Tensor], torch.Tensor, Any]:
        """Greedy's and beam search's start: sources, batch, where a span may end ((B,S)
        bool, ``word_ends``) and ``model.start``'s states, first hidden state and cache."""
        srcs: list[CopySource] = [e["src"] for e in chunk]
        batch = on_device(self.model, self.collate([{"src": s, "tgt": []} for s in srcs]))
        src = batch["src"]
        can_end = torch.tensor([word_ends(x) + [False] * (src.shape[1] - len(x.ids))
                                for x in srcs], dtype=torch.bool, device=src.device)
        return srcs, batch, can_end, self.model.start(src, batch["src_mask"], self.tok.cls_token_id)

    def copy_text(self, s: CopySource, toks: list[int], ends: torch.Tensor | None
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
