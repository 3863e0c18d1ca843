"""Training-thread cost of logging 1,000 steps x 200 metrics.

fastdiag.MetricsLogger (background writer, WAL, one transaction per flush) against a naive
logger that does one INSERT and one COMMIT per metric, as a hand-written SQLite logger does
(values read with ``.item()`` when they are tensors). Timed: the loop of ``log()`` calls in
the training thread. Reported separately: the time ``close()`` then needs to drain the
writer (not training-thread time in a real run, where the writer overlaps the next steps).

The naive logger costs ~0.1-0.2 s per step on a typical disk, so by default it runs
``FASTDIAG_BENCH_NAIVE_STEPS`` (default 20) steps and its per-step time is compared; set it
to 1000 for the full run.

    pytest bench/bench_logger.py --benchmark-only
    python bench/bench_logger.py [--steps 1000 --metrics 200 --naive-steps 1000]
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from fastdiag.store import MetricsLogger

STEPS = 1000
METRICS = 200
NAIVE_STEPS = int(os.environ.get("FASTDIAG_BENCH_NAIVE_STEPS", "20"))


def metric_names(count: int) -> list[str]:
    return [f"group{i % 10}/metric_{i}" for i in range(count)]


def metric_values(count: int, kind: str) -> list[float] | list[torch.Tensor]:
    if kind == "tensor":
        return [torch.tensor(0.5 + i) for i in range(count)]
    return [0.5 + i for i in range(count)]


class NaiveLogger:
    """One INSERT + COMMIT per metric (the per-row approach the logger replaces)."""

    def __init__(self, path: Path) -> None:
        self.conn = sqlite3.connect(str(path))
        self.conn.execute(
            "CREATE TABLE IF NOT EXISTS metrics (step INTEGER, name TEXT, value REAL, "
            "timestamp TEXT, PRIMARY KEY (step, name))"
        )
        self.conn.commit()

    def log_metric(self, name: str, value: float, step: int) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO metrics VALUES (?, ?, ?, ?)",
            (step, name, value, time.strftime("%Y-%m-%dT%H:%M:%S")),
        )
        self.conn.commit()

    def log(self, metrics: dict, step: int) -> None:
        for name, value in metrics.items():
            self.log_metric(name, value.item() if isinstance(value, torch.Tensor) else value, step)

    def close(self) -> None:
        self.conn.close()


def run_fastdiag(directory: Path, steps: int, count: int, kind: str) -> tuple[float, float]:
    """(seconds in the log() loop, seconds close() took to drain)."""
    names, values = metric_names(count), metric_values(count, kind)
    logger = MetricsLogger(directory / f"fastdiag_{kind}_{time.monotonic_ns()}.db", run="bench")
    start = time.perf_counter()
    for step in range(steps):
        logger.log(dict(zip(names, values, strict=True)), step)
    loop = time.perf_counter() - start
    start = time.perf_counter()
    logger.close()
    return loop, time.perf_counter() - start


def run_naive(directory: Path, steps: int, count: int, kind: str) -> float:
    """Seconds of the naive logger for ``steps`` steps."""
    names, values = metric_names(count), metric_values(count, kind)
    logger = NaiveLogger(directory / f"naive_{kind}_{time.monotonic_ns()}.db")
    start = time.perf_counter()
    for step in range(steps):
        logger.log(dict(zip(names, values, strict=True)), step)
    elapsed = time.perf_counter() - start
    logger.close()
    return elapsed


# ---------------------------------------------------------------- pytest-benchmark


@pytest.mark.parametrize("kind", ["float", "tensor"])
def test_fastdiag_logger(benchmark, tmp_path, kind):
    names, values = metric_names(METRICS), metric_values(METRICS, kind)
    loggers: list[MetricsLogger] = []
    drains: list[float] = []

    def setup():
        if loggers:  # drain the previous round outside the timed region
            start = time.perf_counter()
            loggers[-1].close()
            drains.append(time.perf_counter() - start)
        loggers.append(MetricsLogger(tmp_path / f"round{len(loggers)}.db", run="bench"))
        return (loggers[-1],), {}

    def training_loop(logger):
        for step in range(STEPS):
            logger.log(dict(zip(names, values, strict=True)), step)

    benchmark.pedantic(training_loop, setup=setup, rounds=3, iterations=1)
    start = time.perf_counter()
    loggers[-1].close()
    drains.append(time.perf_counter() - start)
    benchmark.extra_info.update(
        steps=STEPS, metrics=METRICS, rows=STEPS * METRICS, drain_s_median=statistics.median(drains)
    )
    with sqlite3.connect(tmp_path / "round0.db") as conn:
        assert conn.execute("SELECT COUNT(*) FROM metrics").fetchone()[0] == STEPS * METRICS


@pytest.mark.parametrize("kind", ["float", "tensor"])
def test_naive_logger(benchmark, tmp_path, kind):
    names, values = metric_names(METRICS), metric_values(METRICS, kind)
    logger = NaiveLogger(tmp_path / "naive.db")
    counter = iter(range(10**9))

    def training_loop():
        base = next(counter) * NAIVE_STEPS
        for step in range(base, base + NAIVE_STEPS):
            logger.log(dict(zip(names, values, strict=True)), step)

    benchmark.pedantic(training_loop, rounds=1, iterations=1)
    benchmark.extra_info.update(steps=NAIVE_STEPS, metrics=METRICS, rows=NAIVE_STEPS * METRICS)
    logger.close()


# ---------------------------------------------------------------- script


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--metrics", type=int, default=METRICS)
    parser.add_argument("--naive-steps", type=int, default=NAIVE_STEPS)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    rows = args.steps * args.metrics
    print(f"{args.steps} steps x {args.metrics} metrics = {rows} rows; torch {torch.__version__}")
    print(f"{'logger':<24}{'values':<8}{'steps':>7}{'log s':>10}{'per step ms':>13}{'drain s':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        results = {}
        for kind in ("float", "tensor"):
            runs = [
                run_fastdiag(directory, args.steps, args.metrics, kind) for _ in range(args.rounds)
            ]
            loop = statistics.median(r[0] for r in runs)
            drain = statistics.median(r[1] for r in runs)
            results[("fastdiag", kind)] = loop / args.steps
            print(
                f"{'fastdiag.MetricsLogger':<24}{kind:<8}{args.steps:>7}{loop:>10.3f}"
                f"{1e3 * loop / args.steps:>13.3f}{drain:>9.3f}"
            )
        for kind in ("float", "tensor"):
            naive = run_naive(directory, args.naive_steps, args.metrics, kind)
            results[("naive", kind)] = naive / args.naive_steps
            print(
                f"{'naive insert+commit':<24}{kind:<8}{args.naive_steps:>7}{naive:>10.3f}"
                f"{1e3 * naive / args.naive_steps:>13.3f}{'-':>9}"
            )
        for kind in ("float", "tensor"):
            ratio = results[("naive", kind)] / results[("fastdiag", kind)]
            print(f"speed-up per step ({kind}): {ratio:.0f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
