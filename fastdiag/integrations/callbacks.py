"""What the framework callbacks (``hf``, ``lightning``) share, free of either framework's import:
their argument checks and the sampling / distributed helpers."""

from __future__ import annotations

from typing import Any

import torch

from fastdiag.diagnostics.params import group_fn
from fastdiag.diagnostics.training import TrainingDiagnostics

__all__ = ["check_arguments", "distributed", "sampled_between"]


def check_arguments(every: Any, prefix: Any, logger: Any, diagnostics: Any, group: Any) -> None:
    """The callbacks' argument checks (ValueError / TypeError naming the argument)."""
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"every must be a positive int, got {every!r}")
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
    if logger is not None and not callable(getattr(logger, "log", None)):
        raise TypeError(f"logger must be a fastdiag.MetricsLogger (with .log(metrics, step)), got {type(logger).__name__}")
    if diagnostics is not None and not isinstance(diagnostics, TrainingDiagnostics):
        raise TypeError(f"diagnostics must be a TrainingDiagnostics, got {type(diagnostics).__name__}")
    group_fn(group, 0)


def sampled_between(start: int, stop: int, every: int) -> int:
    """Number of sampled steps s (s % every == 0) in [start, stop)."""
    return max(0, -(-stop // every) - -(-start // every))


def distributed() -> bool:
    """Whether torch.distributed runs with more than one rank."""
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )
