"""Per-update summaries: from the raw sums of the statistics ops to a class's value vector.

Filled in below; :func:`cpu_ops_available` says whether the fused C++ ops of
``csrc/summaries.cpp`` are loaded (the torch code runs otherwise, and on other devices).
"""

from __future__ import annotations

import torch


def cpu_ops_available() -> bool:
    """True when the C++ summary ops are registered (the extension is built and loaded)."""
    from fastdiag import _extension

    return _extension.load() is not None and hasattr(torch.ops.fastdiag, "accumulate_")
