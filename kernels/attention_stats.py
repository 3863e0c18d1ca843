"""Triton backend of ``fastdiag.ops.attention_stats`` (contract: ``fastdiag.ops._attention_stats_layout``).

Flash-style, two passes over the keys, nothing of size N x Nk is written:

* pass 1 (``_lse_kernel``), one program per (b, h, query block): streams key blocks, scores
  ``tl.dot(q, k^T)`` in float32 (IEEE products, no TF32) times ``scale``, masks (causal
  top-left, bool / additive ``attn_mask``), online softmax: the head's log-sum-exp, float32
  [B, Hq, N] (-inf for a row with no attendable key).
* pass 2 (``_stats_kernel``), one program per (row group a, query block): a row group is one
  batch entry with all Hq heads (``reduce_heads``: the row is the head mean
  p̄ = mean_h exp(s_h - lse_h)) or one (b, h) (G = 1). Per key block it recomputes every head's
  scores, forms p_h and p̄, and accumulates the row statistics of p̄ (entropy, max, sum of
  squares, counts > tau / > eps, row sum, future / local mass, |p̄ - 1/Nk|), a running top-k
  and, with HEADS, each head's entropy (from s - lse, no logarithm), max, count > tau and sum
  of squares in [BLOCK_M, G_PAD] accumulators.

Top-k: int64 keys ``float_bits(p̄) << 32 | (2^31 - 1 - j)`` (p̄ >= 0, so the bits order like
the values; the reversed index sends ties to the lower index), merged per key block by k rounds
of a max and knock-out. Each program writes float64 partials (Slot.NUM per program, HeadSlot.NUM
per head); the launcher reduces them with one fixed-order torch reduction (no atomics).

A row is valid when its row_mask allows it and every head's log-sum-exp is finite (a fully
masked row, NaN / inf scores: ``Slot.NONFINITE``). Launches directly, inside a plain
``torch.library.custom_op`` (opaque to torch.compile, with the layout's fake), so the same code
runs compiled on a GPU and under ``TRITON_INTERPRET=1`` on CPU tensors.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastdiag.ops import _attention_stats_layout as L

_S_COUNT = tl.constexpr(L.S_COUNT)
_S_ENTROPY = tl.constexpr(L.S_ENTROPY)
_S_ENTROPY_SQ = tl.constexpr(L.S_ENTROPY_SQ)
_S_MAX = tl.constexpr(L.S_MAX)
_S_MAX_SQ = tl.constexpr(L.S_MAX_SQ)
_S_SUMSQ = tl.constexpr(L.S_SUMSQ)
_S_GT_TAU = tl.constexpr(L.S_GT_TAU)
_S_GT_EPS = tl.constexpr(L.S_GT_EPS)
_S_ROWSUM_ERR = tl.constexpr(L.S_ROWSUM_ERR)
_S_ROWSUM_ERR_MAX = tl.constexpr(L.S_ROWSUM_ERR_MAX)
_S_FUTURE = tl.constexpr(L.S_FUTURE)
_S_FUTURE_MAX = tl.constexpr(L.S_FUTURE_MAX)
_S_LOCAL = tl.constexpr(L.S_LOCAL)
_S_ABS_DEV = tl.constexpr(L.S_ABS_DEV)
_S_NONFINITE = tl.constexpr(L.S_NONFINITE)
_S_MASKED = tl.constexpr(L.S_MASKED)
_S_NUM = tl.constexpr(L.S_NUM)
_H_ENTROPY = tl.constexpr(L.H_ENTROPY)
_H_MAX = tl.constexpr(L.H_MAX)
_H_GT_TAU = tl.constexpr(L.H_GT_TAU)
_H_SUMSQ = tl.constexpr(L.H_SUMSQ)
_H_NUM = tl.constexpr(L.H_NUM)
_R_ENTROPY = tl.constexpr(L.R_ENTROPY)
_R_MAX = tl.constexpr(L.R_MAX)
_R_GT_EPS = tl.constexpr(L.R_GT_EPS)
_R_SUMSQ = tl.constexpr(L.R_SUMSQ)
_R_NUM = tl.constexpr(L.R_NUM)
_LOW_MASK = tl.constexpr(0xFFFFFFFF)
_IDX_TOP = tl.constexpr(0x7FFFFFFF)


@triton.jit
def _scores(
    q_ptr, k_ptr, m_ptr, b, h, kvh, rows, cols, N, NK, D,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, smb, smh, smn, smk, scale,
    IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, D_PAD: tl.constexpr,
):
    """Masked float32 scores [BLOCK_M, BLOCK_N] of head h (kv head kvh); -inf where not attended
    or out of range. b, h, kvh are int64; rows / cols int64 vectors."""
    dcols = tl.arange(0, D_PAD).to(tl.int64)
    rin = rows < N
    cin = cols < NK
    qv = tl.load(
        q_ptr + b * sqb + h * sqh + rows[:, None] * sqn + dcols[None, :] * sqd,
        mask=rin[:, None] & (dcols[None, :] < D), other=0.0,
    ).to(tl.float32)
    kv = tl.load(
        k_ptr + b * skb + kvh * skh + cols[:, None] * skn + dcols[None, :] * skd,
        mask=cin[:, None] & (dcols[None, :] < D), other=0.0,
    ).to(tl.float32)
    s = tl.dot(qv, tl.trans(kv), input_precision="ieee") * scale
    keep = rin[:, None] & cin[None, :]
    if IS_CAUSAL:  # top-left aligned (SDPA): query i attends keys j <= i
        keep = keep & (cols[None, :] <= rows[:, None])
    if HAS_MASK:
        mv = tl.load(
            m_ptr + b * smb + h * smh + rows[:, None] * smn + cols[None, :] * smk,
            mask=rin[:, None] & cin[None, :], other=0,
        )
        if MASK_BOOL:
            keep = keep & (mv != 0)
        else:
            s = s + mv.to(tl.float32)
    return tl.where(keep, s, float("-inf"))


@triton.jit
def _lse_kernel(
    q_ptr, k_ptr, m_ptr, lse_ptr, N, NK, D, HQ, GROUPS, nqb,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, smb, smh, smn, smk, scale,
    IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    bh = pid // nqb
    qb = pid % nqb
    b = bh // HQ
    h = bh % HQ
    kvh = h // GROUPS
    rows = qb * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    acc = tl.zeros([BLOCK_M], tl.float32)
    hi = NK
    if IS_CAUSAL:  # keys past the block's last query are all masked
        hi = tl.minimum(NK, (qb + 1) * BLOCK_M)
    for j0 in range(0, hi, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N).to(tl.int64)
        s = _scores(
            q_ptr, k_ptr, m_ptr, b, h, kvh, rows, cols, N, NK, D,
            sqb, sqh, sqn, sqd, skb, skh, skn, skd, smb, smh, smn, smk, scale,
            IS_CAUSAL, HAS_MASK, MASK_BOOL, D_PAD,
        )
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        acc = acc * tl.exp(m - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), axis=1)
        m = m_new
    lse = tl.where(acc > 0, m + tl.log(tl.where(acc > 0, acc, 1.0)), float("-inf"))
    tl.store(lse_ptr + bh * N + rows, lse, mask=rows < N)


@triton.jit
def _fsum(keep, v):
    return tl.sum(tl.where(keep, v.to(tl.float64), 0.0), axis=0)


@triton.jit
def _stats_kernel(
    q_ptr, k_ptr, m_ptr, lse_ptr, rm_ptr, part_ptr, hpart_ptr, rows_ptr, topk_ptr,
    N, NK, D, HQ, GROUPS, G, APB, nqb,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, smb, smh, smn, smk, srb, srh, srn,
    scale, tau, eps, window,
    IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
    HAS_ROW_MASK: tl.constexpr, HAS_WINDOW: tl.constexpr, WANT_ROWS: tl.constexpr,
    HEADS: tl.constexpr, TOPK: tl.constexpr, K_PAD: tl.constexpr, G_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    a = pid // nqb
    qb = pid % nqb
    b = a // APB
    hbase = (a % APB) * G
    rows = qb * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    rin = rows < N
    gcols = tl.arange(0, G_PAD)

    # validity: every head's log-sum-exp finite, and the row mask
    finite = rin
    for g in range(G):
        lse_g = tl.load(lse_ptr + (b * HQ + hbase + g) * N + rows, mask=rin, other=0.0)
        finite = finite & (lse_g == lse_g) & (tl.abs(lse_g) < float("inf"))
    allowed = rin
    if HAS_ROW_MASK:
        rmv = tl.load(rm_ptr + b * srb + hbase * srh + rows * srn, mask=rin, other=0)
        allowed = allowed & (rmv != 0)
    valid = allowed & finite

    ent = tl.zeros([BLOCK_M], tl.float32)
    mx = tl.zeros([BLOCK_M], tl.float32)
    ssq = tl.zeros([BLOCK_M], tl.float32)
    ntau = tl.zeros([BLOCK_M], tl.float32)
    neps = tl.zeros([BLOCK_M], tl.float32)
    rsum = tl.zeros([BLOCK_M], tl.float32)
    fut = tl.zeros([BLOCK_M], tl.float32)
    loc = tl.zeros([BLOCK_M], tl.float32)
    adev = tl.zeros([BLOCK_M], tl.float32)
    h_ent = tl.zeros([BLOCK_M, G_PAD], tl.float32)
    h_max = tl.zeros([BLOCK_M, G_PAD], tl.float32)
    h_tau = tl.zeros([BLOCK_M, G_PAD], tl.float32)
    h_ssq = tl.zeros([BLOCK_M, G_PAD], tl.float32)
    kcol = tl.arange(0, K_PAD)
    best = tl.full([BLOCK_M, K_PAD], -1, tl.int64)
    inv_nk = 1.0 / NK
    inv_g = 1.0 / G

    for j0 in range(0, NK, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N).to(tl.int64)
        cin = cols < NK
        pbar = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for g in range(G):
            h = hbase + g
            lse_g = tl.load(lse_ptr + (b * HQ + h) * N + rows, mask=rin, other=0.0)
            lse_g = tl.where((lse_g == lse_g) & (tl.abs(lse_g) < float("inf")), lse_g, 0.0)
            s = _scores(
                q_ptr, k_ptr, m_ptr, b, h, h // GROUPS, rows, cols, N, NK, D,
                sqb, sqh, sqn, sqd, skb, skh, skn, skd, smb, smh, smn, smk, scale,
                IS_CAUSAL, HAS_MASK, MASK_BOOL, D_PAD,
            )
            logp = s - lse_g[:, None]
            p = tl.exp(logp)  # 0 where masked (logp = -inf)
            pbar += p
            if HEADS:
                pos = p > 0
                e_g = -tl.sum(tl.where(pos, p * tl.where(pos, logp, 0.0), 0.0), axis=1)
                m_g = tl.max(p, axis=1)
                t_g = tl.sum(tl.where(p > tau, 1.0, 0.0), axis=1)
                q_g = tl.sum(p * p, axis=1)
                sel = gcols[None, :] == g
                h_ent = tl.where(sel, h_ent + e_g[:, None], h_ent)
                h_max = tl.where(sel, tl.maximum(h_max, m_g[:, None]), h_max)
                h_tau = tl.where(sel, h_tau + t_g[:, None], h_tau)
                h_ssq = tl.where(sel, h_ssq + q_g[:, None], h_ssq)
        pbar = tl.where(cin[None, :], pbar * inv_g, 0.0)
        pos = pbar > 0
        ent -= tl.sum(tl.where(pos, pbar * tl.log(tl.where(pos, pbar, 1.0)), 0.0), axis=1)
        mx = tl.maximum(mx, tl.max(pbar, axis=1))
        ssq += tl.sum(pbar * pbar, axis=1)
        ntau += tl.sum(tl.where(pbar > tau, 1.0, 0.0), axis=1)
        neps += tl.sum(tl.where(pbar > eps, 1.0, 0.0), axis=1)
        rsum += tl.sum(pbar, axis=1)
        fut += tl.sum(tl.where(cols[None, :] > rows[:, None], pbar, 0.0), axis=1)
        if HAS_WINDOW:
            near = tl.abs(cols[None, :] - rows[:, None]) <= window
            loc += tl.sum(tl.where(near, pbar, 0.0), axis=1)
        adev += tl.sum(tl.where(cin[None, :], tl.abs(pbar - inv_nk), 0.0), axis=1)
        if TOPK > 0:
            bits = pbar.to(tl.int32, bitcast=True).to(tl.int64)
            rev = tl.full([BLOCK_N], _IDX_TOP, tl.int64) - cols
            keys = (bits << 32) | rev[None, :]
            keys = tl.where(cin[None, :], keys, -1)
            new = tl.full([BLOCK_M, K_PAD], -1, tl.int64)
            for r in tl.static_range(TOPK):
                w = tl.maximum(tl.max(keys, axis=1), tl.max(best, axis=1))
                new = tl.where(kcol[None, :] == r, w[:, None], new)
                keys = tl.where(keys == w[:, None], -1, keys)
                best = tl.where(best == w[:, None], -1, best)
            best = new

    err = tl.abs(rsum - 1.0)
    adev = adev * inv_nk
    out = part_ptr + pid * _S_NUM
    tl.store(out + _S_COUNT, _fsum(valid, tl.where(valid, 1.0, 0.0)))
    tl.store(out + _S_ENTROPY, _fsum(valid, ent))
    tl.store(out + _S_ENTROPY_SQ, _fsum(valid, ent.to(tl.float64) * ent.to(tl.float64)))
    tl.store(out + _S_MAX, _fsum(valid, mx))
    tl.store(out + _S_MAX_SQ, _fsum(valid, mx.to(tl.float64) * mx.to(tl.float64)))
    tl.store(out + _S_SUMSQ, _fsum(valid, ssq))
    tl.store(out + _S_GT_TAU, _fsum(valid, ntau))
    tl.store(out + _S_GT_EPS, _fsum(valid, neps))
    tl.store(out + _S_ROWSUM_ERR, _fsum(valid, err))
    tl.store(out + _S_ROWSUM_ERR_MAX, tl.max(tl.where(valid, err, 0.0), axis=0).to(tl.float64))
    tl.store(out + _S_FUTURE, _fsum(valid, fut))
    tl.store(out + _S_FUTURE_MAX, tl.max(tl.where(valid, fut, 0.0), axis=0).to(tl.float64))
    tl.store(out + _S_LOCAL, _fsum(valid, loc))
    tl.store(out + _S_ABS_DEV, _fsum(valid, adev))
    tl.store(out + _S_NONFINITE, _fsum(allowed & ~finite, tl.where(rin, 1.0, 0.0)))
    tl.store(out + _S_MASKED, _fsum(rin & ~allowed, tl.where(rin, 1.0, 0.0)))
    if HEADS:
        hout = hpart_ptr + pid * G * _H_NUM + gcols * _H_NUM
        hmask = gcols < G
        vk = valid[:, None]
        tl.store(hout + _H_ENTROPY, tl.sum(tl.where(vk, h_ent.to(tl.float64), 0.0), axis=0), mask=hmask)
        tl.store(hout + _H_MAX, tl.sum(tl.where(vk, h_max.to(tl.float64), 0.0), axis=0), mask=hmask)
        tl.store(hout + _H_GT_TAU, tl.sum(tl.where(vk, h_tau.to(tl.float64), 0.0), axis=0), mask=hmask)
        tl.store(hout + _H_SUMSQ, tl.sum(tl.where(vk, h_ssq.to(tl.float64), 0.0), axis=0), mask=hmask)
    orow = a * N + rows
    if WANT_ROWS:
        nan = float("nan")
        rp = rows_ptr + orow * _R_NUM
        tl.store(rp + _R_ENTROPY, tl.where(valid, ent, nan), mask=rin)
        tl.store(rp + _R_MAX, tl.where(valid, mx, nan), mask=rin)
        tl.store(rp + _R_GT_EPS, tl.where(valid, neps, nan), mask=rin)
        tl.store(rp + _R_SUMSQ, tl.where(valid, ssq, nan), mask=rin)
    if TOPK > 0:
        idx = tl.full([BLOCK_M, K_PAD], _IDX_TOP, tl.int64) - (best & _LOW_MASK)
        idx = tl.where(valid[:, None], idx, -1)
        tp = topk_ptr + orow[:, None] * TOPK + kcol[None, :]
        tl.store(tp, idx, mask=rin[:, None] & (kcol[None, :] < TOPK))


def _pow2(v: int) -> int:
    return 1 if v <= 1 else 1 << (v - 1).bit_length()


def _blocks(interpreting: bool, d: int, g_pad: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): 16 x 16 under the interpreter (slow per element); on a GPU
    64 x 64 tiles (32 x 64 with many heads' accumulators: [BLOCK_M, G_PAD] x 4 per program).
    Not tuned: no GPU was available to this project."""
    if interpreting:
        return 32, 32, 4
    block_m = 64 if g_pad <= 16 else 32
    return block_m, 64, 4


