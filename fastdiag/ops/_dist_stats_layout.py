"""Layout of ``fastdiag::dist_stats_*``, shared by the op wrapper, the torch implementation, the
Triton kernel and the C++ glue (``csrc/dist_stats.cpp`` writes the same slots): the slots of
the outputs, the canonical schema over the [A, G, C, N] view, and the fake. Leaf module.

Canonical op: ``(x4, row_mask, from_logits, topk, tau, eps, window, query_offset, query_len,
want_rows, want_heads=True) -> (sums f64[16], head_sums f64[G, 4], rows f32[R or 0, 4],
topk i64[R, k])`` (``want_heads=False``: no per-head statistics, ``head_sums`` all NaN).
"""

from __future__ import annotations

import torch
from torch import Tensor


class Slot:
    """Slots of ``DistStats.sums`` (float64 [Slot.NUM]); every backend writes exactly these."""

    COUNT = 0  # valid rows
    ENTROPY = 1  # sum of row entropy
    ENTROPY_SQ = 2  # sum of row entropy^2
    MAX = 3  # sum of row max (top-1)
    MAX_SQ = 4  # sum of row max^2
    SUMSQ = 5  # sum over rows of sum_j p_j^2
    GT_TAU = 6  # entries > tau
    GT_EPS = 7  # entries > eps
    ROWSUM_ERR = 8  # sum of |rowsum - 1|
    ROWSUM_ERR_MAX = 9  # max of |rowsum - 1|  (max-reduced, 0 when no valid row)
    FUTURE = 10  # sum of future mass
    FUTURE_MAX = 11  # max of future mass  (max-reduced, 0 when no valid row)
    LOCAL = 12  # sum of local mass (0 when window is None)
    ABS_DEV = 13  # sum of mean_j |p_j - 1/N|
    NONFINITE = 14  # rows excluded for non-finite entries (mask-allowed rows only)
    MASKED = 15  # rows excluded by row_mask
    NUM = 16
    MAX_REDUCED = (ROWSUM_ERR_MAX, FUTURE_MAX)


class HeadSlot:
    """Columns of ``DistStats.head_sums`` [G, HeadSlot.NUM] (float64 sums over valid rows)."""

    ENTROPY = 0
    MAX = 1
    GT_TAU = 2
    SUMSQ = 3
    NUM = 4


class RowSlot:
    """Columns of ``DistStats.rows`` [*L, RowSlot.NUM] (float32, NaN for invalid rows)."""

    ENTROPY = 0
    MAX = 1
    GT_EPS = 2
    SUMSQ = 3
    NUM = 4


MAX_TOPK = 16


SCHEMA = (
    "(Tensor x4, Tensor? row_mask, bool from_logits, int topk, float tau, float eps, int window, "
    "int query_offset, SymInt query_len, bool want_rows, bool want_heads=True) "
    "-> (Tensor, Tensor, Tensor, Tensor)"
)


def fake(
    x4: Tensor,
    row_mask: Tensor | None,
    from_logits: bool,
    topk: int,
    tau: float,
    eps: float,
    window: int,
    query_offset: int,
    query_len: int,
    want_rows: bool,
    want_heads: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Output shapes and dtypes of every backend (the ops' fake / meta implementation)."""
    a, g, c, _ = x4.shape
    r = a * c
    return (
        x4.new_empty(Slot.NUM, dtype=torch.float64),
        x4.new_empty(g, HeadSlot.NUM, dtype=torch.float64),
        x4.new_empty(r if want_rows else 0, RowSlot.NUM, dtype=torch.float32),
        x4.new_empty(r, topk, dtype=torch.int64),
    )
