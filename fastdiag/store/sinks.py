"""Destinations of logged metrics, behind one small interface.

A sink receives rows ``(step, name, value, wall_time)`` (``value`` a Python float, NaN and
inf included) from the logger's background writer thread. :meth:`Sink.prepare` runs once in
the thread that builds the logger (validate, create files, start a service); ``open``,
``write``, ``flush`` and ``close`` run in the writer thread. ``write`` may raise: the logger
keeps the rows (bounded), warns once and retries them later; when the exception is one of
:data:`ROW_ERRORS` it isolates the rejected rows instead and drops (and counts) only those.
"""

from __future__ import annotations

import json
import os
import random
import sqlite3
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fastdiag.store.database import (
    INSERT_METRIC,
    RESUMED_CONFIGS_KEY,
    RunInfo,
    check_schema,
    connect,
    create_schema,
    encode_value,
)

Row = tuple[int, str, float, float]  # (step, name, value, wall_time)

ROW_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    TypeError,
    OverflowError,
    sqlite3.IntegrityError,
    sqlite3.InterfaceError,
    sqlite3.ProgrammingError,
    sqlite3.DataError,
)
"""Exceptions from :meth:`Sink.write` that blame the rows, not the destination: the logger
then writes the batch in halves until it has isolated the rows the sink rejects, drops only
those (counted in ``health/logger_dropped``) and stores the rest. Any other exception (an
``OSError``, a locked or full database) keeps the whole batch buffered for a retry."""


class Sink:
    """Base class: override ``write``; the other hooks default to doing nothing."""

    name = "sink"

    def prepare(self, run: RunInfo) -> None:
        """Called once in the constructing thread, before any row."""

    def open(self) -> None:
        """Called once in the writer thread before the first ``write``."""

    def write(self, rows: Sequence[Row]) -> None:
        """Store ``rows`` (one flush worth); raise on failure, the rows will be retried (or,
        for one of :data:`ROW_ERRORS`, bisected down to the rejected rows)."""
        raise NotImplementedError

    def flush(self) -> None:
        """Make what ``write`` stored durable, where the destination buffers."""

    def close(self) -> None:
        """Release files and connections (writer thread, after the last ``write``)."""


class _Busy(Exception):
    """A transient lock while preparing the store; the attempt is repeated."""


