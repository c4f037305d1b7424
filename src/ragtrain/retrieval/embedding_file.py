"""Saved passage embeddings (``.npy``) read a chunk at a time, so that an index can be built over
a matrix larger than the memory it may use (``index.build_index_from_npy``)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ragtrain.errors import RetrievalError


@dataclass(frozen=True)
class EmbeddingFile:
    """A C-order float32 (n, dim) ``.npy`` file; plain reads, not a memory map (whose pages
    would count as the reading process's memory)."""

    path: Path
    n: int
    dim: int
    offset: int  # where the data starts, after the header

    @classmethod
    def open(cls, path: Path) -> EmbeddingFile:
        try:
            with open(path, "rb") as f:
                version = np.lib.format.read_magic(f)
                read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                        else np.lib.format.read_array_header_2_0)
                shape, fortran, dtype = read(f)
                offset = f.tell()
        except (OSError, ValueError) as e:
            raise RetrievalError(f"{path}: not a readable .npy file ({e})") from None
        if fortran or len(shape) != 2 or dtype != np.float32:
            raise RetrievalError(f"{path}: expected a C-order float32 (n, dim) array, got shape "
                                 f"{shape}, dtype {dtype}{', Fortran order' if fortran else ''}")
        return cls(Path(path), int(shape[0]), int(shape[1]), offset)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` -> (stop - start, dim) float32."""
        count = (stop - start) * self.dim
        with open(self.path, "rb") as f:
            f.seek(self.offset + start * self.dim * 4)
            x = np.fromfile(f, dtype=np.float32, count=count)
        if x.size != count:
            raise RetrievalError(f"{self.path}: truncated: its header says {self.n} x "
                                 f"{self.dim}, the file holds fewer rows")
        return x.reshape(-1, self.dim)

    def chunks(self, rows: int) -> Iterator[np.ndarray]:
        """The whole matrix, ``rows`` at a time, in order."""
        for s in range(0, self.n, rows):
            yield self.read(s, min(self.n, s + rows))

    def take(self, rows: np.ndarray, chunk: int) -> np.ndarray:
        """The sorted ``rows`` (a sample), gathered chunk by chunk: each chunk read once."""
        parts = []
        for s in range(0, self.n, chunk):
            e = min(self.n, s + chunk)
            mine = rows[np.searchsorted(rows, s):np.searchsorted(rows, e)]
            if len(mine):
                parts.append(self.read(s, e)[mine - s])
        return np.concatenate(parts) if parts else np.empty((0, self.dim), np.float32)
