"""The SQLite metrics store: schema, connections and readers.

Schema (one file holds many runs)::

    runs(name PRIMARY KEY, config JSON, start_time, host, fastdiag_version, torch_version)
    metrics(run, step, name, value, special, wall_time)   PRIMARY KEY (run, step, name)

``value`` is a REAL; SQLite cannot store NaN (it becomes NULL), so every non-finite value
also writes its spelling (``'nan'``, ``'inf'``, ``'-inf'``) to ``special`` and readers
decode it back. Writers use WAL mode, so readers (the report) work while training writes.
"""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Iterable, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS runs (
        name TEXT PRIMARY KEY,
        config TEXT,
        start_time REAL,
        host TEXT,
        fastdiag_version TEXT,
        torch_version TEXT
    )""",
    """CREATE TABLE IF NOT EXISTS metrics (
        run TEXT NOT NULL,
        step INTEGER NOT NULL,
        name TEXT NOT NULL,
        value REAL,
        special TEXT,
        wall_time REAL NOT NULL,
        PRIMARY KEY (run, step, name)
    ) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS metrics_by_name ON metrics (name, run, step)",
)

RESUMED_CONFIGS_KEY = "fastdiag/resumed_configs"
"""Key of a resumed run's config listing the configs of resumes that differed from it."""

INSERT_METRIC = (
    "INSERT OR REPLACE INTO metrics (run, step, name, value, special, wall_time) "
    "VALUES (?, ?, ?, ?, ?, ?)"
)


def encode_value(value: float) -> tuple[float | None, str | None]:
    """(value, special) columns for one float; non-finite values keep their spelling."""
    if math.isfinite(value):
        return value, None
    if value != value:
        return None, "nan"
    return value, "inf" if value > 0 else "-inf"


def decode_value(value: float | None, special: str | None) -> float:
    """Inverse of :func:`encode_value`."""
    if special is not None:
        return float(special)
    if value is None:
        return math.nan
    return float(value)


