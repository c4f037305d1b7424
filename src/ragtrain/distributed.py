"""Data-parallel training under ``torchrun`` (torch DDP): the process group, this rank's shard of
a batch, and embeddings gathered across ranks with their gradient.

``torchrun --nproc_per_node N -m ragtrain train-retriever`` (or ``RAGTRAIN_NPROC_PER_NODE=N``
before ``dvc repro`` / the flow: the CLI relaunches its training stages under torchrun) starts N
processes; ``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous, and the
first call here joins the group (gloo on CPU, nccl on GPU). Without those variables every
function is the one-process identity, so the same code runs both ways.

How a trainer splits its work (``trainer.train_loop`` does the rest):

- every rank builds the same global micro-batch (the batches are a pure function of the seed and
  the index) and keeps its contiguous share (``shard``), so N ranks see what one process sees;
- contrastive losses gather the passage embeddings of all ranks with ``gather_rows``, whose
  backward returns each rank the gradient of every rank's loss wrt its own rows: in-batch
  negatives span the global batch;
- the loop weights each rank's mean loss by its share of the examples, and DDP averages the
  gradients, so the update equals the one-process update of the global batch.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from collections.abc import Iterator, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:  # torch is imported where it is used: the CLI starts without it
    import torch

T = TypeVar("T")

NPROC_ENV = "RAGTRAIN_NPROC_PER_NODE"  # >1: the CLI relaunches training stages under torchrun


def requested_processes() -> int:
    """``RAGTRAIN_NPROC_PER_NODE`` (default 1): how many processes a training stage asks for."""
    raw = os.environ.get(NPROC_ENV, "1").strip() or "1"
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        from ragtrain.errors import ConfigError

        raise ConfigError(f"{NPROC_ENV}={raw!r}: expected a whole number of processes >= 1")
    return n


def relaunch(nproc: int, args: Sequence[str]) -> int:
    """Run ``python *args`` as ``nproc`` processes on this machine under torchrun
    (``--standalone``: a local rendezvous); its exit status. On a CPU each process gets an equal
    share of the cores as its thread count, unless OMP_NUM_THREADS says otherwise."""
    import subprocess
    import sys

    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // nproc)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", *args]
    return subprocess.run(cmd, env=env, check=False).returncode


def world_size() -> int:
    """Processes in the job: torchrun's WORLD_SIZE, else 1."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """Rank 0: the only one that writes checkpoints, outputs, metrics and MLflow runs."""
    return rank() == 0


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


@functools.cache
def _ddp_group() -> Any:
    """A group of its own for DDP's gradient buckets, so that their asynchronous all-reduces
    never interleave with the collectives a loss runs (``gather_rows``) on the default group."""
    import torch.distributed as dist

    return dist.new_group(backend=dist.get_backend())


def init() -> bool:
    """Join the process group once when launched with WORLD_SIZE > 1; whether distributed."""
    if world_size() <= 1:
        return False
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # CUDA tensors over nccl, CPU ones (a model left on the CPU) over gloo
        dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo",
                                timeout=timedelta(hours=2))
    return True


def barrier() -> None:
    if init():
        import torch.distributed as dist

        dist.barrier()


def share(n: int) -> range:
    """This rank's contiguous share of ``n`` items: sizes differ by at most one, in rank order
    (empty on the last ranks when ``n`` is smaller than the world, e.g. an epoch's last batch)."""
    w, r = world_size(), rank()
    base, extra = divmod(n, w)
    start = r * base + min(r, extra)
    return range(start, start + base + (r < extra))


def work(n: int) -> range:
    """The items this rank computes: its share, or the first item when its share is empty (it
    then weighs 0: see ``weight``), so that every rank runs the forward and backward DDP
    expects."""
    s = share(n)
    return s if len(s) else range(0, min(1, n))


def weight(n: int, w: float) -> float:
    """This rank's weight ``w`` for its share of ``n`` items, or 0 when it has none."""
    return w if len(share(n)) else 0


def shard(items: Sequence[T]) -> list[T]:
    """The items of a global batch this rank computes (``work``; all of them in one process)."""
    if world_size() <= 1:
        return list(items)
    s = work(len(items))
    return list(items[s.start:s.stop])


