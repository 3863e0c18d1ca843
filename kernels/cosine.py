"""Triton kernel of ``fastdiag.ops.cosine_stats``: blockwise off-diagonal cosine statistics.

One program takes a BLOCK_M-row tile of one matrix x[b] [M, D] and TILES column tiles after
each other; for each pair of tiles it accumulates the dot products over D in chunks of BLOCK_D
(fp32, IEEE products: no TF32) together with the squared row norms, forms
cos_ij = <x_i, x_j> / (|x_i| |x_j| + 1e-8) (the original code's formula) and reduces the off-diagonal
entries of the tile to (sum, max, max |.|). It writes those three fp32 partials per program;
``cosine_partials`` returns them [B, programs per matrix, 3] and the caller reduces them in a
fixed order (float64 sum), so no M x M matrix is ever held and the result is deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from fastdiag.ops._cosine_layout import COSINE_EPS

_EPS = tl.constexpr(COSINE_EPS)


@triton.jit
def _cosine_tiles_kernel(
    x_ptr,
    part_ptr,
    M,
    D,
    stride_b,
    stride_m,
    stride_d,
    n_tiles,
    n_groups,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    TILES: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # int64 before any multiply (offsets past 2^31)
    per_matrix = n_tiles * n_groups
    b = pid // per_matrix
    rest = pid % per_matrix
    ti = rest // n_groups
    group = rest % n_groups
    base = x_ptr + b * stride_b
    rows = ti * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_ok = rows < M
    offs_d = tl.arange(0, BLOCK_D)
    total = tl.zeros((), dtype=tl.float32)
    best = tl.full((), float("-inf"), tl.float32)
    best_abs = tl.full((), float("-inf"), tl.float32)
    for t in range(TILES):
        tj = group * TILES + t
        cols = tj * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
        col_ok = cols < M
        dots = tl.zeros((BLOCK_M, BLOCK_M), dtype=tl.float32)
        sq_r = tl.zeros((BLOCK_M,), dtype=tl.float32)
        sq_c = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + offs_d
            d_ok = d < D
            a = tl.load(
                base + rows[:, None] * stride_m + d[None, :] * stride_d,
                mask=row_ok[:, None] & d_ok[None, :],
                other=0.0,
            ).to(tl.float32)
            c = tl.load(
                base + cols[:, None] * stride_m + d[None, :] * stride_d,
                mask=col_ok[:, None] & d_ok[None, :],
                other=0.0,
            ).to(tl.float32)
            dots = tl.dot(a, tl.trans(c), dots, input_precision="ieee")
            sq_r += tl.sum(a * a, axis=1)
            sq_c += tl.sum(c * c, axis=1)
        cos = dots / (tl.sqrt(sq_r)[:, None] * tl.sqrt(sq_c)[None, :] + _EPS)
        valid = row_ok[:, None] & col_ok[None, :] & (rows[:, None] != cols[None, :])
        total += tl.sum(tl.where(valid, cos, 0.0))
        best = tl.maximum(best, tl.max(tl.where(valid, cos, float("-inf"))))
        best_abs = tl.maximum(best_abs, tl.max(tl.where(valid, tl.abs(cos), float("-inf"))))
    out = part_ptr + pid * 3
    tl.store(out, total)
    tl.store(out + 1, best)
    tl.store(out + 2, best_abs)


def launch_config(m: int, d: int, interpreting: bool) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_D, TILES): small tiles under the interpreter (it is slow per element)."""
    if interpreting:
        return 16, 16, 4
    block_m = 64 if m > 32 else 32
    block_d = 32 if d > 16 else 16
    return block_m, block_d, 8


@triton_op("fastdiag::cosine_partials", mutates_args=())
def cosine_partials(x: Tensor, block_m: int, block_d: int, tiles: int) -> Tensor:
    """Per-program (sum, max, max |.|) of the off-diagonal cosines of x [B, M, D]:
    float32 [B, n_tiles * n_groups, 3] with n_tiles = ceil(M / block_m),
    n_groups = ceil(n_tiles / tiles)."""
    batch, m, d = x.shape
    n_tiles = triton.cdiv(m, block_m)
    n_groups = triton.cdiv(n_tiles, tiles)
    parts = torch.empty((batch, n_tiles * n_groups, 3), dtype=torch.float32, device=x.device)
    grid = (batch * n_tiles * n_groups,)
    wrap_triton(_cosine_tiles_kernel)[grid](
        x,
        parts,
        m,
        d,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        n_tiles,
        n_groups,
        BLOCK_M=block_m,
        BLOCK_D=block_d,
        TILES=tiles,
    )
    return parts


def cosine_triton(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The op's triple (sum f64, max, max |.|) per matrix of x [..., M, D], reduced from the
    per-program partials in a fixed order. CPU tensors only reach here under Triton's
    interpreter (``fastdiag.backends`` decides), which gets small tiles."""
    m, d = x.shape[-2], x.shape[-1]
    block_m, block_d, tiles = launch_config(m, d, interpreting=x.device.type == "cpu")
    parts = cosine_partials(x.reshape(-1, m, d), block_m, block_d, tiles)
    lead = x.shape[:-2]
    total = parts[..., 0].sum(-1, dtype=torch.float64).reshape(lead)
    best = parts[..., 1].amax(-1).reshape(lead)
    best_abs = parts[..., 2].amax(-1).reshape(lead)
    return total, best, best_abs
