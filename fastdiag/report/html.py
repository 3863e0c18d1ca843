"""HTML report: contents, training curves, verdicts, comparisons, then one section per family.

Layout, top to bottom: the runs, a table of contents, the training curves (loss, validation,
perplexity), the health verdicts (critical first), the baseline vs set-routing table, the
run comparison (two or more runs: last values, largest relative difference first, config
differences), then the metric families. A per-layer family (``attention_top1/<layer>``,
``grad_norm/<module>``, ... see :mod:`fastdiag.report.data`) is one heatmap (member x step, one
panel per run) and one small-multiples chart, not one chart per key; other keys get one chart
each, grouped by their prefix.

Charts need matplotlib (the ``report`` extra); without it the report keeps its tables and
says how to get the charts. A line chart draws each run's values, a centred rolling mean (no
lag) and, for noisy series only, a +/- 1 std band over the same centred window; counters and
schedules (``epoch``, ``lr``, monotone series) get neither band nor smoothing. Every name is
drawn as literal text and HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import io
import re
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from fastdiag.report.data import group_metrics, member, natural_key
from fastdiag.report.tables import (
    COMPARISON_HEADERS,
    GROUP_VERDICTS,
    GROUPED_HEADERS,
    VERDICT_HEADERS,
    ReportData,
    collect,
    compare_rows,
    comparison_rows,
    config_rows,
    family_runs,
    fmt,
    grouped_verdict_rows,
    verdict_rows,
)
from fastdiag.store.database import Series

SMALL_MULTIPLES = 16  # panels of a family's small-multiples chart (members evenly chosen)
HEATMAP_RUNS = 4  # runs drawn as heatmap panels (the small multiples overlay every run)
MAX_HEATMAP_ROWS = 160  # members drawn in a heatmap (evenly chosen beyond)
GRID_MIN_KEYS = 4  # per-epoch keys of one prefix drawn as one grid of cells from this many
GRID_MAX_POINTS = 50  # ... when each run logged at most this many values of them
COMPARE_ROWS = 30  # run-comparison rows shown open (the rest folded)
PROGRESS_MIN_CHARTS = 40
PROGRESS_MIN_METRICS = 200  # progress bar on stderr from this many charts (or on a terminal)
_SCHEDULE = re.compile(r"(^|[/_.])(epoch|step|global_step|lr|learning_rate|iteration)$")


def auto_window(count: int) -> int:
    """Default rolling window for ``count`` points: a tenth of them, between 3 and 100."""
    return int(min(100, max(3, count // 10)))


def rolling_band(values: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Trailing rolling mean and standard deviation (ddof 0) of ``values`` [n].

    Point i uses the finite values among ``values[max(0, i - window + 1) : i + 1]``; NaN
    where that window holds none. Returns (mean [n], std [n]) float64.
    """
    return _band(values, window, window - 1, 0)


