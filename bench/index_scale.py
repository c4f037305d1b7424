"""Index scale benchmark: flat, HNSW, IVF-PQ, IVF-PQ + re-ranking (exact or SQ8) on N x 384.

    python bench/index_scale.py                 # N = 1,000,000 (needs ~6 GB RAM, ~2 GB disk)
    python bench/index_scale.py --n 100000      # a quick look

Synthetic embeddings with the structure of real ones (clusters in a low-dimensional latent
space, projected to 384 dims, plus isotropic noise, L2-normalised; fresh queries from the same
distribution), written once to a temporary .npy. Each index is built from that file as
``build-index`` builds it (``ragtrain.retrieval.index.build_index_from_npy``: the IVF-PQ training
sample, then a chunk of vectors at a time, never the whole matrix in memory) and searched by
``search``, in its own subprocess, so its peak memory is that process's high-water mark (VmHWM
in /proc/self/status; tracemalloc does not see FAISS's C++ allocations). ``flat@memory`` is the
reference build with the whole matrix loaded first (``build_index``, what build-index did
before). Per index: build seconds, peak RSS, peak over the interpreter, the saved index's size,
the preflight's estimate, recall@10 against exact search (the flat index) and queries/s. Timings
are wall-clock on this machine (threads: ``--threads``); compare the ratios.

``<kind>@mmap`` loads the index ``<kind>`` saved (run it after that kind) with
``load_index(mmap=True)`` (``index.mmap``: searched from the file, for indexes larger than RAM)
and searches it; its "build" column is the load time. Its memory is the private (anonymous)
memory it holds over the interpreter, RssAnon in /proc/self/status, beside the loaded index's:
the mapped file's pages are the OS's page cache, which it reclaims under pressure.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

KINDS = ("flat", "flat@memory", "hnsw", "ivfpq", "ivfpq+refine", "ivfpq+refine-sq8",
         "flat@mmap", "hnsw@mmap", "ivfpq@mmap", "ivfpq+refine-sq8@mmap")
MB = 2**20


def make_data(path: Path, n: int, dim: int, n_queries: int, seed: int) -> None:
    """Write base.npy (n, dim) and queries.npy (n_queries, dim) float32, in chunks."""
    rng = np.random.default_rng(seed)
    latent, n_clusters = 48, max(16, int(math.sqrt(n)))
    proj = rng.standard_normal((latent, dim)).astype(np.float32) / math.sqrt(latent)
    centers = rng.standard_normal((n_clusters, latent)).astype(np.float32)

    def draw(m: int) -> np.ndarray:
        z = centers[rng.integers(0, n_clusters, m)] + 0.6 * rng.standard_normal(
            (m, latent)).astype(np.float32)
        x = z @ proj + 0.15 * rng.standard_normal((m, dim)).astype(np.float32)  # (m, dim)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    base = np.lib.format.open_memmap(path / "base.npy", "w+", np.float32, (n, dim))
    for s in range(0, n, 100_000):
        base[s : s + 100_000] = draw(min(100_000, n - s))
    base.flush()
    del base
    np.save(path / "queries.npy", draw(n_queries))


def _status_bytes(field: str) -> int:
    """VmRSS / VmHWM of this process from /proc/self/status. Not ru_maxrss: Linux carries the
    parent's high-water mark across fork + exec into it."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def timed_search(idx: Any, q: np.ndarray, out: Path) -> tuple[float, int, int]:
    """Top-10 of every query (saved to ``out`` as rows, -1 where short): queries/s, then this
    process's peak RSS and private memory (bytes)."""
    from ragtrain.retrieval.index import search

    search(idx, q[:10], 10)  # warm-up
    t0 = time.perf_counter()
    _, top = search(idx, q, 10)
    qps = len(q) / (time.perf_counter() - t0)
    np.save(out, np.array([[int(i) for i in r] + [-1] * (10 - len(r)) for r in top]))
    return qps, _status_bytes("VmHWM"), _status_bytes("RssAnon")


