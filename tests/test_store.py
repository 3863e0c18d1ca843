"""MetricsLogger and its sinks: round trips, resume, failures, a killed writer, concurrency."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import textwrap
import threading
import time
import warnings

import pytest
import torch

from fastdiag.store import (
    DROPPED_KEY,
    MetricsLogger,
    Sink,
    SQLiteSink,
    history,
    list_runs,
    load_metrics,
    metric_names,
)
from tests.conftest import forbid_cuda_sync


def rows_of(path, run=None):
    """{(run, step, name): (value, special)} straight from SQL."""
    with sqlite3.connect(path) as conn:
        query = "SELECT run, step, name, value, special FROM metrics"
        rows = conn.execute(query).fetchall()
    return {(r[0], r[1], r[2]): (r[3], r[4]) for r in rows if run is None or r[0] == run}


class ListSink(Sink):
    """Collects rows; fails while ``failing`` is set."""

    name = "list"

    def __init__(self) -> None:
        self.rows: list[tuple] = []
        self.failing = False
        self.attempts = 0

    def write(self, rows):
        self.attempts += 1
        if self.failing:
            raise OSError(28, "No space left on device")
        self.rows.extend(rows)


def test_round_trip_with_non_finite_values_and_0d_tensors(tmp_path):
    path = tmp_path / "m.db"
    metrics = {
        "float": 0.125,
        "int": 7,
        "nan": math.nan,
        "inf": math.inf,
        "ninf": -math.inf,
        "t32": torch.tensor(1.5),
        "t64": torch.tensor(1 / 3, dtype=torch.float64),
        "tint": torch.tensor(11),
        "tbool": torch.tensor(True),
        "tnan": torch.tensor(float("nan")),
        "tinf": torch.tensor(-float("inf")),
        "one_element": torch.tensor([4.25]),
        "needs_grad": torch.tensor(2.0, requires_grad=True) * 3,
    }
    expected = {
        "float": 0.125, "int": 7.0, "nan": math.nan, "inf": math.inf, "ninf": -math.inf,
        "t32": 1.5, "t64": 1 / 3, "tint": 11.0, "tbool": 1.0, "tnan": math.nan,
        "tinf": -math.inf, "one_element": 4.25, "needs_grad": 6.0,
    }  # fmt: skip
    with MetricsLogger(path, run="r") as logger:
        logger.log(metrics, step=0)
        logger.log({"float": 0.25}, step=1)
        assert logger.flush()
    loaded = load_metrics(path)["r"]
    assert set(loaded) == set(expected)
    for name, want in expected.items():
        got = loaded[name].values[0]
        if math.isnan(want):
            assert math.isnan(got), name
        else:
            assert got == want, name  # float64 path: exact
    assert loaded["float"].steps.tolist() == [0, 1]
    assert loaded["float"].values.tolist() == [0.125, 0.25]
    raw = rows_of(path)
    # NaN is not stored as a bare NULL: the special column keeps it
    assert raw[("r", 0, "nan")] == (None, "nan")
    assert raw[("r", 0, "inf")] == (math.inf, "inf")
    assert raw[("r", 0, "ninf")] == (-math.inf, "-inf")
    assert raw[("r", 0, "float")] == (0.125, None)


def test_cpu_tensor_is_snapshotted_at_log_time(tmp_path):
    path = tmp_path / "m.db"
    value = torch.zeros(())
    with MetricsLogger(path, run="r", flush_interval=60) as logger:
        logger.log({"acc": value}, step=0)
        value += 5.0  # the training loop keeps updating its accumulator in place
        logger.log({"acc": value}, step=1)
    assert load_metrics(path)["r"]["acc"].values.tolist() == [0.0, 5.0]


def test_resume_appends_and_relogging_replaces(tmp_path):
    path = tmp_path / "m.db"
    with MetricsLogger(path, run="exp", config={"lr": 0.01, "layers": [2, 3]}) as logger:
        for step in range(5):
            logger.log({"loss": 10.0 - step}, step)
    start = list_runs(path)[0].start_time
    with MetricsLogger(path, run="exp", resume=True) as logger:
        for step in range(5, 8):
            logger.log({"loss": 10.0 - step}, step)
        logger.log({"loss": 100.0}, step=2)  # same (run, step, name): replaced
        logger.log({"loss": 200.0}, step=2)  # twice in one flush: the last one wins
    series = load_metrics(path)["exp"]["loss"]
    assert series.steps.tolist() == list(range(8))
    assert series.values.tolist() == [10, 9, 200, 7, 6, 5, 4, 3]
    runs = list_runs(path)
    assert [r.name for r in runs] == ["exp"]
    assert runs[0].start_time == start  # resume keeps the original start
    assert runs[0].config == {"lr": 0.01, "layers": [2, 3]}  # no config given: kept
    assert runs[0].torch_version == torch.__version__
    assert runs[0].host


def test_several_runs_in_one_file_and_readers(tmp_path):
    path = tmp_path / "m.db"
    for run, offset in (("a", 0.0), ("b", 1.0)):
        with MetricsLogger(path, run=run) as logger:
            for step in range(3):
                logger.log({"x": offset + step, f"only_{run}": 1.0}, step)
    assert {r.name for r in list_runs(path)} == {"a", "b"}
    assert metric_names(path) == ["only_a", "only_b", "x"]
    assert metric_names(path, "a") == ["only_a", "x"]
    assert load_metrics(path, runs=["b"], names=["x"])["b"]["x"].values.tolist() == [1, 2, 3]
    assert history(path, "a") == [{"x": 0.0, "only_a": 1.0}, {"x": 1.0, "only_a": 1.0},
                                  {"x": 2.0, "only_a": 1.0}]  # fmt: skip


def test_metric_names_are_bound_parameters(tmp_path):
    path = tmp_path / "m.db"
    nasty = "x'); DROP TABLE metrics; --"
    with MetricsLogger(path, run="it's") as logger:
        logger.log({nasty: 1.0, 'quote"d': 2.0}, 0)
    assert rows_of(path) == {("it's", 0, nasty): (1.0, None), ("it's", 0, 'quote"d'): (2.0, None)}


def test_log_rejects_bad_inputs_with_clear_errors(tmp_path):
    with MetricsLogger(tmp_path / "m.db", run="r") as logger:
        with pytest.raises(TypeError, match="step must be an int"):
            logger.log({"x": 1.0}, step=torch.tensor(3))
        with pytest.raises(TypeError, match="metric 'x'"):
            logger.log({"x": "1.0"}, step=0)
        with pytest.raises(ValueError, match="one-element tensor, got shape \\(2,\\)"):
            logger.log({"x": torch.ones(2)}, step=0)
        logger.log({"np": __import__("numpy").float32(2.5)}, step=0)  # numpy scalars are fine
    assert load_metrics(tmp_path / "m.db")["r"]["np"].values.tolist() == [2.5]


def test_log_after_close_warns_and_is_ignored(tmp_path):
    logger = MetricsLogger(tmp_path / "m.db", run="r")
    logger.log({"x": 1.0}, 0)
    logger.close()
    logger.close()  # idempotent
    with pytest.warns(RuntimeWarning, match="after close"):
        logger.log({"x": 2.0}, 1)
        logger.close()
    assert load_metrics(tmp_path / "m.db")["r"]["x"].values.tolist() == [1.0]


def test_only_rank_zero_writes_unless_told(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    logger = MetricsLogger(tmp_path / "rank1.db", run="r")
    logger.log({"x": 1.0}, 0)
    assert logger.flush()
    logger.close()
    assert not logger.active and not (tmp_path / "rank1.db").exists()
    with MetricsLogger(tmp_path / "all.db", run="r", rank_zero_only=False) as logger:
        logger.log({"x": 1.0}, 0)
    assert [r.name for r in list_runs(tmp_path / "all.db")] == ["r-rank1"]


def test_jsonl_summary_every_n_steps(tmp_path):
    out = tmp_path / "summary.jsonl"
    with MetricsLogger(None, run="r", jsonl=out, jsonl_every=5) as logger:
        for step in range(13):
            metrics = {"loss": float(step)}
            if step % 4 == 0:
                metrics["epoch/acc"] = step / 100
            if step == 7:
                metrics["bad"] = math.nan
            logger.log(metrics, step)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["step"] for line in lines] == [0, 5, 10, 12]  # every 5 steps, then the end
    assert lines[1]["loss"] == 5.0 and lines[1]["epoch/acc"] == 0.04  # latest value held
    assert math.isnan(lines[2]["bad"]) and lines[3]["loss"] == 12.0
    assert "bad" not in lines[1]
    assert all("wall_time" in line for line in lines)


def test_tensorboard_events_read_back(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logdir = tmp_path / "tb"
    with MetricsLogger(tmp_path / "m.db", run="r", tensorboard=logdir) as logger:
        for step in range(4):
            logger.log(
                {"ausa/router_confidence_mean": 0.5 + step / 10, "loss": torch.tensor(2.0)}, step
            )
    events = EventAccumulator(str(logdir))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"ausa/router_confidence_mean", "loss"}
    scalars = events.Scalars("ausa/router_confidence_mean")
    assert [s.step for s in scalars] == [0, 1, 2, 3]
    assert [s.value for s in scalars] == pytest.approx([0.5, 0.6, 0.7, 0.8])
    assert [s.value for s in events.Scalars("loss")] == [2.0] * 4


def wandb_history(path):
    """History rows of an offline .wandb file (a LevelDB-style log of protobuf Records)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, pending, rows = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full record, or last fragment
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append(
                    {
                        item.key or "/".join(item.nested_key): json.loads(item.value_json)
                        for item in record.history.item
                    }
                )
    return rows


