"""Inline SVG line charts for the run report (no plotting library, no script: a page that
only a browser opens)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#17becf")
_W, _H = 520, 280
_LEFT, _RIGHT, _TOP, _BOTTOM = 56, 14, 30, 42


@dataclass(frozen=True)
class Series:
    """One line: its legend label and (x, y) points; ``faint`` for a raw curve under its
    smoothed one, ``markers`` for a few measured points."""

    label: str
    points: Sequence[tuple[float, float]]
    color: str = ""
    faint: bool = False
    markers: bool = False


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values covering [lo, hi]."""
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step) * step
    ticks, t = [], first
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 10))
        t += step
    if ticks[-1] < hi:
        ticks.append(round(t, 10))
    return ticks


def _log_ticks(lo: float, hi: float) -> list[float]:
    out = []
    decade = 10 ** math.floor(math.log10(lo))
    while decade <= hi:
        out += [m * decade for m in (1, 2, 5) if lo <= m * decade <= hi]
        decade *= 10
    return out or [lo, hi]


def _fmt(v: float) -> str:
    return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.2e}"


def line_chart(series: Sequence[Series], *, title: str, xlabel: str, ylabel: str,
               log_x: bool = False, y_range: tuple[float, float] | None = None,
               legend_below: bool = False) -> str:
    """An SVG line chart of ``series`` (finite points only); a note when there is nothing to
    draw. The legend sits top right, or bottom right (``legend_below``: rising curves)."""
    pts = [[(x, y) for x, y in s.points if math.isfinite(x) and math.isfinite(y)
            and (x > 0 or not log_x)] for s in series]
    xs = [x for p in pts for x, _ in p]
    ys = [y for p in pts for _, y in p]
    head = (f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {_W} {_H}" '
            f'width="{_W}" height="{_H}" role="img" aria-label="{escape(title)}">'
            f'<text class="title" x="{_W / 2}" y="18" text-anchor="middle">{escape(title)}'
            "</text>")
    if not xs:
        return (head + f'<text x="{_W / 2}" y="{_H / 2}" text-anchor="middle">no data</text>'
                "</svg>")
    x0, x1 = min(xs), max(xs)
    if x1 == x0:
        x1 = x0 + 1
    yt = nice_ticks(*(y_range or (min(ys), max(ys))))
    y0, y1 = yt[0], yt[-1]
    fx = (lambda v: math.log10(v)) if log_x else (lambda v: v)
    pw, ph = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM

    def sx(v: float) -> float:
        return round(_LEFT + (fx(v) - fx(x0)) / ((fx(x1) - fx(x0)) or 1) * pw, 1)

    def sy(v: float) -> float:
        return round(_TOP + ph - (v - y0) / ((y1 - y0) or 1) * ph, 1)

    parts = [head, f'<g class="axes"><rect x="{_LEFT}" y="{_TOP}" width="{pw}" height="{ph}" '
                   'fill="none"/>']
    for t in yt:
        parts.append(f'<line class="grid" x1="{_LEFT}" x2="{_LEFT + pw}" y1="{sy(t)}" '
                     f'y2="{sy(t)}"/><text x="{_LEFT - 4}" y="{sy(t) + 4}" '
                     f'text-anchor="end">{_fmt(t)}</text>')
    for t in (_log_ticks(x0, x1) if log_x else nice_ticks(x0, x1)):
        if x0 <= t <= x1:
            parts.append(f'<text x="{sx(t)}" y="{_TOP + ph + 15}" text-anchor="middle">'
                         f"{_fmt(t)}</text>")
    parts.append(f'<text x="{_LEFT + pw / 2}" y="{_H - 6}" text-anchor="middle">'
                 f'{escape(xlabel)}</text><text transform="translate(13 {_TOP + ph / 2}) '
                 f'rotate(-90)" text-anchor="middle">{escape(ylabel)}</text></g>')
    shown = sum(1 for s, p in zip(series, pts, strict=True) if p and not s.faint)
    legend_y = _TOP + ph - 8 - 15 * (shown - 1) if legend_below else _TOP + 14
    for i, (s, p) in enumerate(zip(series, pts, strict=True)):
        color = s.color or PALETTE[i % len(PALETTE)]
        if not p:
            continue
        if not (s.faint and s.markers):  # faint markers: measured points over a curve
            line = " ".join(f"{sx(x)},{sy(y)}" for x, y in p)
            parts.append(f'<polyline class="{"faint" if s.faint else "line"}" fill="none" '
                         f'stroke="{color}" points="{line}"><title>{escape(s.label)}</title>'
                         "</polyline>")
        if s.markers:
            parts += [f'<circle cx="{sx(x)}" cy="{sy(y)}" r="3" fill="{color}">'
                      f"<title>{escape(s.label)}: {_fmt(x)}, {_fmt(y)}</title></circle>"
                      for x, y in p]
        if not s.faint:
            parts.append(f'<rect x="{_LEFT + pw - 118}" y="{legend_y - 8}" width="10" '
                         f'height="10" fill="{color}"/><text x="{_LEFT + pw - 104}" '
                         f'y="{legend_y + 1}">{escape(s.label[:20])}</text>')
            legend_y += 15
    parts.append("</svg>")
    return "".join(parts)
