"""The run report as one self-contained HTML page: ``render_report(ReportData) -> str``.

Everything is inline (CSS, SVG charts, a small script that sorts and filters the question
table), and a Content-Security-Policy forbids the page any network request, so it opens the
same on an offline machine. Every text from the data is escaped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from html import escape
from typing import Any

from ragtrain.report import analysis as an
from ragtrain.report.charts import PALETTE, Series, line_chart
from ragtrain.report.questions import ASSETS, question_table, script_json

_CSP = ("default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
        "img-src data:")
# the baselines beside each headline metric: column title -> the metric's prefix
BASELINES = {"untrained": "untrained/", "BM25": "bm25/", "sliding window": "baseline_window/",
             "gold passage given": "gold_passage/"}


@dataclass(frozen=True)
class Champion:
    """The registry's champion as the report compares with it."""

    version: str
    run_id: str = ""
    metrics: Mapping[str, float] = field(default_factory=dict)
    params: Mapping[str, str] = field(default_factory=dict)
    lineage: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ReportData:
    """Everything the report shows, as plain data.

    Args:
        rows: per question, ``analysis.join_questions``'s rows.
        passages: passage id -> {"title", "text"} of the cited passages.
        curves: model ("retriever", "generator", ...) -> its training plot rows
            ({"step", "loss", "lr", "dev/..."?}).
        train_metrics: model -> its training metrics (steps, seconds, best dev figures).
        params: this run's flattened config; ``lineage``: git / dvc.lock / versions.
    """

    split: str
    top_k: int
    retriever_kind: str
    metrics: Mapping[str, float]
    rows: Sequence[Mapping[str, Any]] = ()
    passages: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    curves: Mapping[str, Sequence[Mapping[str, float]]] = field(default_factory=dict)
    train_metrics: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    champion: Champion | None = None
    champion_note: str = ""  # why there is no champion to compare with, or what it is
    this_version: str | None = None  # the version this run registered
    primary_metric: str = "test/f1"
    greater_is_better: bool = True  # of the primary metric (registry.greater_is_better)
    lineage: Mapping[str, str] = field(default_factory=dict)
    params: Mapping[str, Any] = field(default_factory=dict)
    created: str = ""
    notes: Sequence[str] = ()  # e.g. inputs that were missing
    title: str = "ragtrain run report"


def _num(v: float | None) -> str:
    return "—" if v is None else f"{v:.4g}"


def _cell(v: float | None, cls: str = "") -> str:
    return f'<td class="num{" " + cls if cls else ""}">{_num(v)}</td>'


def _delta_cell(key: str, new: float | None, old: float | None) -> str:
    d, cls = an.delta(key, new, old)
    return f'<td class="num delta {cls}">{"—" if d is None else f"{d:+.4g}"}</td>'


def headline_keys(metrics: Mapping[str, float], split: str) -> list[str]:
    """The metrics the first table shows: answer quality, then the RAG model's retrieval."""
    answers = [f"{split}/{m}" for m in ("em", "f1", "accuracy") if f"{split}/{m}" in metrics]
    retrieval = sorted(
        (k for k in metrics if k.count("/") == 1 and k.split("/")[1].split("_at_")[0] in (
            "recall", "mrr", "ndcg", "answer_recall") and k.startswith(f"{split}/")),
        key=lambda k: (k.split("/")[1].split("_at_")[0], int(k.rsplit("_", 1)[1])))
    return answers + retrieval


def metrics_table(d: ReportData) -> str:
    """This run beside the champion (delta coloured by whether it is better) and baselines."""
    old = d.champion.metrics if d.champion else {}
    split = d.split
    head = ("<tr><th>metric</th><th>this run</th><th>champion</th><th>Δ vs champion</th>"
            + "".join(f"<th>{escape(b)}</th>" for b in BASELINES) + "</tr>")
    body = []
    for k in headline_keys(d.metrics, split):
        name = k.split("/", 1)[1]
        new, ch = d.metrics.get(k), old.get(k)
        body.append(f'<tr><th scope="row"><code>{escape(k)}</code></th>{_cell(new, "run")}'
                    f"{_cell(ch)}{_delta_cell(k, new, ch)}"
                    + "".join(_cell(d.metrics.get(f"{split}/{p}{name}"))
                              for p in BASELINES.values()) + "</tr>")
    if not body:
        return '<p class="note">no evaluation metrics found</p>'
    return (f'<table id="metrics" class="metrics"><thead>{head}</thead><tbody>'
            + "".join(body) + "</tbody></table>")


