"""Portable torch path of ``fastdiag.ops.attention_stats``, also its executable specification.

Query-chunked: for each block of queries it computes one [B, Hq, block, Nk] float32 slab of
scores ``q_blk @ k^T * scale`` (kv head ``h // (Hq // Hk)`` for query head h), applies the
causal / boolean / additive mask, takes the softmax and hands the slab to the public
``fastdiag.ops.dist_stats`` with ``query_offset = c0`` and the block's ``row_mask``; the
blocks' DistStats merge in query order (sums add, except the max-reduced slots; head sums
add; rows / top-k concatenate along the query axis). The slab stays within
``SLAB_BYTES`` (one buffer, reused across blocks; softmax in place), so memory is
O(B * Hq * block * Nk), never O(N * Nk). A row with no attendable key softmaxes to NaN and
is counted by dist_stats as non-finite.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fastdiag.ops._attention_stats_layout import (
    H_NUM,
    R_NUM,
    S_MAX_REDUCED,
    S_NUM,
    SLAB_BYTES,
)
from fastdiag.ops._dist_stats import dist_stats


def query_block(b: int, h: int, n: int, nk: int, slab_bytes: int | None = None) -> int:
    """Queries per slab: [b, h, block, nk] float32 within ``slab_bytes`` (default: the module's
    ``SLAB_BYTES``, read at each call so tests can lower it), at least 1."""
    if slab_bytes is None:
        slab_bytes = SLAB_BYTES
    per_query = max(1, b * h * nk * 4)
    return max(1, min(n, slab_bytes // per_query))


def attention_stats_torch(
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
    slab_bytes: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The op's four tensors (see ``_attention_stats_layout``) for validated 4-d inputs."""
    b, hq, n, d = q.shape
    hk, nk = k.shape[1], k.shape[2]
    groups = hq // hk
    dev = q.device
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    lead = [b, n] if reduce_heads else [b, hq, n]
    g = hq if reduce_heads else 1
    if b * hq * n == 0:
        sums = torch.zeros(S_NUM, dtype=torch.float64, device=dev)
        head_sums = torch.full((g, H_NUM), 0.0 if want_heads else math.nan, dtype=torch.float64, device=dev)
        rows = torch.empty([*lead, R_NUM] if want_rows else [0, R_NUM], dtype=torch.float32, device=dev)
        return sums, head_sums, rows, torch.empty([*lead, topk], dtype=torch.int64, device=dev)

    block = query_block(b, hq, n, nk, slab_bytes)
    kt = k.to(torch.float32).reshape(b * hk, nk, d).transpose(1, 2)  # [B*Hk, d, Nk]
    flat = b * hq * block * nk
    scores = torch.empty(flat, dtype=torch.float32, device=dev)  # the one slab, reused
    keys = torch.arange(nk, device=dev) if is_causal else None
    sums = head_sums = None
    rows_parts: list[Tensor] = []
    topk_parts: list[Tensor] = []
    for c0 in range(0, n, block):
        c1 = min(n, c0 + block)
        m = c1 - c0
        size = b * hq * m * nk
        # scale folded into the (small) query block: no extra pass over the slab; the same
        # scores as (q @ k^T) * scale up to one rounding (exact for powers of two, e.g. d = 64)
        qc = (q[:, :, c0:c1].to(torch.float32) * scale).reshape(b * hk, groups * m, d)
        s3 = scores[:size].view(b * hk, groups * m, nk)
        torch.bmm(qc, kt, out=s3)  # (baddbmm's alpha allocates a temporary of the slab's size)
        s4 = s3.view(b, hq, m, nk)
        if is_causal:  # top-left aligned, as SDPA: query i attends keys j <= i
            future = keys[None, :] > torch.arange(c0, c1, device=dev)[:, None]
            s4.masked_fill_(future, -math.inf)
        if attn_mask is not None:
            mc = attn_mask if attn_mask.shape[2] == 1 else attn_mask[:, :, c0:c1]
            if mc.dtype == torch.bool:
                s4.masked_fill_(~mc, -math.inf)
            else:
                s4.add_(mc)
        # softmax in place (the out= variant into another buffer allocates a temporary)
        p4 = torch.ops.aten._softmax.out(s4, -1, False, out=s4)
        rm = None
        if row_mask is not None:
            rm = row_mask[:, c0:c1] if reduce_heads else row_mask[:, :, c0:c1]
        st = dist_stats(
            p4,
            reduce_dim=1 if reduce_heads else None,
            topk=topk,
            tau=tau,
            eps=eps,
            row_mask=rm,
            window=None if window < 0 else window,
            query_offset=c0,
            rows=want_rows,
            heads=want_heads,
        )
        if sums is None:
            sums, head_sums = st.sums.clone(), st.head_sums.clone()
        else:
            summed = sums + st.sums
            maxed = torch.maximum(sums, st.sums)
            sums = summed
            for slot in S_MAX_REDUCED:
                sums[slot] = maxed[slot]
            head_sums = head_sums + st.head_sums
        if want_rows:
            rows_parts.append(st.rows)
        topk_parts.append(st.topk)
    rows = (
        torch.cat(rows_parts, dim=-2)
        if want_rows
        else torch.empty(0, R_NUM, dtype=torch.float32, device=dev)
    )
    topk_out = torch.cat(topk_parts, dim=-2) if len(topk_parts) > 1 else topk_parts[0]
    return sums, head_sums, rows, topk_out
