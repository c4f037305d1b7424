"""Cross-encoder reranker: one relevance logit per (question, passage) pair.

Any Hugging Face encoder as ``AutoModelForSequenceClassification(num_labels=1)`` (the bundled
MiniLM offline: its scoring head is new), reading ``question [SEP] title. passage``, or, with
``window_words``, ``question [SEP] title. window`` for each word window of the passage, the
passage scored by its best window (MaxP, as the windowed index: shorter pairs train faster and
the answer's sentence is not diluted by the rest of the passage). It reorders the first stage's
top candidates; the final score fuses both, min-max normalised over the candidates. Saved as a
plain Hugging Face folder (safetensors + tokenizer) plus ``reranker.json`` with the spec and the
fingerprint of the weights, so a bundle can bind the exact reranker it was built with.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ragtrain import runtime
from ragtrain.config import RerankerConfig
from ragtrain.data.corpus import Corpus
from ragtrain.errors import RagtrainError, RetrievalError
from ragtrain.io import atomic_path
from ragtrain.models import (
    autocast_padding_mask,
    model_load_error,
    resolve_model_path,
    without_attention_dropout,
)
from ragtrain.retrieval.onnx_runtime import ONNX_BATCH, OnnxModel, on_runtime, onnx_cross_encoder
from ragtrain.retrieval.windows import passage_windows

SPEC_FILE = "reranker.json"
MODEL_DIR = "model"  # the weights, config and tokenizer: loadable by any HF / ST cross-encoder


@dataclass(frozen=True)
class RerankerSpec:
    base_model: str
    max_length: int = 256  # question + passage tokens, the passage cut first
    window_words: int = 0  # > 0: passages read as windows of this many words (0: whole)
    window_stride: int = 0  # words between window starts; 0 = half a window

    @classmethod
    def from_config(cls, cfg: RerankerConfig) -> RerankerSpec:
        return cls(cfg.model_name, cfg.max_length, cfg.window_words, cfg.window_stride)


# What the reranker reads of one passage: its text, or its windows' texts (scored by the best).
PassageText = str | Sequence[str]


def passage_texts(corpus: Corpus, spec: RerankerSpec) -> dict[str, tuple[str, ...]]:
    """What the reranker reads of each passage, by id: ``(title. text,)`` (as the encoders
    do), or, with ``spec.window_words``, each of its windows (``windows.passage_windows``)."""
    texts, owners = passage_windows(corpus.passages, spec.window_words, spec.window_stride)
    out: dict[str, list[str]] = {}
    for text, pid in zip(texts, owners, strict=True):
        out.setdefault(pid, []).append(text)
    return {pid: tuple(t) for pid, t in out.items()}


_WORD = re.compile(r"\w+")


def lexical_windows(question: str, passages: Sequence[Sequence[str]], n: int
                    ) -> list[list[int]]:
    """Per passage, the indices (in passage order) of its ``n`` windows sharing the most of the
    question's words, each word weighted by its BM25 idf among all these windows (ties: the
    earlier window); a passage of at most ``n`` windows keeps them all; ``n`` = 0 keeps all.
    A cheap pre-selection: the cross-encoder then reads only these (reranker.max_windows)."""
    if n <= 0 or all(len(p) <= n for p in passages):
        return [list(range(len(p))) for p in passages]
    terms = set(_WORD.findall(question.lower()))
    seen = [[terms.intersection(_WORD.findall(w.lower())) for w in p] for p in passages]
    df: dict[str, int] = {}
    for hits in (h for p in seen for h in p):
        for t in hits:
            df[t] = df.get(t, 0) + 1
    total = sum(len(p) for p in passages)
    idf = {t: math.log(1 + (total - d + 0.5) / (d + 0.5)) for t, d in df.items()}
    out = []
    for hits in seen:
        score = [sum(idf[t] for t in h) for h in hits]
        best = sorted(range(len(hits)), key=lambda j: (-score[j], j))[:n]
        out.append(sorted(best))
    return out


class Reranker(torch.nn.Module):
    """A sequence-classification model with one logit, its tokenizer and spec."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, spec: RerankerSpec,
                 new_params: Sequence[str] = ()) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.spec = spec
        # parameter names (as this module names them) the warm start did not have: the head
        self.new_params = tuple(new_params)
        self.onnx: OnnxModel | None = None  # an ONNX Runtime copy that scores instead (use_runtime)

    def use_runtime(self, name: str) -> Reranker:
        """Score with ``name`` (reranker.runtime): torch, or ONNX Runtime fp32 / int8 (exported
        now from the current weights; training still runs in torch)."""
        self.onnx = on_runtime(name, "reranker.runtime", lambda int8: onnx_cross_encoder(
            self.model, self.tokenizer, int8))
        return self

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_pretrained(cls, spec: RerankerSpec, seed: int = 0) -> Reranker:
        """A fresh reranker from a hub name, a local folder or the bundled MiniLM; the new head
        is initialised from ``seed`` (the same weights every time: a resumable run's start)."""
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

        path = resolve_model_path(spec.base_model)
        try:
            tok = AutoTokenizer.from_pretrained(path)
            # attention-probability dropout off (SDPA's fast path; models.py)
            config = without_attention_dropout(AutoConfig.from_pretrained(path, num_labels=1))
            with torch.random.fork_rng(devices=[]):  # the caller's RNG stream is untouched
                torch.manual_seed(seed)
                model, info = AutoModelForSequenceClassification.from_pretrained(
                    path, config=config, output_loading_info=True)
        except (OSError, ValueError) as e:
            raise model_load_error(spec.base_model, e) from None
        new = sorted(f"model.{k}" for k in info.get("missing_keys", ()))
        return cls(model, tok, spec, new).to(runtime.device()).eval()

    def save(self, out_dir: Path) -> None:
        """Atomically write the model and tokenizer (one HF folder) and the spec to ``out_dir``."""
        with atomic_path(out_dir) as tmp:
            tmp.mkdir()
            self.model.save_pretrained(tmp / MODEL_DIR)
            self.tokenizer.save_pretrained(tmp / MODEL_DIR)
            meta = {**asdict(self.spec), "fingerprint": self.fingerprint()}
            (tmp / SPEC_FILE).write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, in_dir: Path) -> Reranker:
        """A saved reranker; refused when ``in_dir`` holds the disabled marker, misses its
        spec, or its weights differ from the fingerprint saved with them."""
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        in_dir = Path(in_dir)
        spec_file = in_dir / SPEC_FILE
        if not spec_file.exists():
            held = sorted(p.name for p in in_dir.iterdir()) if in_dir.is_dir() else []
            raise RagtrainError(f"{spec_file}: missing; is {in_dir} a saved reranker? (it holds "
                                f"{', '.join(held) or 'nothing'}); run `ragtrain train-reranker`")
        meta = json.loads(spec_file.read_text())
        saved_fp = meta.pop("fingerprint", None)
        try:
            spec = RerankerSpec(**meta)
        except TypeError as e:
            raise RagtrainError(f"{spec_file}: not a reranker spec ({e})") from None
        try:
            tok = AutoTokenizer.from_pretrained(in_dir / MODEL_DIR)
            model = AutoModelForSequenceClassification.from_pretrained(in_dir / MODEL_DIR)
        except (OSError, ValueError) as e:
            raise RagtrainError(f"{in_dir / MODEL_DIR}: cannot load the reranker "
                                f"({type(e).__name__}: {str(e).splitlines()[0]})") from None
        if model.config.num_labels != 1:
            raise RagtrainError(f"{in_dir / MODEL_DIR}: a reranker has 1 output label, this "
                                f"model has {model.config.num_labels}")
        out = cls(model, tok, spec).to(runtime.device()).eval()
        if saved_fp and out.fingerprint() != saved_fp:
            raise RagtrainError(f"{in_dir}: weights do not match the fingerprint saved with them "
                                "(corrupted or edited); retrain or restore the reranker")
        return out

    def fingerprint(self) -> str:
        """sha256 over the weights (as ``BiEncoder.fingerprint``)."""
        from ragtrain.retrieval.index import fingerprint_state_dict

        return fingerprint_state_dict(self.state_dict())

    # ------------------------------------------------------------------ scoring

    def tokenize(self, questions: Sequence[str], passages: Sequence[str],
                 padding: bool) -> dict[str, Any]:
        """Pairs ``[CLS] question [SEP] passage [SEP]`` within max_length: the longer side is
        cut first (``longest_first``), so only the passage is cut unless the question takes more
        than half the budget (``only_second`` would fail on such a question)."""
        return self.tokenizer(list(questions), list(passages), truncation="longest_first",
                              max_length=self.spec.max_length, padding=padding,
                              return_tensors="pt" if padding else None)

    def forward_pairs(self, questions: Sequence[str], passages: Sequence[str]) -> torch.Tensor:
        """Logits # (n_pairs,) with gradients (training)."""
        enc = self.tokenize(questions, passages, padding=True)
        dev = next(self.parameters()).device
        enc = {k: v.to(dev) for k, v in enc.items()}
        enc["attention_mask"] = autocast_padding_mask(self.model, enc["attention_mask"])
        return self.model(**enc).logits[:, 0]

    @torch.inference_mode()
    def score(self, questions: Sequence[str], passage_lists: Sequence[Sequence[PassageText]],
              *, batch_size: int = 64, bf16: bool = False, progress: bool = False,
              max_windows: int = 0) -> list[np.ndarray]:
        """One float32 score array per question, over its passages, in input order: a passage
        is a text, or its windows' texts (``passage_texts``) and then scored by the best one
        (with ``max_windows``, the best of its ``lexical_windows``). Batches of similar length
        (less padding), bf16 autocast when ``bf16``."""
        if len(questions) != len(passage_lists):
            raise RetrievalError(f"score: {len(questions)} questions but "
                                 f"{len(passage_lists)} passage lists")
        sizes: list[int] = []  # per passage: how many texts (windows) it is read as
        qs: list[str] = []
        ps: list[str] = []
        for q, plist in zip(questions, passage_lists, strict=True):
            read = [[p] if isinstance(p, str) else list(p) for p in plist]
            if any(not texts for texts in read):
                raise RetrievalError("score: a passage with no text to read (no windows)")
            keep = lexical_windows(q, read, max_windows)
            for texts, idx in zip(read, keep, strict=True):
                texts = [texts[j] for j in idx]
                sizes.append(len(texts))
                ps += texts
                qs += [q] * len(texts)
        flat = self._score_pairs(qs, ps, batch_size, bf16, progress)
        if len(ps) > len(sizes):  # windows: each passage scores its best window
            flat = np.maximum.reduceat(flat, np.cumsum([0, *sizes[:-1]]))
        out, start = [], 0
        for plist in passage_lists:
            out.append(flat[start:start + len(plist)])
            start += len(plist)
        return out

    def _score_pairs(self, qs: Sequence[str], ps: Sequence[str], batch_size: int, bf16: bool,
                     progress: bool) -> np.ndarray:
        """The logit # (n_pairs,) of each (question, text) pair, float32."""
        flat = np.empty(len(ps), dtype=np.float32)
        if ps:
            was_training = self.training
            self.eval()
            enc = self.tokenize(qs, ps, padding=False)
            keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
            order = np.argsort([-len(x) for x in enc["input_ids"]], kind="stable")
            pad = {"input_ids": self.tokenizer.pad_token_id or 0}
            dev = next(self.parameters()).device
            bar = tqdm(total=len(ps), disable=not progress, desc="rerank", unit="pair")
            if self.onnx is not None:
                batch_size = min(batch_size, ONNX_BATCH)
            for start in range(0, len(ps), batch_size):
                idx = order[start:start + batch_size]
                width = len(enc["input_ids"][idx[0]])  # sorted: the first is the longest
                batch = {k: torch.full((len(idx), width), pad.get(k, 0), dtype=torch.long)
                         for k in keys}
                for row, i in enumerate(idx):
                    for k in keys:
                        batch[k][row, :len(enc[k][i])] = torch.tensor(enc[k][i])
                if self.onnx is not None:
                    flat[idx] = self.onnx(**batch)
                else:
                    with runtime.autocast(bf16, dev):
                        logits = self.model(**{k: v.to(dev) for k, v in batch.items()}).logits
                    flat[idx] = logits[:, 0].float().cpu().numpy()
                bar.update(len(idx))
            bar.close()
            self.train(was_training)
        return flat

    def rerank(self, questions: Sequence[str], scores: np.ndarray | Sequence[Sequence[float]],
               ids: Sequence[Sequence[str]], passages: Mapping[str, PassageText], *,
               candidates: int, fuse_weight: float, batch_size: int = 64, bf16: bool = False,
               progress: bool = False, max_windows: int = 0
               ) -> tuple[np.ndarray, list[list[str]]]:
        """Reorder each question's top ``candidates`` first-stage passages by the fused score.

        ``scores`` # (n_questions, k) and ``ids`` are a first stage's result (as
        ``Retriever.search`` returns them; an id list may be shorter than k). ``passages`` maps
        an id to what the reranker reads (``passage_texts``; ``max_windows``: as ``score``).
        Returns the same shapes: the reranked head, then the rest of the list in first-stage
        order (``fuse_scores``).
        """
        if len(ids) != len(questions):
            raise RetrievalError(f"rerank: {len(questions)} questions but {len(ids)} id lists")
        if candidates < 1:
            raise RetrievalError(f"rerank: candidates must be >= 1, got {candidates}")
        heads = [list(row[:candidates]) for row in ids]
        missing = next((p for row in heads for p in row if p not in passages), None)
        if missing is not None:
            raise RetrievalError(f"rerank: passage {missing!r} is not in the corpus")
        r = self.score(questions, [[passages[p] for p in row] for row in heads],
                       batch_size=batch_size, bf16=bf16, progress=progress,
                       max_windows=max_windows)
        return apply_fusion(r, scores, ids, fuse_weight)


