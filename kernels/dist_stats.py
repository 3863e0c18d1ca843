"""Triton backend of ``fastdiag::dist_stats`` (see ``fastdiag.ops._dist_stats`` for the contract).

One read of ``x4`` [A, G, C, N]: each program owns ``BLOCK_R`` rows ``r = a * C + c`` and loops
over the G heads, accumulating the head-mean row in registers while it reduces each head's
statistics. A row of up to ``TILE_N_MAX`` entries is one tile; longer rows stream in blocks of
``LOOP_BLOCK_N`` columns (additive statistics, a running top-k merge; logits then take a first
pass per head for its max and normaliser by online softmax). Softmax is never written out.

Determinism, no float atomics: each program writes float64 partials ``[16, num_programs]`` and
per-(head, row) statistics to a small float32 scratch (a row's validity is known only after its
last head); ``_finalize_kernel`` reduces both in a fixed order, over the valid rows for heads.

Top-k: k rounds of a fused (max, lowest index of the max) reduction, knocking the winner out,
so ties go to the lower index; column blocks merge into a running sorted list.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from fastdiag.ops._dist_stats_layout import MAX_TOPK, HeadSlot, RowSlot, Slot, fake

# Launch geometry, read at every call (tests lower them to reach the multi-block and two-stage
# paths on small shapes). GPU choices for a bandwidth-bound op whose floor is one read of x4
# (checked with ptxas for sm_90: no spills for N in 8..20000, fp32 and bf16, up to topk 16):
# * Per element and head the kernel issues ~15 instructions for probabilities (~26 for logits:
#   exp, max and sum reductions), so at bf16 it is close to compute-bound: keep rows inside one
#   warp (cross-warp reductions cost a shared-memory round trip and a barrier per head) and
#   give each thread ~32 entries per tile (see _config): one warp per 1024 entries of a row,
#   rows shorter than a warp's span stacked (BLOCK_R rows, 4 warps, <= 4 rows per thread).
# * The next head's tile is loaded while the current one is reduced (two tiles in flight per
#   program). The bf16 [*, 16, 2048, 2048] benchmark shape: 2 warps per row, ~160 registers per
#   thread, 6 programs (12 warps, 12 tiles of 4 KiB in flight) per SM.
# * TILE_N_MAX = 8192: longer rows would need > 32 entries per thread at 8 warps; beyond, rows
#   stream in LOOP_BLOCK_N = 4096 column blocks (logits then read each row twice).
# * Per-head statistics go to a [G, num_blocks_n, 4, R] float32 scratch (16 bytes per head row,
#   under 1% of the bytes read for N >= 1024) instead of registers: [BLOCK_R, G] accumulators
#   cost ~150 registers per thread (one program per SM).
# * The finalize reduces FINAL_CHUNK items per program, then the chunk values (two stages only
#   when R or the program count exceeds one chunk).
TILE_N_MAX = 8192
LOOP_BLOCK_N = 4096
MAX_BLOCK_R = 256
FINAL_BLOCK = 1024
FINAL_CHUNK = 16384

_S_COUNT = tl.constexpr(Slot.COUNT)
_S_ENTROPY = tl.constexpr(Slot.ENTROPY)
_S_ENTROPY_SQ = tl.constexpr(Slot.ENTROPY_SQ)
_S_MAX = tl.constexpr(Slot.MAX)
_S_MAX_SQ = tl.constexpr(Slot.MAX_SQ)
_S_SUMSQ = tl.constexpr(Slot.SUMSQ)
_S_GT_TAU = tl.constexpr(Slot.GT_TAU)
_S_GT_EPS = tl.constexpr(Slot.GT_EPS)
_S_ROWSUM_ERR = tl.constexpr(Slot.ROWSUM_ERR)
_S_ROWSUM_ERR_MAX = tl.constexpr(Slot.ROWSUM_ERR_MAX)
_S_FUTURE = tl.constexpr(Slot.FUTURE)
_S_FUTURE_MAX = tl.constexpr(Slot.FUTURE_MAX)
_S_LOCAL = tl.constexpr(Slot.LOCAL)
_S_ABS_DEV = tl.constexpr(Slot.ABS_DEV)
_S_NONFINITE = tl.constexpr(Slot.NONFINITE)
_S_MASKED = tl.constexpr(Slot.MASKED)
_S_NUM = tl.constexpr(Slot.NUM)
_H_ENTROPY = tl.constexpr(HeadSlot.ENTROPY)
_H_MAX = tl.constexpr(HeadSlot.MAX)
_H_GT_TAU = tl.constexpr(HeadSlot.GT_TAU)
_H_SUMSQ = tl.constexpr(HeadSlot.SUMSQ)
_H_NUM = tl.constexpr(HeadSlot.NUM)
_R_ENTROPY = tl.constexpr(RowSlot.ENTROPY)
_R_MAX = tl.constexpr(RowSlot.MAX)
_R_GT_EPS = tl.constexpr(RowSlot.GT_EPS)
_R_SUMSQ = tl.constexpr(RowSlot.SUMSQ)
_R_NUM = tl.constexpr(RowSlot.NUM)


@triton.jit
def _log2(x, FAST_LOG: tl.constexpr):
    # tl.log2 / tl.log lower to a ~30-instruction precise routine on NVIDIA; lg2.approx.ftz is
    # one MUFU instruction (rel. error ~2^-22; inputs here are >= FLT_MIN, so ftz changes
    # nothing). The interpreter cannot run inline asm, so FAST_LOG is off there.
    if FAST_LOG:
        return tl.inline_asm_elementwise(
            "lg2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        return tl.log2(x)


@triton.jit
def _plog2p(p, FAST_LOG: tl.constexpr):
    """p * log2(p) for p > 0, 0 for p <= 0 (entropy = -ln 2 * sum)."""
    q = tl.maximum(p, 0.0)
    return q * _log2(tl.maximum(q, 1.1754943508222875e-38), FAST_LOG)


@triton.jit
def _head_combine(e0, m0, t0, q0, e1, m1, t1, q1):
    return e0 + e1, tl.maximum(m0, m1), t0 + t1, q0 + q1


@triton.jit
def _head_reduce(e, m, t, q, FUSED: tl.constexpr):
    """Row-wise (sum, max, sum, sum); FUSED: one tuple reduction (one cross-warp exchange
    instead of four). The interpreter runs custom combines element by element, so not there;
    both forms give the same values up to float summation order."""
    if FUSED:
        return tl.reduce((e, m, t, q), 1, _head_combine)
    else:
        return tl.sum(e, axis=1), tl.max(m, axis=1), tl.sum(t, axis=1), tl.sum(q, axis=1)


@triton.jit
def _sum4_combine(a0, b0, c0, d0, a1, b1, c1, d1):
    return a0 + a1, b0 + b1, c0 + c1, d0 + d1


@triton.jit
def _sum4(a, b, c, d, FUSED: tl.constexpr):
    """Four row-wise sums, fused like _head_reduce."""
    if FUSED:
        return tl.reduce((a, b, c, d), 1, _sum4_combine)
    else:
        return tl.sum(a, axis=1), tl.sum(b, axis=1), tl.sum(c, axis=1), tl.sum(d, axis=1)


@triton.jit
def _vsum(keep, v):
    """float64 sum of v over the rows where keep is set."""
    return tl.sum(tl.where(keep, v.to(tl.float64), 0.0), axis=0)


@triton.jit
def _vmax0(keep, v):
    """float64 max of v over the rows where keep is set, and 0."""
    return tl.maximum(tl.max(tl.where(keep, v.to(tl.float64), 0.0), axis=0), 0.0)


@triton.jit
def _load_head(x_ptr, hoff, cols64, stride_n, lm, other, FAST_BF16: tl.constexpr):
    """One head's [BLOCK_R, BLOCK_N] tile as float32 (padding loads ``other``)."""
    ptrs = x_ptr + (hoff[:, None] + cols64[None, :] * stride_n)
    x = tl.load(ptrs, mask=lm, other=other)
    if FAST_BF16:
        # bf16 is the top half of a float32: one shift or mask per value, two values per
        # register (element 0 in the low half), where the default conversion takes two ops
        return tl.inline_asm_elementwise(
            "shl.b32 $0, $2, 16;\n\tand.b32 $1, $2, 0xffff0000;",
            "=r,=r,r",
            [x],
            dtype=tl.float32,
            is_pure=True,
            pack=2,
        )
    else:
        return x.to(tl.float32)


