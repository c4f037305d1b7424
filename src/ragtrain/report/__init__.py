"""The run report: one self-contained HTML page (inline SVG charts, a sortable and filterable
per-question table) from plain data — metrics, per-question rows, training curves, lineage and
the champion's figures. ``pipeline/report.py`` reads the files and the registry."""

from __future__ import annotations

from ragtrain.report.analysis import join_questions
from ragtrain.report.page import Champion, ReportData, render_report

__all__ = ["Champion", "ReportData", "join_questions", "render_report"]
