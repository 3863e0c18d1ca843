"""Plain-text tables and the numbers behind them (terminal summary, verdicts, comparisons)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fastdiag.report.data import (
    RunRef,
    group_metrics,
    load_runs,
    member,
    natural_key,
    resolve_runs,
    select_metrics,
)
from fastdiag.schema import COMPARISON_TABLE, SEVERITIES, Verdict, verdicts
from fastdiag.store.database import Series, load_metrics


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


def _epoch_history(series: Mapping[str, Series]) -> list[dict[str, float]]:
    per_step: dict[int, dict[str, float]] = {}
    for name, s in series.items():
        for step, value in zip(s.steps.tolist(), s.values.tolist(), strict=True):
            per_step.setdefault(step, {})[name] = value
    return [per_step[k] for k in sorted(per_step)]


def series_verdicts(series: Mapping[str, Series]) -> list[Verdict]:
    """``fastdiag.verdicts`` of one run's series: last values, earlier values as the history."""
    steps = _epoch_history(series)
    stats: dict[str, float] = {}
    past: list[dict[str, float]] = []
    for entry in reversed(steps):  # the last occurrence of each key is "now", older ones history
        older = {k: v for k, v in entry.items() if k in stats}
        stats.update({k: v for k, v in entry.items() if k not in stats})
        if older:
            past.append(older)
    return verdicts(stats, list(reversed(past)))


def run_verdicts(db: str | Path, run: str) -> list[Verdict]:
    """``fastdiag.verdicts`` of a stored run: its last values, earlier values as the history."""
    return series_verdicts(load_metrics(db, [run]).get(run, {}))


def format_verdicts(per_run: Mapping[str, Sequence[Verdict]]) -> str:
    """One table of every run's broken rules, or a line saying all rules hold."""
    rows = verdict_rows(per_run)
    if not rows:
        return "health verdicts: every rule of the interpretation guide holds"
    if len(rows) > GROUP_VERDICTS:
        grouped = grouped_verdict_rows(per_run)
        return (format_table(GROUPED_HEADERS, grouped)
                + f"\n({len(rows)} verdicts in {len(grouped)} groups; the HTML report lists each)")  # fmt: skip
    return format_table(VERDICT_HEADERS, rows)


GROUP_VERDICTS = 20  # more verdicts than this: one row per (run, verdict, family)
GROUPED_HEADERS = ("run", "severity", "verdict", "metrics", "count", "values", "why")


def grouped_verdict_rows(per_run: Mapping[str, Sequence[Verdict]]) -> list[list[str]]:
    """One row per (run, severity, verdict, family): the family as ``<family>/*``, the count
    and the range of the values; critical first."""
    from fastdiag.report.data import family_of

    groups: dict[tuple[str, str, str, str], list[Verdict]] = {}
    for run, found in per_run.items():
        for v in found:
            fam = family_of(v.key)
            name = f"{fam[0]}/*" if fam else v.key
            groups.setdefault((run, v.severity, v.failure, name), []).append(v)
    rank = {s: i for i, s in enumerate(reversed(SEVERITIES))}
    rows = []
    for (run, severity, failure, name), vs in sorted(
        groups.items(), key=lambda kv: rank.get(kv[0][1], 9)
    ):
        values = [v.value for v in vs]
        same = min(values) == max(values)
        spread = fmt(values[0]) if same else f"{fmt(min(values))} .. {fmt(max(values))}"
        name = vs[0].key if len(vs) == 1 else name
        rows.append([run, severity, failure, name, str(len(vs)), spread, vs[0].message])
    return rows


VERDICT_HEADERS = ("run", "severity", "metric", "value", "verdict", "why")


def verdict_rows(per_run: Mapping[str, Sequence[Verdict]]) -> list[list[str]]:
    """[run, severity, metric, value, verdict, why]: critical first, then by run and key."""
    rank = {s: i for i, s in enumerate(reversed(SEVERITIES))}
    ordered = sorted(
        ((run, v) for run, found in per_run.items() for v in found),
        key=lambda rv: rank.get(rv[1].severity, len(rank)),
    )
    return [[run, v.severity, v.key, fmt(v.value), v.failure, v.message] for run, v in ordered]


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
    """[metric, A, B, B - A] for every metric both runs logged (last values), the largest
    relative difference first."""
    return [row[:-1] for row in compare_rows({"a": a, "b": b})]


