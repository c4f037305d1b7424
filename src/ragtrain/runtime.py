"""Where and in what precision torch runs: CUDA when present; bf16 autocast where the hardware has
it, fp16 autocast (with loss scaling in the training loop) on GPUs without bf16."""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from pathlib import Path

import torch


def device() -> torch.device:
    """Where models are placed: this process's GPU when there is one (under torchrun the rank's
    ``LOCAL_RANK``), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


@functools.cache
def cpu_has_bf16() -> bool:
    """x86 CPUs with AVX512-BF16 or AMX run bf16 matmuls natively (oneDNN); others emulate."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def amp_dtype(precision: str, dev: torch.device | None = None) -> torch.dtype | None:
    """The autocast dtype for ``precision``: 'auto' -> bf16 on a bf16-capable GPU or CPU, fp16 on
    an older GPU, none (fp32) on a CPU without bf16; 'bf16' / 'fp16' / 'fp32' force it."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    dev = dev or device()
    if dev.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_bf16() else None


def use_bf16(precision: str, dev: torch.device | None = None) -> bool:
    """Whether ``precision`` means bf16 autocast here (inference paths: fp16 runs them in fp32)."""
    return amp_dtype(precision, dev) == torch.bfloat16


@contextlib.contextmanager
def autocast(enabled: bool | torch.dtype | None, dev: torch.device | None = None
             ) -> Iterator[None]:
    """Autocast on ``dev``: True -> bf16, a dtype -> that dtype; False / None -> a no-op."""
    dev = dev or device()
    dtype = torch.bfloat16 if enabled is True else enabled
    with torch.autocast(dev.type, dtype=dtype or torch.bfloat16, enabled=bool(dtype)):
        yield