def centred_band(values: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Centred rolling mean and standard deviation (ddof 0) of ``values`` [n]: point i uses
    the finite values among ``values[i - (window - 1) // 2 : i + window // 2 + 1]`` (clipped
    at the ends), so the smoothed curve does not lag the data. NaN where none is finite."""
    return _band(values, window, (window - 1) // 2, window // 2)


def _band(
    values: np.ndarray, window: int, before: int, after: int
) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
        raise ValueError(f"window must be >= 1, got {window!r}")
    x = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(x)
    clean = np.where(finite, x, 0.0)
    # prefix sums over finite values: O(n) whatever the window
    c = np.concatenate([[0.0], np.cumsum(finite)])
    s1 = np.concatenate([[0.0], np.cumsum(clean)])
    idx = np.arange(x.size)
    lo = np.clip(idx - before, 0, x.size)
    hi = np.clip(idx + after + 1, 0, x.size)
    counts = c[hi] - c[lo]
    mean = np.divide(s1[hi] - s1[lo], counts, out=np.full(x.shape, np.nan), where=counts > 0)
    # the variance as the mean squared deviation from each window's mean (stable for offsets)
    shift = np.where(np.isfinite(mean), mean, 0.0)
    std = np.full(x.shape, np.nan)
    if x.size:
        pad = np.concatenate([np.full(before, np.nan), np.where(finite, x, np.nan),
                              np.full(after, np.nan)])  # fmt: skip
        windows = np.lib.stride_tricks.sliding_window_view(pad, before + after + 1)
        sq = np.nansum((windows - shift[:, None]) ** 2, axis=1)
        std = np.sqrt(np.divide(sq, counts, out=np.full(x.shape, np.nan), where=counts > 0))
    return mean, std


def is_schedule(name: str, values: np.ndarray) -> bool:
    """Whether a series is a counter or a schedule (no band, no smoothing): named like one
    (``epoch``, ``step``, ``lr``, ...), constant, or monotone over at least 3 finite points."""
    if _SCHEDULE.search(name.lower()):
        return True
    finite = values[np.isfinite(values)]
    if finite.size < 3:
        return False
    diffs = np.diff(finite)
    return bool((diffs >= 0).all() or (diffs <= 0).all())


def _literal(*texts: object) -> None:
    for text in texts:
        text.set_parse_math(False)  # type: ignore[attr-defined]


def _png(fig: object) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")  # type: ignore[attr-defined]
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _short(text: str, limit: int = 60) -> str:
    return (
        text if len(text) <= limit else text[: limit // 2 - 1] + "..." + text[-(limit // 2 - 2) :]
    )


def _chart_png(name: str, by_run: Mapping[str, Series], window: int | None) -> tuple[str, str]:
    """(base64 PNG, caption) of one metric's chart. Every name is drawn as literal text
    (``parse_math=False``: ``$`` or ``\\`` in a metric or run name is no math text)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.6, 3.0), dpi=72)
    fig.subplots_adjust(left=0.15, right=0.98, top=0.9, bottom=0.27)  # fixed: layout engines cost
    ax = fig.add_subplot()
    notes, handles, labels = [], [], []
    smoothed = banded = False
    used = set()
    for index, (run, series) in enumerate(by_run.items()):
        color = f"C{index % 10}"
        steps, values = series.steps, series.values
        finite = np.isfinite(values)
        count = int(finite.sum())
        schedule = is_schedule(name, values)
        sparse = count <= 50  # per-epoch series: show the points themselves
        if schedule or sparse:
            (line,) = ax.plot(steps[finite], values[finite], color=color, lw=1.4,
                              marker="o" if sparse else None, ms=3)  # fmt: skip
        else:
            w = window or auto_window(count)
            used.add(w)
            mean, std = centred_band(values, w)
            ax.plot(steps[finite], values[finite], color=color, alpha=0.3, lw=0.7)
            (line,) = ax.plot(steps, mean, color=color, lw=1.6)
            ax.fill_between(steps, mean - std, mean + std, color=color, alpha=0.18, lw=0)
            smoothed = banded = True
        handles.append(line)
        labels.append(_short(run, 40))  # explicit labels: a leading "_" is not hidden
        if (~finite).any():
            notes.append(f"{run}: {int((~finite).sum())} non-finite values not drawn")
    _literal(ax.set_title(_short(name, 70), fontsize=9, loc="left"))
    _literal(ax.set_ylabel(_short(name.rsplit("/", 1)[-1], 30), fontsize=8))
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    legend = fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=min(4, len(labels)),
                        frameon=False)  # fmt: skip
    _literal(*legend.get_texts())
    what = []
    if smoothed:
        what.append(f"centred mean over {', '.join(map(str, sorted(used)))} points")
    if banded:
        what.append("band +/- 1 std")
    caption = (
        "; ".join(what + notes) or "values, not smoothed (a counter, a schedule or few points)"
    )
    return _png(fig), caption


def _evenly(items: Sequence[str], limit: int) -> list[str]:
    if len(items) <= limit:
        return list(items)
    picks = np.linspace(0, len(items) - 1, limit).round().astype(int)
    return [items[i] for i in sorted(set(picks.tolist()))]