def connect(
    path: str | Path, *, readonly: bool = False, timeout: float = 5.0
) -> sqlite3.Connection:
    """A connection to the store at ``path``; read-only connections never create the file.

    Raises ``FileNotFoundError`` (read-only, no file) or ``ValueError`` naming the path when
    it is a directory or SQLite cannot open it.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"the metrics database path {str(path)!r} is a directory, not a file")
    if readonly and not path.exists():
        raise FileNotFoundError(f"no metrics database at {str(path)!r}")
    try:
        if readonly:
            return sqlite3.connect(f"file:{path.resolve()}?mode=ro", uri=True, timeout=timeout)
        return sqlite3.connect(str(path), timeout=timeout, isolation_level=None)
    except sqlite3.Error as exc:
        raise ValueError(f"cannot open the metrics database {str(path)!r}: {exc}") from exc


# (column names in order, primary key columns in order) of the tables writers rely on
EXPECTED_COLUMNS = {
    "runs": (
        ("name", "config", "start_time", "host", "fastdiag_version", "torch_version"),
        ("name",),
    ),
    "metrics": (("run", "step", "name", "value", "special", "wall_time"), ("run", "step", "name")),
}
READ_COLUMNS = {"run", "step", "name", "value", "special"}  # what the readers need of metrics


def _columns(conn: sqlite3.Connection, table: str) -> tuple[str | None, list[str], list[str]]:
    """(type in sqlite_master or None, column names, primary key columns in key order)."""
    found = conn.execute(
        "SELECT type FROM sqlite_master WHERE name = ? AND type IN ('table', 'view')", (table,)
    ).fetchone()
    if found is None:
        return None, [], []
    info = conn.execute(f"PRAGMA table_info({table})").fetchall()
    names = [row[1] for row in info]
    pk = [row[1] for row in sorted((r for r in info if r[5]), key=lambda r: r[5])]
    return found[0], names, pk


def check_schema(conn: sqlite3.Connection, path: str | Path) -> None:
    """Raise ``ValueError`` naming ``path`` unless its tables are the ones writers expect."""
    for table, (columns, key) in EXPECTED_COLUMNS.items():
        kind, names, pk = _columns(conn, table)
        if kind is None:
            continue  # created by create_schema
        if kind != "table" or tuple(names) != columns or tuple(pk) != key:
            raise ValueError(
                f"the {table!r} {kind} of {str(path)!r} has another schema: expected columns "
                f"{', '.join(columns)} (primary key {', '.join(key)}), found "
                f"{', '.join(names) or 'none'} (primary key {', '.join(pk) or 'none'}); use "
                f"another file for fastdiag metrics"
            )


def open_reader(path: str | Path) -> tuple[sqlite3.Connection, bool]:
    """A read-only connection to a fastdiag store and whether it has a ``runs`` table.

    ``FileNotFoundError`` when there is no file; ``ValueError`` naming the path when it is a
    directory, not an SQLite database, or has no usable ``metrics`` table.
    """
    conn = connect(path, readonly=True)
    try:
        kind, names, _ = _columns(conn, "metrics")
        if kind is None:
            raise ValueError(
                f"{str(path)!r} is not a fastdiag metrics database: it has no 'metrics' table"
            )
        missing = sorted(READ_COLUMNS - set(names))
        if missing:
            raise ValueError(
                f"the 'metrics' table of {str(path)!r} lacks the columns {', '.join(missing)} "
                f"(found {', '.join(names)})"
            )
        has_runs = _columns(conn, "runs")[0] is not None
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise ValueError(
            f"{str(path)!r} is not a readable SQLite metrics database ({exc})"
        ) from exc
    except BaseException:
        conn.close()
        raise
    return conn, has_runs


def create_schema(conn: sqlite3.Connection) -> None:
    """Switch to WAL and create the tables and index if missing."""
    conn.execute("PRAGMA journal_mode=WAL")
    for statement in SCHEMA:
        conn.execute(statement)


@dataclass(frozen=True)
class RunInfo:
    """One row of the ``runs`` table."""

    name: str
    config: dict[str, Any] = field(default_factory=dict)
    start_time: float = 0.0
    host: str = ""
    fastdiag_version: str = ""
    torch_version: str = ""


def _run_from_row(row: Sequence[Any]) -> RunInfo:
    try:
        config = json.loads(row[1]) if row[1] else {}
    except json.JSONDecodeError:
        config = {"_raw": row[1]}
    return RunInfo(row[0], config, row[2] or 0.0, row[3] or "", row[4] or "", row[5] or "")


def list_runs(path: str | Path) -> list[RunInfo]:
    """Every run recorded in the store, in start order."""
    conn, has_runs = open_reader(path)
    with closing(conn):
        rows = []
        if has_runs:
            rows = conn.execute(
                "SELECT name, config, start_time, host, fastdiag_version, torch_version "
                "FROM runs ORDER BY start_time, name"
            ).fetchall()
        known = {r[0] for r in rows}
        # runs written by foreign tools may have metrics without a runs row
        extra = [
            r[0]
            for r in conn.execute("SELECT DISTINCT run FROM metrics").fetchall()
            if r[0] not in known
        ]
    return [_run_from_row(r) for r in rows] + [RunInfo(name) for name in sorted(extra)]


def metric_names(path: str | Path, run: str | None = None) -> list[str]:
    """Sorted distinct metric names (of one run, or of all runs)."""
    with closing(open_reader(path)[0]) as conn:
        if run is None:
            rows = conn.execute("SELECT DISTINCT name FROM metrics ORDER BY name").fetchall()
        else:
            rows = conn.execute(
                "SELECT DISTINCT name FROM metrics WHERE run = ? ORDER BY name", (run,)
            ).fetchall()
    return [r[0] for r in rows]


@dataclass(frozen=True)
class Series:
    """One metric of one run: ``steps`` int64 [n] ascending, ``values`` float64 [n]."""

    steps: np.ndarray
    values: np.ndarray


def load_metrics(
    path: str | Path,
    runs: Iterable[str] | None = None,
    names: Iterable[str] | None = None,
) -> dict[str, dict[str, Series]]:
    """``{run: {name: Series}}`` for the chosen runs and names (all when None)."""
    query = "SELECT run, name, step, value, special FROM metrics"
    clauses, params = [], []
    if runs is not None:
        runs = list(runs)
        clauses.append(f"run IN ({','.join('?' * len(runs))})")
        params += runs
    if names is not None:
        names = list(names)
        clauses.append(f"name IN ({','.join('?' * len(names))})")
        params += names
    if clauses:
        query += " WHERE " + " AND ".join(clauses)
    query += " ORDER BY run, name, step"
    grouped: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
    with closing(open_reader(path)[0]) as conn:
        for run, name, step, value, special in conn.execute(query, params):
            steps, values = grouped.setdefault(run, {}).setdefault(name, ([], []))
            steps.append(step)
            values.append(decode_value(value, special))
    return {
        run: {
            name: Series(np.asarray(s, dtype=np.int64), np.asarray(v, dtype=np.float64))
            for name, (s, v) in by_name.items()
        }
        for run, by_name in grouped.items()
    }


def history(
    path: str | Path, run: str, names: Iterable[str] | None = None
) -> list[dict[str, float]]:
    """The run's logged steps in order, each as ``{name: value}`` (with ``'step'`` omitted)."""
    per_step: dict[int, dict[str, float]] = {}
    for name, series in load_metrics(path, [run], names).get(run, {}).items():
        for step, value in zip(series.steps.tolist(), series.values.tolist(), strict=True):
            per_step.setdefault(step, {})[name] = value
    return [per_step[s] for s in sorted(per_step)]
