"""Cached contrastive batches (GradCache): a batch's loss and gradient with chunk-sized memory.

A contrastive loss couples every query with every passage of the batch, so the plain loss holds
the activations of the whole batch at once. Gao et al. 2021 ("Scaling Deep Contrastive Learning
Batch Size under Memory Limited Setup"; Tevatron, sentence-transformers'
CachedMultipleNegativesRankingLoss) split it in two passes:

1. embed every chunk of ``chunk_size`` inputs without a graph, saving the RNG state before each;
2. compute the full-batch loss on the detached embeddings and its gradient wrt them (cheap:
   ``(B, d)`` tensors);
3. at ``backward()``, re-run each chunk with a graph, the RNG state restored (so dropout draws
   the same masks as in step 1), and backpropagate the cached embedding gradient into it.

The parameter gradient is then the one of the plain loss over the same chunks' forward passes.
The returned loss is a leaf whose backward hook runs step 3, so the shared training loop's
``(loss / accum).backward()`` and fp16 loss scaling work unchanged: the hook receives the
upstream gradient (``scale / accum``) and multiplies the cached gradients by it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

# embeds a chunk of inputs -> (chunk, d)
Forward = Callable[[Sequence[Any]], torch.Tensor]


@dataclass(frozen=True)
class RngState:
    """The CPU and CUDA generator states before a chunk's first forward pass."""

    cpu: torch.Tensor
    cuda: tuple[torch.Tensor, ...]

    @classmethod
    def capture(cls) -> RngState:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
        return cls(torch.get_rng_state(), tuple(cuda))

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        """Run the block from this state; the generators are restored afterwards."""
        with torch.random.fork_rng(devices=list(range(len(self.cuda)))):
            torch.set_rng_state(self.cpu)
            if self.cuda:
                torch.cuda.set_rng_state_all(list(self.cuda))
            yield


def _chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def grad_cached_loss(
    parts: Sequence[tuple[Forward, Sequence[Any]]],
    loss_of: Callable[..., torch.Tensor],
    chunk_size: int,
    *,
    context: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
) -> torch.Tensor:
    """The loss ``loss_of(*embeddings)`` whose ``backward()`` runs GradCache's second pass.

    Args:
        parts: ``(forward, inputs)`` per embedded group, e.g. queries then passages; each
            ``forward(inputs[i:i + chunk_size])`` returns ``(chunk, d)`` embeddings.
        loss_of: the loss of the full-batch embeddings, one tensor per part, in order.
        chunk_size: inputs per forward pass (the memory knob); >= 1.
        context: entered around every forward pass (e.g. autocast), not the loss; the second
            pass runs at backward time, outside the caller's own context.
    """
    if chunk_size < 1:
        raise ValueError(f"grad_cached_loss: chunk_size must be >= 1, got {chunk_size}")
    saved: list[list[tuple[Sequence[Any], RngState]]] = []
    reps: list[torch.Tensor] = []
    for forward, inputs in parts:  # pass 1: embeddings without a graph
        chunks, embs = [], []
        for chunk in _chunks(inputs, chunk_size):
            rng = RngState.capture()
            with torch.no_grad(), context():
                embs.append(forward(chunk))
            chunks.append((chunk, rng))
        saved.append(chunks)
        # fp32 leaves: the cached gradients must not underflow before fp16 loss scaling
        reps.append(torch.cat(embs).detach().float().requires_grad_())  # (n_inputs, d)
    with torch.enable_grad():  # outside ``context``, as the plain trainer computes its loss
        loss = loss_of(*reps)
    grads = torch.autograd.grad(loss, reps, allow_unused=True)
    cached = [torch.zeros_like(r) if g is None else g for r, g in zip(reps, grads, strict=True)]
    out = loss.detach().requires_grad_()

    def replay(upstream: torch.Tensor) -> None:  # pass 2, at backward time
        with torch.enable_grad():
            for (forward, _), chunks, grad in zip(parts, saved, cached, strict=True):
                start = 0
                for chunk, rng in chunks:
                    with rng.replay(), context():
                        emb = forward(chunk)  # (chunk, d), the same dropout as in pass 1
                    g = grad[start : start + len(chunk)] * upstream.to(grad.dtype)
                    torch.autograd.backward(emb, g.to(emb.dtype))
                    start += len(chunk)
        saved.clear()  # the inputs and RNG states are needed once

    out.register_hook(replay)
    return out