def _matrix(keys: Sequence[str], series: Mapping[str, Series]) -> tuple[np.ndarray, np.ndarray]:
    """(steps [T], values [len(keys), T]) on the union of the members' steps (NaN where absent)."""
    steps = np.unique(
        np.concatenate([series[k].steps for k in keys if k in series] or [np.zeros(0, np.int64)])
    )
    grid = np.full((len(keys), steps.size), np.nan)
    for i, key in enumerate(keys):
        if key in series:
            grid[i, np.searchsorted(steps, series[key].steps)] = series[key].values
    return steps, grid


def _heatmap_png(
    family: str, keys: Sequence[str], by_run: Mapping[str, Mapping[str, Series]]
) -> tuple[str, str]:
    """One heatmap per run (member x step) of a family; a log colour scale when the values are
    positive and span more than two decades."""
    from matplotlib.colors import LogNorm, Normalize
    from matplotlib.figure import Figure

    runs = list(by_run)[:HEATMAP_RUNS]
    rows = _evenly(keys, MAX_HEATMAP_ROWS)
    mats = {run: _matrix(rows, by_run[run]) for run in runs}
    every = np.concatenate([g[np.isfinite(g)] for _, g in mats.values()] or [np.zeros(0)])
    norm: Normalize = Normalize()
    scale = "linear"
    if every.size:
        lo, hi = float(every.min()), float(every.max())
        if lo > 0 and hi / lo > 100:
            norm, scale = LogNorm(lo, hi), "log"
        else:
            norm = Normalize(lo, hi if hi > lo else lo + 1e-12)
    # every run's block side by side in one axes (one axes per run costs ~0.2 s each)
    gap = max(1, max((mats[r][0].size for r in runs), default=0) // 12)  # room for the ticks
    blocks, ticks, tick_labels, starts = [], [], [], []
    column = 0
    for run in runs:
        steps, grid = mats[run]
        if blocks:
            blocks.append(np.full((len(rows), gap), np.nan))
            column += gap
        blocks.append(grid)
        starts.append(column)
        if steps.size:
            ticks += [column, column + steps.size - 1]
            tick_labels += [str(int(steps[0])), str(int(steps[-1]))]
        column += steps.size
    image_data = np.concatenate(blocks, axis=1) if blocks else np.zeros((len(rows), 0))
    height = min(9.0, 1.2 + 0.09 * len(rows))
    width = min(11.0, 3.0 + 3.0 * len(runs))
    fig = Figure(figsize=(width, height), dpi=72)
    left = 1.9 / width
    fig.subplots_adjust(
        left=left, right=1 - 1.1 / width, top=1 - 0.4 / height, bottom=0.45 / height
    )
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(image_data), aspect="auto", interpolation="nearest",
                      norm=norm, cmap="viridis")  # fmt: skip
    ax.set_facecolor("#eee")
    for run, start_col in zip(runs, starts):
        _literal(ax.text(start_col, -0.7, _short(run, 40), fontsize=8, va="bottom"))
    ax.set_xticks(ticks, tick_labels, fontsize=7)
    ax.set_xlabel("step (first .. last of each run)", fontsize=8)
    labels = [_short(member(family, k), 28) for k in rows]
    tick_every = max(1, -(-len(rows) // 40))
    ax.set_yticks(range(0, len(rows), tick_every), labels[::tick_every], fontsize=6)
    _literal(*ax.get_yticklabels())
    cax = fig.add_axes((1 - 0.95 / width, 0.45 / height, 0.12 / width, 1 - 0.85 / height))
    bar = fig.colorbar(image, cax=cax)
    bar.ax.tick_params(labelsize=7)
    if scale == "log":  # plain labels: the default log labels are math text (slow to lay out)
        from matplotlib.ticker import FuncFormatter, NullFormatter

        bar.ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: fmt(float(v), 2)))
        bar.ax.yaxis.set_minor_formatter(NullFormatter())
    _literal(bar.ax.set_ylabel(_short(family.rsplit("/", 1)[-1], 30), fontsize=8))
    notes = [f"{len(keys)} members, {scale} colour scale"]
    if len(rows) < len(keys):
        notes.append(f"{len(rows)} rows drawn, evenly spaced")
    if len(runs) < len(by_run):
        notes.append(f"first {len(runs)} of {len(by_run)} runs")
    return _png(fig), "heatmap (member x step); " + "; ".join(notes)


