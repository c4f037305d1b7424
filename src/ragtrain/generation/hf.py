"""The ``seq2seq`` and ``causal`` generators: a transformers model fed a rendered prompt.

Both render the prompt from ``template`` (``inputs.render_prompt``), train on the model's own
loss (labels -100 outside the answer) and answer with greedy ``generate``. They differ in the
model class, how the prompt becomes ids (the causal kind applies the model's chat template when
it has one, and keeps the prompt's end), how a batch is padded and where the answer starts in
the generated sequence. With ``generator.lora_r > 0`` only LoRA adapters train
(``generation/lora.py``); the saved model has them merged in.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ragtrain import runtime
from ragtrain.config import GeneratorConfig
from ragtrain.generation import lora
from ragtrain.generation.generator import (
    Example,
    Generator,
    GeneratorSpec,
    Prediction,
    on_device,
)
from ragtrain.generation.inputs import render_prompt


class HFBackend(Generator):
    """What the seq2seq and causal kinds share: weights saved with ``save_pretrained`` in
    ``model/``, the prompt, the loss and decoding by ``generate``; on a GPU when there is one."""

    AUTO_CLASS: ClassVar[str]  # the transformers Auto class that loads this kind
    LORA_TASK: ClassVar[str]  # peft's task type for this kind

    def __init__(self, spec: GeneratorSpec, model: nn.Module, tok: Any) -> None:
        super().__init__(spec, model, tok)
        self.model.to(runtime.device())

    @classmethod
    def _auto_class(cls) -> Any:
        import transformers

        return getattr(transformers, cls.AUTO_CLASS)

    @classmethod
    def _pretrained_model(cls, path: str, kw: dict[str, Any]) -> nn.Module:
        model: nn.Module = cls._auto_class().from_pretrained(path, **kw)
        return model

    @classmethod
    def _saved_model(cls, in_dir: Path) -> nn.Module:
        model: nn.Module = cls._auto_class().from_pretrained(in_dir / "model")
        return model

    def configure(self, cfg: GeneratorConfig) -> None:
        if cfg.lora_r:
            self.model, settings = lora.add_lora(self.model, cfg, self.LORA_TASK)
            self.spec = replace(self.spec, extra={**self.spec.extra, "lora": settings})

    def _save_model(self, tmp: Path) -> None:
        if lora.is_lora(self.model):
            # the adapters alone (safetensors), and merged: a plain model that loads without peft
            self.model.save_pretrained(tmp / "adapter", safe_serialization=True)
            lora.merged(self.model).save_pretrained(tmp / "model", safe_serialization=True)
        else:
            self.model.save_pretrained(tmp / "model", safe_serialization=True)

    def _embedding_rows(self) -> int:
        return int(self.model.get_input_embeddings().weight.shape[0])

    # ------------------------------------------------------------------ batches

    def encode(self, ex: Example, with_target: bool = True) -> dict[str, Any]:
        s = self.spec
        prompt, cut = render_prompt(s.template, ex.question, ex.passages, self.tok,
                                    s.max_source_tokens, s.max_question_tokens)
        ans = (self.tok(ex.answer, add_special_tokens=False)["input_ids"][: s.max_answer_tokens]
               if with_target else [])
        return {"ids": self._prompt_ids(prompt), "tgt": ans, "question_cut": cut}

    @abstractmethod
    def _prompt_ids(self, prompt: str) -> list[int]:
        """The prompt's token ids, cut to ``max_source_tokens``."""

    def source_length(self, encoded: dict[str, Any]) -> int:
        return len(encoded["ids"])

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = self.model(**on_device(self.model, batch))
        return out.loss

    # ------------------------------------------------------------------ answering

    def _answer_batch(self, chunk: list[dict[str, Any]], decoding: str) -> list[Prediction]:
        batch = on_device(self.model, self.collate(chunk, for_training=False))
        eos = self.tok.eos_token_id
        out = self.model.generate(**batch, max_new_tokens=self.spec.max_answer_tokens,
                                  do_sample=False, num_beams=1, pad_token_id=self.tok.pad_token_id,
                                  eos_token_id=eos, output_scores=True,
                                  return_dict_in_generate=True)
        seqs = self._answer_tokens(out.sequences, batch)
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

    def _answer_tokens(self, sequences: torch.Tensor, batch: dict[str, torch.Tensor]
                       ) -> torch.Tensor:
        """The generated answer part of ``generate``'s sequences (B, T)."""
        return sequences


class Seq2SeqBackend(HFBackend):
    """The ``seq2seq`` kind: any ``AutoModelForSeq2SeqLM`` (T5, BART)."""

    AUTO_CLASS = "AutoModelForSeq2SeqLM"
    LORA_TASK = "SEQ_2_SEQ_LM"

    def _prompt_ids(self, prompt: str) -> list[int]:
        ids: list[int] = self.tok(prompt, add_special_tokens=True)["input_ids"]
        return ids[: self.spec.max_source_tokens]

    def collate(self, encoded: Sequence[dict[str, Any]], for_training: bool = True
                ) -> dict[str, torch.Tensor]:
        pad, eos = self.tok.pad_token_id, self.tok.eos_token_id
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


class CausalBackend(HFBackend):
    """The ``causal`` kind: any ``AutoModelForCausalLM``; the loss only on the answer."""

    AUTO_CLASS = "AutoModelForCausalLM"
    LORA_TASK = "CAUSAL_LM"

    def _prompt_ids(self, prompt: str) -> list[int]:
        if getattr(self.tok, "chat_template", None):
            prompt = self.tok.apply_chat_template([{"role": "user", "content": prompt}],
                                                  tokenize=False, add_generation_prompt=True)
        ids: list[int] = self.tok(prompt, add_special_tokens=False)["input_ids"]
        # keep the end: generation continues from the prompt's last tokens (the template's
        # "answer:", the chat template's assistant turn)
        return ids[-self.spec.max_source_tokens:]

    def collate(self, encoded: Sequence[dict[str, Any]], for_training: bool = True
                ) -> dict[str, torch.Tensor]:
        # prompt + answer + eos, left-padded (so generation continues every row);
        # labels only on the answer and eos
        pad, eos = self.tok.pad_token_id, self.tok.eos_token_id
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
            # positions counted from each row's first real token, as generate() counts them
            # from the attention mask: a left-padded row is learnt where it is answered
            batch["position_ids"] = (att.cumsum(-1) - 1).clamp(min=0)
        return batch

    def _answer_tokens(self, sequences: torch.Tensor, batch: dict[str, torch.Tensor]
                       ) -> torch.Tensor:
        return sequences[:, batch["input_ids"].shape[1]:]
