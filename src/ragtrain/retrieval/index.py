"""Dense passage index: build, save, load and search; the only module that imports faiss.

Embeddings are assumed L2-normalised, so inner product is cosine similarity. An index is bound
to the corpus and to the encoder weights that built it (``corpus_sha256`` and
``encoder_fingerprint`` in its meta); ``load_index`` refuses an index built by another encoder
or from another corpus when told what to expect.

Index kinds:

- ``flat``: ``IndexFlatIP``, exact.
- ``hnsw``: ``IndexHNSWFlat`` (inner product); always searched on CPU (faiss has no GPU HNSW).
- ``ivfpq``: ``IndexIVFPQ`` (inner product), trained on a seeded sample of the embeddings
  (``TRAIN_PER_LIST`` points per list, at least ``39 * 2 ** pq_bits``; all of them when fewer).
  ``nlist`` is cut to ``n // 39`` (at least 1) for a corpus too small for ``index.ivf_nlist``
  (faiss wants 39 training points per list); ``nprobe`` is capped at nlist. ``pq_m`` must
  divide the dimension and the corpus hold ``2 ** pq_bits`` vectors (one per PQ centroid), or
  build_index raises: shrinking the code silently would change what the index is (use ``flat``
  for tiny corpora). ``meta.params`` records the effective values. ``index.refine_k_factor``
  > 0 wraps it in ``IndexRefineFlat``: ``k * refine_k_factor`` PQ candidates re-ranked exactly
  on the raw vectors it also stores; ``index.refine_store: fp16 | sq8`` re-ranks on 2 or 1 byte
  per dimension copies instead (``IndexRefine`` over ``IndexScalarQuantizer``).
- ``index.window_words > 0``: one vector per passage window, ids repeated (``windows.py``).

Builds are deterministic: faiss k-means is seeded (``cp.seed``); flat / HNSW adds use no
randomness beyond HNSW's fixed level generator. ``build_index_from_npy`` builds from a saved
``.npy`` without loading it: the training sample, then the vectors a chunk at a time, so the
build holds the index, not the embeddings (what ``build-index`` does after saving them); flat
and IVF-PQ indexes come out byte-identical to ``build_index`` over the loaded array.

``load_index(..., mmap=True)`` (``index.mmap``) searches the saved file from disk, for indexes
larger than RAM: faiss memory-maps IVF-PQ's inverted lists (``IO_FLAG_MMAP``) or else the stored
vectors (``IO_FLAG_MMAP_IFC``: flat's, HNSW's, IVF-PQ + refine's re-ranking copy, its largest
part; faiss maps one or the other). The OS pages in what searches touch; results are identical.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import faiss
import numpy as np

from ragtrain.config import IndexConfig
from ragtrain.errors import IndexFileError, IndexMismatchError, RetrievalError
from ragtrain.io import atomic_path, atomic_write_json, sha256_file
from ragtrain.retrieval.checks import check_int
from ragtrain.retrieval.embedding_file import EmbeddingFile
from ragtrain.retrieval.windows import search_passages, stride_of

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
IDS_FILE = "passage_ids.json"
META_FILE = "meta.json"
METRIC = "inner_product"
# bytes per dimension each index.refine_store keeps for re-ranking
REFINE_BYTES = {"flat": 4, "fp16": 2, "sq8": 1}
# faiss GPU k-selection supports k up to this; larger k are searched on the CPU copy.
GPU_MAX_K = 2048


@dataclass(frozen=True)
class IndexMeta:
    kind: str
    dim: int
    metric: str
    n_passages: int
    corpus_sha256: str
    encoder_fingerprint: str
    index_sha256: str  # sha256 of the saved index.faiss; "" until save_index writes it
    faiss_version: str
    params: dict[str, int] = field(default_factory=dict)  # effective M, nlist, nprobe, ...


@dataclass
class DenseIndex:
    index: Any  # a CPU faiss.Index; saved as is
    passage_ids: list[str]
    meta: IndexMeta
    device: str = "cpu"  # where search runs: "cpu" or "gpu"
    gpu_index: Any = field(default=None, repr=False, compare=False)  # GPU copy used by search
    gpu_resources: Any = field(default=None, repr=False, compare=False)  # keeps gpu_index alive


def fingerprint_state_dict(state: Mapping[str, torch.Tensor]) -> str:
    """Hex sha256 over sorted tensor names, dtypes, shapes and raw bytes of a state dict."""
    import torch

    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name]
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"state[{name!r}]: expected a torch.Tensor, got {type(t).__name__}")
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        # view as bytes: works for every dtype (bfloat16 has no numpy equivalent)
        h.update(t.reshape(-1).view(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()


def validate_embeddings(x: np.ndarray, what: str) -> np.ndarray:
    """Return ``x`` as a C-contiguous float32 (n, dim) array, or raise naming ``what``."""
    try:
        arr = np.asarray(x)
    except (TypeError, ValueError) as e:
        raise RetrievalError(f"{what}: not an array ({e})") from None
    if arr.ndim != 2:
        raise RetrievalError(f"{what}: expected a 2-D array (n, dim), got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise RetrievalError(f"{what}: empty array, shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise RetrievalError(f"{what}: expected numbers, got dtype {arr.dtype}")
    with np.errstate(over="ignore"):  # float64 overflow -> inf, reported below
        arr = np.ascontiguousarray(arr, dtype=np.float32)
    finite = np.isfinite(arr).all(axis=1)  # (n,)
    if not finite.all():
        raise RetrievalError(f"{what}: {int((~finite).sum())} row(s) contain NaN or inf (first "
                             f"bad row: {int(np.flatnonzero(~finite)[0])})")
    return arr


def _check_ids(passage_ids: Sequence[str], n: int, what: str, windows: bool) -> list[str]:
    """One id per row; distinct, or with ``windows`` each passage's rows in a run."""
    ids = list(passage_ids)
    if len(ids) != n:
        raise RetrievalError(f"{what}: {len(ids)} passage ids for {n} embedding rows")
    seen: set[str] = set()
    for i, pid in enumerate(ids):
        if not isinstance(pid, str):
            raise RetrievalError(f"{what}: passage id at {i} is not a string: {pid!r}")
        if pid in seen and not (windows and ids[i - 1] == pid):
            raise RetrievalError(f"{what}: duplicate passage id {pid!r} (at {i})")
        seen.add(pid)
    return ids


