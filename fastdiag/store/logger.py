"""``MetricsLogger``: a non-blocking metrics logger with a SQLite store and optional sinks.

The training thread only snapshots values: Python numbers are kept as they are, one-element
tensors are stacked per (device, dtype) into one tensor and, on CUDA, copied to pinned host
memory with ``non_blocking=True`` behind a CUDA event (one copy per group, no host sync).
A background writer thread waits on the events, turns the values into rows and hands them
to every sink once per flush (every ``flush_interval`` seconds, every ``flush_rows`` rows,
or on :meth:`flush` / :meth:`close`). A sink that fails (disk error, locked database,
network) never raises into the training loop: the logger warns once, keeps up to
``max_buffer_rows`` rows for that sink (dropping the oldest beyond that), retries with
backoff, and reports the number of dropped rows in the ``health/logger_dropped`` metric.

No row accepted by :meth:`MetricsLogger.log` is lost silently: it is stored, or counted in
:attr:`MetricsLogger.dropped` and ``health/logger_dropped``. ``log`` rejects up front what no
store can hold (a step outside int64, a name that is not a ``str`` or cannot be UTF-8 encoded,
a Python number too large for a float); a sink that rejects single rows (one of
:data:`~fastdiag.store.sinks.ROW_ERRORS`) costs only those rows, found by bisecting the batch.
"""

from __future__ import annotations

import atexit
import functools
import numbers
import os
import secrets
import socket
import threading
import time
import warnings
import weakref
from collections import deque
from collections.abc import Mapping, Sequence
from itertools import repeat
from typing import Any, NamedTuple

import torch

from fastdiag.store.database import RunInfo
from fastdiag.store.sinks import (
    ROW_ERRORS,
    JSONLSink,
    Row,
    Sink,
    SQLiteSink,
    TensorBoardSink,
    WandbSink,
)

DROPPED_KEY = "health/logger_dropped"
_MAX_BACKOFF = 30.0
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def default_run_name() -> str:
    """``run-<date>-<time>-<host>-<pid>-<6 random hex digits>``: unique across loggers
    started in the same second, in one process or many, on one host or many."""
    host = "".join(c if c.isalnum() or c in "-_." else "_" for c in socket.gethostname())
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return f"run-{stamp}-{host or 'host'}-{os.getpid()}-{secrets.token_hex(3)}"


def _check_name(name: object) -> None:
    if type(name) is not str:
        raise TypeError(f"metric names must be str, got {type(name).__name__}")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"metric name {name!r} cannot be stored: it cannot be UTF-8 encoded ({exc.reason} "
            f"at index {exc.start}); names must be valid Unicode text"
        ) from None


def _as_float(name: str, value: Any) -> float:
    try:
        return float(value)
    except OverflowError:
        raise ValueError(
            f"metric {name!r} is too large for a float (about 1.8e308 at most); "
            f"log float(value) or math.inf if that is what you mean"
        ) from None


class _TensorGroup(NamedTuple):
    """The one-element tensors of one :meth:`MetricsLogger.log` call on one (device, dtype)."""

    names: list[str]
    host: torch.Tensor  # the stacked values, on the CPU (or being copied there)
    event: torch.cuda.Event | None  # recorded after the device-to-host copy; None off CUDA


class _QueuedLog(NamedTuple):
    """One :meth:`MetricsLogger.log` call, queued for the writer thread."""

    step: int
    wall_time: float
    names: list[str]  # the Python-number metrics ...
    values: list[Any]  # ... and their values
    tensor_groups: list[_TensorGroup]
    count: int  # rows this call produces


