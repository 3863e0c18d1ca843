"""Layout of ``fastdiag::spectral_stats`` shared by the op wrapper, the torch path and the glue.

Outputs for x [..., rows, cols], r = min(rows, cols): ``(stats f64[..., NUM_STATS], sigma
f64[..., r] descending, nonfinite i64[...], iterations i32[...])``; ``stats`` columns in the
order of ``STATS``. Leaf module: imports nothing of fastdiag.
"""

from __future__ import annotations

import torch
from torch import Tensor

STATS = (
    "effective_rank",
    "effective_rank_ratio",
    "top1_singular_share",
    "stable_rank",
    "condition_number",
)
NUM_STATS = len(STATS)
METHODS = ("auto", "jacobi", "tridiagonal")
MAX_DIM = 1024  # largest min(rows, cols) the kernels take (csrc/spectral.h: kMaxDim)


def fake(x: Tensor, method: str = "auto") -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Output shapes and dtypes of the op (its fake / meta implementation)."""
    lead = tuple(x.shape[:-2])
    r = torch.sym_min(x.shape[-2], x.shape[-1])
    return (
        x.new_empty((*lead, NUM_STATS), dtype=torch.float64),
        x.new_empty((*lead, r), dtype=torch.float64),
        x.new_empty(lead, dtype=torch.int64),
        x.new_empty(lead, dtype=torch.int32),
    )
