"""Layout of ``fastdiag.ops.attention_stats`` shared by the op, its torch path and the Triton kernel.

Leaf module (imports nothing of fastdiag). Every backend is one ``fastdiag::attention_stats_*``
custom op with the schema below and returns ``dist_stats``'s four tensors:

``(q [B, Hq, N, d], k [B, Hk, Nk, d], attn_mask? (4-d, broadcastable to [B, Hq, N, Nk]; bool:
True = attend, or floating: added), row_mask? (bool [B, N] when reduce_heads else [B, Hq, N]),
is_causal, scale? (None = 1 / sqrt(d)), topk, tau, eps, window (-1 = none), reduce_heads,
want_rows, want_heads) -> (sums f64[16], head_sums f64[G, 4], rows f32[*L, 4] or [0, 4],
topk i64[*L, k])`` with G = Hq and L = [B, N] when ``reduce_heads``, G = 1 and L = [B, Hq, N]
otherwise. Head h reads kv head ``h // (Hq // Hk)``.

The slot numbers repeat ``fastdiag.ops._dist_stats`` (``Slot`` / ``HeadSlot`` / ``RowSlot``)
so that the kernel module can read them from a leaf; tests check that they agree.
"""

from __future__ import annotations

import torch
from torch import Tensor

SCHEMA = (
    "(Tensor q, Tensor k, Tensor? attn_mask, Tensor? row_mask, bool is_causal, float? scale, "
    "int topk, float tau, float eps, int window, bool reduce_heads, bool want_rows, "
    "bool want_heads) -> (Tensor, Tensor, Tensor, Tensor)"
)

# torch path: one [B, Hq, block, Nk] float32 slab of probabilities at a time stays within this
# many bytes (one buffer, reused; softmax in place), so memory is O(B * Hq * block * Nk)
SLAB_BYTES = 16 << 20
MAX_TOPK = 16

# dist_stats' slots (fastdiag.ops._dist_stats.Slot / HeadSlot / RowSlot)
S_COUNT = 0
S_ENTROPY = 1
S_ENTROPY_SQ = 2
S_MAX = 3
S_MAX_SQ = 4
S_SUMSQ = 5
S_GT_TAU = 6
S_GT_EPS = 7
S_ROWSUM_ERR = 8
S_ROWSUM_ERR_MAX = 9
S_FUTURE = 10
S_FUTURE_MAX = 11
S_LOCAL = 12
S_ABS_DEV = 13
S_NONFINITE = 14
S_MASKED = 15
S_NUM = 16
S_MAX_REDUCED = (S_ROWSUM_ERR_MAX, S_FUTURE_MAX)
H_ENTROPY = 0
H_MAX = 1
H_GT_TAU = 2
H_SUMSQ = 3
H_NUM = 4
R_ENTROPY = 0
R_MAX = 1
R_GT_EPS = 2
R_SUMSQ = 3
R_NUM = 4


def out_shapes(
    q: Tensor, topk: int, reduce_heads: bool, want_rows: bool
) -> tuple[list, list, list, list]:
    """Shapes of (sums, head_sums, rows, topk) for q [B, Hq, N, d]."""
    b, h, n, _ = q.shape
    lead = [b, n] if reduce_heads else [b, h, n]
    g = h if reduce_heads else 1
    rows = [*lead, R_NUM] if want_rows else [0, R_NUM]
    return [S_NUM], [g, H_NUM], rows, [*lead, topk]


def fake(
    q: Tensor,
    k: Tensor,
    attn_mask: Tensor | None,
    row_mask: Tensor | None,
    is_causal: bool,
    scale: float | None,
    topk: int,
    tau: float,
    eps: float,
    window: int,
    reduce_heads: bool,
    want_rows: bool,
    want_heads: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The outputs' shapes and dtypes (every backend's fake implementation)."""
    s, hs, r, t = out_shapes(q, topk, reduce_heads, want_rows)
    return (
        q.new_empty(s, dtype=torch.float64),
        q.new_empty(hs, dtype=torch.float64),
        q.new_empty(r, dtype=torch.float32),
        q.new_empty(t, dtype=torch.int64),
    )
