"""Answer generators: the question and retrieved passages in, an answer out.

One interface (``Generator``) with a backend per kind, looked up by ``spec.kind`` (``backend``):

- ``copy`` (``generation/copy.py``, the offline default): a BERT-style encoder warm start (the
  bundled all-MiniLM-L6-v2) used as one prefix-LM with a copy (pointer) head over the passages.
- ``seq2seq`` (``generation/hf.py``): any ``AutoModelForSeq2SeqLM`` (T5, BART), prompt from
  ``template``.
- ``causal`` (``generation/hf.py``): any ``AutoModelForCausalLM``; the loss is masked to the
  answer tokens; the model's chat template wraps the prompt when it has one. Both HF kinds can
  train LoRA adapters instead (``generation/lora.py``).
- ``hf_rag`` (``generation/hf_rag.py``): transformers' ``RagTokenForGeneration`` /
  ``RagSequenceForGeneration`` reading ragtrain's retrieved passages (``context_input_ids``).

A new kind is a new backend module (a ``Generator`` subclass) plus one entry in ``backend``'s
table.
Every kind saves ``generator.json`` (the spec) and ``tokenizer/`` beside its weights.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ragtrain import runtime
from ragtrain.config import GeneratorConfig
from ragtrain.data.corpus import Passage
from ragtrain.errors import RagtrainError
from ragtrain.io import atomic_path, atomic_write_json
from ragtrain.models import model_load_error, resolve_model_path

SPEC_FILE = "generator.json"


class GeneratorError(RagtrainError):
    """A generator checkpoint or input that cannot be used."""


def on_device(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``batch`` on the device that holds ``model`` (batches are built on the CPU)."""
    dev = next(model.parameters()).device
    return {k: v.to(dev) for k, v in batch.items()}


@dataclass
class Example:
    question: str
    passages: list[Passage]
    answer: str = ""
    # the retriever's score of each passage (hf_rag: the prior p(z|x) = softmax of them); empty:
    # unknown, a uniform prior
    passage_scores: list[float] = field(default_factory=list)


@dataclass
class Prediction:
    answer: str
    score: float  # mean log-probability of the answer's tokens
    passage: int = -1  # the passage the answer was copied from (copy model), else -1
    question_cut: bool = False
    null: float = 0.0  # log p(the empty answer) where the kind gives it (copy), else 0


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
    num_beams: int = 1  # copy, constrained decoding (generator.json files before it: greedy)

    @classmethod
    def from_config(cls, cfg: GeneratorConfig) -> GeneratorSpec:
        return cls(cfg.kind, cfg.model_name, cfg.max_source_tokens, cfg.max_question_tokens,
                   cfg.max_answer_tokens, cfg.template, cfg.decoding, gguf_file=cfg.gguf_file,
                   num_beams=cfg.num_beams)


def tokenizer_sha256(tok: Any) -> str:
    """A fingerprint of the tokenizer's vocabulary (what binds it to a checkpoint)."""
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()


def backend(kind: str) -> type[Generator]:
    """The ``Generator`` subclass that implements ``kind``: the one table of backends."""
    # imported here, not at the top, because each backend module imports this one; plain
    # imports (not names in strings) so the stages' code closure (pipeline/code.py) sees them
    from ragtrain.generation.copy import CopyBackend
    from ragtrain.generation.hf import CausalBackend, Seq2SeqBackend
    from ragtrain.generation.hf_rag import HFRagBackend

    backends: dict[str, type[Generator]] = {
        "copy": CopyBackend,
        "seq2seq": Seq2SeqBackend,
        "causal": CausalBackend,
        "hf_rag": HFRagBackend,
    }
    if kind not in backends:
        raise GeneratorError(f"generator kind {kind!r}: expected one of {sorted(backends)}")
    return backends[kind]


