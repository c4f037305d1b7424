"""Markdown for the flows' Prefect artifacts."""

from __future__ import annotations

from collections.abc import Mapping


def metrics_table(metrics: Mapping[str, float]) -> str:
    """A two-column markdown table of metrics, sorted by name."""
    rows = "\n".join(f"| `{k}` | {v:.4g} |" for k, v in sorted(metrics.items()))
    return f"| metric | value |\n|---|---|\n{rows}\n"