def _multiples_png(
    family: str,
    keys: Sequence[str],
    by_run: Mapping[str, Mapping[str, Series]],
    limit: int = SMALL_MULTIPLES,
) -> tuple[str, str]:
    """Small multiples: one cell per member (at most ``SMALL_MULTIPLES``, evenly chosen), runs
    overlaid, each cell scaled to its member's own range (printed in the cell). Drawn in one
    axes (a grid of cells): one matplotlib axes per member costs ~0.1 s each."""
    from matplotlib.figure import Figure

    shown = _evenly(keys, limit)
    cols = min(4, len(shown))
    nrows = (len(shown) + cols - 1) // cols
    height = 1.1 * nrows + 0.5
    fig = Figure(figsize=(2.5 * cols + 0.3, height), dpi=72)
    ax = fig.add_axes((0.01, 0.35 / height, 0.98, 1 - 0.4 / height))
    ax.set_axis_off()
    ax.set_xlim(0, cols)
    ax.set_ylim(nrows, 0)
    handles: dict[str, object] = {}
    runs = list(by_run)
    steps_all = [by_run[r][k].steps for r in runs for k in shown if k in by_run[r]]
    x0 = min((int(s[0]) for s in steps_all if s.size), default=0)
    x1 = max((int(s[-1]) for s in steps_all if s.size), default=1)
    span = max(1, x1 - x0)
    for i, key in enumerate(shown):
        col, row = i % cols, i // cols
        held = [by_run[r][key] for r in runs if key in by_run[r]]
        values = np.concatenate([s.values[np.isfinite(s.values)] for s in held] or [np.zeros(0)])
        lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
        scale = hi - lo if hi > lo else 1.0
        ax.add_patch(_cell(col, row))
        for index, run in enumerate(runs):
            s = by_run[run].get(key)
            if s is None:
                continue
            finite = np.isfinite(s.values)
            x = col + 0.05 + 0.9 * (s.steps[finite] - x0) / span
            y = row + 0.85 - 0.6 * (s.values[finite] - lo) / scale
            sparse = x.size <= 50
            (line,) = ax.plot(x, y, color=f"C{index % 10}", lw=1.0, marker="o" if sparse else None,
                              ms=2.5)  # fmt: skip
            handles.setdefault(run, line)
        _literal(ax.text(col + 0.04, row + 0.14, _short(member(family, key), 34), fontsize=7,
                         va="center"))  # fmt: skip
        _literal(ax.text(col + 0.96, row + 0.14, f"{fmt(lo)} .. {fmt(hi)}", fontsize=6,
                         ha="right", va="center", color="#555"))  # fmt: skip
    if len(handles) > 1:
        legend = fig.legend(list(handles.values()), [_short(r, 30) for r in handles], fontsize=7,
                            loc="lower center", ncol=min(6, len(handles)), frameon=False)  # fmt: skip
        _literal(*legend.get_texts())
    what = "each cell's metric" if limit >= len(keys) else family.rsplit("/", 1)[-1]
    caption = (f"small multiples: x step {x0} .. {x1}, y {what} scaled per cell to the range "
               "printed in it")  # fmt: skip
    if len(shown) < len(keys):
        caption += f"; {len(shown)} of {len(keys)} members (evenly spaced; all in the heatmap)"
    return _png(fig), caption


def _cell(col: int, row: int) -> object:
    from matplotlib.patches import Rectangle

    return Rectangle((col + 0.02, row + 0.04), 0.96, 0.92, fill=False, lw=0.6, ec="#bbb")


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], cls: str = "",
           row_classes: Sequence[str] | None = None) -> str:  # fmt: skip
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        attr = f" class='{row_classes[i]}'" if row_classes and row_classes[i] else ""
        body.append(f"<tr{attr}>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>")
    attr = f' class="{cls}"' if cls else ""
    return f"<table{attr}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left;font-size:.85em;
 overflow-wrap:anywhere;max-width:40em}