def apply_fusion(reranker_scores: Sequence[np.ndarray],
                 scores: np.ndarray | Sequence[Sequence[float]], ids: Sequence[Sequence[str]],
                 weight: float) -> tuple[np.ndarray, list[list[str]]]:
    """Each question's list reordered by ``fuse_scores`` of its head's reranker scores:
    scores # (n_questions, k) (-inf beyond an id list's end) and ids, best first."""
    first = np.asarray(scores, dtype=np.float64)
    if first.ndim != 2 or first.shape[0] != len(ids):
        raise RetrievalError(f"rerank: expected first-stage scores of shape (n_questions="
                             f"{len(ids)}, k), got {first.shape}")
    out = np.full(first.shape, -np.inf, dtype=np.float64)  # (n_questions, k)
    out_ids: list[list[str]] = []
    for qi, row in enumerate(ids):
        if len(row) > first.shape[1]:
            raise RetrievalError(f"rerank: question {qi} has {len(row)} ids but "
                                 f"{first.shape[1]} scores")
        fused, order = fuse_scores(reranker_scores[qi], first[qi, :len(row)], weight)
        out[qi, :len(row)] = fused[order]
        out_ids.append([row[j] for j in order])
    return out, out_ids


def _minmax(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)


def fuse_scores(reranker: np.ndarray, first: np.ndarray, weight: float
                ) -> tuple[np.ndarray, np.ndarray]:
    """Fused scores # (n,) of one ranked list and the order that sorts it (best first).

    The head (the first ``m = len(reranker)`` passages) gets ``w * minmax(reranker) + (1 - w) *
    minmax(first[:m])``, both normalised over the head (a constant list maps to 0). The tail keeps
    its first-stage order with ``(1 - w) * minmax(first)`` on the head's scale: at most 0, below
    every head score. Ties in the head keep first-stage order.
    """
    m = len(reranker)
    if not 0.0 <= weight <= 1.0:
        raise RetrievalError(f"fuse_weight: must be in [0, 1], got {weight!r}")
    if m > len(first):
        raise RetrievalError(f"fuse_scores: {m} reranker scores for {len(first)} passages")
    head = first[:m]
    if not (np.isfinite(head).all() and np.isfinite(reranker).all()):
        raise RetrievalError("fuse_scores: a NaN or infinite score among the candidates")
    lo, hi = (float(head.min()), float(head.max())) if m else (0.0, 0.0)
    r = np.asarray(reranker, dtype=np.float64)
    rn = _minmax(r, float(r.min()), float(r.max())) if m else r
    fused = np.concatenate([weight * rn + (1 - weight) * _minmax(head, lo, hi),
                            (1 - weight) * np.minimum(_minmax(first[m:], lo, hi), 0.0)])
    order = np.concatenate([np.argsort(-fused[:m], kind="stable"), np.arange(m, len(first))])
    return fused, order.astype(np.int64)
