"""Matplotlib plots for run artifacts: training curves and recall@k (no pyplot state)."""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ragtrain.errors import TrackingError
from ragtrain.io import atomic_path


def _save(fig: Any, path: Path) -> Path:
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, dpi=120, bbox_inches="tight")
    return path


def _finite(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def plot_curve(points: list[dict[str, Any]], x: str, ys: list[str], path: Path,
               title: str) -> Path:
    """Plot each of ``ys`` against ``x`` (one panel each, shared x) from logged points; a PNG."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state (Agg for files)

    if not ys:
        raise TrackingError(f"plot_curve {path}: no y keys given")
    fig = Figure(figsize=(7, 2.6 * len(ys)))
    axes = fig.subplots(len(ys), 1, sharex=True, squeeze=False)[:, 0]
    plotted = 0
    for ax, y in zip(axes, ys, strict=True):
        xy = [(p[x], p[y]) for p in points if _finite(p.get(x)) and _finite(p.get(y))]
        if xy:
            xs, vs = zip(*xy, strict=True)
            ax.plot(xs, vs, linewidth=1.2)
            plotted += 1
        else:
            ax.text(0.5, 0.5, f"no {y} values", ha="center", va="center",
                    transform=ax.transAxes)
        ax.set_ylabel(y)
        ax.grid(True, alpha=0.3)
    if not plotted:
        raise TrackingError(
            f"plot_curve {path}: no point has numeric {x!r} and any of {ys} "
            f"({len(points)} points)"
        )
    axes[-1].set_xlabel(x)
    fig.suptitle(title)
    return _save(fig, path)


def plot_recall_at_k(metrics: Mapping[str, float], split: str, path: Path,
                     systems: list[str]) -> Path:
    """Plot recall@k against k for each system, from keys ``{split}/{system}/recall_at_{k}``."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    all_ks: set[int] = set()
    for system in systems:
        pat = re.compile(rf"^{re.escape(split)}/{re.escape(system)}/recall_at_(\d+)$")
        pts = sorted(
            (int(m.group(1)), float(v))
            for k, v in metrics.items()
            if (m := pat.match(k)) and _finite(v)
        )
        if not pts:
            raise TrackingError(
                f"plot_recall_at_k {path}: no metric like {split}/{system}/recall_at_<k>"
            )
        ks, vs = zip(*pts, strict=True)
        all_ks.update(ks)
        ax.plot(ks, vs, marker="o", label=system)
    ax.set_xscale("log")
    ax.set_xticks(sorted(all_ks), [str(k) for k in sorted(all_ks)])
    ax.minorticks_off()
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("k")
    ax.set_ylabel(f"{split} recall@k")
    ax.set_title(f"Recall@k on {split}")
    ax.grid(True, alpha=0.3)
    ax.legend()
    return _save(fig, path)