th{background:#f3f3f3}
.charts{display:flex;flex-wrap:wrap;gap:1em;align-items:flex-start}
figure.chart{margin:0;border:1px solid #ddd;padding:.4em;max-width:100%}
figure.chart img{max-width:100%;height:auto;display:block}
figure.chart.single{width:404px}
figcaption{font-size:.78em;color:#555;overflow-wrap:anywhere;max-width:100%}
nav.toc{columns:3;font-size:.9em;border:1px solid #ddd;padding:.5em 1em;background:#fafafa}
nav.toc a{display:block;overflow-wrap:anywhere}
tr.critical td{background:#fde2e2}tr.warning td{background:#fff4d6}
tr.differs td{background:#fff4d6}
.ok{color:#070}.note{color:#a50}
"""


def _figure(kind: str, name: str, png: str, caption: str) -> str:
    attr = html.escape(name, quote=True)
    cls = "chart single" if kind == "chart" else f"chart {kind}"
    return (
        f"<figure class='{cls}' data-{'metric' if kind == 'chart' else 'family'}='{attr}'>"
        f"<img alt='{attr}' src='data:image/png;base64,{png}'>"
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def _progress(total: int, show: bool | None, metrics: int = 0):
    """A tqdm bar on stderr (when stderr is a terminal, ``total`` >= PROGRESS_MIN_CHARTS or
    ``metrics`` >= PROGRESS_MIN_METRICS, unless ``show`` says otherwise), else a no-op."""
    if show is None:
        tty = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
        show = tty or total >= PROGRESS_MIN_CHARTS or metrics >= PROGRESS_MIN_METRICS
    if show:
        try:
            from tqdm.auto import tqdm

            return tqdm(total=total, desc="fastdiag report: charts", unit="chart", file=sys.stderr,
                        leave=False)  # fmt: skip
        except ImportError:
            pass

    class _Nothing:
        def update(self, n: int = 1) -> None:
            pass

        def close(self) -> None:
            pass

    return _Nothing()


def _points(name: str, by_run: Mapping[str, Mapping[str, Series]]) -> int:
    return max((by[name].values.size for by in by_run.values() if name in by), default=0)


def _anchor(text: str) -> str:
    return "s-" + re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-").lower()


def write_html(
    db: str | Path | Sequence[str | Path],
    out: str | Path,
    runs: Sequence[str] | None = None,
    metrics: str | Sequence[str] | None = None,
    window: int | None = None,
    title: str | None = None,
    *,
    exclude: str | Sequence[str] | None = None,
    progress: bool | None = None,
    data: ReportData | None = None,
) -> Path:
    """Write the report of ``runs`` (all when None) of one or more databases to ``out``.

    ``metrics`` / ``exclude``: glob patterns on the keys (all keys when None); a per-layer
    family becomes one heatmap and one small-multiples chart (``<figure class='chart family'
    data-family=...>``), other keys one chart each (``<figure class='chart single'
    data-metric=...>``). ``window`` fixes the smoothing window (default: a tenth of each
    series' points, 3 to 100). ``progress``: tqdm bar on stderr (default: on a terminal, from
    ``PROGRESS_MIN_CHARTS`` charts or from ``PROGRESS_MIN_METRICS`` metrics). ``data``: what :func:`~fastdiag.report.tables.collect`
    already read (``db`` / ``runs`` / ``metrics`` / ``exclude`` are then not read again).
    """
    if window is not None and (isinstance(window, bool) or window < 1):
        raise ValueError(f"window must be >= 1, got {window!r}")
    out = Path(out)
    if data is None:
        data = collect(db, runs, metrics, exclude)
    labels = data.labels
    dbs = sorted({str(r.db) for r in data.refs})
    by_run = {label: data.selected(label) for label in labels}
    curves, families, others = group_metrics(data.names)

    sections: list[tuple[str, str, list[str]]] = []  # (anchor, heading, html parts)

    def section(heading: str) -> list[str]:
        parts: list[str] = []
        sections.append((_anchor(heading), heading, parts))
        return parts

    runs_part = section("Runs")
    run_rows = []
    for ref in data.refs:
        info = ref.info
        started = (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.start_time))
                   if info.start_time else "")  # fmt: skip
        steps = [int(s.steps[-1]) for s in data.full.get(ref.label, {}).values() if s.steps.size]
        run_rows.append([ref.label, str(ref.db), started, info.host, info.fastdiag_version,
                         info.torch_version, str(max(steps)) if steps else "-",
                         str(len(data.full.get(ref.label, {})))])  # fmt: skip
    runs_part.append(_table(["run", "database", "started", "host", "fastdiag", "torch",
                             "last step", "metrics"], run_rows))  # fmt: skip

    charts: list[tuple[list[str], str, object]] = []  # (parts, kind, what) drawn later
    if curves:
        part = section("Training curves")
        charts += [(part, "chart", name) for name in curves]

    part = section("Health verdicts")
    rows = verdict_rows(data.verdicts)
    if rows and len(rows) > GROUP_VERDICTS:
        grouped = grouped_verdict_rows(data.verdicts)
        part.append(_table(GROUPED_HEADERS, grouped, "verdicts grouped", [r[1] for r in grouped]))
        part.append(f"<details><summary>all {len(rows)} verdicts</summary>"
                    + _table(VERDICT_HEADERS, rows, "verdicts", [r[1] for r in rows]) + "</details>")  # fmt: skip
    elif rows:
        part.append(_table(VERDICT_HEADERS, rows, "verdicts", [r[1] for r in rows]))
    else:
        part.append("<p class='ok'>Every rule of the interpretation guide holds.</p>")

    base, sets = family_runs(data.last)
    if base is not None and sets is not None:
        part = section(f"Comparison: baseline ({base}) vs set routing ({sets})")
        part.append(_table(COMPARISON_HEADERS, comparison_rows(data.last[base], data.last[sets]),
                           "comparison"))  # fmt: skip
    if len(labels) >= 2:
        chosen = set(data.names)
        last = {
            label: {n: v for n, v in data.last[label].items() if n in chosen} for label in labels
        }
        rows = compare_rows(last)
        if rows:
            part = section("Run comparison (last values)")
            diff = f"{labels[1]} - {labels[0]}" if len(labels) == 2 else "max - min"
            same = [r for r in rows if r[-1] == "0.0%"]
            rows = [r for r in rows if r[-1] != "0.0%"]
            part.append(
                "<p>Largest relative difference first (max - min over the largest |value|); "
                f"highlighted: more than 10%. {len(same)} metrics are equal (to 0.05%) in every "
                "run and not listed.</p>"
            )
            marks = [
                "differs" if r[-1] == "inf" or float(r[-1].rstrip("%")) > 10 else "" for r in rows
            ]
            headers = ["metric", *labels, diff, "rel. diff"]
            part.append(
                _table(headers, rows[:COMPARE_ROWS], "run-comparison", marks[:COMPARE_ROWS])
            )
            if len(rows) > COMPARE_ROWS:
                part.append(f"<details><summary>{len(rows) - COMPARE_ROWS} more differing metrics"
                            "</summary>" + _table(headers, rows[COMPARE_ROWS:], "run-comparison",
                                                   marks[COMPARE_ROWS:]) + "</details>")  # fmt: skip
        configs = config_rows({r.label: r.info.config for r in data.refs})
        if configs:
            part = section("Config differences")
            part.append(_table(["config", *labels], [r for _, r in configs], "config",
                               ["differs" if d else "" for d, _ in configs]))  # fmt: skip
    for family, keys in families.items():
        part = section(f"{family}/* ({len(keys)} keys)")
        charts.append((part, "family", (family, keys)))
    prefixes: dict[str, list[str]] = {}
    for name in others:
        prefixes.setdefault(name.split("/", 1)[0] if "/" in name else "other", []).append(name)
    for prefix in sorted(prefixes, key=natural_key):
        part = section(f"{prefix}/" if prefix != "other" else "Other metrics")
        names = prefixes[prefix]
        # per-epoch keys (few points) of one prefix: one grid of cells, one chart each is slow
        sparse = [n for n in names if _points(n, by_run) <= GRID_MAX_POINTS]
        if len(sparse) >= GRID_MIN_KEYS and prefix != "other":
            charts.append((part, "grid", (prefix, sparse)))
            names = [n for n in names if n not in sparse]
        charts += [(part, "chart", name) for name in names]

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        warnings.warn(
            "fastdiag report: matplotlib is not installed, the report has no charts "
            "(pip install 'fastdiag[report]')",
            RuntimeWarning,
            stacklevel=2,
        )
        note = "<p class='note'>Charts need matplotlib: pip install 'fastdiag[report]'.</p>"
        for part, _, _ in charts:
            if note not in part:
                part.append(note)
    else:
        total = sum(2 if kind == "family" else 1 for _, kind, _ in charts)
        bar = _progress(total, progress, len(data.names))
        grids: dict[int, list[str]] = {}
        try:
            for part, kind, what in charts:
                grid = grids.setdefault(id(part), [])
                if not grid:
                    part.append(grid)  # type: ignore[arg-type]  # joined below
                grid.extend(_draw(kind, what, labels, by_run, window))
                bar.update(2 if kind == "family" else 1)
        finally:
            bar.close()
        for _, _, parts in sections:
            for i, item in enumerate(parts):
                if isinstance(item, list):
                    parts[i] = "<div class='charts'>" + "".join(item) + "</div>"

    head = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title or 'fastdiag report: ' + ', '.join(Path(d).name for d in dbs))}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title or 'fastdiag report')}</h1>",
        "<p>"
        + ", ".join(f"database <code>{html.escape(d)}</code>" for d in dbs)
        + f"; {len(labels)} runs, {len(data.names)} metrics; written "
        f"{html.escape(time.strftime('%Y-%m-%d %H:%M:%S'))}</p>",
        "<nav class='toc'><strong>Contents</strong>"
        + "".join(f"<a href='#{a}'>{html.escape(h)}</a>" for a, h, _ in sections)
        + "</nav>",
    ]
    body = []
    for anchor, heading, parts in sections:
        body.append(f"<h2 id='{anchor}'>{html.escape(heading)}</h2>")
        body += parts
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(head + body + ["</body></html>"]), encoding="utf-8")
    return out


def _draw(kind: str, what: object, labels: Sequence[str], by_run: Mapping[str, Mapping[str, Series]],
          window: int | None) -> list[str]:  # fmt: skip
    """The figure HTML of one chart or one family; a chart that cannot be drawn is named
    (warning and a note) and the report kept."""
    try:
        if kind == "grid":
            prefix, keys = what  # type: ignore[misc]
            held = {
                label: by_run[label] for label in labels if any(k in by_run[label] for k in keys)
            }
            png, caption = _multiples_png(prefix, keys, held, limit=len(keys))
            attr = html.escape(" ".join(keys), quote=True)
            figure = _figure("grid", prefix + "/", png, "per-epoch metrics; " + caption)
            return [figure.replace(" data-family=", f" data-metrics='{attr}' data-family=", 1)]
        if kind == "family":
            family, keys = what  # type: ignore[misc]
            held = {
                label: by_run[label] for label in labels if any(k in by_run[label] for k in keys)
            }
            out = []
            png, caption = _heatmap_png(family, keys, held)
            out.append(_figure("heatmap", family, png, caption))
            png, caption = _multiples_png(family, keys, held)
            out.append(_figure("multiples", family, png, caption))
            return out
        name = str(what)
        series = {label: by_run[label][name] for label in labels if name in by_run[label]}
        png, caption = _chart_png(name, series, window)
        return [_figure("chart", name, png, caption)]
    except Exception as exc:  # noqa: BLE001 - one chart must not cost the report
        name = what[0] if kind == "family" else what  # type: ignore[index]
        message = f"the chart of metric {name!r} could not be drawn ({type(exc).__name__}: {exc})"
        warnings.warn(f"fastdiag report: {message}", RuntimeWarning, stacklevel=3)
        return [f"<p class='note'>{html.escape(message)}</p>"]
