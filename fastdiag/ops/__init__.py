"""The public functional API: fused, sync-free statistics ops.

Every op keeps its results on the input's device and picks its backend through
``fastdiag.backends``.
"""

from fastdiag.ops._dist_stats import DistStats, HeadSlot, RowSlot, Slot, dist_stats, mean, std

__all__ = ["DistStats", "HeadSlot", "RowSlot", "Slot", "dist_stats", "mean", "std"]
