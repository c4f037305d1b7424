"""Wall-clock figures of a run, kept out of the DVC metrics files.

Times differ on every run, so they would make ``dvc metrics diff`` (and the metrics files the
reference run commits) change with nothing changed. They go to ``timings/timings.json``
(not in git) and to each stage's MLflow run, as ``<stage>/wall_seconds`` and the like.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from ragtrain.io import atomic_write_json


def read_timings(path: Path) -> dict[str, float]:
    """The figures recorded so far (empty when there are none, or the file is unreadable)."""
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {k: float(v) for k, v in d.items() if isinstance(v, int | float)} if isinstance(
        d, dict) else {}


def record_timings(path: Path, figures: Mapping[str, float]) -> None:
    """Merge ``figures`` (e.g. ``{"evaluate/answers_per_s": 61.2}``) into the timings file."""
    atomic_write_json(path, {**read_timings(path), **{k: round(float(v), 2)
                                                      for k, v in figures.items()}})