def _spread(values: Sequence[float]) -> float:
    """Relative spread of one metric's last values across runs: (max - min) / max |value|;
    inf when some are finite and some not, 0 when all equal."""
    finite = [v for v in values if math.isfinite(v)]
    if len(finite) != len(values):
        same = all(str(v) == str(values[0]) for v in values)
        return 0.0 if same else math.inf
    top = max(abs(v) for v in finite)
    return 0.0 if top == 0 else (max(finite) - min(finite)) / top


def compare_rows(last: Mapping[str, Mapping[str, float]]) -> list[list[str]]:
    """The N-run last-values table: [metric, value per run..., difference, relative spread]
    for each metric at least two runs logged, the largest relative difference first.

    difference: ``B - A`` for two runs, ``max - min`` for more."""
    labels = list(last)
    names = sorted({n for values in last.values() for n in values})
    scored = []
    for name in names:
        held = [last[r][name] for r in labels if name in last[r]]
        if len(held) < 2:
            continue
        finite = [v for v in held if math.isfinite(v)]
        if len(labels) == 2 and len(finite) == 2:
            delta: float | None = held[1] - held[0]
        elif len(finite) == len(held):
            delta = max(finite) - min(finite)
        else:
            delta = None
        spread = _spread(held)
        cells = [fmt(last[r].get(name)) if name in last[r] else "-" for r in labels]
        scored.append(
            (
                spread,
                name,
                [name, *cells, fmt(delta), f"{spread:.1%}" if math.isfinite(spread) else "inf"],
            )
        )
    scored.sort(key=lambda t: (-t[0], natural_key(t[1])))
    return [row for _, _, row in scored]


def config_rows(configs: Mapping[str, Mapping[str, object]]) -> list[tuple[bool, list[str]]]:
    """(differs, [key, value per run...]) for every config key, the differing keys first."""
    import json

    keys = sorted({k for c in configs.values() for k in c})
    rows = []
    for key in keys:
        cells = [
            json.dumps(c[key], sort_keys=True, default=str) if key in c else "-"
            for c in configs.values()
        ]
        rows.append((len(set(cells)) > 1, [key, *cells]))
    rows.sort(key=lambda t: not t[0])
    return rows


def family_runs(last: Mapping[str, Mapping[str, float]]) -> tuple[str | None, str | None]:
    """(first run holding ``baseline/`` keys, first run holding ``ausa/`` keys)."""
    base = next((r for r, v in last.items() if any(k.startswith("baseline/") for k in v)), None)
    sets = next((r for r, v in last.items() if any(k.startswith("ausa/") for k in v)), None)
    return base, sets


@dataclass
class ReportData:
    """Everything a report shows, read once: the runs, their full series, the selected keys,
    the last values and the verdicts of each run."""

    refs: list[RunRef]
    full: dict[str, dict[str, Series]]
    names: list[str]
    last: dict[str, dict[str, float]] = field(default_factory=dict)
    verdicts: dict[str, list[Verdict]] = field(default_factory=dict)

    @property
    def labels(self) -> list[str]:
        return [r.label for r in self.refs]

    def selected(self, label: str) -> dict[str, Series]:
        by = self.full.get(label, {})
        return {n: by[n] for n in self.names if n in by}


def collect(
    dbs: str | Path | Sequence[str | Path],
    runs: Sequence[str] | None = None,
    metrics: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
) -> ReportData:
    """Read the runs of ``dbs`` (filtered by ``runs``), select ``metrics`` globs minus
    ``exclude`` globs, compute last values and verdicts (over every key of each run)."""
    refs = resolve_runs(dbs, runs)
    full = load_runs(refs)
    labels = [r.label for r in refs]
    available = {n for by in full.values() for n in by}
    names = select_metrics(available, metrics, exclude, labels)
    data = ReportData(refs, full, names)
    data.last = {label: last_values(full[label]) for label in labels}
    data.verdicts = {label: series_verdicts(full[label]) for label in labels}
    return data


