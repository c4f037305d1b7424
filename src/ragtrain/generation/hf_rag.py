"""The ``hf_rag`` generator: transformers' ``RagTokenForGeneration`` / ``RagSequenceForGeneration``
reading the passages ragtrain's retriever found.

ragtrain's retriever stands in for Hugging Face's ``RagRetriever``: each example's passages are
tokenized with the generator's tokenizer as RAG formats them (``title / text // question``, one
encoder input per passage) and handed to the model as ``context_input_ids`` /
``context_attention_mask``, with ``doc_scores`` from the retriever's scores
(``Example.passage_scores``; a uniform prior when there are none). No index or ``datasets``.

Gradient and the question encoder: the loss is RAG's marginal likelihood over the passages,
``p(y|x) = sum_z softmax(doc_scores)_z p(y|x,z)`` (RAG-Sequence) or that mixture per token
(RAG-Token), so gradient reaches the generator and ``doc_scores``. Here ``doc_scores`` are
constants from ragtrain's retriever, so the RAG checkpoint's own question encoder (DPR) is never
run and is frozen; training the query encoder through the passage scores is the joint stage's
job (``train_rag``), which scores passages with ragtrain's trainable encoder. (HF computes
``doc_scores = q(x) . d(z)`` itself only when it retrieves through its ``RagRetriever``.)

Saved with ``save_pretrained`` (safetensors) in ``model/``; the class (token or sequence) is the
one in its ``config.json``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ragtrain import runtime
from ragtrain.config import GeneratorConfig
from ragtrain.generation.generator import (
    Example,
    Generator,
    GeneratorError,
    GeneratorSpec,
    Prediction,
    on_device,
)

VARIANTS = {"token": "RagTokenForGeneration", "sequence": "RagSequenceForGeneration"}
ABSENT = -1.0e4  # doc score of a padding passage (an example with fewer passages): p(z|x) ~ 0


def _rag_class(name: str) -> Any:
    import transformers

    if name not in VARIANTS.values():
        name = VARIANTS["token"]
    return getattr(transformers, name)


class HFRagBackend(Generator):
    """The ``hf_rag`` kind; ``generator.rag_variant`` picks RAG-Token or RAG-Sequence."""

    def __init__(self, spec: GeneratorSpec, model: nn.Module, tok: Any) -> None:
        super().__init__(spec, model, tok)
        self._freeze_question_encoder()
        self.model.to(runtime.device())  # a GPU when there is one

    def _freeze_question_encoder(self) -> None:
        # never run (doc_scores come from ragtrain's retriever): no gradient, no optimizer state
        for p in self.model.rag.question_encoder.parameters():
            p.requires_grad_(False)

    # ------------------------------------------------------------------ building

    def configure(self, cfg: GeneratorConfig) -> None:
        super().configure(cfg)  # refuses LoRA
        want = VARIANTS[cfg.rag_variant]
        if type(self.model).__name__ != want:
            # both classes wrap the same RagModel: rebuild around its question encoder and
            # generator (the weights are shared, not copied)
            rag = self.model.rag
            self.model = _rag_class(want)(config=self.model.config,
                                          question_encoder=rag.question_encoder,
                                          generator=rag.generator)
            self.model.config.architectures = [want]
            self._freeze_question_encoder()
            self.model.to(runtime.device())
        self.spec = replace(self.spec, extra={**self.spec.extra, "rag_variant": cfg.rag_variant})

    @classmethod
    def _pretrained_tokenizer(cls, path: str, kw: dict[str, Any]) -> Any:
        """The generator's tokenizer: RAG checkpoints keep it in ``generator_tokenizer/``."""
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(path, subfolder="generator_tokenizer", **kw)
        except (OSError, ValueError):
            return AutoTokenizer.from_pretrained(path, **kw)

    @classmethod
    def _pretrained_model(cls, path: str, kw: dict[str, Any]) -> nn.Module:
        from transformers import AutoConfig

        arch = (AutoConfig.from_pretrained(path).architectures or [""])[0]
        model: nn.Module = _rag_class(arch).from_pretrained(path, **kw)
        return model

    @classmethod
    def _saved_model(cls, in_dir: Path) -> nn.Module:
        return cls._pretrained_model(str(in_dir / "model"), {})

    def _save_model(self, tmp: Path) -> None:
        self.model.save_pretrained(tmp / "model", safe_serialization=True)

    def _embedding_rows(self) -> int:
        return int(self.model.rag.generator.get_input_embeddings().weight.shape[0])

    def _check_positions(self) -> None:
        n = getattr(self.model.rag.generator.config, "max_position_embeddings", None)
        if n is not None and self.spec.max_source_tokens > n:
            raise GeneratorError(f"generator.max_source_tokens: {self.spec.max_source_tokens} "
                                 f"(per passage) exceeds the model's {n} positions")

    # ------------------------------------------------------------------ batches

    def encode(self, ex: Example, with_target: bool = True) -> dict[str, Any]:
        s, tok, cfg = self.spec, self.tok, self.model.config
        q = tok(ex.question, add_special_tokens=False)["input_ids"]
        cut = len(q) > s.max_question_tokens
        # the separator stays when the passage is cut: "title / text // question"
        q = tok(cfg.doc_sep, add_special_tokens=False)["input_ids"] + q[: s.max_question_tokens]
        head, tail = self._specials()
        room = s.max_source_tokens - len(q) - len(head) - len(tail)
        if room < 1:
            raise GeneratorError(f"generator.max_source_tokens: {s.max_source_tokens} leaves no "
                                 f"room for a passage after the question (max_question_tokens "
                                 f"{s.max_question_tokens})")
        ctx = []
        for p in ex.passages or []:
            text = f"{p.title.replace('_', ' ')}{cfg.title_sep}{p.text}"
            ids = tok(text, add_special_tokens=False)["input_ids"][:room]
            ctx.append(head + ids + q + tail)
        if not ctx:  # no passage: the question alone, as one "passage"
            ctx.append(head + q + tail)
        scores = list(ex.passage_scores) if len(ex.passage_scores) == len(ctx) else (
            [0.0] * len(ctx))
        ans = (tok(ex.answer, add_special_tokens=False)["input_ids"][: s.max_answer_tokens]
               if with_target else [])
        return {"ctx": ctx, "scores": scores, "tgt": ans, "question_cut": cut}

    def _specials(self) -> tuple[list[int], list[int]]:
        """The special tokens the tokenizer puts before and after one sequence (``<s>`` ...
        ``</s>`` for BART), read off a probe: fast tokenizers no longer build them for us."""
        if not hasattr(self, "_special_ids"):
            probe = self.tok("a", add_special_tokens=True)["input_ids"]
            plain = self.tok("a", add_special_tokens=False)["input_ids"]
            i = next(i for i in range(len(probe)) if probe[i: i + len(plain)] == plain)
            self._special_ids = (probe[:i], probe[i + len(plain):])
        return self._special_ids

    def source_length(self, encoded: dict[str, Any]) -> int:
        return sum(len(c) for c in encoded["ctx"])

    def _start(self) -> list[int]:
        """What the decoder starts from: the decoder start token (and the BOS that ``generate``
        forces after it, for BART-like models), so training sees what generation produces."""
        gc = self.model.rag.generator.config
        start = gc.decoder_start_token_id
        if start is None:
            start = self.model.config.decoder_start_token_id
        if start is None:
            raise GeneratorError("hf_rag: the generator config has no decoder_start_token_id")
        forced = getattr(self.model.rag.generator.generation_config, "forced_bos_token_id", None)
        return [int(start)] + ([int(forced)] if forced is not None else [])

    def collate(self, encoded: Sequence[dict[str, Any]], for_training: bool = True
                ) -> dict[str, torch.Tensor]:
        pad, eos = self.tok.pad_token_id, self.tok.eos_token_id
        n_docs = max(len(e["ctx"]) for e in encoded)
        rows: list[list[int]] = []
        scores = torch.full((len(encoded), n_docs), ABSENT)
        for i, e in enumerate(encoded):
            # an example with fewer passages repeats its first with a score of ~ -inf
            rows += e["ctx"] + [e["ctx"][0]] * (n_docs - len(e["ctx"]))
            scores[i, : len(e["ctx"])] = torch.tensor(e["scores"], dtype=torch.float)
        n = max(len(r) for r in rows)
        ctx = torch.full((len(rows), n), pad)  # (B * n_docs, L)
        att = torch.zeros(len(rows), n, dtype=torch.long)
        for i, r in enumerate(rows):
            ctx[i, : len(r)] = torch.tensor(r)
            att[i, : len(r)] = 1
        batch = {"context_input_ids": ctx, "context_attention_mask": att, "doc_scores": scores}
        if for_training:
            batch["labels"] = self._targets([[*self._start(), *e["tgt"], eos] for e in encoded])
        return batch

    def _targets(self, seqs: list[list[int]]) -> torch.Tensor:
        """Decoder sequences (start token first) padded with pad: RAG's ``labels`` are its
        decoder inputs too, and its loss ignores pad (not -100) after shifting them left."""
        m = max(len(t) for t in seqs)
        out = torch.full((len(seqs), m), self.tok.pad_token_id)
        for i, t in enumerate(seqs):
            out[i, : len(t)] = torch.tensor(t)
        return out

    def sequence_nll(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """-log p(y|x) marginalised over the passages, per example # (B,), and the number of
        target tokens per example # (B,)."""
        batch = on_device(self.model, batch)
        labels = batch["labels"]
        n_docs = batch["doc_scores"].shape[1]
        out = self.model(context_input_ids=batch["context_input_ids"],
                         context_attention_mask=batch["context_attention_mask"],
                         doc_scores=batch["doc_scores"], labels=labels, n_docs=n_docs,
                         reduce_loss=False, use_cache=False)
        return out.loss, (labels[:, 1:] != self.tok.pad_token_id).sum(1)

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The marginal negative log-likelihood per answer token (the batch's tokens pooled)."""
        nll, n_tok = self.sequence_nll(batch)
        return nll.sum() / n_tok.sum().clamp(min=1)

    # ------------------------------------------------------------------ answering

    def _answer_batch(self, chunk: list[dict[str, Any]], decoding: str) -> list[Prediction]:
        batch = on_device(self.model, self.collate(chunk, for_training=False))
        if type(self.model).__name__ == VARIANTS["sequence"]:
            answers, nll, n_tok = self._decode_sequence(batch)
        else:
            answers = self._decode_token(batch)
            # score: the marginal log-likelihood per token of the answer as generated
            nll, n_tok = self.sequence_nll({**batch, "labels": self._labels(answers)})
        special = set(self.tok.all_special_ids)
        preds = []
        for i, e in enumerate(chunk):
            text = self.tok.decode([t for t in answers[i] if t not in special],
                                   skip_special_tokens=True).strip()
            preds.append(Prediction(text, float(-nll[i] / n_tok[i].clamp(min=1)), -1,
                                    e.get("question_cut", False)))
        return preds

    def _generate_kw(self) -> dict[str, Any]:
        start = self._start()
        return {"max_new_tokens": self.spec.max_answer_tokens + len(start), "num_beams": 1,
                "do_sample": False, "pad_token_id": self.tok.pad_token_id,
                "eos_token_id": self.tok.eos_token_id, "decoder_start_token_id": start[0]}

    def _trim(self, rows: torch.Tensor) -> list[list[int]]:
        """Generated sequences without the decoder start token, eos and what follows."""
        out = []
        for row in rows.tolist():
            toks = row[1:]
            if self.tok.eos_token_id in toks:
                toks = toks[: toks.index(self.tok.eos_token_id)]
            out.append([t for t in toks if t != self.tok.pad_token_id])
        return out

    def _labels(self, answers: list[list[int]]) -> torch.Tensor:
        return self._targets([[self._start()[0], *a, self.tok.eos_token_id] for a in answers])

    def _decode_token(self, batch: dict[str, torch.Tensor]) -> list[list[int]]:
        """RAG-Token greedy decoding: each step marginalises the next token over the passages."""
        return self._trim(self.model.generate(**batch, n_docs=batch["doc_scores"].shape[1],
                                              **self._generate_kw()))

    def _decode_sequence(self, batch: dict[str, torch.Tensor]
                         ) -> tuple[list[list[int]], torch.Tensor, torch.Tensor]:
        """RAG-Sequence decoding ("thorough", greedy): one answer per passage, each rescored by
        the marginal likelihood over all the passages; the best per example, its nll and
        length. (``RagSequenceForGeneration.generate`` drops the passages' attention mask, so
        padded passages would be read as text: decoded here instead.)"""
        n = batch["doc_scores"].shape[1]
        per_doc = self._trim(self.model.rag.generator.generate(
            input_ids=batch["context_input_ids"], attention_mask=batch["context_attention_mask"],
            **self._generate_kw()))  # B * n answers
        b = batch["doc_scores"].shape[0]
        cands = [list(dict.fromkeys(tuple(a) for a in per_doc[i * n:(i + 1) * n]))
                 for i in range(b)]
        own = [i for i in range(b) for _ in cands[i]]  # the example of each candidate
        rows = torch.tensor([i * n + j for i in own for j in range(n)],
                            device=batch["doc_scores"].device)
        nll, n_tok = self.sequence_nll({
            "context_input_ids": batch["context_input_ids"][rows],
            "context_attention_mask": batch["context_attention_mask"][rows],
            "doc_scores": batch["doc_scores"][own],
            "labels": self._labels([list(c) for cs in cands for c in cs])})
        answers, best_nll, best_n = [], [], []
        at = 0
        for cs in cands:
            k = at + int(torch.argmin(nll[at: at + len(cs)]))
            answers.append(list(cs[k - at]))
            best_nll.append(nll[k])
            best_n.append(n_tok[k])
            at += len(cs)
        return answers, torch.stack(best_nll), torch.stack(best_n)