def test_wandb_offline_run_directory(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    with MetricsLogger(
        tmp_path / "m.db", run="wb", config={"seed": 1}, wandb={"dir": str(tmp_path)}
    ) as logger:
        for step in range(3):
            logger.log({"loss": 1.0 / (step + 1)}, step)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    records = list(runs[0].glob("*.wandb"))
    assert len(records) == 1 and records[0].stat().st_size > 0
    logged = {row["_step"]: row["loss"] for row in wandb_history(records[0])}
    assert logged == pytest.approx({0: 1.0, 1: 0.5, 2: 1 / 3})
    assert load_metrics(tmp_path / "m.db")["wb"]["loss"].steps.tolist() == [0, 1, 2]


def test_sink_failure_warns_once_buffers_bounded_and_reports_drops(tmp_path):
    sink = ListSink()
    sink.failing = True
    logger = MetricsLogger(None, run="r", sinks=[sink], flush_interval=0.01, max_buffer_rows=10)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(30):
            logger.log({"x": float(step)}, step)  # never raises
            if step % 5 == 4:
                assert logger.flush() is False
        failures = [w for w in caught if "sink failed" in str(w.message)]
        assert len(failures) == 1  # warned once
        assert issubclass(failures[0].category, RuntimeWarning)
        sink.failing = False
        assert logger.flush() is True  # retried and stored
        logger.log({"x": 30.0}, 30)
        logger.close()
    assert logger.dropped == 20
    xs = [(s, v) for s, n, v, _ in sink.rows if n == "x"]
    assert xs == [(s, float(s)) for s in range(20, 31)]  # the 10 newest kept, then new rows
    dropped = [(s, v) for s, n, v, _ in sink.rows if n == DROPPED_KEY]
    assert dropped and dropped[-1][1] == 20.0


def test_locked_database_never_raises_and_recovers(tmp_path):
    path = tmp_path / "m.db"
    logger = MetricsLogger(path, run="r", flush_interval=0.02, busy_timeout=0.02)
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(20):
            logger.log({"x": float(step), "y": torch.tensor(float(-step))}, step)
        assert logger.flush(timeout=10) is False
        blocker.execute("ROLLBACK")
        blocker.close()
        deadline = time.monotonic() + 10
        while not logger.flush(timeout=10) and time.monotonic() < deadline:
            time.sleep(0.05)
        logger.close()
    assert sum("sink failed" in str(w.message) for w in caught) == 1
    assert any("locked" in str(w.message) for w in caught)
    loaded = load_metrics(path)["r"]
    assert loaded["x"].values.tolist() == [float(s) for s in range(20)]
    assert loaded["y"].values.tolist() == [float(-s) for s in range(20)]
    assert logger.dropped == 0 and DROPPED_KEY not in loaded


def test_full_disk_is_survived_and_counted(tmp_path):
    path = tmp_path / "full.db"
    witness = ListSink()
    # max_page_count caps the file: SQLite answers SQLITE_FULL ("database or disk is full")
    sqlite_sink = SQLiteSink(path, pragmas={"max_page_count": 12})
    logger = MetricsLogger(
        None, run="r", sinks=[sqlite_sink, witness], flush_interval=0.01, max_buffer_rows=1000
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(60):
            logger.log({f"metric_{i:03d}_with_a_long_name": float(step) for i in range(100)}, step)
            stored_all = logger.flush()  # one transaction of 100 rows per step
            if step == 0:
                assert stored_all  # the first rows fit
        assert not stored_all
        logger.close()
    messages = [str(w.message) for w in caught]
    assert sum("sqlite sink failed" in m for m in messages) == 1
    assert any("full" in m for m in messages)
    assert logger.dropped > 0
    reported = [v for s, n, v, _ in witness.rows if n == DROPPED_KEY]
    assert reported and reported[-1] <= logger.dropped and reported == sorted(reported)
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        stored = conn.execute("SELECT step, value FROM metrics").fetchall()
    assert 100 <= len(stored) < 6000 and len(stored) % 100 == 0  # whole transactions only
    assert all(value == step for step, value in stored)
    assert logger.dropped == 6000 - len(stored) - 1000  # 1000 were still buffered at close
    assert any("could not be stored before close" in m for m in messages)
    assert len([r for r in witness.rows if r[1] != DROPPED_KEY]) == 6000  # other sinks unaffected


def test_bounded_queue_when_the_writer_cannot_keep_up(tmp_path):
    class SlowSink(ListSink):
        def write(self, rows):
            time.sleep(0.2)
            super().write(rows)

    sink = SlowSink()
    logger = MetricsLogger(None, run="r", sinks=[sink], flush_interval=0.01, max_buffer_rows=50)
    for step in range(400):
        logger.log({"a": 1.0, "b": 2.0}, step)
    logger.close()
    stored = [r for r in sink.rows if r[1] != DROPPED_KEY]
    assert logger.dropped > 0
    assert len(stored) + logger.dropped == 800
    assert stored[-1][0] == 399  # the newest rows survive


def test_reading_while_training_writes(tmp_path):
    path = tmp_path / "live.db"
    logger = MetricsLogger(path, run="live", flush_interval=0.005)
    stop = threading.Event()

    def train():
        step = 0
        while not stop.is_set():
            logger.log({f"m{i}": float(step) for i in range(20)}, step)
            step += 1
            time.sleep(0.0005)

    thread = threading.Thread(target=train)
    thread.start()
    counts = []
    try:
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            if path.exists():
                try:
                    series = load_metrics(path, runs=["live"], names=["m0"])
                except sqlite3.OperationalError as exc:  # pragma: no cover - the failure mode
                    pytest.fail(f"reader blocked by the writer: {exc}")
                if series:
                    counts.append(len(series["live"]["m0"].steps))
    finally:
        stop.set()
        thread.join()
        logger.close()
    assert len(counts) > 5 and counts == sorted(counts) and counts[-1] > counts[0]


KILLED_WRITER = textwrap.dedent(
    """
    import sys
    from fastdiag.store import MetricsLogger

    logger = MetricsLogger(sys.argv[1], run="killed", flush_interval=0.005)
    step = 0
    while True:
        logger.log({f"m{i}": float(step * 1000 + i) for i in range(100)}, step)
        if step % 20 == 19:
            logger.flush()
            print(step, flush=True)
        step += 1
    """
)


def test_sigkill_leaves_an_intact_database_with_every_flushed_step(tmp_path):
    path = tmp_path / "killed.db"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(path)], stdout=subprocess.PIPE, text=True
    )
    flushed = -1
    try:
        for line in proc.stdout:
            flushed = int(line)
            if flushed >= 400:
                break
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    assert flushed >= 400
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = conn.execute(
            "SELECT step, name, value FROM metrics WHERE run = 'killed' AND step <= ?", (flushed,)
        ).fetchall()
    assert len(rows) == (flushed + 1) * 100
    assert all(value == step * 1000 + int(name[1:]) for step, name, value in rows)