class Generator(ABC):
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
        self._check_positions()
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token

    # ------------------------------------------------------------------ building

    @classmethod
    def from_pretrained(cls, cfg: GeneratorConfig) -> Generator:
        """Warm start from ``cfg.model_name`` (bundled MiniLM, a folder, or a hub name)."""
        impl = backend(cfg.kind)
        path = resolve_model_path(cfg.model_name)
        kw: dict[str, Any] = {"gguf_file": cfg.gguf_file} if cfg.gguf_file else {}
        try:
            tok = impl._pretrained_tokenizer(path, kw)
            model = impl._pretrained_model(path, kw)
        except OSError as e:
            raise model_load_error(cfg.model_name, e) from None
        impl._check_tokenizer(tok, cfg.model_name)
        spec = GeneratorSpec.from_config(cfg)
        spec = GeneratorSpec(**{**asdict(spec), "tokenizer_sha256": tokenizer_sha256(tok)})
        gen = impl(spec, model, tok)
        gen.configure(cfg)
        return gen

    @classmethod
    def load(cls, in_dir: Path) -> Generator:
        """A generator saved by ``save``, in eval mode; its tokenizer must match the spec's."""
        from transformers import AutoTokenizer

        spec_file = in_dir / SPEC_FILE
        if not spec_file.exists():
            raise GeneratorError(f"{spec_file}: missing; is {in_dir} a saved generator?")
        spec = GeneratorSpec(**json.loads(spec_file.read_text()))
        tok = AutoTokenizer.from_pretrained(in_dir / "tokenizer")
        if spec.tokenizer_sha256 and tokenizer_sha256(tok) != spec.tokenizer_sha256:
            raise GeneratorError(f"{in_dir}: generator checkpoint does not match its tokenizer "
                                 "(vocabulary fingerprint differs from the one saved with it)")
        impl = backend(spec.kind)
        model = impl._saved_model(in_dir)
        model.eval()
        return impl(spec, model, tok)

    def save(self, out: Path) -> None:
        """Weights as safetensors, the tokenizer, and ``generator.json`` (written atomically)."""
        with atomic_path(out) as tmp:
            tmp.mkdir()
            self.tok.save_pretrained(tmp / "tokenizer")
            self._save_model(tmp)
            atomic_write_json(tmp / SPEC_FILE, asdict(self.spec))

    def configure(self, cfg: GeneratorConfig) -> None:
        """Settings a kind takes from ``cfg`` on a fresh warm start (LoRA adapters, the RAG
        variant); a kind without them refuses LoRA."""
        if cfg.lora_r:
            raise GeneratorError(f"generator.lora_r: LoRA is for the seq2seq and causal kinds, "
                                 f"not {self.spec.kind!r}; got lora_r={cfg.lora_r}")

    def new_param_prefixes(self) -> tuple[str, ...]:
        """Parameter name prefixes that start untrained (they get ``new_params_lr``)."""
        return ()

    def passage_log_probs(self, examples: Sequence[Example]
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """Joint RAG training: log p(y_t | x, z, y_<t) of each example's answer read with each
        of its k passages alone # (N, k, T), and the answer-token mask # (N, T) (the same
        tokens under every passage). Kinds that do not implement it raise."""
        raise GeneratorError(f"generator kind {self.spec.kind!r} does not give per-passage "
                             "answer log-probabilities (joint RAG training needs them)")

    # ------------------------------------------------------------------ answering

    @torch.no_grad()
    def answer(self, examples: Sequence[Example], batch_size: int = 32, *,
               bf16: bool = False, decoding: str | None = None,
               progress: bool = False) -> list[Prediction]:
        """One prediction per example, in order (greedy; ``decoding`` overrides the spec's)."""
        from tqdm.auto import tqdm

        self.model.eval()
        # sort by length so a batch pads little; restore the order afterwards
        encoded = [self.encode(ex, with_target=False) for ex in examples]
        length = [self.source_length(e) for e in encoded]
        order = sorted(range(len(encoded)), key=lambda i: length[i])
        out: dict[int, Prediction] = {}
        bar = tqdm(total=len(order), disable=not progress, desc="answer", unit="q")
        for b in range(0, len(order), batch_size):
            idx = order[b: b + batch_size]
            chunk = [encoded[i] for i in idx]
            with runtime.autocast(bf16):
                got = self._answer_batch(chunk, decoding or self.spec.decoding)
            out.update(zip(idx, got, strict=True))
            bar.update(len(idx))
        bar.close()
        return [out[i] for i in range(len(encoded))]

    # ------------------------------------------------------------------ what a backend defines

    @abstractmethod
    def encode(self, ex: Example, with_target: bool = True) -> dict[str, Any]:
        """One example as token ids (and its target), before padding."""

    @abstractmethod
    def collate(self, encoded: Sequence[dict[str, Any]], for_training: bool = True
                ) -> dict[str, torch.Tensor]:
        """Encoded examples as one padded batch of tensors."""

    @abstractmethod
    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean token cross-entropy of the reference answers (answer tokens only)."""

    def target_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        """The answer tokens ``loss`` averages over (a rank's weight under torchrun)."""
        return int((batch["labels"] != -100).sum())

    @abstractmethod
    def source_length(self, encoded: dict[str, Any]) -> int:
        """The source tokens of one encoded example (what batches are grouped by)."""

    @abstractmethod
    def _answer_batch(self, chunk: list[dict[str, Any]], decoding: str) -> list[Prediction]:
        """Predictions for one batch of encoded examples, in order."""

    @classmethod
    @abstractmethod
    def _pretrained_model(cls, path: str, kw: dict[str, Any]) -> nn.Module:
        """The warm-start model at ``path`` (``kw``: extra ``from_pretrained`` arguments)."""

    @classmethod
    @abstractmethod
    def _saved_model(cls, in_dir: Path) -> nn.Module:
        """The model written by ``_save_model`` into ``in_dir``."""

    @abstractmethod
    def _save_model(self, tmp: Path) -> None:
        """Write the model's weights (safetensors) and config into the folder ``tmp``."""

    @abstractmethod
    def _embedding_rows(self) -> int:
        """Rows of the model's input embedding (at least the tokenizer's size)."""

    @classmethod
    def _pretrained_tokenizer(cls, path: str, kw: dict[str, Any]) -> Any:
        """The warm start's tokenizer (the one the generator reads and writes with)."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path, **kw)

    @classmethod
    def _check_tokenizer(cls, tok: Any, model_name: str) -> None:
        """Raise ``GeneratorError`` if this kind cannot use ``tok``."""

    def _check_positions(self) -> None:
        """Raise ``GeneratorError`` if the spec's lengths exceed the model's positions."""
