"""Argument checks shared by the retrieval modules: one message shape for a bad count."""

from __future__ import annotations

from typing import Any

import numpy as np

from ragtrain.errors import RetrievalError


def check_int(name: str, v: Any, lo: int = 1, hi: int | None = None, unit: str = "") -> int:
    """``int(v)`` for an integer (not a bool) in ``[lo, hi]``; else a RetrievalError naming it.

    ``unit`` names what ``hi`` counts in the message: "between 1 and 10 (passages)".
    """
    if (isinstance(v, bool) or not isinstance(v, int | np.integer) or v < lo
            or (hi is not None and v > hi)):
        bound = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        if unit:
            bound += f" ({unit})"
        raise RetrievalError(f"{name}: must be an integer {bound}, got {v!r}")
    return int(v)