@triton.jit
def _dist_stats_kernel(
    x_ptr,
    mask_ptr,
    part_ptr,
    rows_ptr,
    topk_ptr,
    hs_ptr,
    ms_ptr,
    valid_ptr,
    stride_mask,
    R,
    G,
    C,
    N,
    stride_a,
    stride_g,
    stride_c,
    stride_n,
    tau,
    eps,
    window,
    query_offset,
    query_len,
    num_blocks_n,
    LOGITS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    WANT_ROWS: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    TOPK: tl.constexpr,
    K_PAD: tl.constexpr,
    ONE_BLOCK: tl.constexpr,
    EVEN_N: tl.constexpr,
    MULTI_HEAD: tl.constexpr,
    HEADS: tl.constexpr,
    G_POW2: tl.constexpr,
    FAST_LOG: tl.constexpr,
    FAST_BF16: tl.constexpr,
    FUSED: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    NEG_INF: tl.constexpr = float("-inf")
    LN2: tl.constexpr = 0.6931471805599453
    OTHER: tl.constexpr = NEG_INF if LOGITS else 0.0  # padding: zero probability either way
    pid = tl.program_id(0).to(tl.int64)
    npg = tl.num_programs(0).to(tl.int64)
    # Scalar arguments may arrive as constexprs (Triton specialises the value 1): tl.cast, no .to().
    r64 = tl.cast(R, tl.int64)
    n32 = tl.cast(N, tl.float32)
    inv_n = 1.0 / n32
    g32 = tl.cast(G, tl.float32)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    row_ok = rows < R
    a = rows // C
    rbase = a * stride_a + (rows - a * C) * stride_c  # int64 element offsets
    qi = rows % query_len + query_offset
    kcol = tl.arange(0, K_PAD)

    # Non-finite input is found without per-element tests: a logit head is bad when its softmax
    # normaliser is not >= 1 (NaN from NaN/+inf, 0 when all -inf); a probability row is bad when
    # sum(p * p + p * 0) is NaN, p the head-mean row (p * 0 is NaN exactly where p is not
    # finite: any NaN/inf entry of any head, or, only possible with entries beyond 1e37, a head
    # sum that overflows float32, whose statistics would be inf/NaN anyway).
    rowbad = tl.zeros([BLOCK_R], tl.int1)

    # Pass 1, long logit rows only: each head's max and normaliser by online softmax, kept in
    # the [G, 2, R] scratch ``ms`` (a barrier makes it visible to the whole program).
    if LOGITS and not ONE_BLOCK:
        hoff = rbase
        mptr = ms_ptr + rows
        for _g in range(G):
            m = tl.full([BLOCK_R], NEG_INF, tl.float32)
            s = tl.zeros([BLOCK_R], tl.float32)
            for nb in range(num_blocks_n):
                cols64 = (nb * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
                lm = row_ok[:, None] & (cols64 < N)[None, :]
                x = _load_head(x_ptr, hoff, cols64, stride_n, lm, NEG_INF, FAST_BF16)
                m_new = tl.maximum(m, tl.max(x, axis=1))
                m_safe = tl.where(m_new == NEG_INF, 0.0, m_new)
                s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe[:, None]), axis=1)
                m = m_new
            rowbad = rowbad | ~(s >= 1.0)
            tl.store(mptr, m, mask=row_ok)
            tl.store(mptr + r64, s, mask=row_ok)
            hoff += stride_g  # int64 running offsets: no int32 g * stride
            mptr += 2 * r64
        tl.debug_barrier()

    # Pass 2: per-head probabilities and head statistics, head-mean row and its statistics.
    ent = tl.zeros([BLOCK_R], tl.float32)  # sum p log2 p
    mx = tl.full([BLOCK_R], NEG_INF, tl.float32)
    sq = tl.zeros([BLOCK_R], tl.float32)
    gtau = tl.zeros([BLOCK_R], tl.float32)
    geps = tl.zeros([BLOCK_R], tl.float32)
    rsum = tl.zeros([BLOCK_R], tl.float32)
    adev = tl.zeros([BLOCK_R], tl.float32)
    fut = tl.zeros([BLOCK_R], tl.float32)
    loc = tl.zeros([BLOCK_R], tl.float32)
    best_v = tl.full([BLOCK_R, K_PAD], NEG_INF, tl.float32)  # running top-k (values, indices)
    best_i = tl.zeros([BLOCK_R, K_PAD], tl.int64)
    for nb in range(num_blocks_n):
        cols64 = (nb * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        lm = row_ok[:, None] & (cols64 < N)[None, :]
        pacc = tl.zeros([BLOCK_R, BLOCK_N], tl.float32)
        hoff = rbase
        mptr = ms_ptr + rows
        hptr = hs_ptr + rows + nb * _H_NUM * r64  # [G, num_blocks_n, 4, R] scratch
        # one head ahead: the next head's load is in flight while this one is reduced
        xn = _load_head(x_ptr, hoff, cols64, stride_n, lm, OTHER, FAST_BF16)
        for g in range(G):
            x = xn
            hoff += stride_g
            xn = _load_head(x_ptr, hoff, cols64, stride_n, lm & (g + 1 < G), OTHER, FAST_BF16)
            if LOGITS:
                if ONE_BLOCK:
                    m = tl.max(x, axis=1)
                    e = tl.exp(x - tl.where(m == NEG_INF, 0.0, m)[:, None])
                    s = tl.sum(e, axis=1)
                    rowbad = rowbad | ~(s >= 1.0)
                else:
                    m = tl.load(mptr, mask=row_ok, other=NEG_INF)
                    s = tl.load(mptr + r64, mask=row_ok, other=0.0)
                    e = tl.exp(x - tl.where(m == NEG_INF, 0.0, m)[:, None])
                ph = e * (1.0 / tl.where(s > 0, s, 1.0))[:, None]
            else:
                ph = x
            pacc += ph
            # per-head statistics (HEADS = want_heads); one head: the head stats are the row
            # stats (finalize copies them)
            if MULTI_HEAD:
                if HEADS:
                    if EVEN_N:
                        hmx = ph
                        hgt = tl.where(ph > tau, 1.0, 0.0)
                    else:
                        hmx = tl.where(lm, ph, NEG_INF)
                        hgt = tl.where((ph > tau) & lm, 1.0, 0.0)
                    he, hm, ht, hq = _head_reduce(_plog2p(ph, FAST_LOG), hmx, hgt, ph * ph, FUSED)
                    tl.store(hptr + _H_ENTROPY * r64, -LN2 * he, mask=row_ok)
                    tl.store(hptr + _H_MAX * r64, hm, mask=row_ok)
                    tl.store(hptr + _H_GT_TAU * r64, ht, mask=row_ok)
                    tl.store(hptr + _H_SUMSQ * r64, hq, mask=row_ok)
            mptr += 2 * r64
            hptr += num_blocks_n * _H_NUM * r64
        # head mean as torch computes it (sequential sum, correctly rounded divide): bit-equal
        # to the torch backend for G <= 3, so exact ties survive and top-k indices agree; for a
        # power-of-two G the product with 1 / G is the same number, without div_rn's slow path
        if G_POW2:
            p = pacc * (1.0 / g32)
        else:
            p = tl.div_rn(pacc, g32)
        if EVEN_N:
            pmx = p
            pgt = tl.where(p > tau, 1.0, 0.0)
            pge = tl.where(p > eps, 1.0, 0.0)
            pdev = tl.abs(p - inv_n)
        else:
            cm = (cols64 < N)[None, :]
            pmx = tl.where(cm, p, NEG_INF)
            pgt = tl.where((p > tau) & cm, 1.0, 0.0)
            pge = tl.where((p > eps) & cm, 1.0, 0.0)
            pdev = tl.where(cm, tl.abs(p - inv_n), 0.0)
        # two fused 4-tuples (one 8-tuple keeps 8 tile-sized temporaries live: spills)
        psq = p * p if LOGITS else p * p + p * 0.0
        be, bm, bq, bs = _head_reduce(_plog2p(p, FAST_LOG), pmx, psq, p, FUSED)
        pfut = tl.where(cols64[None, :] > qi[:, None], p, 0.0)
        bt, bg, bd, bf = _sum4(pgt, pge, pdev, pfut, FUSED)
        ent += be
        mx = tl.maximum(mx, bm)
        sq += bq
        rsum += bs
        gtau += bt
        geps += bg
        adev += bd
        fut += bf
        if HAS_WINDOW:
            near = tl.abs(cols64[None, :] - qi[:, None]) <= window
            loc += tl.sum(tl.where(near, p, 0.0), axis=1)
        if TOPK > 0:
            # k rounds of (max with its lowest index, knock it out); across column blocks the
            # running list (sorted, from lower indices) wins ties against the current block
            v = p if EVEN_N else tl.where((cols64 < N)[None, :], p, NEG_INF)
            v = tl.where(v == v, v, NEG_INF)  # NaN only in invalid rows, whose output is -1
            lcol = tl.arange(0, BLOCK_N)
            new_v = tl.full([BLOCK_R, K_PAD], NEG_INF, tl.float32)
            new_i = tl.zeros([BLOCK_R, K_PAD], tl.int64)
            for k in tl.static_range(TOPK):
                mt, it = tl.max(v, axis=1, return_indices=True, return_indices_tie_break_left=True)
                gi = it.to(tl.int64) + nb * BLOCK_N
                if ONE_BLOCK:
                    v = tl.where(lcol[None, :] == it[:, None], NEG_INF, v)
                    new_i = tl.where(kcol[None, :] == k, gi[:, None], new_i)
                else:
                    mb, ib = tl.max(
                        best_v, axis=1, return_indices=True, return_indices_tie_break_left=True
                    )
                    take_b = mb >= mt
                    bi = tl.sum(tl.where(kcol[None, :] == ib[:, None], best_i, 0), axis=1)
                    sel = kcol[None, :] == k
                    new_v = tl.where(sel, tl.where(take_b, mb, mt)[:, None], new_v)
                    new_i = tl.where(sel, tl.where(take_b, bi, gi)[:, None], new_i)
                    best_v = tl.where(
                        take_b[:, None] & (kcol[None, :] == ib[:, None]), NEG_INF, best_v
                    )
                    v = tl.where((~take_b)[:, None] & (lcol[None, :] == it[:, None]), NEG_INF, v)
            best_v = new_v
            best_i = new_i

    if not LOGITS:
        rowbad = rowbad | (sq != sq)
    finite = ~rowbad
    if HAS_MASK:
        allowed = row_ok & (tl.load(mask_ptr + rows * stride_mask, mask=row_ok, other=0) != 0)
    else:
        allowed = row_ok
    valid = allowed & finite
    ent = -LN2 * ent
    rerr = tl.abs(rsum - 1.0)
    adev = adev / n32
    if MULTI_HEAD:
        if HEADS:
            tl.store(valid_ptr + rows, valid.to(tl.int8), mask=row_ok)

    # Per-program float64 partials, one column per program (max-reduced slots floored at 0).
    out = part_ptr + pid
    tl.store(out + _S_COUNT * npg, _vsum(valid, valid))
    tl.store(out + _S_ENTROPY * npg, _vsum(valid, ent))
    tl.store(out + _S_ENTROPY_SQ * npg, _vsum(valid, ent * ent))
    tl.store(out + _S_MAX * npg, _vsum(valid, mx))
    tl.store(out + _S_MAX_SQ * npg, _vsum(valid, mx * mx))
    tl.store(out + _S_SUMSQ * npg, _vsum(valid, sq))
    tl.store(out + _S_GT_TAU * npg, _vsum(valid, gtau))
    tl.store(out + _S_GT_EPS * npg, _vsum(valid, geps))
    tl.store(out + _S_ROWSUM_ERR * npg, _vsum(valid, rerr))
    tl.store(out + _S_ROWSUM_ERR_MAX * npg, _vmax0(valid, rerr))
    tl.store(out + _S_FUTURE * npg, _vsum(valid, fut))
    tl.store(out + _S_FUTURE_MAX * npg, _vmax0(valid, fut))
    tl.store(out + _S_LOCAL * npg, _vsum(valid, loc))
    tl.store(out + _S_ABS_DEV * npg, _vsum(valid, adev))
    tl.store(out + _S_NONFINITE * npg, _vsum(allowed & ~finite, allowed))
    tl.store(out + _S_MASKED * npg, _vsum(row_ok & ~allowed, row_ok))

    if WANT_ROWS:
        ro = rows * _R_NUM
        nan = float("nan")
        tl.store(rows_ptr + ro + _R_ENTROPY, tl.where(valid, ent, nan), mask=row_ok)
        tl.store(rows_ptr + ro + _R_MAX, tl.where(valid, mx, nan), mask=row_ok)
        tl.store(rows_ptr + ro + _R_GT_EPS, tl.where(valid, geps, nan), mask=row_ok)
        tl.store(rows_ptr + ro + _R_SUMSQ, tl.where(valid, sq, nan), mask=row_ok)
    if TOPK > 0:
        idx = tl.where(valid[:, None], best_i, -1)
        tptr = topk_ptr + rows[:, None] * TOPK + kcol[None, :]
        tl.store(tptr, idx, mask=row_ok[:, None] & (kcol < TOPK)[None, :])


@triton.jit
def _reduce_partials(part_ptr, src, P, lo, hi, BLOCK: tl.constexpr):
    """Sum (max for the max-reduced slots) of row ``src`` of the [16, P] program partials over
    programs [lo, hi)."""
    offs = tl.arange(0, BLOCK)
    base = part_ptr + src.to(tl.int64) * P
    acc_sum = tl.zeros([BLOCK], tl.float64)
    acc_max = tl.zeros([BLOCK], tl.float64)  # max slots are >= 0 in every program
    for start in range(lo, hi, BLOCK):
        idx = start + offs
        v = tl.load(base + idx, mask=idx < hi, other=0.0)
        acc_sum += v
        acc_max = tl.maximum(acc_max, v)
    is_max = (src == _S_ROWSUM_ERR_MAX) | (src == _S_FUTURE_MAX)
    return tl.where(is_max, tl.max(acc_max, axis=0), tl.sum(acc_sum, axis=0))


@triton.jit
def _reduce_head(hs_ptr, valid_ptr, hcol, R, num_blocks_n, lo, hi, BLOCK: tl.constexpr):
    """Head column ``hcol = 4 g + s`` from the [G, nbn, 4, R] scratch over rows [lo, hi):
    combined over column blocks (max for HeadSlot.MAX, else sum), summed over valid rows."""
    offs = tl.arange(0, BLOCK)
    g = hcol // _H_NUM
    s = hcol - g * _H_NUM
    r64 = tl.cast(R, tl.int64)
    base = hs_ptr + (g.to(tl.int64) * num_blocks_n * _H_NUM + s) * r64
    acc = tl.zeros([BLOCK], tl.float64)
    for start in range(lo, hi, BLOCK):
        idx = start + offs
        im = idx < hi
        bptr = base + idx
        v = tl.load(bptr, mask=im, other=0.0)
        for _nb in range(1, num_blocks_n):
            bptr += _H_NUM * r64
            w = tl.load(bptr, mask=im, other=0.0)
            v = tl.where(s == _H_MAX, tl.maximum(v, w), v + w)
        keep = tl.load(valid_ptr + idx, mask=im, other=0) != 0
        acc += tl.where(keep, v.to(tl.float64), 0.0)
    return tl.sum(acc, axis=0)


@triton.jit
def _finalize_kernel(
    part_ptr,
    hs_ptr,
    valid_ptr,
    out_ptr,
    sums_ptr,
    head_ptr,
    P,
    R,
    num_blocks_n,
    chunk,
    MULTI_HEAD: tl.constexpr,
    TWO_STAGE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Output column ``col`` (Slot col < 16, head column 16 + 4 g + s) over item chunk
    ``program_id(1)`` (programs for Slot columns, rows for head columns), in a fixed order.
    TWO_STAGE: write the chunk's value to out[col, chunk] for _stage_kernel; else the result."""
    col = tl.program_id(0)
    lo = tl.program_id(1).to(tl.int64) * chunk  # int64: R may pass 2^31 rows
    if MULTI_HEAD:
        if col < _S_NUM:
            total = _reduce_partials(part_ptr, col, P, lo, tl.minimum(lo + chunk, P), BLOCK)
        else:
            hi = tl.minimum(lo + chunk, R)
            total = _reduce_head(hs_ptr, valid_ptr, col - _S_NUM, R, num_blocks_n, lo, hi, BLOCK)
    else:
        # one head: its statistics are the row statistics, reduced from the matching slot
        hcol = col - _S_NUM
        src = tl.where(
            col < _S_NUM,
            col,
            tl.where(
                hcol == _H_ENTROPY,
                _S_ENTROPY,
                tl.where(hcol == _H_MAX, _S_MAX, tl.where(hcol == _H_GT_TAU, _S_GT_TAU, _S_SUMSQ)),
            ),
        )
        total = _reduce_partials(part_ptr, src, P, lo, tl.minimum(lo + chunk, P), BLOCK)
    if TWO_STAGE:
        tl.store(out_ptr + col * tl.num_programs(1) + tl.program_id(1), total)
    else:
        if col < _S_NUM:
            tl.store(sums_ptr + col, total)
        else:
            tl.store(head_ptr + (col - _S_NUM), total)


@triton.jit
def _stage_kernel(stage_ptr, sums_ptr, head_ptr, nchunk, BLOCK: tl.constexpr):
    """Second stage of the finalize: reduce row ``col`` of the [ncol, nchunk] chunk values."""
    col = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    acc_sum = tl.zeros([BLOCK], tl.float64)
    acc_max = tl.zeros([BLOCK], tl.float64)
    for start in range(0, nchunk, BLOCK):
        idx = start + offs
        v = tl.load(stage_ptr + col * nchunk + idx, mask=idx < nchunk, other=0.0)
        acc_sum += v
        acc_max = tl.maximum(acc_max, v)
    is_max = (col == _S_ROWSUM_ERR_MAX) | (col == _S_FUTURE_MAX)
    total = tl.where(is_max, tl.max(acc_max, axis=0), tl.sum(acc_sum, axis=0))
    if col < _S_NUM:
        tl.store(sums_ptr + col, total)
    else:
        tl.store(head_ptr + (col - _S_NUM), total)


def _is_fake(t: Tensor) -> bool:
    return t.device.type == "meta" or torch._subclasses.fake_tensor.is_fake(t)


def _fast_log(dev: torch.device) -> bool:
    """PTX inline asm (lg2.approx, bf16 unpack): NVIDIA GPUs only (not ROCm, not the interpreter)."""
    return dev.type == "cuda" and torch.version.hip is None and not _interpreting


def _pow2(v: int) -> int:
    return 1 if v <= 1 else 1 << (v - 1).bit_length()


def _config(n: int, r: int, elem_size: int) -> dict[str, int]:
    """Block sizes and warps for r rows of length n with elements of elem_size bytes.

    Aim: ~32 elements per thread per head tile and few rows per thread (every per-row
    accumulator is held by each thread of its row). A warp spans 32 16-byte vectors of a row;
    rows longer than that get one warp per 1024 entries (no cross-warp reduction below 1024),
    shorter rows are stacked, 4 warps of rows, 16 entries per thread."""
    if n <= TILE_N_MAX:
        block_n, nbn = _pow2(n), 1
    else:
        block_n = _pow2(min(LOOP_BLOCK_N, TILE_N_MAX))
        nbn = -(-n // block_n)
    warp_span = 32 * max(1, 16 // elem_size)
    if nbn > 1 or block_n >= 1024:
        block_r, num_warps = 1, max(1, block_n // 1024)
    elif block_n > warp_span:
        block_r, num_warps = 1024 // block_n, 1
    else:
        block_r, num_warps = min(MAX_BLOCK_R, 2048 // block_n), 4
    if _pow2(r) < block_r:  # few rows: a smaller tile, fewer warps
        block_r = _pow2(r)
        num_warps = min(num_warps, max(1, (block_r * block_n) // 512))
    return dict(
        BLOCK_N=block_n, num_blocks_n=nbn, BLOCK_R=block_r, num_warps=_pow2(min(16, num_warps))
    )


def _dist_stats_impl(
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
    """Triton backend of the canonical op: (sums f64[16], head_sums f64[G, 4],
    rows f32[R or 0, 4], topk i64[R, k]) for x4 [A, G, C, N], R = A * C. Launches only
    through ``torch.library.wrap_triton`` (traceable: no host reads of device data).
    ``want_heads=False`` (constexpr HEADS): no per-head statistic is computed, head_sums is
    NaN and the finalize reduces the Slot columns only."""
    if x4.dim() != 4:
        raise ValueError(f"x4 must be 4-d [A, G, C, N], got shape {tuple(x4.shape)}")
    if not 0 <= topk <= MAX_TOPK:
        raise ValueError(f"topk must be in [0, {MAX_TOPK}], got {topk}")
    if x4.device.type == "cpu" and not _interpreting:
        raise RuntimeError(
            "the triton backend needs a CUDA tensor, or TRITON_INTERPRET=1 for CPU tensors"
        )
    a_dim, g_dim, c_dim, n = x4.shape
    r = a_dim * c_dim
    dev = x4.device
    rows_out = torch.empty((r if want_rows else 0, RowSlot.NUM), dtype=torch.float32, device=dev)
    topk_out = torch.empty((r, topk), dtype=torch.int64, device=dev)
    head_fill = 0.0 if want_heads else float("nan")
    if r == 0 or n == 0 or (_interpreting and _is_fake(x4)):
        sums = torch.zeros(Slot.NUM, dtype=torch.float64, device=dev)
        head_sums = torch.full((g_dim, HeadSlot.NUM), head_fill, dtype=torch.float64, device=dev)
        return sums, head_sums, rows_out, topk_out

    cfg = _config(int(n), int(r), x4.element_size())
    nbn = cfg["num_blocks_n"]
    nprog = -(-r // cfg["BLOCK_R"])
    multi_head = g_dim > 1
    head_scratch = multi_head and want_heads  # per-(head, row) statistics in the scratch
    part = torch.empty((Slot.NUM, nprog), dtype=torch.float64, device=dev)
    sums = torch.empty(Slot.NUM, dtype=torch.float64, device=dev)
    if want_heads:
        head_sums = torch.empty((g_dim, HeadSlot.NUM), dtype=torch.float64, device=dev)
    else:
        head_sums = torch.full((g_dim, HeadSlot.NUM), head_fill, dtype=torch.float64, device=dev)
    # Scratch. Pointers a specialisation never touches still get their own 1-element tensor:
    # under torch.compile each argument is functionalised separately, and two arguments
    # sharing a tensor would leave it ambiguous which copy carries the kernel's writes.
    f32 = torch.float32
    hs = torch.empty((g_dim, nbn, HeadSlot.NUM, r) if head_scratch else 1, dtype=f32, device=dev)
    valid = torch.empty(r if head_scratch else 1, dtype=torch.int8, device=dev)
    ms = torch.empty((g_dim, 2, r) if from_logits and nbn > 1 else 1, dtype=f32, device=dev)
    mask_arg = row_mask if row_mask is not None else torch.empty(1, dtype=torch.bool, device=dev)
    # launch on the tensor's own GPU (tracing with fake tensors needs no device)
    on_gpu = dev.type == "cuda" and not _is_fake(x4)
    guard = torch.cuda.device(dev) if on_gpu else contextlib.nullcontext()
    with guard:
        wrap_triton(_dist_stats_kernel)[(nprog,)](
            x4,
            mask_arg,
            part,
            rows_out,
            topk_out,
            hs,
            ms,
            valid,
            row_mask.stride(0) if row_mask is not None else 0,
            r,
            g_dim,
            c_dim,
            n,
            x4.stride(0),
            x4.stride(1),
            x4.stride(2),
            x4.stride(3),
            tau,
            eps,
            window,
            query_offset,
            query_len,
            nbn,
            LOGITS=bool(from_logits),
            HAS_MASK=row_mask is not None,
            WANT_ROWS=bool(want_rows),
            HAS_WINDOW=window >= 0,
            TOPK=topk,
            K_PAD=_pow2(max(topk, 1)),
            ONE_BLOCK=nbn == 1,
            EVEN_N=n % cfg["BLOCK_N"] == 0,
            MULTI_HEAD=multi_head,
            HEADS=bool(want_heads),
            G_POW2=g_dim & (g_dim - 1) == 0,
            FAST_LOG=_fast_log(dev),
            FAST_BF16=_fast_log(dev)
            and x4.dtype == torch.bfloat16
            and cfg["BLOCK_R"] * cfg["BLOCK_N"] >= 64 * cfg["num_warps"],  # 2+ values per thread
            FUSED=not _interpreting,
            BLOCK_R=cfg["BLOCK_R"],
            BLOCK_N=cfg["BLOCK_N"],
            num_warps=cfg["num_warps"],
        )
        # fixed-order reduction of the partials (and head scratch): chunks of FINAL_CHUNK items
        # per program, then one more pass over the chunk values when there is more than one
        # without heads only the Slot columns (head_sums stays NaN)
        items = r if head_scratch else nprog
        nchunk = -(-items // FINAL_CHUNK)
        ncol = Slot.NUM + (HeadSlot.NUM * g_dim if want_heads else 0)
        stage = torch.empty((ncol, nchunk) if nchunk > 1 else 1, dtype=torch.float64, device=dev)
        wrap_triton(_finalize_kernel)[(ncol, nchunk)](
            part,
            hs,
            valid,
            stage,
            sums,
            head_sums,
            nprog,
            r,
            nbn,
            FINAL_CHUNK,
            MULTI_HEAD=head_scratch,
            TWO_STAGE=nchunk > 1,
            BLOCK=min(FINAL_BLOCK, _pow2(min(items, FINAL_CHUNK))),
            num_warps=4,
        )
        if nchunk > 1:
            wrap_triton(_stage_kernel)[(ncol,)](
                stage, sums, head_sums, nchunk, BLOCK=min(FINAL_BLOCK, _pow2(nchunk)), num_warps=4
            )
    return sums, head_sums, rows_out, topk_out


_interpreting = False  # set once by register(), from fastdiag.backends' TRITON_INTERPRET switch
_op = None


def register(interpreting: bool):
    """Register ``fastdiag::dist_stats_triton`` once and return it.

    Compiled Triton: a ``triton_op``, so torch.compile sees (and Inductor schedules) the kernels.
    Under the interpreter (``interpreting``, decided by ``fastdiag.backends``) ``wrap_triton``
    returns the interpreted kernel itself, which cannot run on fake or functional tensors: there
    the same launcher is an opaque custom op whose fake is the layout's.
    """
    global _interpreting, _op
    if _op is None:
        _interpreting = interpreting
        if interpreting:
            _op = torch.library.custom_op("fastdiag::dist_stats_triton", mutates_args=())(
                _dist_stats_impl
            )
            _op.register_fake(fake)
        else:
            # (wrap_triton is called by its bare name in the launcher: torch finds the kernels
            # of a triton_op by reading its source, to key the AOTAutograd cache on them)
            _op = triton_op("fastdiag::dist_stats_triton", mutates_args=())(_dist_stats_impl)
    return _op