def _gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _resolve_device(device: str, kind: str) -> str:
    """'cpu' or 'gpu' for where search runs, given index.device and index.kind."""
    if device == "cpu":
        return "cpu"
    if device == "gpu":
        if not _gpu_available():
            raise RetrievalError(
                "index.device: 'gpu' requested, but the installed faiss has no GPU support or "
                "sees no GPU (install faiss-gpu, or set index.device to 'auto' or 'cpu')"
            )
        if kind == "hnsw":
            raise RetrievalError(
                "index.device: 'gpu' requested, but faiss has no GPU HNSW index; use "
                "index.kind 'flat' or 'ivfpq', or index.device 'auto' (HNSW then runs on CPU)"
            )
        return "gpu"
    if device == "auto":
        return "gpu" if kind != "hnsw" and _gpu_available() else "cpu"
    raise RetrievalError(f"index.device: expected 'auto', 'cpu' or 'gpu', got {device!r}")


def _place(idx: DenseIndex, device: str) -> DenseIndex:
    """Attach a GPU copy of the index for search when ``device`` resolves to 'gpu'."""
    want = _resolve_device(device, idx.meta.kind)
    if want == "cpu":
        idx.device, idx.gpu_index, idx.gpu_resources = "cpu", None, None
        return idx
    res = faiss.StandardGpuResources()
    co = faiss.GpuClonerOptions()
    co.useFloat16LookupTables = True  # IVFPQ with many sub-quantizers needs it on GPU
    try:
        gpu = faiss.index_cpu_to_gpu(res, 0, idx.index, co)
    except RuntimeError as e:
        if device == "gpu":
            raise RetrievalError(f"index: cannot copy the {idx.meta.kind} index to GPU: {e}") from e
        log.warning("index: cannot copy the %s index to GPU (%s); searching on CPU",
                    idx.meta.kind, e)
        idx.device, idx.gpu_index, idx.gpu_resources = "cpu", None, None
        return idx
    idx.device, idx.gpu_index, idx.gpu_resources = "gpu", gpu, res
    return idx


