"""Dropout with a cheaper mask on the CPU.

PyTorch's CPU ``bernoulli_`` (what ``nn.Dropout`` draws its mask with) takes its vectorised MKL
path on Intel CPUs only; elsewhere it draws one 32-bit number per element, serially. In a copy
generator training step on a 2-core AMD EPYC that was ~17% of the step (13 hidden-state
dropouts of 16 x 273 x 384, ~7.4 ms each). ``keep_mask`` draws one 64-bit number per four
elements instead. ``set_training`` puts ``CpuDropout`` in place of the ``nn.Dropout`` layers of
a model that trains on the CPU.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def keep_mask(shape: tuple[int, ...], p: float) -> torch.Tensor:
    """A dropout keep-mask (bool) from the default CPU generator (so ``torch.manual_seed`` fixes
    it): each element kept with probability ``1 - p``, to 1/65,536. Each 64-bit draw is split
    into four 16-bit values, one per element."""
    n = math.prod(shape)
    words = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), 2**63 - 1)
    dropped = round(p * 65536)  # of the 65,536 values of a 16-bit draw, these many drop
    return words.view(torch.int16)[:n].view(shape) >= -32768 + dropped


class CpuDropout(nn.Dropout):
    """``nn.Dropout`` with its mask from ``keep_mask`` on the CPU: the same distribution (each
    element kept with probability 1 - p, kept values scaled by 1 / (1 - p)), a cheaper draw.
    In eval mode, with p = 0 or off the CPU it is ``nn.Dropout`` itself."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0 or x.device.type != "cpu":
            return super().forward(x)
        if self.p == 1.0:
            return x.zero_() if self.inplace else torch.zeros_like(x)
        mask = keep_mask(tuple(x.shape), self.p).to(x.dtype)
        scale = 1.0 / (1.0 - self.p)
        return x.mul_(mask).mul_(scale) if self.inplace else x * mask * scale