class SQLiteSink(Sink):
    """The default store: one SQLite file, WAL mode, one transaction per ``write``.

    ``busy_timeout`` (seconds) bounds how long a write waits for a lock held by another
    connection before it fails (and is retried later). ``synchronous`` is the SQLite PRAGMA:
    ``NORMAL`` (default) survives a killed process, ``FULL`` also a power loss.
    ``pragmas`` sets further per-connection PRAGMAs (e.g. ``{"cache_size": -8000}``).
    ``resume``: whether :meth:`prepare` may continue a run already in the file (else it raises
    ``ValueError``); :class:`~fastdiag.MetricsLogger` passes its own ``resume``.
    """

    name = "sqlite"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        busy_timeout: float = 5.0,
        synchronous: str = "NORMAL",
        pragmas: Mapping[str, str | int] | None = None,
        resume: bool = False,
    ) -> None:
        if synchronous.upper() not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise ValueError(
                f"synchronous must be one of OFF, NORMAL, FULL, EXTRA, got {synchronous!r}"
            )
        if busy_timeout < 0:
            raise ValueError(f"busy_timeout must be >= 0 seconds, got {busy_timeout!r}")
        self.path = Path(path)
        self.busy_timeout = float(busy_timeout)
        self.synchronous = synchronous.upper()
        self.pragmas = dict(pragmas or {})
        self.resume = bool(resume)
        for key in self.pragmas:
            if not key.replace("_", "").isalnum():
                raise ValueError(f"pragmas keys must be PRAGMA names, got {key!r}")
        self._run = ""
        self._conn: sqlite3.Connection | None = None

    def _connect(self) -> sqlite3.Connection:
        conn = connect(self.path, timeout=self.busy_timeout)
        try:
            conn.execute(f"PRAGMA synchronous={self.synchronous}")
            for key, value in self.pragmas.items():
                conn.execute(f"PRAGMA {key}={int(value) if isinstance(value, bool) else value}")
        except BaseException:
            conn.close()
            raise
        return conn

    def prepare(self, run: RunInfo, *, resume: bool | None = None) -> None:
        """Create the file, the schema and the run's row; ``ValueError`` naming the file when
        it cannot be opened, its tables have another schema, or the run exists and neither
        ``resume`` nor ``self.resume`` is set.

        Resuming keeps the run's start time, its rows and its config; a new config that
        differs is appended to ``config["fastdiag/resumed_configs"]`` (with its start time and
        host), never merged over the original.
        """
        resume = self.resume if resume is None else bool(resume)
        self._run = run.name
        where = str(self.path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ValueError(
                f"cannot create the directory of the metrics database {where!r}: "
                f"{exc.strerror or exc}"
            ) from exc
        deadline = time.monotonic() + max(self.busy_timeout, 1.0)
        while True:
            try:
                self._prepare_once(run, resume, where)
                return
            except _Busy as busy:
                # a lock SQLite's busy handler does not wait for (a fresh file's WAL switch)
                if time.monotonic() >= deadline:
                    raise ValueError(
                        f"cannot prepare the metrics database {where!r}: {busy.__cause__}"
                    ) from busy.__cause__
                time.sleep(0.01 + 0.04 * random.random())

    def _prepare_once(self, run: RunInfo, resume: bool, where: str) -> None:
        try:
            conn = self._connect()
        except sqlite3.Error as exc:
            raise ValueError(f"cannot open the metrics database {where!r}: {exc}") from exc
        try:
            check_schema(conn, self.path)
            create_schema(conn)
            conn.execute("BEGIN IMMEDIATE")  # the existence check and the insert are atomic
            found = conn.execute("SELECT config FROM runs WHERE name = ?", (run.name,)).fetchone()
            if found is not None and not resume:
                raise ValueError(
                    f"run {run.name!r} already exists in {where!r}: pass resume=True to "
                    f"continue it, or choose another run name (run=None gives a unique one)"
                )
            if found is None:
                conn.execute(
                    "INSERT INTO runs (name, config, start_time, host, fastdiag_version, "
                    "torch_version) VALUES (?, ?, ?, ?, ?, ?)",
                    (run.name, _config_json(run.config) if run.config else None, run.start_time,
                     run.host, run.fastdiag_version, run.torch_version),
                )  # fmt: skip
            else:
                conn.execute(
                    "UPDATE runs SET config = ?, fastdiag_version = ?, torch_version = ? "
                    "WHERE name = ?",
                    (_resumed_config(found[0], run), run.fastdiag_version, run.torch_version,
                     run.name),
                )  # fmt: skip
            conn.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                raise _Busy from exc
            raise ValueError(f"cannot prepare the metrics database {where!r}: {exc}") from exc
        except sqlite3.Error as exc:
            raise ValueError(f"cannot prepare the metrics database {where!r}: {exc}") from exc
        finally:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            conn.close()

    def write(self, rows: Sequence[Row]) -> None:
        if self._conn is None:
            try:
                conn = self._connect()
            except ValueError as exc:  # the file is gone or unopenable: retry, never blame rows
                raise sqlite3.OperationalError(str(exc)) from exc
            try:
                create_schema(conn)  # idempotent: covers a file removed or replaced mid-run
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        run = self._run
        params = []
        for step, name, value, wall in rows:
            stored, special = encode_value(value)
            params.append((run, step, name, stored, special, wall))
        conn = self._conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(INSERT_METRIC, params)
            conn.execute("COMMIT")
        except BaseException as exc:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            if not isinstance(exc, ROW_ERRORS):  # a broken connection is reopened next time
                conn.close()
                self._conn = None
            raise

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _config_json(config: Mapping[str, Any]) -> str:
    return json.dumps(config, default=str, sort_keys=True)


def _resumed_config(stored: str | None, run: RunInfo) -> str | None:
    """The config of a resumed run: the stored one, plus the new one when it differs."""
    if not run.config:
        return stored
    if not stored:
        return _config_json(run.config)
    try:
        old = json.loads(stored)
    except json.JSONDecodeError:
        old = {"_raw": stored}
    if not isinstance(old, dict):
        old = {"_raw": old}
    new = json.loads(_config_json(run.config))
    original = {k: v for k, v in old.items() if k != RESUMED_CONFIGS_KEY}
    if new == original:
        return stored
    entry = {"start_time": run.start_time, "host": run.host, "config": new}
    old[RESUMED_CONFIGS_KEY] = [*old.get(RESUMED_CONFIGS_KEY, []), entry]
    return _config_json(old)


class JSONLSink(Sink):
    """Appends a JSON line ``{"step": s, "wall_time": t, name: latest value, ...}`` every
    ``every`` steps (and once at close), holding the latest value of every metric seen so far.
    NaN and inf are written as the ``NaN`` / ``Infinity`` tokens Python's json reads back.
    """

    name = "jsonl"

    def __init__(self, path: str | os.PathLike[str], every: int = 100) -> None:
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int (steps), got {every!r}")
        self.path = Path(path)
        self.every = every
        self._latest: dict[str, float] = {}
        self._next_step: int | None = None
        self._dirty = False
        self._last: tuple[int, float] = (0, 0.0)
        self._file: Any = None

    def prepare(self, run: RunInfo) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def _emit(self, step: int, wall: float) -> None:
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open
        line = {"step": step, "wall_time": wall}
        line.update(self._latest)
        self._file.write(json.dumps(line) + "\n")
        self._dirty = False

    def write(self, rows: Sequence[Row]) -> None:
        index = 0
        while index < len(rows):
            step, _, _, wall = rows[index]
            while index < len(rows) and rows[index][0] == step:
                self._latest[rows[index][1]] = rows[index][2]
                index += 1
            self._dirty = True
            self._last = (step, wall)
            if self._next_step is None or step >= self._next_step:
                self._emit(step, wall)
                self._next_step = (step // self.every + 1) * self.every
        if self._file is not None:
            self._file.flush()

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._dirty and self._latest:
            self._emit(*self._last)
        if self._file is not None:
            self._file.close()
            self._file = None


class TensorBoardSink(Sink):
    """Scalars through ``torch.utils.tensorboard.SummaryWriter(log_dir)`` (needs tensorboard)."""

    name = "tensorboard"

    def __init__(self, log_dir: str | os.PathLike[str], **writer_kwargs: Any) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ImportError(
                "the TensorBoard sink needs the tensorboard package: pip install 'fastdiag[tensorboard]'"
            ) from exc
        self._writer_cls = SummaryWriter
        self.log_dir = Path(log_dir)
        self.writer_kwargs = writer_kwargs
        self._writer: Any = None

    def prepare(self, run: RunInfo) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)

    def open(self) -> None:
        self._writer = self._writer_cls(log_dir=str(self.log_dir), **self.writer_kwargs)

    def write(self, rows: Sequence[Row]) -> None:
        add = self._writer.add_scalar
        for step, name, value, wall in rows:
            add(name, value, global_step=step, walltime=wall)

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class WandbSink(Sink):
    """Weights & Biases: ``run.log({name: value}, step=step)`` per logged step.

    Uses the active ``wandb.run`` when there is one (the user keeps their dashboard and their
    run; it is not finished at close), else starts one with ``wandb.init(project=..., name=<run
    name>, config=<run config>, **init_kwargs)`` and finishes it at close. W&B keeps steps
    monotonic: rows for a step below the run's current step are dropped by W&B itself.
    """

    name = "wandb"

    def __init__(self, project: str | None = None, run: Any = None, **init_kwargs: Any) -> None:
        try:
            import wandb
        except ImportError as exc:
            raise ImportError("the W&B sink needs wandb: pip install 'fastdiag[wandb]'") from exc
        self._wandb = wandb
        self.project = project
        self.init_kwargs = init_kwargs
        self._run = run
        self._owned = False

    def prepare(self, run: RunInfo) -> None:
        if self._run is None and self._wandb.run is not None and not self.init_kwargs:
            self._run = self._wandb.run
        if self._run is None:
            kwargs = {"project": self.project or "fastdiag", "name": run.name, "config": run.config}
            kwargs.update(self.init_kwargs)
            self._run = self._wandb.init(**kwargs)
            self._owned = True

    def write(self, rows: Sequence[Row]) -> None:
        index = 0
        while index < len(rows):
            step = rows[index][0]
            payload = {}
            while index < len(rows) and rows[index][0] == step:
                payload[rows[index][1]] = rows[index][2]
                index += 1
            self._run.log(payload, step=step)

    def close(self) -> None:
        if self._owned and self._run is not None:
            self._run.finish()
        self._run = None