def test_interpreter_exit_closes_the_logger(tmp_path):
    path = tmp_path / "exit.db"
    script = (
        "import sys\nfrom fastdiag.store import MetricsLogger\n"
        "logger = MetricsLogger(sys.argv[1], run='x', flush_interval=3600)\n"
        "for step in range(50):\n    logger.log({'v': float(step)}, step)\n"
    )
    subprocess.run([sys.executable, "-c", script, str(path)], check=True, timeout=60)
    assert load_metrics(path)["x"]["v"].values.tolist() == [float(s) for s in range(50)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tensors_are_logged_without_a_host_sync(tmp_path):
    path = tmp_path / "cuda.db"
    device = torch.device("cuda")
    big = torch.randn(4096, 4096, device=device)
    half = torch.full((), 0.5, device=device, dtype=torch.float16)
    with MetricsLogger(path, run="gpu") as logger:
        with forbid_cuda_sync():
            for step in range(10):
                # queued behind a large matmul: values must still be the final ones
                total = (big @ big).sum() * 0 + step
                logger.log({"total": total, "half": half}, step)
    loaded = load_metrics(path)["gpu"]
    assert loaded["total"].values.tolist() == [float(s) for s in range(10)]
    assert loaded["half"].values.tolist() == [0.5] * 10


# ---------------------------------------------------------------- reliability regressions


def _write_default_named_run(path, barrier, rows):
    """Child process: a logger with the default run name, started in the same second as its
    sibling's, writing ``rows`` rows."""
    barrier.wait()
    time.sleep(1.05 - time.time() % 1.0)  # both siblings start just after the same second
    with MetricsLogger(path) as logger:
        for step in range(rows):
            logger.log({"x": float(step)}, step)
        assert logger.flush() is True and logger.dropped == 0


def test_default_run_names_are_unique_across_processes(tmp_path):
    import multiprocessing

    path = tmp_path / "m.db"  # a fresh file: the children also race to create the schema
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    children = [
        context.Process(target=_write_default_named_run, args=(str(path), barrier, 3000))
        for _ in range(2)
    ]
    for child in children:
        child.start()
    for child in children:
        child.join(120)
    assert [child.exitcode for child in children] == [0, 0]
    runs = [r.name for r in list_runs(path)]
    assert len(runs) == 2 and len(set(runs)) == 2
    assert len(rows_of(path)) == 6000
    # one script, two loggers in the same second: two runs too
    a, b = MetricsLogger(path), MetricsLogger(path)
    a.close()
    b.close()
    assert a.run != b.run and str(os.getpid()) in a.run and socket.gethostname() in a.run


def test_reusing_a_run_name_needs_resume(tmp_path):
    from fastdiag.store import RESUMED_CONFIGS_KEY

    path = tmp_path / "m.db"
    with MetricsLogger(path, run="exp", config={"lr": 0.1}) as logger:
        logger.log({"loss": 1.0}, 0)
    with pytest.raises(ValueError, match=r"run 'exp' already exists in .*m\.db.*resume=True"):
        MetricsLogger(path, run="exp", config={"lr": 0.5})
    with MetricsLogger(path, run="exp", config={"lr": 0.5, "note": "resumed"}, resume=True) as log2:
        log2.log({"loss": 0.5}, 1)
    with MetricsLogger(path, run="exp", config={"lr": 0.1}, resume=True) as log3:  # same config
        log3.log({"loss": 0.25}, 2)
    assert load_metrics(path)["exp"]["loss"].values.tolist() == [1.0, 0.5, 0.25]
    (run,) = list_runs(path)
    assert run.config["lr"] == 0.1  # the original config is kept ...
    resumed = run.config[RESUMED_CONFIGS_KEY]  # ... and the new, different one recorded
    assert [entry["config"] for entry in resumed] == [{"lr": 0.5, "note": "resumed"}]
    with MetricsLogger(path, run="fresh", resume=True) as log4:  # nothing to resume: a new run
        log4.log({"loss": 3.0}, 0)
    assert load_metrics(path)["fresh"]["loss"].values.tolist() == [3.0]


def test_log_rejects_what_sqlite_cannot_store(tmp_path):
    path = tmp_path / "m.db"
    with MetricsLogger(path, run="r") as logger:
        with pytest.raises(ValueError, match=r"step must fit in a signed 64-bit int.*2\*\*63"):
            logger.log({"x": 1.0}, 2**63)
        with pytest.raises(ValueError, match="step"):
            logger.log({"x": 1.0}, -(2**63) - 1)
        with pytest.raises(ValueError, match=r"metric name 'bad\\ud800' .*UTF-8"):
            logger.log({"bad\ud800": 1.0}, 0)
        with pytest.raises(TypeError, match="metric names must be str, got int"):
            logger.log({3: 1.0}, 0)
        with pytest.raises(ValueError, match=r"metric 'huge'.*too large for a float"):
            logger.log({"huge": 10**400, "ok": 2.0}, 1)
        logger.log({"x": 1.0}, 2**63 - 1)  # the edges are fine
        logger.log({"x": 1.0}, -(2**63))
        for step in range(50):
            logger.log({"x": float(step)}, step)
        assert logger.flush() is True and logger.dropped == 0
    assert len(rows_of(path)) == 52


def test_a_huge_value_in_the_writer_costs_no_other_row(tmp_path):
    """Values that slip past log() (a Real whose float() overflows) cost only themselves."""
    import fractions

    path = tmp_path / "m.db"
    with MetricsLogger(path, run="r", flush_interval=60) as logger:
        logger.log({"ok": 1.0}, 0)
        with pytest.raises(ValueError, match="metric 'huge'"):
            logger.log({"huge": fractions.Fraction(10**400), "ok": 2.0}, 1)
        logger.log({"ok": 3.0}, 2)
        assert logger.flush() is True
    assert load_metrics(path)["r"]["ok"].values.tolist() == [1.0, 3.0]


def test_a_row_the_sink_rejects_costs_only_that_row(tmp_path):
    path = tmp_path / "m.db"
    with MetricsLogger(path, run="setup") as logger:
        pass
    with sqlite3.connect(path) as conn:  # a database constraint rejects one metric name
        conn.execute(
            "CREATE TRIGGER no_poison BEFORE INSERT ON metrics WHEN NEW.name = 'poison' "
            "BEGIN SELECT RAISE(ABORT, 'poison row'); END"
        )
    logger = MetricsLogger(path, run="r", flush_interval=60)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logger.log({"poison": 1.0}, 0)
        for step in range(1, 51):
            logger.log({"x": float(step)}, step)
        assert logger.flush() is False  # a row was dropped in this flush
        assert logger.dropped == 1
        logger.log({"x": 51.0}, 51)
        assert logger.flush() is True  # later flushes store everything again
        logger.close()
    assert any("rejected" in str(w.message) and "poison" in str(w.message) for w in caught)
    loaded = load_metrics(path)["r"]
    assert loaded["x"].values.tolist() == [float(s) for s in range(1, 52)]
    assert loaded[DROPPED_KEY].values.tolist()[-1] == 1.0


def test_a_custom_sink_rejecting_rows_loses_only_those(tmp_path):
    class Picky(ListSink):
        def write(self, rows):
            if any(name == "bad" for _, name, _, _ in rows):
                raise ValueError("bad row")
            super().write(rows)

    sink = Picky()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with MetricsLogger(None, run="r", sinks=[sink], flush_interval=60) as logger:
            for step in range(20):
                logger.log({"a": float(step), "bad": 0.0} if step % 7 == 3 else {"a": 1.0}, step)
            logger.flush()
    assert logger.dropped == 3
    assert len([r for r in sink.rows if r[1] == "a"]) == 20
    assert [r[2] for r in sink.rows if r[1] == DROPPED_KEY][-1] == 3.0


def test_schema_mismatch_fails_in_the_constructor(tmp_path):
    path = tmp_path / "foreign.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE metrics (run TEXT, step INTEGER, name TEXT, value REAL)")
    with pytest.raises(ValueError, match=r"foreign\.db.*expected columns .*wall_time.*found"):
        MetricsLogger(path, run="r")


def test_a_directory_or_unopenable_path_is_named(tmp_path):
    with pytest.raises(ValueError, match=re.escape(str(tmp_path))):
        MetricsLogger(tmp_path, run="r")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match=re.escape(str(blocker / "m.db"))):
        MetricsLogger(blocker / "m.db", run="r")