def all_metrics_table(d: ReportData) -> str:
    old = d.champion.metrics if d.champion else {}
    rows = "".join(
        f"<tr><td><code>{escape(k)}</code></td>{_cell(d.metrics.get(k))}{_cell(old.get(k))}"
        f"{_delta_cell(k, d.metrics.get(k), old.get(k))}</tr>"
        for k in sorted({*d.metrics, *old}))
    return ("<details><summary>every metric of the run (" + str(len({*d.metrics, *old}))
            + ")</summary><table class=\"metrics\"><thead><tr><th>metric</th><th>this run</th>"
            "<th>champion</th><th>Δ</th></tr></thead><tbody>" + rows + "</tbody></table>"
            "</details>")


def verdict(d: ReportData) -> str:
    """One sentence: the primary metric against the champion's, or why there is none."""
    m = d.primary_metric
    new = d.metrics.get(m)
    if d.champion is None:
        return (f"<p class=\"verdict\">No champion to compare with: {escape(d.champion_note)}"
                f" (<code>{escape(m)}</code> = {_num(new)}).</p>")
    old = d.champion.metrics.get(m)
    delta, cls = an.delta(m, new, old)
    if delta:  # the registry's rule says which way is better, not the name
        cls = "better" if (delta > 0) == d.greater_is_better else "worse"
    same = d.this_version is not None and d.this_version == d.champion.version
    who = " (this run's model is the champion)" if same else ""
    return (f'<p class="verdict">Against the champion, version {escape(d.champion.version)}'
            f"{who}: <code>{escape(m)}</code> {_num(new)} vs {_num(old)}, "
            f'<span class="{cls}">{"—" if delta is None else f"{delta:+.4g}"}</span>.'
            + (f" {escape(d.champion_note)}" if d.champion_note else "") + "</p>")


def retrieval_section(d: ReportData) -> str:
    """recall@k of every retriever: dense curves from the per-question ranks, the measured
    points (metrics) as markers."""
    max_k = max((k for k, _ in an.metric_points(d.metrics, d.split, None)), default=20)
    present = [n for n in an.RETRIEVERS if any(n in r["ranks"] for r in d.rows)
               or an.metric_points(d.metrics, d.split, n)]
    curves = an.recall_curves(d.rows, present, max_k)
    series = []
    for i, name in enumerate(present):
        color = PALETTE[i % len(PALETTE)]
        label = name + (" (used)" if name == d.retriever_kind else "")
        if name in curves:
            series.append(Series(label, curves[name], color))
        pts = an.metric_points(d.metrics, d.split, name)
        if pts:
            series.append(Series(label if name not in curves else f"{label} metrics", pts,
                                 color, faint=name in curves, markers=True))
    chart = line_chart(series, title=f"recall@k on {d.split}", xlabel="k (log scale)",
                       ylabel="recall@k", log_x=True, y_range=(0.0, 1.0), legend_below=True)
    return f'<div class="charts">{chart}</div>'