TRAIN_PER_LIST = 100  # IVF-PQ training points per inverted list (faiss warns below 39)
CHUNK_ROWS = 16_384  # vectors read and added at a time by build_index_from_npy


def training_rows(n: int, cfg: IndexConfig, seed: int) -> np.ndarray | None:
    """The sorted rows IVF-PQ trains on (a seeded sample), or None: all ``n`` (other kinds, or a
    corpus no larger than the sample)."""
    if cfg.kind != "ivfpq":
        return None
    nlist = max(1, min(cfg.ivf_nlist, n // 39))
    cap = max(TRAIN_PER_LIST * nlist, 39 * 2**cfg.pq_bits)
    if n <= cap:
        return None
    return np.sort(np.random.default_rng([seed, n]).choice(n, size=cap, replace=False))


def _ivfpq(x: np.ndarray, n: int, cfg: IndexConfig, seed: int) -> tuple[Any, dict[str, int]]:
    """An untrained-then-trained IVF-PQ index for ``n`` vectors, trained on the sample ``x``."""
    dim = x.shape[1]
    if dim % cfg.pq_m:
        raise RetrievalError(
            f"index.pq_m: must divide the embedding dimension {dim}, got {cfg.pq_m}"
        )
    n_codes = 2**cfg.pq_bits
    if n < n_codes:
        raise RetrievalError(
            f"index.kind 'ivfpq': the corpus has {n} passages, but PQ with index.pq_bits="
            f"{cfg.pq_bits} needs at least {n_codes} to train; lower index.pq_bits or use "
            f"index.kind 'flat' or 'hnsw'"
        )
    nlist = max(1, min(cfg.ivf_nlist, n // 39))
    if nlist < cfg.ivf_nlist:
        log.info("index: ivf_nlist reduced from %d to %d for %d passages",
                 cfg.ivf_nlist, nlist, n)
    if n < 39 * n_codes:
        log.warning("index: %d passages train %d PQ centroids per sub-quantizer poorly "
                    "(faiss wants %d); recall may suffer", n, n_codes, 39 * n_codes)
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFPQ(quantizer, dim, nlist, cfg.pq_m, cfg.pq_bits,
                             faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed
    index.pq.cp.seed = seed
    index.pq.cp.min_points_per_centroid = 1  # warned above, in our words, not on raw stderr
    index.train(x)
    index.nprobe = min(cfg.ivf_nprobe, nlist)
    params = {"nlist": nlist, "nprobe": index.nprobe, "pq_m": cfg.pq_m, "pq_bits": cfg.pq_bits}
    if cfg.refine_k_factor:  # search k * factor PQ candidates, re-rank them on stored vectors
        if cfg.refine_store == "flat":
            index = faiss.IndexRefineFlat(index)
        else:  # compressed re-ranking: less memory, near-exact scores
            qt = faiss.ScalarQuantizer.QT_fp16 if cfg.refine_store == "fp16" else (
                faiss.ScalarQuantizer.QT_8bit)
            store = faiss.IndexScalarQuantizer(dim, qt, faiss.METRIC_INNER_PRODUCT)
            store.train(x)
            index = faiss.IndexRefine(index, store)
        index.k_factor = float(cfg.refine_k_factor)
        params["refine_k_factor"] = cfg.refine_k_factor
        params["refine_bytes_per_dim"] = REFINE_BYTES[cfg.refine_store]
    return index, params


def build_index(
    embeddings: np.ndarray,
    passage_ids: Sequence[str],
    cfg: IndexConfig,
    *,
    corpus_sha256: str,
    encoder_fingerprint: str,
    seed: int = 0,
) -> DenseIndex:
    """Build a ``cfg.kind`` inner-product index over L2-normalised passage embeddings."""
    x = validate_embeddings(embeddings, "passage embeddings")  # (n_passages, dim)
    n, dim = x.shape
    rows = training_rows(n, cfg, seed)
    return _build(n, dim, lambda: x if rows is None else x[rows], lambda: iter([x]),
                  passage_ids, cfg,
                  corpus_sha256=corpus_sha256, encoder_fingerprint=encoder_fingerprint,
                  seed=seed)


def build_index_from_npy(
    path: Path,
    passage_ids: Sequence[str],
    cfg: IndexConfig,
    *,
    corpus_sha256: str,
    encoder_fingerprint: str,
    seed: int = 0,
    chunk_rows: int = CHUNK_ROWS,
) -> DenseIndex:
    """``build_index`` over the embeddings saved in ``path`` (.npy), read ``chunk_rows`` at a
    time: memory holds the index, the IVF-PQ training sample and one chunk, never the whole
    matrix."""
    f = EmbeddingFile.open(path)
    what = f"passage embeddings ({path})"
    rows = training_rows(f.n, cfg, seed)

    def sample() -> np.ndarray:
        x = f.read(0, f.n) if rows is None else f.take(rows, chunk_rows)
        return validate_embeddings(x, what)

    return _build(f.n, f.dim, sample,
                  lambda: (validate_embeddings(x, what) for x in f.chunks(chunk_rows)),
                  passage_ids, cfg, corpus_sha256=corpus_sha256,
                  encoder_fingerprint=encoder_fingerprint, seed=seed)


def _build(n: int, dim: int, sample: Callable[[], np.ndarray],
           chunks: Callable[[], Iterable[np.ndarray]], passage_ids: Sequence[str],
           cfg: IndexConfig, *, corpus_sha256: str, encoder_fingerprint: str,
           seed: int) -> DenseIndex:
    """The index of ``n`` vectors: trained on ``sample()`` (IVF-PQ; freed once trained),
    filled from ``chunks()``."""
    ids = _check_ids(passage_ids, n, "passage embeddings", windows=cfg.window_words > 0)
    if cfg.kind == "flat":
        index: Any = faiss.IndexFlatIP(dim)
        params: dict[str, int] = {}
    elif cfg.kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = cfg.hnsw_ef_construction
        index.hnsw.efSearch = cfg.hnsw_ef_search
        params = {"M": cfg.hnsw_m, "ef_construction": cfg.hnsw_ef_construction,
                  "ef_search": cfg.hnsw_ef_search}
    elif cfg.kind == "ivfpq":
        index, params = _ivfpq(sample(), n, cfg, seed)
    else:
        raise RetrievalError(f"index.kind: expected 'flat', 'hnsw' or 'ivfpq', got {cfg.kind!r}")
    for x in chunks():
        index.add(x)
    if cfg.window_words:  # one vector per window (retrieval/windows.py)
        params.update(window_words=cfg.window_words, vectors=n,
                      window_stride=stride_of(cfg.window_words, cfg.window_stride))
    meta = IndexMeta(
        kind=cfg.kind, dim=dim, metric=METRIC, n_passages=len(set(ids)),
        corpus_sha256=corpus_sha256,
        encoder_fingerprint=encoder_fingerprint, index_sha256="",
        faiss_version=faiss.__version__, params=params,
    )
    return _place(DenseIndex(index=index, passage_ids=ids, meta=meta), cfg.device)


def save_index(idx: DenseIndex, out_dir: Path) -> None:
    """Atomically write ``index.faiss``, ``passage_ids.json`` and ``meta.json`` to ``out_dir``.

    Sets ``idx.meta.index_sha256`` to the hash of the written index file.
    """
    out_dir = Path(out_dir)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        faiss.write_index(idx.index, str(tmp / INDEX_FILE))  # always the CPU index
        meta = dataclasses.replace(idx.meta, index_sha256=sha256_file(tmp / INDEX_FILE))
        atomic_write_json(tmp / IDS_FILE, idx.passage_ids)
        atomic_write_json(tmp / META_FILE, dataclasses.asdict(meta))
    idx.meta = meta


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise IndexFileError(f"{path}: missing; rebuild the index (ragtrain build-index)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IndexFileError(f"{path}: corrupted ({e}); rebuild the index") from None


def _read_meta(path: Path) -> IndexMeta:
    raw = _read_json(path)
    names = {f.name for f in dataclasses.fields(IndexMeta)}
    if not isinstance(raw, dict) or set(raw) - names or {n for n in names if n != "params"} - set(
        raw
    ):
        raise IndexFileError(
            f"{path}: not an index meta file (expected keys {sorted(names)}); rebuild the index"
        )
    return IndexMeta(**raw)


def load_index(
    in_dir: Path,
    *,
    expect_encoder_fingerprint: str | None = None,
    expect_corpus_sha256: str | None = None,
    device: str = "auto",
    mmap: bool = False,
) -> DenseIndex:
    """Read an index folder written by ``save_index``, verifying its integrity and provenance;
    ``mmap``: search it from disk (see the module doc)."""
    in_dir = Path(in_dir)
    if not in_dir.is_dir():
        raise IndexFileError(f"{in_dir}: no index folder here; build it (ragtrain build-index)")
    meta = _read_meta(in_dir / META_FILE)
    if expect_encoder_fingerprint is not None and meta.encoder_fingerprint != (
        expect_encoder_fingerprint
    ):
        raise IndexMismatchError(
            f"index at {in_dir} was built by encoder {meta.encoder_fingerprint}, but the query "
            f"encoder is {expect_encoder_fingerprint}; rebuild the index (ragtrain build-index)"
        )
    if expect_corpus_sha256 is not None and meta.corpus_sha256 != expect_corpus_sha256:
        raise IndexMismatchError(
            f"index at {in_dir} was built from corpus {meta.corpus_sha256}, but the current "
            f"corpus is {expect_corpus_sha256}; rebuild the index (ragtrain build-index)"
        )
    index_path = in_dir / INDEX_FILE
    if not index_path.is_file():
        raise IndexFileError(f"{index_path}: missing; rebuild the index (ragtrain build-index)")
    got = sha256_file(index_path)
    if got != meta.index_sha256:
        raise IndexFileError(
            f"{index_path}: corrupted (sha256 {got} does not match {meta.index_sha256} in "
            f"{META_FILE}); rebuild the index (ragtrain build-index)"
        )
    plain_ivf = meta.kind == "ivfpq" and not meta.params.get("refine_k_factor")
    flags = (faiss.IO_FLAG_MMAP if plain_ivf else faiss.IO_FLAG_MMAP_IFC) if mmap else 0
    try:
        index = faiss.read_index(str(index_path), flags)
    except RuntimeError as e:
        raise IndexFileError(
            f"{index_path}: faiss cannot read it ({e}); rebuild the index"
        ) from None
    ids = _read_json(in_dir / IDS_FILE)
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise IndexFileError(f"{in_dir / IDS_FILE}: expected a JSON list of strings")
    if len(ids) != index.ntotal or len(set(ids)) != meta.n_passages:
        raise IndexFileError(
            f"{in_dir / IDS_FILE}: {len(ids)} ids of {len(set(ids))} passages, but {INDEX_FILE} "
            f"holds {index.ntotal} vectors and {META_FILE} says {meta.n_passages} passages; "
            "rebuild the index")
    if index.d != meta.dim:
        raise IndexFileError(f"{index_path}: dimension {index.d}, but {META_FILE} says "
                             f"{meta.dim}; rebuild the index")
    if len(set(ids)) != len(ids) and not meta.params.get("window_words"):
        raise IndexFileError(f"{in_dir / IDS_FILE}: duplicate passage ids; rebuild the index")
    return _place(DenseIndex(index=index, passage_ids=ids, meta=meta), device)


def search(idx: DenseIndex, queries: np.ndarray, k: int) -> tuple[np.ndarray, list[list[str]]]:
    """Top-k passages per query: scores ``# (n_queries, k)`` and ids, best first; an index of
    windows scores a passage by its best window. An approximate index (IVF) can find fewer than
    k passages for a query: the id list is then shorter and the missing scores ``-inf``."""
    q = validate_embeddings(queries, "query embeddings")  # (n_queries, dim)
    if q.shape[1] != idx.meta.dim:
        raise RetrievalError(
            f"query embeddings have dimension {q.shape[1]}, but the index has dimension "
            f"{idx.meta.dim}; encode queries with the encoder that built the index"
        )
    k = check_int("k", k, hi=idx.meta.n_passages, unit="passages")

    def vectors(m: int) -> tuple[np.ndarray, list[list[str]]]:
        use_gpu = idx.gpu_index is not None and m <= GPU_MAX_K
        scores, rows = (idx.gpu_index if use_gpu else idx.index).search(q, m)  # (n_queries, m)
        scores = np.where(rows >= 0, scores, -np.inf).astype(np.float32)
        return scores, [[idx.passage_ids[r] for r in row if r >= 0] for row in rows.tolist()]

    if not idx.meta.params.get("window_words"):
        return vectors(k)
    return search_passages(vectors, k, len(idx.passage_ids))
