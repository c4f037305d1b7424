"""ragtrain: train, evaluate, track and promote Retrieval-Augmented Generation models."""

from __future__ import annotations

import os

# faiss-cpu and torch each bring an OpenMP runtime; with busy-waiting threads they starve each
# other on small machines (IVF-PQ training went from 0.17 s to 11 s). Set before either loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# MKL (torch's CPU BLAS) picks its code path by the buffers' memory alignment on some CPUs: on an
# AMD EPYC, a reranker saved and loaded again scored the same inputs differently in the last bits,
# so a run could depend on where its tensors happened to land. Conditional numerical
# reproducibility (AUTO: the CPU's own kernels, no slowdown measured) makes MKL's results
# independent of alignment. MKL reads it at its first call, so setting it here is enough.
os.environ.setdefault("MKL_CBWR", "AUTO")

__version__ = "0.1.0"