def training_section(d: ReportData) -> str:
    """Loss (raw and smoothed) and dev curves of each trained model, its best dev figures."""
    charts, notes = [], []
    for model, rows in d.curves.items():
        pts = [(float(r["step"]), float(r["loss"])) for r in rows if "loss" in r]
        if pts:
            smooth = list(zip([x for x, _ in pts], an.smooth([y for _, y in pts]), strict=True))
            charts.append(line_chart(
                [Series("loss", pts, "#9ab", faint=True), Series("loss (smoothed)", smooth)],
                title=f"{model} training loss", xlabel="step", ylabel="loss"))
        dev_keys = sorted({k for r in rows for k in r  # figures, not counts
                           if k.startswith("dev/") and an.direction(k) != 0})
        if dev_keys:
            charts.append(line_chart(
                [Series(k, [(float(r["step"]), float(r[k])) for r in rows if k in r],
                        markers=True) for k in dev_keys],
                title=f"{model} dev metrics", xlabel="step", ylabel="dev", legend_below=True))
        tm = d.train_metrics.get(model, {})
        if tm:
            notes.append(f"<li><b>{escape(model)}</b>: " + ", ".join(
                f"<code>{escape(k)}</code> {_num(v)}" for k, v in sorted(tm.items())) + "</li>")
    if not charts and not notes:
        return '<p class="note">no training curves found (plots/train_*.json)</p>'
    return (f'<div class="charts">{"".join(charts)}</div>'
            + (f"<ul class=\"small\">{''.join(notes)}</ul>" if notes else ""))


def _bar(counts: Mapping[str, int]) -> str:
    n = counts["n"] or 1
    return '<div class="bar">' + "".join(
        f'<span class="o-{o.replace(" ", "-")}" style="width:{100 * counts[o] / n:.1f}%" '
        f'title="{o}: {counts[o]}"></span>' for o in an.OUTCOMES if counts[o]) + "</div>"


def breakdown_table(title: str, table: Sequence[tuple[str, Mapping[str, int]]],
                    table_id: str) -> str:
    outs = [o for o in an.OUTCOMES if any(c[o] for _, c in table)]
    head = (f"<tr><th>{escape(title)}</th><th>questions</th>"
            + "".join(f"<th>{o}</th>" for o in outs) + "<th></th></tr>")
    body = "".join(
        f"<tr><th scope=\"row\">{escape(v)}</th><td class=\"num\">{c['n']}</td>"
        + "".join(f'<td class="num" data-outcome="{o}">{c[o]} '
                  f'<small>({100 * c[o] / (c["n"] or 1):.0f}%)</small></td>' for o in outs)
        + f"<td>{_bar(c)}</td></tr>" for v, c in table)
    return (f'<table id="{table_id}" class="breakdown"><thead>{head}</thead><tbody>{body}'
            "</tbody></table>")


def failures_section(d: ReportData) -> str:
    if not d.rows:
        return '<p class="note">no per-question table found (artifacts/eval/*_test.jsonl)</p>'
    legend = "".join(f'<span class="key o-{o.replace(" ", "-")}"></span> {o} '
                     for o in an.OUTCOMES)
    return (f'<p class="small">A <b>retrieval miss</b>: the gold passage was not among the '
            f"{d.top_k} passage(s) the generator read; a <b>reading miss</b>: it was, and the "
            f"answer is still wrong (EM 0). {legend}</p>"
            + breakdown_table("question type", an.breakdown(d.rows, "type",
                                                            an.QUESTION_TYPES), "by-type")
            + breakdown_table("answer words", an.breakdown(d.rows, "length",
                                                           an.LENGTH_BUCKETS), "by-length"))


def _kv_table(rows: Sequence[tuple[str, str | None, str | None]], table_id: str) -> str:
    body = "".join(f"<tr><td><code>{escape(k)}</code></td><td>{escape(a or '—')}</td>"
                   f"<td>{escape(b or '—')}</td></tr>" for k, a, b in rows)
    return (f'<table id="{table_id}" class="kv"><thead><tr><th>key</th><th>this run</th>'
            f"<th>champion's run</th></tr></thead><tbody>{body}</tbody></table>")


