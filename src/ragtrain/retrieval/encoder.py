"""Dense bi-encoder: any Hugging Face encoder + mean/CLS pooling, L2-normalised.

Shared or separate query / passage towers (DPR style), one max length per tower. Saved as
safetensors (``save_pretrained``) plus ``retriever.json``; a fingerprint of the weights binds an
index to the encoder that built it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ragtrain import runtime
from ragtrain.config import RetrieverConfig
from ragtrain.errors import RagtrainError
from ragtrain.io import atomic_path
from ragtrain.models import model_load_error, resolve_model_path, without_attention_dropout
from ragtrain.retrieval.onnx_runtime import ONNX_BATCH, OnnxModel, on_runtime, onnx_towers

SPEC_FILE = "retriever.json"


@dataclass(frozen=True)
class EncoderSpec:
    base_model: str
    pooling: str = "mean"
    shared_encoder: bool = True
    query_max_length: int = 64
    passage_max_length: int = 256

    @classmethod
    def from_config(cls, cfg: RetrieverConfig) -> EncoderSpec:
        return cls(cfg.model_name, cfg.pooling, cfg.shared_encoder, cfg.query_max_length,
                   cfg.passage_max_length)


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """(batch, seq, dim) -> (batch, dim): masked mean, or the first ([CLS]) token."""
    if how == "cls":
        return hidden[:, 0]
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


class Tower(torch.nn.Module):
    """One encoder: transformer -> pooling -> L2 normalisation."""

    def __init__(self, model: torch.nn.Module, pooling: str) -> None:
        super().__init__()
        self.model = model
        self.pooling = pooling

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                **kw: torch.Tensor) -> torch.Tensor:
        dev = next(self.model.parameters()).device  # inputs are built on the CPU
        input_ids, attention_mask = input_ids.to(dev), attention_mask.to(dev)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         **{k: v.to(dev) for k, v in kw.items()})
        return F.normalize(pool(out.last_hidden_state, attention_mask, self.pooling), dim=-1)


class BiEncoder(torch.nn.Module):
    """Query and passage towers (the same module when shared) and their tokenizer."""

    def __init__(self, query: Tower, passage: Tower | None, tokenizer: Any,
                 spec: EncoderSpec) -> None:
        super().__init__()
        self.query_tower = query
        self.passage_tower = passage  # None: shared with the query tower
        self.tokenizer = tokenizer
        self.spec = spec
        self.onnx: tuple[OnnxModel, OnnxModel] | None = None  # (query, passage) ONNX Runtime towers

    def use_runtime(self, name: str) -> BiEncoder:
        """Encode with ``name`` (retriever.runtime): torch, or ONNX Runtime fp32 / int8 (the
        towers exported now, from the current weights; training still runs in torch)."""
        self.onnx = on_runtime(name, "retriever.runtime", lambda int8: onnx_towers(
            self.query_tower, self.passage_tower, self.tokenizer, int8))
        return self

    @property
    def passage(self) -> Tower:
        return self.passage_tower if self.passage_tower is not None else self.query_tower

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_pretrained(cls, spec: EncoderSpec, *, attention_dropout: bool = True) -> BiEncoder:
        """A fresh bi-encoder from a hub name, a local folder or the bundled MiniLM;
        ``attention_dropout=False`` trains without attention-probability dropout (SDPA's fast
        path: cheaper steps; retriever.attention_dropout)."""
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        path = resolve_model_path(spec.base_model)
        try:
            tok = AutoTokenizer.from_pretrained(path)
            config = AutoConfig.from_pretrained(path)
            if not attention_dropout:
                config = without_attention_dropout(config)
            q = AutoModel.from_pretrained(path, config=config)
            p = None if spec.shared_encoder else AutoModel.from_pretrained(path, config=config)
        except OSError as e:
            raise model_load_error(spec.base_model, e) from None
        return cls(Tower(q, spec.pooling), Tower(p, spec.pooling) if p is not None else None,
                   tok, spec).to(runtime.device()).eval()

    def save(self, out_dir: Path) -> None:
        """Atomically write the towers (safetensors), tokenizer and spec to ``out_dir``."""
        with atomic_path(out_dir) as tmp:
            tmp.mkdir()
            self.query_tower.model.save_pretrained(tmp / "query")
            if self.passage_tower is not None:
                self.passage_tower.model.save_pretrained(tmp / "passage")
            self.tokenizer.save_pretrained(tmp / "tokenizer")
            meta = {**asdict(self.spec), "fingerprint": self.fingerprint()}
            (tmp / SPEC_FILE).write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, in_dir: Path) -> BiEncoder:
        from transformers import AutoModel, AutoTokenizer

        spec_file = in_dir / SPEC_FILE
        if not spec_file.exists():
            raise RagtrainError(f"{spec_file}: missing; is {in_dir} a saved retriever?")
        meta = json.loads(spec_file.read_text())
        saved_fp = meta.pop("fingerprint", None)
        spec = EncoderSpec(**meta)
        tok = AutoTokenizer.from_pretrained(in_dir / "tokenizer")
        q = AutoModel.from_pretrained(in_dir / "query")
        p = AutoModel.from_pretrained(in_dir / "passage") if not spec.shared_encoder else None
        if tok.vocab_size > q.config.vocab_size:
            raise RagtrainError(
                f"{in_dir}: tokenizer vocabulary ({tok.vocab_size}) does not fit the model "
                f"({q.config.vocab_size}); the checkpoint and tokenizer do not belong together")
        model = cls(Tower(q, spec.pooling), Tower(p, spec.pooling) if p is not None else None,
                    tok, spec).to(runtime.device()).eval()
        if saved_fp and model.fingerprint() != saved_fp:
            raise RagtrainError(f"{in_dir}: weights do not match the fingerprint saved with them "
                                "(corrupted or edited); retrain or restore the retriever")
        return model

    def fingerprint(self) -> str:
        from ragtrain.retrieval.index import fingerprint_state_dict

        return fingerprint_state_dict(self.state_dict())

    # ------------------------------------------------------------------ encoding

    def tokenize(self, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=max_length,
                             return_tensors="pt")
        dev = next(self.parameters()).device
        return {k: v.to(dev) for k, v in enc.items()}

    def forward_queries(self, texts: list[str]) -> torch.Tensor:
        return self.query_tower(**self.tokenize(texts, self.spec.query_max_length))

    def forward_passages(self, texts: list[str]) -> torch.Tensor:
        return self.passage(**self.tokenize(texts, self.spec.passage_max_length))

    def encode_queries(self, texts: list[str], batch_size: int = 64,
                       progress: bool = False) -> np.ndarray:
        if self.onnx is not None:
            return encode_with(_named(self.onnx[0]), self.tokenizer, texts,
                               self.spec.query_max_length, min(batch_size, ONNX_BATCH),
                               progress, "queries")
        return encode(self.query_tower, self.tokenizer, texts, self.spec.query_max_length,
                      batch_size, progress, "queries")

    def encode_passages(self, texts: list[str], batch_size: int = 64,
                        progress: bool = False) -> np.ndarray:
        if self.onnx is not None:
            return encode_with(_named(self.onnx[1]), self.tokenizer, texts,
                               self.spec.passage_max_length, min(batch_size, ONNX_BATCH),
                               progress, "passages")
        return encode(self.passage, self.tokenizer, texts, self.spec.passage_max_length,
                      batch_size, progress, "passages")


@torch.inference_mode()
def encode(tower: Tower, tokenizer: Any, texts: list[str], max_length: int, batch_size: int,
           progress: bool = False, desc: str = "encode") -> np.ndarray:
    """Embeddings # (n, dim) float32, in input order; batches of similar length (less padding)."""
    was_training = tower.training
    tower.eval()
    try:
        return encode_with(lambda ids, mask: tower(input_ids=ids, attention_mask=mask)
                           .float().cpu().numpy(), tokenizer, texts, max_length, batch_size,
                           progress, desc)
    finally:
        tower.train(was_training)


