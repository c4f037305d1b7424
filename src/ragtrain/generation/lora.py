"""LoRA adapters (peft) for the seq2seq and causal generators.

With ``generator.lora_r > 0`` the warm start's weights are frozen and low-rank adapters
``W + (alpha / r) B A`` train in the chosen modules (peft's per-architecture default when
``lora_target_modules`` is empty: the attention's query / value projections). A saved generator
holds the adapters merged into ``model/`` (plain transformers weights: loading and serving need
no peft) and the adapters alone in ``adapter/`` (``adapter_model.safetensors`` and
``adapter_config.json``, loadable with ``peft.PeftModel.from_pretrained`` on the base model).
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from ragtrain.config import GeneratorConfig
from ragtrain.errors import RagtrainError


class LoraError(RagtrainError):
    """LoRA asked for where it cannot be set up."""


def _peft() -> Any:
    try:
        import peft
    except ImportError:
        raise LoraError("generator.lora_r > 0 needs peft: pip install -e '.[lora]'") from None
    return peft


def is_lora(model: nn.Module) -> bool:
    """Whether ``model`` carries (unmerged) peft adapters."""
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def target_modules(model: nn.Module, cfg: GeneratorConfig) -> list[str] | str:
    """The modules that get adapters: the configured names, peft's default for the
    architecture, else every linear layer (``"all-linear"``)."""
    if cfg.lora_target_modules:
        return list(cfg.lora_target_modules)
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as table

    found = table.get(getattr(model.config, "model_type", ""))
    return list(found) if found else "all-linear"


def add_lora(model: nn.Module, cfg: GeneratorConfig, task_type: str
             ) -> tuple[nn.Module, dict[str, Any]]:
    """``model`` wrapped with trainable adapters (its own weights frozen), and the settings used
    (what ``generator.json`` records)."""
    peft = _peft()
    targets = target_modules(model, cfg)
    lc = peft.LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                         target_modules=targets, task_type=task_type)
    try:
        wrapped = peft.get_peft_model(model, lc)
    except ValueError as e:  # a named module that the model does not have
        raise LoraError(f"generator.lora_target_modules: {e}") from None
    settings = {"r": cfg.lora_r, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout,
                "target_modules": targets, "merged": True}
    return wrapped, settings


def merged(model: nn.Module) -> nn.Module:
    """A copy of a LoRA model with the adapters folded into its weights (plain transformers
    model, same outputs up to float rounding); ``model`` itself keeps training."""
    out: nn.Module = copy.deepcopy(model).merge_and_unload()
    return out