def lineage_section(d: ReportData) -> str:
    """git and dvc.lock hashes of this run, and what differs from the champion's run."""
    lin = d.lineage
    champ = d.champion
    head = (f"<p>git commit <code>{escape(lin.get('git.commit', 'unknown'))}</code>"
            + (" (uncommitted changes)" if lin.get("git.dirty") == "true" else "") + "</p>")
    if champ is None:
        hashes = sorted((k, v, None) for k, v in lin.items() if k.startswith("dvc."))
        return head + ("<details><summary>dvc.lock hashes</summary>"
                       + _kv_table(hashes, "dvc-hashes") + "</details>"
                       + "<p class=\"note\">no champion: no params diff</p>")
    theirs = dict(champ.lineage)
    lin_diff = an.dict_diff({k: v for k, v in lin.items() if not k.startswith("version.")},
                            {k: v for k, v in theirs.items() if not k.startswith("version.")})
    params_diff = an.dict_diff(d.params, champ.params) if champ.params else []
    return (head + f"<h3>params that differ from the champion's run "
            f"({len(params_diff)})</h3>"
            + (_kv_table(params_diff, "params-diff") if params_diff else
               "<p class=\"note\">" + ("none" if champ.params else
                                        "the champion's run has no recorded params") + "</p>")
            + f"<details><summary>git and dvc.lock hashes that differ ({len(lin_diff)})"
            f"</summary>{_kv_table(lin_diff, 'lineage-diff')}</details>")


_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:0 auto;max-width:1400px;padding:0 16px;color:#222}
h1{font-size:22px;margin:14px 0 4px}
h2{font-size:18px;margin:24px 0 8px;border-bottom:1px solid #ddd}
h3{font-size:15px}code{font-size:12px}.small,small{font-size:12px;color:#555}.note{color:#777}
table{border-collapse:collapse;margin:6px 0}th,td{padding:3px 8px;border-bottom:1px solid #eee;
text-align:left;vertical-align:top}td.num{text-align:right;font-variant-numeric:tabular-nums}
thead th{background:#f4f4f4;position:sticky;top:0}td.run{font-weight:600}
.better{color:#1a7f37;font-weight:600}.worse{color:#c62828;font-weight:600}.same{color:#777}
.verdict{font-size:15px;background:#f7f7f7;padding:8px;border-left:4px solid #1f77b4}
.charts{display:flex;flex-wrap:wrap;gap:12px}.chart{background:#fff;border:1px solid #eee}
.chart text{font-size:11px;fill:#333}.chart .title{font-size:13px;font-weight:600}
.chart .grid{stroke:#eee}.chart rect{stroke:#ccc}.chart .line{stroke-width:1.8}
.chart .faint{stroke-width:1;opacity:.5}
.bar{display:flex;width:220px;height:12px;background:#eee}
.bar span,.key{display:inline-block;height:12px}
.key{width:12px;vertical-align:middle}
.o-correct{background:#4caf50}.o-retrieval-miss{background:#e57373}
.o-reading-miss{background:#ffb74d}.o-no-gold-passage{background:#bdbdbd}
"""


def render_report(d: ReportData) -> str:
    """The whole page: an HTML string that needs nothing but a browser."""
    n = len(d.rows) or int(d.metrics.get(f"{d.split}/n_questions", 0))
    registered = (f", registered as version {escape(d.this_version)}" if d.this_version
                  else "")
    notes = "".join(f"<li>{escape(x)}</li>" for x in d.notes)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
        f"<title>{escape(d.title)}</title><style>{_CSS}{ASSETS.css}</style></head>"
        '<body data-load-ms="">'
        f"<h1>{escape(d.title)}</h1><p class=\"small\">{escape(d.created)} · "
        f"{n} {escape(d.split)} questions · top-{d.top_k} {escape(d.retriever_kind)} passages"
        f"{registered}</p>"
        + (f'<ul class="note">{notes}</ul>' if notes else "")
        + verdict(d)
        + "<h2 id=\"s-metrics\">Metrics: this run, the champion, the baselines</h2>"
        + metrics_table(d) + all_metrics_table(d)
        + "<h2 id=\"s-retrieval\">Retrieval: recall@k of every retriever</h2>"
        + retrieval_section(d)
        + "<h2 id=\"s-training\">Training</h2>" + training_section(d)
        + "<h2 id=\"s-failures\">Where it fails</h2>" + failures_section(d)
        + "<h2 id=\"s-questions\">Every question</h2>" + question_table(d.rows, d.top_k)
        + "<h2 id=\"s-lineage\">Lineage</h2>" + lineage_section(d)
        + f'<script type="application/json" id="passages">{script_json(d.passages)}</script>'
        + f"<script>{ASSETS.js}</script></body></html>\n")