def _named(model: Callable[..., np.ndarray]) -> Callable[[torch.Tensor, torch.Tensor], np.ndarray]:
    """An ONNX Runtime model (named inputs) as ``encode_with``'s ``forward``."""
    return lambda ids, mask: model(input_ids=ids, attention_mask=mask)


def encode_with(forward: Callable[[torch.Tensor, torch.Tensor], np.ndarray], tokenizer: Any,
                texts: list[str], max_length: int, batch_size: int, progress: bool = False,
                desc: str = "encode") -> np.ndarray:
    """``forward(input_ids, attention_mask)`` over ``texts`` in batches of similar length (less
    padding) -> embeddings # (n, dim) float32, in input order."""
    if not texts:
        raise RagtrainError(f"encode {desc}: no texts")
    ids = tokenizer(texts, truncation=True, max_length=max_length, add_special_tokens=True,
                    return_attention_mask=False)["input_ids"]
    order = np.argsort([-len(x) for x in ids], kind="stable")
    out: np.ndarray | None = None
    pad = tokenizer.pad_token_id or 0
    bar = tqdm(total=len(texts), disable=not progress, desc=f"encode {desc}", unit="text")
    for start in range(0, len(texts), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(ids[i]) for i in idx)
        input_ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            input_ids[row, : len(ids[i])] = torch.tensor(ids[i])
            mask[row, : len(ids[i])] = 1
        emb = forward(input_ids, mask)
        if out is None:
            out = np.empty((len(texts), emb.shape[1]), dtype=np.float32)
        out[idx] = emb
        bar.update(len(idx))
    bar.close()
    assert out is not None
    return out