def gather_rows(x: torch.Tensor, n: int) -> torch.Tensor:
    """Each rank gives the rows of its ``work(n)`` items (rows, d); their ``share(n)`` rows
    (none from a rank whose share is empty) are concatenated in rank order -> (n, d),
    differentiable: each rank's backward gets the summed gradient of all ranks for its rows."""
    if not init():
        return x
    import torch
    from torch.distributed.nn.functional import all_gather

    w = world_size()
    width = max(1, -(-n // w))  # the same on every rank
    dtype, x = x.dtype, x.float()  # gathered in fp32 (every backend has it), returned as given
    padded = torch.cat([x, x.new_zeros((width - x.shape[0], *x.shape[1:]))]) \
        if x.shape[0] < width else x
    with warnings.catch_warnings():  # its successor (_functional_collectives) is private API
        warnings.filterwarnings("ignore", "torch.distributed.nn.functional.all_gather",
                                FutureWarning)
        parts = all_gather(padded)
    sizes = [n // w + (r < n % w) for r in range(w)]
    return torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)]).to(dtype)


def gather_to_main(obj: T) -> list[T] | None:
    """Every rank's ``obj`` (picklable) on rank 0, in rank order; None on the others."""
    if not init():
        return [obj]
    import torch.distributed as dist

    box: list[Any] | None = [None] * world_size() if is_main() else None
    dist.gather_object(obj, box, dst=0)
    return box


class ShardedMap:
    """``fn`` over a list, its items split across the ranks and the results joined on rank 0.

    Rank 0 (the leader) calls the instance with the list, as often as it needs (the other ranks
    do not know the lists: e.g. only the passages missing from an embedding cache); the other
    ranks call ``follow()``, which serves every call until the leader's ``close()``. ``fn`` maps
    a list to an array of one row per item; rows come back in the list's order. In one process
    the instance is ``fn`` itself."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def _round(self, items: Sequence[Any]) -> Any:
        import numpy as np

        s = share(len(items))
        part = self.fn(list(items[s.start:s.stop])) if len(s) else None
        parts = gather_to_main(part)
        if parts is None:
            return None
        done = [p for p in parts if p is not None]  # none for an empty list: fn's own answer
        return np.concatenate(done) if done else self.fn([])

    def __call__(self, items: Sequence[Any]) -> Any:
        if not init():
            return self.fn(items)
        return self._round(broadcast(list(items)))

    def close(self) -> None:
        """Leader: release the followers."""
        if init():
            broadcast(None)

    def follow(self) -> None:
        """Non-zero ranks: take part in the leader's calls until it closes."""
        while (items := broadcast(None)) is not None:
            self._round(items)


def sum_all(values: Sequence[float]) -> list[float]:
    """Element-wise sums over ranks (float64)."""
    import torch
    import torch.distributed as dist

    t = torch.tensor(list(values), dtype=torch.float64)
    if init():
        dist.all_reduce(t)
    return t.tolist()


def broadcast(obj: T) -> T:
    """Rank 0's ``obj`` on every rank (picklable)."""
    if not init():
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wrap(model: torch.nn.Module) -> Any:
    """``model`` under DistributedDataParallel (its parameters broadcast from rank 0), or None
    in one process. Call the result as ``ddp(loss_fn, micro)``."""
    if not init():
        return None
    import torch
    from torch.nn.parallel import DistributedDataParallel

    class _Call(torch.nn.Module):
        """DDP calls ``forward``: this one runs a whole loss computation, however many towers
        or passes it makes, as one DDP forward (one gradient synchronisation per backward)."""

        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, fn: Any, *args: Any) -> Any:
            return fn(*args)

    dev = next(model.parameters()).device
    return DistributedDataParallel(
        _Call(model), device_ids=[dev.index] if dev.type == "cuda" else None,
        process_group=_ddp_group(), find_unused_parameters=True)


@contextlib.contextmanager
def no_sync(ddp: Any, skip: bool) -> Iterator[None]:
    """Accumulate gradients locally (DDP's no_sync) when ``skip``: all but the last micro-batch."""
    with ddp.no_sync() if ddp is not None and skip else contextlib.nullcontext():
        yield
