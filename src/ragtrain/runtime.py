"""Where and in what precision torch runs: CUDA when present, bf16 where the hardware has it."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from pathlib import Path

import torch


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@functools.cache
def cpu_has_bf16() -> bool:
    """x86 CPUs with AVX512-BF16 or AMX run bf16 matmuls natively (oneDNN); others emulate."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def use_bf16(precision: str, dev: torch.device | None = None) -> bool:
    """precision 'auto' -> bf16 on a bf16-capable GPU or CPU; 'bf16' / 'fp32' force it."""
    if precision != "auto":
        return precision == "bf16"
    dev = dev or device()
    if dev.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return cpu_has_bf16()


@contextlib.contextmanager
def autocast(enabled: bool, dev: torch.device | None = None) -> Iterator[None]:
    """bf16 autocast on ``dev`` when enabled; a no-op otherwise."""
    dev = dev or device()
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=enabled):
        yield