def _impl(
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
    b, hq, n, d = q.shape
    hk, nk = k.shape[1], k.shape[2]
    dev = q.device
    s_shape, h_shape, r_shape, t_shape = L.out_shapes(q, topk, reduce_heads, want_rows)
    rows_out = torch.empty(r_shape, dtype=torch.float32, device=dev)
    topk_out = torch.empty(t_shape, dtype=torch.int64, device=dev)
    g = hq if reduce_heads else 1
    if b * hq * n == 0:
        sums = torch.zeros(s_shape, dtype=torch.float64, device=dev)
        head_sums = torch.full(h_shape, 0.0 if want_heads else math.nan, dtype=torch.float64, device=dev)
        return sums, head_sums, rows_out, topk_out
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    interpreting = dev.type == "cpu"  # fastdiag.backends sends CPU tensors only when interpreting
    g_pad = _pow2(g)
    block_m, block_n, warps = _blocks(interpreting, d, g_pad)
    d_pad = max(16, _pow2(d))
    nqb = -(-n // block_m)
    groups = hq // hk
    if attn_mask is not None:
        mask = attn_mask.expand(b, hq, n, nk)
        mask_bool = mask.dtype == torch.bool
        if mask_bool:
            mask = mask.view(torch.uint8)
        sm = mask.stride()
    else:
        mask = torch.empty(1, dtype=torch.uint8, device=dev)
        mask_bool = True
        sm = (0, 0, 0, 0)
    if row_mask is not None:
        rm = row_mask.view(torch.uint8)
        sr = (rm.stride(0), 0, rm.stride(1)) if reduce_heads else rm.stride()
    else:
        rm = torch.empty(1, dtype=torch.uint8, device=dev)
        sr = (0, 0, 0)
    common = (n, nk, d, hq, groups)
    strides = (*q.stride(), *k.stride(), *sm)
    lse = torch.empty((b, hq, n), dtype=torch.float32, device=dev)
    guard = torch.cuda.device(dev) if dev.type == "cuda" else _null()
    with guard:
        _lse_kernel[(b * hq * nqb,)](
            q, k, mask, lse, *common, nqb, *strides, scale,
            IS_CAUSAL=bool(is_causal), HAS_MASK=attn_mask is not None, MASK_BOOL=mask_bool,
            BLOCK_M=block_m, BLOCK_N=block_n, D_PAD=d_pad, num_warps=warps,
        )
        apb = hq // g
        nprog = b * apb * nqb
        part = torch.empty((nprog, L.S_NUM), dtype=torch.float64, device=dev)
        hpart = torch.empty((nprog, g, L.H_NUM) if want_heads else 1, dtype=torch.float64, device=dev)
        _stats_kernel[(nprog,)](
            q, k, mask, lse, rm, part, hpart, rows_out, topk_out,
            *common, g, apb, nqb, *strides, *sr,
            scale, float(tau), float(eps), int(window),
            IS_CAUSAL=bool(is_causal), HAS_MASK=attn_mask is not None, MASK_BOOL=mask_bool,
            HAS_ROW_MASK=row_mask is not None, HAS_WINDOW=window >= 0, WANT_ROWS=bool(want_rows),
            HEADS=bool(want_heads), TOPK=int(topk), K_PAD=_pow2(max(topk, 1)), G_PAD=g_pad,
            BLOCK_M=block_m, BLOCK_N=block_n, D_PAD=d_pad, num_warps=warps,
        )
    # fixed-order second stage over the per-program partials (no atomics)
    sums = part.sum(0)
    maxed = part.amax(0)
    idx = torch.tensor(list(L.S_MAX_REDUCED), device=dev)
    sums = sums.index_copy(0, idx, maxed.index_select(0, idx))
    if want_heads:
        head_sums = hpart.sum(0)
    else:
        head_sums = torch.full(h_shape, math.nan, dtype=torch.float64, device=dev)
    return sums, head_sums, rows_out, topk_out


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


attention_stats_triton = torch.library.custom_op("fastdiag::attention_stats_triton", mutates_args=())(_impl)
attention_stats_triton.register_fake(L.fake)