def worker(args: argparse.Namespace) -> None:
    """Build and search one index; print one JSON line."""
    import faiss

    from ragtrain.config import IndexConfig
    from ragtrain.retrieval.index import build_index, build_index_from_npy, save_index
    from ragtrain.retrieval.preflight import MARGIN, estimate_index

    faiss.omp_set_num_threads(args.threads)
    data = Path(args.data)
    start, start_anon = _status_bytes("VmRSS"), _status_bytes("RssAnon")  # the interpreter, faiss
    if args.worker.endswith("@mmap"):
        return search_mapped(args, data, start, start_anon)
    kind, in_memory = args.worker.removesuffix("@memory"), args.worker.endswith("@memory")
    x = np.load(data / "base.npy", mmap_mode=None if in_memory else "r")
    q = np.load(data / "queries.npy")
    n, dim = x.shape
    refine = kind.startswith("ivfpq+refine")
    cfg = IndexConfig(kind="ivfpq" if kind.startswith("ivfpq") else kind, device="cpu",
                      ivf_nlist=args.nlist, ivf_nprobe=args.nprobe, pq_m=args.pq_m,
                      refine_k_factor=args.refine if refine else 0,
                      refine_store="sq8" if kind.endswith("sq8") else "flat", hnsw_m=args.hnsw_m)
    ids = [str(i) for i in range(n)]
    t0 = time.perf_counter()
    if in_memory:  # the whole matrix loaded, then indexed
        idx = build_index(x, ids, cfg, corpus_sha256="", encoder_fingerprint="", seed=0)
    else:  # (the memory map above only gave the shape; no page of it was read)
        del x
        idx = build_index_from_npy(data / "base.npy", ids, cfg, corpus_sha256="",
                                   encoder_fingerprint="", seed=0)
    build_s = time.perf_counter() - t0
    searched = timed_search(idx, q, data / f"top_{args.worker}.npy")
    save_index(idx, data / f"idx_{args.worker}")  # its size; <kind>@mmap loads it
    est = estimate_index(n, dim, "ivfpq+refine" if refine else kind, cfg)
    print_row(args.worker, build_s, searched, (start, start_anon), data / f"idx_{args.worker}",
              idx.meta.params, (MARGIN * (est.embeddings_bytes + max(est.index_bytes,
                                                                     est.build_bytes))
                                if in_memory else est.from_file_bytes))


def search_mapped(args: argparse.Namespace, data: Path, start: int, start_anon: int) -> None:
    """Load the index ``<kind>`` saved with mmap=True, search it; print one JSON line."""
    from ragtrain.retrieval.index import load_index

    kind = args.worker.removesuffix("@mmap")
    q = np.load(data / "queries.npy")
    t0 = time.perf_counter()
    idx = load_index(data / f"idx_{kind}", device="cpu", mmap=True)
    load_s = time.perf_counter() - t0
    searched = timed_search(idx, q, data / f"top_{args.worker}.npy")
    print_row(args.worker, load_s, searched, (start, start_anon), data / f"idx_{kind}",
              idx.meta.params, None)


