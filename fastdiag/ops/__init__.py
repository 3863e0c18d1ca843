"""The public functional API: fused, sync-free statistics ops.

Every op keeps its results on the input's device and picks its backend through
``fastdiag.backends``.
"""

from fastdiag.ops import _dist_stats_dispatch  # noqa: F401  (registers the fastdiag:: custom ops)
from fastdiag.ops._dist_stats import DistStats, HeadSlot, RowSlot, Slot, dist_stats, mean, std

__all__ = ["DistStats", "HeadSlot", "RowSlot", "Slot", "dist_stats", "mean", "std"]
