"""Reports of one or more metrics databases: a terminal summary and an HTML report with charts.

``summarize(db)`` returns the text summary (last values, trends, health verdicts, comparison
tables); ``write_html(db, out)`` writes the HTML report (charts need matplotlib). ``db`` may be
one path or several; metrics are chosen with glob patterns (``metrics=``, ``exclude=``).
``collect`` reads once what both show (``write_html(..., data=collect(...))``).
"""

from fastdiag.report.data import family_of, group_metrics, resolve_runs, select_metrics
from fastdiag.report.html import auto_window, centred_band, is_schedule, rolling_band, write_html
from fastdiag.report.tables import (
    ReportData,
    collect,
    compare_rows,
    comparison_rows,
    format_comparison,
    format_table,
    format_verdicts,
    run_verdicts,
    series_verdicts,
    summarize,
    summary_text,
    trend,
    worst,
)

__all__ = [
    "ReportData",
    "auto_window",
    "centred_band",
    "collect",
    "compare_rows",
    "comparison_rows",
    "family_of",
    "format_comparison",
    "format_table",
    "format_verdicts",
    "group_metrics",
    "is_schedule",
    "resolve_runs",
    "rolling_band",
    "run_verdicts",
    "select_metrics",
    "series_verdicts",
    "summarize",
    "summary_text",
    "trend",
    "worst",
    "write_html",
]
