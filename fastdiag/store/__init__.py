"""Metrics store and logging sinks.

``MetricsLogger`` writes ``{name: value}`` per step to a SQLite file (WAL, one transaction per
flush, from a background thread) and optionally to a JSONL summary, TensorBoard and
Weights & Biases. The readers (``list_runs``, ``metric_names``, ``load_metrics``,
``history``) open the file read-only and work while a run is writing.
"""

from fastdiag.store.database import (
    RESUMED_CONFIGS_KEY,
    RunInfo,
    Series,
    decode_value,
    encode_value,
    history,
    list_runs,
    load_metrics,
    metric_names,
)
from fastdiag.store.logger import DROPPED_KEY, MetricsLogger, default_run_name
from fastdiag.store.sinks import (
    ROW_ERRORS,
    JSONLSink,
    Row,
    Sink,
    SQLiteSink,
    TensorBoardSink,
    WandbSink,
)

__all__ = [
    "DROPPED_KEY",
    "JSONLSink",
    "MetricsLogger",
    "RESUMED_CONFIGS_KEY",
    "ROW_ERRORS",
    "Row",
    "RunInfo",
    "SQLiteSink",
    "Series",
    "Sink",
    "TensorBoardSink",
    "WandbSink",
    "decode_value",
    "default_run_name",
    "encode_value",
    "history",
    "list_runs",
    "load_metrics",
    "metric_names",
]
