"""Plain-text tables and the numbers behind them (terminal summary, verdicts, comparisons)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from fastdiag.schema import COMPARISON_TABLE, Verdict, verdicts
from fastdiag.store.database import Series, history, list_runs, load_metrics


def fmt(value: float | None, digits: int = 4) -> str:
    """A compact number: 4 significant digits, 'nan' / 'inf' spelled out, '-' for None."""
    if value is None:
        return "-"
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
        return f"{value:.{digits - 1}e}"
    return f"{value:.{digits}g}"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned text table with a rule under the header."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    return "\n".join(lines)


def trend(values: np.ndarray, window: int) -> tuple[float | None, str]:
    """Relative change over the last ``window`` finite values, and an ASCII arrow.

    Returns (change, arrow): change = (last - first) / |first| of that window (absolute
    change when first is 0), arrow '^' rising, 'v' falling, '=' within 1%; (None, '') when
    fewer than 2 finite values.
    """
    finite = values[np.isfinite(values)][-window:]
    if finite.size < 2:
        return None, ""
    first, last = float(finite[0]), float(finite[-1])
    change = (last - first) / abs(first) if first != 0 else last - first
    if abs(change) < 0.01:
        return change, "="
    return change, "^" if change > 0 else "v"


def last_values(series: Mapping[str, Series]) -> dict[str, float]:
    """The last logged value of every metric."""
    return {name: float(s.values[-1]) for name, s in series.items() if s.values.size}


def run_verdicts(db: str | Path, run: str) -> list[Verdict]:
    """``fastdiag.verdicts`` of a stored run: its last values, earlier values as the history."""
    steps = history(db, run)
    stats: dict[str, float] = {}
    past: list[dict[str, float]] = []
    for entry in reversed(steps):  # the last occurrence of each key is "now", older ones history
        older = {k: v for k, v in entry.items() if k in stats}
        stats.update({k: v for k, v in entry.items() if k not in stats})
        if older:
            past.append(older)
    return verdicts(stats, list(reversed(past)))


def format_verdicts(per_run: Mapping[str, Sequence[Verdict]]) -> str:
    """One table of every run's broken rules, or a line saying all rules hold."""
    rows = [
        [run, v.key, fmt(v.value), v.failure, v.message]
        for run, found in per_run.items()
        for v in found
    ]
    if not rows:
        return "health verdicts: every rule of the interpretation guide holds"
    return format_table(["run", "metric", "value", "verdict", "why"], rows)


def comparison_rows(
    baseline: Mapping[str, float], set_routing: Mapping[str, float]
) -> list[list[str]]:
    """The baseline vs set-routing comparison table (``schema.COMPARISON_TABLE``).

    Rows: [label, baseline value, set value, interpretation].
    """
    return [
        [row.label, fmt(baseline.get(row.baseline_key)), fmt(set_routing.get(row.set_key)),
         row.interpretation]
        for row in COMPARISON_TABLE
    ]  # fmt: skip


COMPARISON_HEADERS = (
    "metric",
    "baseline (token-token)",
    "set-routing (token-set)",
    "interpretation",
)


def format_comparison(baseline: Mapping[str, float], set_routing: Mapping[str, float]) -> str:
    """The baseline-vs-set-routing comparison table as text."""
    return format_table(COMPARISON_HEADERS, comparison_rows(baseline, set_routing))


def run_vs_run_rows(a: Mapping[str, float], b: Mapping[str, float]) -> list[list[str]]:
    """[metric, A, B, B - A] for every metric both runs logged (last values)."""
    rows = []
    for name in sorted(set(a) & set(b)):
        delta = b[name] - a[name] if math.isfinite(a[name]) and math.isfinite(b[name]) else None
        rows.append([name, fmt(a[name]), fmt(b[name]), fmt(delta)])
    return rows


def family_runs(last: Mapping[str, Mapping[str, float]]) -> tuple[str | None, str | None]:
    """(first run holding ``baseline/`` keys, first run holding ``ausa/`` keys)."""
    base = next((r for r, v in last.items() if any(k.startswith("baseline/") for k in v)), None)
    sets = next((r for r, v in last.items() if any(k.startswith("ausa/") for k in v)), None)
    return base, sets


def summarize(
    db: str | Path,
    runs: Sequence[str] | None = None,
    metrics: Sequence[str] | None = None,
    window: int = 5,
) -> str:
    """Terminal summary: per run the last value, the mean and trend over the last ``window``
    logged values of each metric, then the health verdicts and the comparison tables."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be >= 1, got {window!r}")
    known = [r.name for r in list_runs(db)]
    chosen = list(runs) if runs else known
    missing = [r for r in chosen if r not in known]
    if missing:
        raise ValueError(f"runs {missing} are not in {str(db)!r}; it holds {known}")
    data = load_metrics(db, chosen, metrics)
    out: list[str] = []
    for run in chosen:
        series = data.get(run, {})
        rows = []
        for name, s in sorted(series.items()):
            finite = s.values[np.isfinite(s.values)][-window:]
            change, arrow = trend(s.values, window)
            rows.append(
                [
                    name,
                    str(int(s.steps[-1])),
                    fmt(float(s.values[-1])),
                    fmt(float(finite.mean())) if finite.size else "-",
                    f"{arrow} {change:+.1%}" if change is not None else "",
                ]
            )
        out.append(f"== run {run}: {len(series)} metrics")
        if rows:
            out.append(
                format_table(["metric", "step", "last", f"mean(last {window})", "trend"], rows)
            )
        out.append("")
    out.append("health verdicts (last values; earlier values as history):")
    out.append(format_verdicts({run: run_verdicts(db, run) for run in chosen}))
    last = {run: last_values(data.get(run, {})) for run in chosen}
    if metrics is None:
        full = last
    else:
        full = {run: last_values(by) for run, by in load_metrics(db, chosen).items()}
    base, sets = family_runs(full)
    if base is not None and sets is not None:
        out += ["", f"baseline ({base}) vs set-routing ({sets}), last values:",
                format_comparison(full[base], full[sets])]  # fmt: skip
    if len(chosen) == 2:
        a, b = chosen
        rows = run_vs_run_rows(last[a], last[b])
        if rows:
            out += ["", f"run {a} vs run {b} (last values):",
                    format_table(["metric", a, b, f"{b} - {a}"], rows)]  # fmt: skip
    return "\n".join(out)
