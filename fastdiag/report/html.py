"""HTML report: run table, verdicts, comparison tables and one chart per metric.

Charts need matplotlib (the ``report`` extra); without it the report keeps its tables and
says how to get the charts. Each chart draws every selected run's values over steps, its
rolling mean, and a band of +/- one standard deviation over the same rolling window.
"""

from __future__ import annotations

import base64
import html
import io
import json
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from fastdiag.report.tables import (
    COMPARISON_HEADERS,
    comparison_rows,
    family_runs,
    fmt,
    last_values,
    run_verdicts,
    run_vs_run_rows,
)
from fastdiag.store.database import Series, list_runs, load_metrics


def auto_window(count: int) -> int:
    """Default rolling window for ``count`` points: a tenth of them, between 3 and 100."""
    return int(min(100, max(3, count // 10)))


def rolling_band(values: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Trailing rolling mean and standard deviation (ddof 0) of ``values`` [n].

    Point i uses the finite values among ``values[max(0, i - window + 1) : i + 1]``; NaN
    where that window holds none. Returns (mean [n], std [n]) float64.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window!r}")
    x = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(x)
    padded = np.concatenate([np.full(window - 1, np.nan), np.where(finite, x, np.nan)])
    windows = np.lib.stride_tricks.sliding_window_view(padded, window)
    counts = np.isfinite(windows).sum(axis=1)
    sums = np.nansum(windows, axis=1)
    mean = np.divide(sums, counts, out=np.full(x.shape, np.nan), where=counts > 0)
    sq = np.nansum((windows - mean[:, None]) ** 2, axis=1)
    std = np.sqrt(np.divide(sq, counts, out=np.full(x.shape, np.nan), where=counts > 0))
    return mean, std


def _chart_png(name: str, by_run: Mapping[str, Series], window: int | None) -> tuple[str, str]:
    """(base64 PNG, caption) of one metric's chart. Every name is drawn as literal text
    (``parse_math=False``: ``$`` or ``\\`` in a metric or run name is no math text)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.0), dpi=80)
    fig.subplots_adjust(left=0.12, right=0.98, top=0.9, bottom=0.16)  # fixed: layout engines cost
    ax = fig.add_subplot()
    notes = []
    handles, labels = [], []
    for index, (run, series) in enumerate(by_run.items()):
        color = f"C{index % 10}"
        steps, values = series.steps, series.values
        finite = np.isfinite(values)
        w = window or auto_window(int(finite.sum()))
        mean, std = rolling_band(values, w)
        sparse = int(finite.sum()) <= 50  # per-epoch series: show the points themselves
        ax.plot(steps[finite], values[finite], color=color, alpha=0.5 if sparse else 0.35,
                lw=0.8, marker="o" if sparse else None, ms=3)  # fmt: skip
        (line,) = ax.plot(steps, mean, color=color, lw=1.6)
        handles.append(line)
        labels.append(f"{run} (window {w})")  # explicit labels: a leading "_" is not hidden
        ax.fill_between(steps, mean - std, mean + std, color=color, alpha=0.2, lw=0)
        if (~finite).any():
            notes.append(f"{run}: {int((~finite).sum())} non-finite values not drawn")
    ax.set_title(name, fontsize=10, parse_math=False)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    legend = ax.legend(handles, labels, fontsize=7, loc="best")
    for text in legend.get_texts():
        text.set_parse_math(False)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    caption = "rolling mean +/- 1 std" + ("; " + "; ".join(notes) if notes else "")
    return base64.b64encode(buffer.getvalue()).decode("ascii"), caption


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows
    )
    attr = f' class="{cls}"' if cls else ""
    return f"<table{attr}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left;font-size:.9em}
th{background:#f3f3f3}
.charts{display:flex;flex-wrap:wrap;gap:1em}
figure.chart{margin:0;border:1px solid #ddd;padding:.4em}
figcaption{font-size:.8em;color:#555}
.ok{color:#070}.note{color:#a50}
"""


def write_html(
    db: str | Path,
    out: str | Path,
    runs: Sequence[str] | None = None,
    metrics: Sequence[str] | None = None,
    window: int | None = None,
    title: str | None = None,
) -> Path:
    """Write the report of ``runs`` (all when None) to ``out``; returns its path.

    One chart (``<figure class="chart" data-metric=...>``) per metric in ``metrics`` (all
    metrics of the chosen runs when None), runs overlaid; ``window`` fixes the rolling
    window (default: a tenth of each series' points, 3 to 100).
    """
    if window is not None and (isinstance(window, bool) or window < 1):
        raise ValueError(f"window must be >= 1, got {window!r}")
    db, out = Path(db), Path(out)
    infos = {r.name: r for r in list_runs(db)}
    chosen = list(runs) if runs else list(infos)
    missing = [r for r in chosen if r not in infos]
    if missing:
        raise ValueError(f"runs {missing} are not in {str(db)!r}; it holds {list(infos)}")
    data = load_metrics(db, chosen, metrics)
    names = list(metrics) if metrics else sorted({n for by in data.values() for n in by})
    unknown = [n for n in names if not any(n in data.get(r, {}) for r in chosen)]
    if unknown:
        raise ValueError(f"metrics {unknown} were not logged by runs {chosen}")

    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title or f'fastdiag report: {db.name}')}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title or 'fastdiag report')}</h1>",
        f"<p>database <code>{html.escape(str(db))}</code>, written "
        f"{html.escape(time.strftime('%Y-%m-%d %H:%M:%S'))}</p>",
        "<h2>Runs</h2>",
    ]
    run_rows = []
    for run in chosen:
        info = infos[run]
        started = (
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.start_time))
            if info.start_time
            else ""
        )
        steps = [int(s.steps[-1]) for s in data.get(run, {}).values() if s.steps.size]
        run_rows.append([run, started, info.host, info.fastdiag_version, info.torch_version,
                         str(max(steps)) if steps else "-",
                         json.dumps(info.config, sort_keys=True, default=str)])  # fmt: skip
    parts.append(
        _table(["run", "started", "host", "fastdiag", "torch", "last step", "config"], run_rows)
    )

    parts.append("<h2>Health verdicts</h2>")
    verdict_rows = [
        [run, v.key, fmt(v.value), v.failure, v.message]
        for run in chosen
        for v in run_verdicts(db, run)
    ]
    if verdict_rows:
        parts.append(_table(["run", "metric", "value", "verdict", "why"], verdict_rows, "verdicts"))
    else:
        parts.append("<p class='ok'>Every rule of the interpretation guide holds.</p>")

    full = data if metrics is None else load_metrics(db, chosen)
    last = {run: last_values(full.get(run, {})) for run in chosen}
    base, sets = family_runs(last)
    if base is not None and sets is not None:
        parts.append(
            f"<h2>Comparison: baseline ({html.escape(base)}) vs set routing ({html.escape(sets)})</h2>"
        )
        parts.append(
            _table(COMPARISON_HEADERS, comparison_rows(last[base], last[sets]), "comparison")
        )
    if len(chosen) == 2:
        a, b = chosen
        rows = run_vs_run_rows(last[a], last[b])
        if rows:
            parts.append(f"<h2>Run {html.escape(a)} vs run {html.escape(b)} (last values)</h2>")
            parts.append(_table(["metric", a, b, f"{b} - {a}"], rows, "run-comparison"))

    parts.append("<h2>Metrics</h2>")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        warnings.warn(
            "fastdiag report: matplotlib is not installed, the report has no charts "
            "(pip install 'fastdiag[report]')",
            RuntimeWarning,
            stacklevel=2,
        )
        parts.append("<p class='note'>Charts need matplotlib: pip install 'fastdiag[report]'.</p>")
    else:
        parts.append("<div class='charts'>")
        for name in names:
            by_run = {run: data[run][name] for run in chosen if name in data.get(run, {})}
            try:
                png, caption = _chart_png(name, by_run, window)
            except Exception as exc:  # noqa: BLE001 - one chart must not cost the report
                message = (
                    f"the chart of metric {name!r} could not be drawn ({type(exc).__name__}: {exc})"
                )
                warnings.warn(f"fastdiag report: {message}", RuntimeWarning, stacklevel=2)
                parts.append(f"<p class='note'>{html.escape(message)}</p>")
                continue
            parts.append(
                f"<figure class='chart' data-metric='{html.escape(name, quote=True)}'>"
                f"<img alt='{html.escape(name, quote=True)}' src='data:image/png;base64,{png}'>"
                f"<figcaption>{html.escape(caption)}</figcaption></figure>"
            )
        parts.append("</div>")
    parts.append("</body></html>")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(parts), encoding="utf-8")
    return out
