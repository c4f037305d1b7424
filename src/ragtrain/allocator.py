"""The memory allocator the stage commands run under: jemalloc when the system has it.

Training batches change shape every step. glibc's malloc hands the freed blocks back to the
system and maps and zero-fills fresh pages for the next shapes, so a 60-step ``train_generator``
run took 8.5 million page faults and 66-68 s. jemalloc configured to keep its freed pages took
0.78 million and 52 s, with the same loss at every step (BENCHMARKS.md, "Training-step kernels").

A preloaded allocator must be in place before the interpreter starts, so ``ragtrain <stage>``
re-executes itself once with ``LD_PRELOAD`` set. That covers ``dvc repro``, ``ragtrain
pipeline`` and the Prefect flow alike: they all run the stages as ``ragtrain`` commands.
``RAGTRAIN_MALLOC`` chooses: ``auto`` (the default: jemalloc where it is installed, e.g.
Debian's ``libjemalloc2``), ``system`` (glibc's malloc, no re-execution), or a path to a
``libjemalloc.so``. The allocator changes speed and memory only: the stage outputs are
byte-identical either way (the reference run was checked both ways).

Without decay jemalloc never returns a freed page, and the pages it keeps are not all reused:
``train_generator`` over 10 epochs of 42 batches grew from 3 to 13 GB, and a 5-epoch run on
SQuAD reached 23.9 GB by step 1,760. ``release_free_memory`` purges them; the training loop
calls it at every checkpoint and after every dev evaluation (1.6-1.75 GB instead).
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from ragtrain.errors import ConfigError

ENV = "RAGTRAIN_MALLOC"
# jemalloc keeps the pages it frees (no decay), returns large blocks through the same arenas,
# and purges in a background thread: the settings measured above
JEMALLOC_CONF = ("oversize_threshold:1,background_thread:true,metadata_thp:auto,"
                 "dirty_decay_ms:-1,muzzy_decay_ms:-1")
SEARCH = ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
          "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2", "/usr/lib64/libjemalloc.so.2",
          "/usr/lib/libjemalloc.so.2", "/usr/local/lib/libjemalloc.so.2")
ALL_ARENAS = 4096  # jemalloc 5's MALLCTL_ARENAS_ALL


def jemalloc_path(setting: str, search: Sequence[str] = SEARCH) -> str | None:
    """The library to preload for ``setting`` (``auto``, ``system`` or a path), or None."""
    if setting == "system":
        return None
    if setting in ("", "auto"):
        return next((p for p in search if Path(p).is_file()), None)
    if not Path(setting).is_file():
        raise ConfigError(f"{ENV}={setting}: no such file (use auto, system or the path of "
                          "libjemalloc.so.2)")
    return setting


def preload_env(env: Mapping[str, str], search: Sequence[str] = SEARCH) -> dict[str, str] | None:
    """The environment to re-execute under, or None when the process should run as it is
    (``system``, no jemalloc installed, or a preload already in place)."""
    lib = jemalloc_path(env.get(ENV, "auto"), search)
    if lib is None or "jemalloc" in env.get("LD_PRELOAD", ""):
        return None
    preload = " ".join(x for x in (lib, env.get("LD_PRELOAD", "")) if x)
    return {**env, "LD_PRELOAD": preload,
            "MALLOC_CONF": env.get("MALLOC_CONF") or JEMALLOC_CONF}


def reexec_with_jemalloc(argv: Sequence[str]) -> None:
    """Replace this process by ``python -m ragtrain.cli *argv`` under jemalloc, when
    ``preload_env`` says so (Linux only); otherwise return and let the caller go on."""
    if not sys.platform.startswith("linux"):
        return
    env = preload_env(os.environ)
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "ragtrain.cli", *argv], env)


def release_free_memory() -> bool:
    """Hand the pages jemalloc keeps free back to the system (``arena.<all>.purge``); False,
    and nothing done, where the process does not run under jemalloc."""
    try:
        mallctl = ctypes.CDLL(None).mallctl
    except (AttributeError, OSError, TypeError):  # glibc's malloc; a platform without dlopen
        return False
    return mallctl(f"arena.{ALL_ARENAS}.purge".encode(), None, None, None,
                   ctypes.c_size_t(0)) == 0