def print_row(kind: str, seconds: float, searched: tuple[float, int, int],
              start: tuple[int, int], index_dir: Path, params: dict,
              estimate: float | None) -> None:
    """One worker's JSON line: build (or load) seconds, timed_search's figures over the
    interpreter's ``start`` (RSS, private), the saved index's size, the preflight's estimate."""
    qps, peak, anon = searched
    print(json.dumps({"kind": kind, "build_s": seconds, "qps": qps, "peak_mb": peak / MB,
                      "over_interpreter_mb": (peak - start[0]) / MB,
                      "anon_mb": (anon - start[1]) / MB,
                      "index_mb": (index_dir / "index.faiss").stat().st_size / MB,
                      "estimate_mb": None if estimate is None else estimate / MB,
                      "params": params}))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--nlist", type=int, default=0, help="0: 4 * sqrt(n)")
    ap.add_argument("--nprobe", type=int, default=32)
    ap.add_argument("--pq-m", type=int, default=48, help="bytes per vector; divides --dim")
    ap.add_argument("--refine", type=int, default=8, help="ivfpq+refine: k_factor")
    ap.add_argument("--hnsw-m", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.nlist = args.nlist or int(4 * math.sqrt(args.n))
    if args.worker:
        worker(args)
        return 0
    kinds = [k for k in args.kinds.split(",") if k]
    if kinds[0] != "flat":
        kinds.insert(0, "flat")  # the exact top-10 that recall is measured against
    results = []
    with tempfile.TemporaryDirectory(prefix="index_scale_") as tmp:
        t0 = time.perf_counter()
        make_data(Path(tmp), args.n, args.dim, args.queries, args.seed)
        print(f"data: {args.n:,} x {args.dim} ({args.n * args.dim * 4 / MB:,.0f} MB), "
              f"{args.queries} queries, made in {time.perf_counter() - t0:.0f} s; nlist "
              f"{args.nlist}, nprobe {args.nprobe}, pq_m {args.pq_m}, refine x{args.refine}, "
              f"{args.threads} threads", flush=True)
        for kind in kinds:
            cmd = [sys.executable, __file__, "--worker", kind, "--data", tmp,
                   *[a for a in (argv if argv is not None else sys.argv[1:])]]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                print(f"{kind}: failed\n{out.stderr[-2000:]}")
                continue
            row = json.loads(out.stdout.strip().splitlines()[-1])
            top = np.load(Path(tmp) / f"top_{kind}.npy")
            exact = np.load(Path(tmp) / "top_flat.npy")
            if kind.endswith("@mmap"):
                loaded_top = Path(tmp) / f"top_{kind.removesuffix('@mmap')}.npy"
                row["same_as_loaded"] = loaded_top.exists() and bool(
                    np.array_equal(top, np.load(loaded_top)))
            row["recall_at_10"] = float(np.mean(
                [len(set(a) & set(b) - {-1}) / 10 for a, b in zip(top, exact, strict=True)]))
            results.append(row)
            estimate = "-" if row["estimate_mb"] is None else f"{row['estimate_mb']:.0f}"
            print(f"{kind:>21}: {'load' if kind.endswith('@mmap') else 'build'} "
                  f"{row['build_s']:7.1f} s  peak {row['peak_mb']:7.0f} MB "
                  f"({row['over_interpreter_mb']:6.0f} over the interpreter; preflight estimate "
                  f"{estimate:>6}; private {row['anon_mb']:6.0f})  "
                  f"index {row['index_mb']:7.0f} MB  "
                  f"recall@10 {row['recall_at_10']:.3f}  {row['qps']:8.0f} q/s", flush=True)
    flat = next((r for r in results if r["kind"] == "flat"), None)
    loaded = next((r for r in results if r["kind"] == "flat@memory"), None)
    if flat:
        for r in results:
            vs_loaded = (f"peak / flat@memory's {r['peak_mb'] / loaded['peak_mb']:.2f}, "
                         if loaded else "")
            print(f"{r['kind']:>16}: {vs_loaded}"
                  f"peak / flat's {r['peak_mb'] / flat['peak_mb']:.2f} (over the "
                  f"interpreter: {r['over_interpreter_mb'] / flat['over_interpreter_mb']:.2f}), "
                  f"index / flat's {r['index_mb'] / flat['index_mb']:.3f}, "
                  f"q/s / flat's {r['qps'] / flat['qps']:.1f}")
    by_kind = {r["kind"]: r for r in results}
    for r in results:  # searched from disk beside searched from memory
        base = by_kind.get(r["kind"].removesuffix("@mmap"))
        if r["kind"].endswith("@mmap") and base:
            print(f"{r['kind']:>21}: private memory / loaded's "
                  f"{r['anon_mb'] / max(base['anon_mb'], 1e-9):.3f} "
                  f"({r['anon_mb']:.0f} vs {base['anon_mb']:.0f} MB), "
                  f"q/s / loaded's {r['qps'] / base['qps']:.2f}, "
                  f"same top-10 as loaded: {r['same_as_loaded']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
