"""Reports of a metrics database: a terminal summary and an HTML report with charts.

``summarize(db)`` returns the text summary (last values, trends, health verdicts, comparison
tables); ``write_html(db, out)`` writes the HTML report (charts need matplotlib).
"""

from fastdiag.report.html import auto_window, rolling_band, write_html
from fastdiag.report.tables import (
    comparison_rows,
    format_comparison,
    format_table,
    format_verdicts,
    run_verdicts,
    summarize,
    trend,
)

__all__ = [
    "auto_window",
    "comparison_rows",
    "format_comparison",
    "format_table",
    "format_verdicts",
    "rolling_band",
    "run_verdicts",
    "summarize",
    "trend",
    "write_html",
]