def worst(found: Mapping[str, Sequence[Verdict]]) -> str | None:
    """The highest severity among ``found``'s verdicts, or None."""
    seen = {v.severity for vs in found.values() for v in vs}
    for severity in reversed(SEVERITIES):
        if severity in seen:
            return severity
    return None


def _metric_row(name: str, s: Series, window: int) -> list[str]:
    finite = s.values[np.isfinite(s.values)][-window:]
    change, arrow = trend(s.values, window)
    return [
        name,
        str(int(s.steps[-1])),
        fmt(float(s.values[-1])),
        fmt(float(finite.mean())) if finite.size else "-",
        f"{arrow} {change:+.1%}" if change is not None else "",
    ]


def _family_row(family: str, keys: Sequence[str], series: Mapping[str, Series]) -> list[str]:
    held = [k for k in keys if k in series and series[k].values.size]
    lasts = np.array([series[k].values[-1] for k in held], dtype=np.float64)
    finite = np.isfinite(lasts)
    if not finite.any():
        return [f"{family}/* ({len(held)})", "-", "-", "-", ""]
    lo, hi = (
        int(np.nanargmin(np.where(finite, lasts, np.nan))),
        int(np.nanargmax(np.where(finite, lasts, np.nan))),
    )
    step = max(int(series[k].steps[-1]) for k in held)
    return [
        f"{family}/* ({len(held)})",
        str(step),
        f"{fmt(float(lasts[lo]))} .. {fmt(float(lasts[hi]))}",
        fmt(float(lasts[finite].mean())),
        f"max {member(family, held[hi])}",
    ]


def summary_text(data: ReportData, window: int = 5, compare_limit: int = 25) -> str:
    """The terminal summary of ``data`` (see :func:`summarize`)."""
    out: list[str] = []
    for label in data.labels:
        series = data.selected(label)
        curves, families, others = group_metrics(list(series))
        rows = [_metric_row(n, series[n], window) for n in curves + others]
        rows += [_family_row(f, keys, series) for f, keys in families.items()]
        out.append(f"== run {label}: {len(series)} metrics")
        if rows:
            out.append(
                format_table(["metric", "step", "last", f"mean(last {window})", "trend"], rows)
            )
        out.append("")
    out.append("health verdicts (last values; earlier values as history):")
    out.append(format_verdicts(data.verdicts))
    base, sets = family_runs(data.last)
    if base is not None and sets is not None:
        out += ["", f"baseline ({base}) vs set-routing ({sets}), last values:",
                format_comparison(data.last[base], data.last[sets])]  # fmt: skip
    if len(data.labels) >= 2:
        chosen = {
            label: {n: v for n, v in data.last[label].items() if n in set(data.names)}
            for label in data.labels
        }
        rows = compare_rows(chosen)
        if rows:
            head = " vs ".join(f"run {label}" for label in data.labels)
            diff = f"{data.labels[1]} - {data.labels[0]}" if len(data.labels) == 2 else "max - min"
            out += ["", f"{head} (last values, largest relative difference first):",
                    format_table(["metric", *data.labels, diff, "rel. diff"], rows[:compare_limit])]  # fmt: skip
            if len(rows) > compare_limit:
                out.append(
                    f"... {len(rows) - compare_limit} more metrics (the HTML report lists all)"
                )
        configs = {r.label: r.info.config for r in data.refs}
        differing = [row for differs, row in config_rows(configs) if differs]
        if differing:
            out += ["", "config differences:", format_table(["config", *data.labels], differing)]
    return "\n".join(out)


def summarize(
    db: str | Path | Sequence[str | Path],
    runs: Sequence[str] | None = None,
    metrics: str | Sequence[str] | None = None,
    window: int = 5,
    *,
    exclude: str | Sequence[str] | None = None,
) -> str:
    """Terminal summary of one or more databases: per run the last value, the mean and trend
    over the last ``window`` logged values of each metric (a per-layer family on one line:
    the range of its members' last values), then the health verdicts, the comparison tables,
    the run comparison (two or more runs, the largest differences first) and the config
    differences. ``metrics`` / ``exclude``: glob patterns."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be >= 1, got {window!r}")
    return summary_text(collect(db, runs, metrics, exclude), window)