def _rank_and_world() -> tuple[int, int]:
    """(rank, world size) from torch.distributed when initialised, else RANK / WORLD_SIZE."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except Exception:  # noqa: BLE001 - a broken dist setup must not stop logging
        pass
    try:
        return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 0, 1


class _SinkState:
    """Retry bookkeeping of one sink (writer thread only)."""

    def __init__(self, sink: Sink, interval: float) -> None:
        self.sink = sink
        self.opened = False
        self.pending: list[Row] = []
        self.dropped = 0
        self.reported = 0.0
        self.warned = False
        self.warned_rows = False
        self.retry_at = 0.0
        self.base_backoff = max(interval, 0.05)
        self.backoff = self.base_backoff

    def deliver(
        self, rows: list[Row], forced: bool, max_rows: int, dropped: Row | None
    ) -> list[str]:
        """Write pending + ``rows`` (+ the ``dropped`` count row when it changed for this
        sink; it is regenerated, never buffered); returns the warnings to show: the first
        failure of the sink, the first rows it rejected."""
        if self.pending:
            self.pending.extend(rows)
            batch = self.pending
        else:
            batch = rows
        if dropped is not None:
            _step, _name, dropped_count, _wall = dropped
            if dropped_count == self.reported:
                dropped = None
        if not batch and dropped is None and not forced:
            return []
        now = time.monotonic()
        if self.pending and not forced and now < self.retry_at:
            self._trim(max_rows)
            return []
        to_write = batch + [dropped] if dropped is not None else batch
        rejected: list[tuple[Row, BaseException]] = []
        unwritten: list[Row] = []
        error: Exception | None = None
        try:
            if not self.opened:
                self.sink.open()
                self.opened = True
        except Exception as exc:  # noqa: BLE001 - any sink failure is kept away from training
            error, unwritten = exc, to_write
        if error is None and to_write:
            rejected, unwritten, error = self._write(to_write)
        if error is None and forced:
            try:
                self.sink.flush()
            except Exception as exc:  # noqa: BLE001
                bad = {id(row) for row, _ in rejected}
                error, unwritten = exc, [r for r in to_write if id(r) not in bad]
        messages = []
        if rejected:
            self.dropped += len(rejected)
            if not self.warned_rows:
                self.warned_rows = True
                (step, name, value, _), exc = rejected[0]
                messages.append(
                    f"fastdiag.MetricsLogger: the {self.sink.name} sink rejected "
                    f"{len(rejected)} row(s), first (step {step}, {name!r}, {value!r}): "
                    f"{type(exc).__name__}: {exc}; the other rows are stored, rejected rows "
                    f"are counted in {DROPPED_KEY!r}"
                )
        if error is not None:
            self.pending = [r for r in unwritten if r is not dropped]
            self._trim(max_rows)
            self.retry_at = now + self.backoff
            self.backoff = min(self.backoff * 2.0, _MAX_BACKOFF)
            if not self.warned:
                self.warned = True
                messages.append(
                    f"fastdiag.MetricsLogger: the {self.sink.name} sink failed "
                    f"({type(error).__name__}: {error}); keeping up to {max_rows} rows in "
                    f"memory and retrying; dropped rows are counted in {DROPPED_KEY!r}"
                )
            return messages
        self.pending = []
        self.backoff = self.base_backoff
        if dropped is not None:
            self.reported = dropped_count
        return messages

    def _write(
        self, rows: list[Row]
    ) -> tuple[list[tuple[Row, BaseException]], list[Row], Exception | None]:
        """Write ``rows``; on one of ``ROW_ERRORS`` write the halves, down to single rows.

        Returns (rows rejected alone with their exception, rows not written, the failure that
        stopped the writing or None)."""
        rejected: list[tuple[Row, BaseException]] = []
        todo = [rows]  # a stack: the last part is written next
        while todo:
            part = todo.pop()
            try:
                self.sink.write(part)
            except ROW_ERRORS as exc:
                if len(part) == 1:
                    rejected.append((part[0], exc))
                    continue
                middle = len(part) // 2
                todo += [part[middle:], part[:middle]]
            except Exception as exc:  # noqa: BLE001 - the destination failed: retry it all
                return rejected, part + [r for p in reversed(todo) for r in p], exc
        return rejected, [], None

    def _trim(self, max_rows: int) -> None:
        excess = len(self.pending) - max_rows
        if excess > 0:
            del self.pending[:excess]
            self.dropped += excess


class MetricsLogger:
    """Log ``{name: float | one-element tensor}`` per step without blocking the training loop.

    ``path``: the SQLite file (default sink; ``None`` for none). ``run``: the run's name
    (default ``run-<date>-<time>-<host>-<pid>-<random>``, unique). A run name already in the
    file raises ``ValueError`` unless ``resume=True``: the resumed run keeps its rows, start
    time and config, appends new steps, and re-logging a (run, step, name) replaces the
    value; a different new config is recorded under ``config["fastdiag/resumed_configs"]``.
    ``config``: a JSON-able dict stored with the run.
    Optional sinks: ``jsonl=PATH`` (a summary line every ``jsonl_every`` steps),
    ``tensorboard=LOG_DIR``, ``wandb=True`` or a dict of ``wandb.init`` arguments, and any
    :class:`~fastdiag.store.Sink` in ``sinks``. With ``rank_zero_only`` (default) only
    global rank 0 writes and other ranks' calls do nothing; otherwise every rank writes, to
    the run ``<run>-rank<r>``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None,
        run: str | None = None,
        config: Mapping[str, Any] | None = None,
        *,
        jsonl: str | os.PathLike[str] | None = None,
        jsonl_every: int = 100,
        tensorboard: str | os.PathLike[str] | None = None,
        wandb: bool | Mapping[str, Any] = False,
        sinks: Sequence[Sink] = (),
        rank_zero_only: bool = True,
        flush_interval: float = 1.0,
        flush_rows: int = 50_000,
        max_buffer_rows: int = 500_000,
        busy_timeout: float = 5.0,
        resume: bool = False,
    ) -> None:
        if run is not None and (not isinstance(run, str) or not run):
            raise TypeError(f"run must be a non-empty str or None, got {run!r}")
        if config is not None and not isinstance(config, Mapping):
            raise TypeError(f"config must be a mapping or None, got {type(config).__name__}")
        if flush_interval <= 0:
            raise ValueError(f"flush_interval must be > 0 seconds, got {flush_interval!r}")
        if flush_rows < 1 or max_buffer_rows < 1:
            raise ValueError(
                f"flush_rows and max_buffer_rows must be >= 1, got {flush_rows!r} and "
                f"{max_buffer_rows!r}"
            )
        rank, world = _rank_and_world()
        self.rank = rank
        self.active = rank == 0 or not rank_zero_only
        name = run or default_run_name()
        if not rank_zero_only and world > 1:
            name = f"{name}-rank{rank}"
        from fastdiag import __version__

        self.run_info = RunInfo(
            name=name,
            config=dict(config or {}),
            start_time=time.time(),
            host=socket.gethostname(),
            fastdiag_version=__version__,
            torch_version=torch.__version__,
        )
        self.run = name
        self._interval = float(flush_interval)
        self._flush_rows = int(flush_rows)
        self._max_rows = int(max_buffer_rows)
        self._cv = threading.Condition(threading.Lock())
        self._queue: deque[_QueuedLog] = deque()
        self._queued_rows = 0
        self._queue_dropped = 0
        self._dropped_seen = 0  # self.dropped when the last flush() began
        self._ticket = 0
        self._ticket_done = 0
        self._closing = False
        self._closed = False
        self._warnings: list[str] = []
        self._warned_after_close = False
        self._last_step: int | None = None
        self._states: list[_SinkState] = []
        self._thread: threading.Thread | None = None
        if not self.active:
            return

        chosen: list[Sink] = []
        if path is not None:
            chosen.append(SQLiteSink(path, busy_timeout=busy_timeout, resume=resume))
        if jsonl is not None:
            chosen.append(JSONLSink(jsonl, every=jsonl_every))
        if tensorboard is not None:
            chosen.append(TensorBoardSink(tensorboard))
        if wandb:
            chosen.append(WandbSink(**(dict(wandb) if isinstance(wandb, Mapping) else {})))
        for sink in sinks:
            if not isinstance(sink, Sink):
                raise TypeError(f"sinks must hold Sink instances, got {type(sink).__name__}")
            chosen.append(sink)
        for sink in chosen:
            if isinstance(sink, SQLiteSink):
                sink.prepare(self.run_info, resume=resume or sink.resume)
            else:
                sink.prepare(self.run_info)
        self.sinks: tuple[Sink, ...] = tuple(chosen)
        self._states = [_SinkState(sink, self._interval) for sink in chosen]
        self._thread = threading.Thread(
            target=self._writer, name=f"fastdiag-logger-{name}", daemon=True
        )
        self._thread.start()
        self._atexit = functools.partial(_close_at_exit, weakref.ref(self))
        atexit.register(self._atexit)

    # ------------------------------------------------------------------ training thread

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Queue ``metrics`` (floats, ints, or one-element tensors on any device) at ``step``.

        Returns at once: no host sync, no I/O. Values are snapshotted now (CPU tensors are
        copied, CUDA tensors copied asynchronously in stream order). Raises ``ValueError`` /
        ``TypeError`` (and queues nothing of the call) for a step outside int64, a name that
        is not a ``str`` or cannot be UTF-8 encoded, a number too large for a float.
        """
        if not self.active:
            return
        if self._warnings:
            self._emit_warnings()
        if type(step) is not int:
            if isinstance(step, numbers.Integral) and not isinstance(step, bool):
                step = int(step)
            else:
                raise TypeError(f"step must be an int, got {type(step).__name__}")
        if not _INT64_MIN <= step <= _INT64_MAX:
            raise ValueError(
                f"step must fit in a signed 64-bit int (-2**63 to 2**63 - 1), got {step}"
            )
        names: list[str] = []
        values: list[Any] = []
        groups: dict[tuple[torch.device, torch.dtype], tuple[list[str], list[torch.Tensor]]] = {}
        for name, value in metrics.items():
            if type(name) is not str or not name.isascii():  # inline: the hot path
                _check_name(name)
            cls = type(value)
            if cls is float:
                names.append(name)
                values.append(value)
            elif cls is int:
                names.append(name)
                values.append(_as_float(name, value))
            elif isinstance(value, torch.Tensor):
                if value.numel() != 1:
                    raise ValueError(
                        f"metric {name!r} must be a one-element tensor, got shape "
                        f"{tuple(value.shape)}"
                    )
                group = groups.get((value.device, value.dtype))
                if group is None:
                    group = groups[(value.device, value.dtype)] = ([], [])
                group_names, tensors = group
                group_names.append(name)
                tensors.append(value)
            elif isinstance(value, numbers.Real):
                names.append(name)
                values.append(_as_float(name, value))
            else:
                raise TypeError(
                    f"metric {name!r} must be a float, an int or a one-element tensor, "
                    f"got {type(value).__name__}"
                )
        tensor_groups: list[_TensorGroup] = []
        if groups:
            with torch.no_grad():
                for (device, dtype), (group_names, tensors) in groups.items():
                    if dtype.is_complex:
                        raise TypeError(
                            f"metric {group_names[0]!r} must be a real-valued tensor, got dtype {dtype}"
                        )
                    stacked = torch.stack([t if t.dim() == 0 else t.reshape(()) for t in tensors])
                    event = None
                    if device.type == "cuda":
                        host = stacked.to("cpu", non_blocking=True)  # pinned, stream-ordered
                        event = torch.cuda.Event()
                        event.record(torch.cuda.current_stream(device))
                    elif device.type == "cpu":
                        host = stacked  # stack already copied: later in-place edits are not seen
                    else:
                        host = stacked.to("cpu")
                    tensor_groups.append(_TensorGroup(group_names, host, event))
        count = len(names) + sum(len(group.names) for group in tensor_groups)
        if count == 0:
            return
        queued = _QueuedLog(step, time.time(), names, values, tensor_groups, count)
        with self._cv:
            if self._closing:
                self._log_after_close()
                return
            self._queue.append(queued)
            self._queued_rows += count
            while self._queued_rows > self._max_rows and len(self._queue) > 1:
                old = self._queue.popleft()
                self._queued_rows -= old.count
                self._queue_dropped += old.count
            if self._queued_rows >= self._flush_rows:
                self._cv.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Write everything logged so far to every sink; True when every sink stored it all
        and no row was dropped since the previous ``flush``.

        Blocks until the writer has tried (or ``timeout`` seconds passed). A failing sink
        keeps its rows buffered and makes this return False; it never raises.
        """
        if not self.active or self._thread is None:
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            if self._closed:
                return not any(s.pending for s in self._states)
            self._ticket += 1
            ticket = self._ticket
            dropped_before = self._dropped_seen
            self._cv.notify_all()
            while self._ticket_done < ticket and self._thread.is_alive():
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                self._cv.wait(0.1 if remaining is None else min(remaining, 0.1))
            done = self._ticket_done >= ticket
            dropped_now = self.dropped
            self._dropped_seen = dropped_now
        self._emit_warnings()
        return done and not any(s.pending for s in self._states) and dropped_now == dropped_before

    def close(self, timeout: float | None = None) -> None:
        """Flush, stop the writer thread and close the sinks (idempotent; also run at exit)."""
        if not self.active or self._thread is None:
            return
        with self._cv:
            if self._closing:
                already = True
            else:
                already = False
                self._closing = True
                self._cv.notify_all()
        if not already:
            self._thread.join(timeout)
            atexit.unregister(self._atexit)
            with self._cv:
                self._closed = True
            lost = sum(len(s.pending) for s in self._states)
            if lost:
                with self._cv:
                    self._warnings.append(
                        f"fastdiag.MetricsLogger: {lost} rows could not be stored before close "
                        f"(run {self.run!r}); {self.dropped} rows dropped in all"
                    )
        self._emit_warnings()

    @property
    def dropped(self) -> int:
        """Rows dropped so far: queue overflow plus rows no sink could keep buffered."""
        return self._queue_dropped + sum(s.dropped for s in self._states)

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _log_after_close(self) -> None:
        if not self._warned_after_close:
            self._warned_after_close = True
            self._warnings.append(
                f"fastdiag.MetricsLogger: log() after close() is ignored (run {self.run!r})"
            )

    def _emit_warnings(self) -> None:
        with self._cv:
            messages, self._warnings = self._warnings, []
        for message in messages:
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    # ------------------------------------------------------------------ writer thread

    def _writer(self) -> None:
        while True:
            with self._cv:
                if not (
                    self._closing
                    or self._ticket > self._ticket_done
                    or self._queued_rows >= self._flush_rows
                ):
                    self._cv.wait(self._interval)
                queued = list(self._queue)
                self._queue.clear()
                self._queued_rows = 0
                ticket = self._ticket
                closing = self._closing
                forced = closing or ticket > self._ticket_done
            try:
                rows = self._resolve(queued)
            except Exception as exc:  # noqa: BLE001 - the writer must survive anything
                rows = []
                with self._cv:  # nothing silently lost: the rows of this flush are counted
                    self._queue_dropped += sum(item.count for item in queued)
                    self._warnings.append(
                        f"fastdiag.MetricsLogger: writer error ({type(exc).__name__}: {exc})"
                    )
            try:
                self._deliver(rows, forced)
            except Exception as exc:  # noqa: BLE001
                with self._cv:
                    self._warnings.append(
                        f"fastdiag.MetricsLogger: writer error ({type(exc).__name__}: {exc})"
                    )
            with self._cv:
                self._ticket_done = ticket
                self._cv.notify_all()
            if closing:
                break
        for state in self._states:
            if state.opened:
                try:
                    state.sink.close()
                except Exception as exc:  # noqa: BLE001
                    self._warnings.append(
                        f"fastdiag.MetricsLogger: closing the {state.sink.name} sink failed "
                        f"({type(exc).__name__}: {exc})"
                    )

    def _resolve(self, queued: list[_QueuedLog]) -> list[Row]:
        rows: list[Row] = []
        for item in queued:
            step, wall = item.step, item.wall_time
            if item.names:  # log() made every value a float already
                rows.extend(zip(repeat(step), item.names, item.values, repeat(wall)))
            for group in item.tensor_groups:
                try:
                    if group.event is not None:
                        group.event.synchronize()
                    host_values = group.host.tolist()  # host ok: writer thread, after the event
                except Exception as exc:  # noqa: BLE001 - e.g. a failed CUDA kernel
                    with self._cv:
                        self._queue_dropped += len(group.names)
                        self._warnings.append(
                            f"fastdiag.MetricsLogger: could not read tensors at step {step} "
                            f"({type(exc).__name__}: {exc})"
                        )
                    continue
                rows.extend(zip(repeat(step), group.names, map(float, host_values), repeat(wall)))
            if self._last_step is None or step > self._last_step:
                self._last_step = step
        return rows

    def _deliver(self, rows: list[Row], forced: bool) -> None:
        for attempt in range(2):  # once more when rows were dropped, to report the new count
            dropped = self.dropped
            dropped_row = None
            if dropped and self._last_step is not None:
                dropped_row = (self._last_step, DROPPED_KEY, float(dropped), time.time())
            for state in self._states:
                messages = state.deliver(
                    rows if attempt == 0 else [], forced, self._max_rows, dropped_row
                )
                if messages:
                    with self._cv:
                        self._warnings.extend(messages)
            if self.dropped == dropped:
                break


def _close_at_exit(ref: weakref.ref[MetricsLogger]) -> None:
    logger = ref()
    if logger is not None:
        logger.close(timeout=30.0)
