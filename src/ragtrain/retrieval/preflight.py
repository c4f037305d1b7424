"""Index preflight: estimate a build's memory and disk from the corpus size, refuse before work.

``build-index`` holds the passage embeddings (``n x dim`` float32) in memory while it encodes
and writes them next to the index, then builds the index from that file a chunk at a time
(``index.build_index_from_npy``): the peak is the larger of the embeddings and the index (or its
training buffers) plus a chunk. ``check_index_build`` compares the
estimate for ``index.kind`` with the memory budget (``index.max_memory_gb``, else what the
machine has available: ``MemAvailable`` in /proc/meminfo, capped by a cgroup limit, or psutil)
and the free disk, and refuses with the key to change and a kind that fits. The estimates follow
faiss's storage (``bench/index_scale.py`` measures them against real builds):

- ``flat``: the raw vectors, ``4 dim`` bytes per passage.
- ``hnsw``: the raw vectors plus about ``2M + 1`` int32 links per passage (level 0 holds ``2M``),
  and 12 bytes of level bookkeeping.
- ``ivfpq``: ``pq_m * pq_bits / 8`` code bytes and an 8-byte id per passage, the coarse and PQ
  centroids, and the training sample (``index.TRAIN_PER_LIST`` points per list) and its
  residuals.
- ``ivfpq`` with ``refine_k_factor``: plus the vectors it re-ranks on: 4, 2 or 1 bytes per
  dimension (``index.refine_store``: flat, fp16, sq8).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from ragtrain.config import IndexConfig
from ragtrain.errors import ConfigError
from ragtrain.retrieval.index import CHUNK_ROWS, REFINE_BYTES, TRAIN_PER_LIST

log = logging.getLogger(__name__)

GB = 1024**3
MARGIN = 1.1  # allocator slack and temporaries the model leaves out
PROPOSALS = ("flat", "hnsw", "ivfpq+refine", "ivfpq+refine/sq8", "ivfpq")  # most exact first


@dataclass(frozen=True)
class IndexEstimate:
    kind: str  # flat | hnsw | ivfpq | ivfpq+refine
    embeddings_bytes: int  # the n x dim float32 matrix build-index holds and saves
    index_bytes: int  # the built index, in memory and (about the same) on disk
    build_bytes: int  # training buffers that exist only during the build

    chunk_bytes: int = 0  # the vectors read and added at a time

    @property
    def from_file_bytes(self) -> int:
        """Peak memory of building from the saved embeddings, with margin: the training buffers
        or the filled index (whichever is larger; faiss frees the first before adding vectors)
        plus a chunk of vectors being added."""
        return int(MARGIN * (max(self.index_bytes, self.build_bytes) + self.chunk_bytes))

    @property
    def memory_bytes(self) -> int:
        """Peak memory of build-index, with margin: the embeddings while encoding, or the build
        from their file, whichever is larger."""
        return max(int(MARGIN * self.embeddings_bytes), self.from_file_bytes)

    @property
    def disk_bytes(self) -> int:
        return int(MARGIN * (self.embeddings_bytes + self.index_bytes))


def estimate_index(n: int, dim: int, kind: str, cfg: IndexConfig) -> IndexEstimate:
    """The memory and disk an index ``kind`` ('ivfpq+refine' too) over n x dim floats needs."""
    raw = 4 * n * dim
    chunk = 4 * min(n, CHUNK_ROWS) * dim
    if kind == "flat":
        return IndexEstimate(kind, raw, raw, 0, chunk)
    if kind == "hnsw":
        return IndexEstimate(kind, raw, raw + n * (4 * (2 * cfg.hnsw_m + 1) + 12), 0, chunk)
    if kind not in ("ivfpq", "ivfpq+refine"):
        raise ValueError(f"estimate_index: unknown kind {kind!r}")
    nlist = max(1, min(cfg.ivf_nlist, n // 39))
    ksub = 2**cfg.pq_bits
    codes = n * (-(-cfg.pq_m * cfg.pq_bits // 8) + 8)  # PQ code + int64 id per passage
    centroids = 4 * dim * (nlist + ksub)
    train = 4 * dim * min(n, max(TRAIN_PER_LIST * nlist, 39 * ksub)) * 2  # sample, residuals
    refine = n * dim * REFINE_BYTES[cfg.refine_store] if kind == "ivfpq+refine" else 0
    index = codes + centroids + refine
    return IndexEstimate(kind, raw, index, train, chunk)


def _configured(cfg: IndexConfig) -> str:
    return "ivfpq+refine" if cfg.kind == "ivfpq" and cfg.refine_k_factor else cfg.kind


def available_memory(meminfo: Path = Path("/proc/meminfo"),
                     cgroup: Path = Path("/sys/fs/cgroup")) -> tuple[int | None, str]:
    """Bytes of memory a new allocation can get, and where that figure comes from."""
    avail, source = None, ""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail, source = int(line.split()[1]) * 1024, f"MemAvailable in {meminfo}"
    except (OSError, ValueError, IndexError):
        pass
    if avail is None:
        try:
            import psutil

            avail, source = int(psutil.virtual_memory().available), "psutil available memory"
        except ImportError:
            return None, "unknown"
    try:  # a container's limit can be far below the host's free memory
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            free = int(limit) - int((cgroup / "memory.current").read_text())
            if free < avail:
                avail, source = free, f"the cgroup limit in {cgroup / 'memory.max'}"
    except (OSError, ValueError):
        pass
    return avail, source


def _describe(kind: str, cfg: IndexConfig) -> str:
    if kind == "ivfpq+refine":
        return (f"'ivfpq' with refine_k_factor {cfg.refine_k_factor or 8}, refine_store "
                f"{cfg.refine_store}")
    return f"'{kind}'"


def _gb(b: int | float) -> str:
    return f"{b / GB:.2f} GB"


def _fix(kind: str, cfg: IndexConfig) -> str:
    if kind == "ivfpq+refine":
        return (f"set index.kind: ivfpq, index.refine_k_factor: {cfg.refine_k_factor or 8}, "
                f"index.refine_store: {cfg.refine_store}")
    return f"set index.kind: {kind}" + (", index.refine_k_factor: 0" if kind == "ivfpq" else "")


def check_index_build(n: int, dim: int, cfg: IndexConfig, out_dir: Path | None = None,
                      *, available: int | None = None) -> IndexEstimate:
    """The estimate for ``cfg``'s index; a ConfigError when it cannot fit in memory or on disk.

    ``available`` (bytes) overrides what the machine reports (tests); ``index.max_memory_gb``
    overrides both.
    """
    kind = _configured(cfg)
    est = estimate_index(n, dim, kind, cfg)
    if cfg.max_memory_gb:
        budget, source = int(cfg.max_memory_gb * GB), "index.max_memory_gb"
    elif available is not None:
        budget, source = available, "the available memory; index.max_memory_gb sets it"
    else:
        got, source = available_memory()
        if got is None:
            log.warning("index preflight: cannot read the available memory; not checked")
            return est
        budget, source = got, f"{source}; index.max_memory_gb sets it"
    if est.memory_bytes > budget:
        fits = []
        for name in PROPOSALS:
            k, _, store = name.partition("/")
            alt = dataclasses.replace(cfg, refine_store=store or cfg.refine_store)
            if (k, alt.refine_store) != (kind, cfg.refine_store):
                size = estimate_index(n, dim, k, alt).memory_bytes
                if size <= budget:
                    fits.append((k, alt, size))
        hint = (f"{_describe(fits[0][0], fits[0][1])} fits (about {_gb(fits[0][2])}): "
                f"{_fix(fits[0][0], fits[0][1])}"
                if fits else
                "no index kind fits: even the embeddings alone need "
                f"{_gb(est.embeddings_bytes)}; raise the budget or use a larger machine")
        raise ConfigError(
            f"index.kind: {_describe(kind, cfg)} needs about {_gb(est.memory_bytes)} of memory "
            f"to build over "
            f"{n:,} x {dim} embeddings (embeddings {_gb(est.embeddings_bytes)} + the larger of "
            f"index {_gb(est.index_bytes)} and training {_gb(est.build_bytes)}), but the budget is "
            f"{_gb(budget)} ({source}); {hint}")
    if out_dir is not None:
        where = Path(out_dir).resolve()
        while not where.exists():
            where = where.parent
        free = shutil.disk_usage(where).free
        if est.disk_bytes > free:
            raise ConfigError(
                f"index.kind: {_describe(kind, cfg)} writes about {_gb(est.disk_bytes)} "
                f"(embeddings + index) under {where}, but only {_gb(free)} is free there; free "
                f"space or choose a smaller kind ({_fix('ivfpq', cfg)})")
    log.info("index preflight: '%s' over %d x %d needs about %s of memory (budget %s) and %s "
             "on disk", kind, n, dim, _gb(est.memory_bytes), _gb(budget), _gb(est.disk_bytes))
    return est
