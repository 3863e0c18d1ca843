"""Portable PyTorch implementation of ``fastdiag::dist_stats`` (the torch backend).

Vectorised, sync-free, and chunked over rows so the temporaries stay a bounded multiple of
one chunk (``CHUNK_ELEMS`` input elements), whatever the size of ``x4``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastdiag.ops._dist_stats import HeadSlot, RowSlot, Slot

CHUNK_ELEMS = 1 << 22  # fewer, larger chunks: the per-chunk Python cost outweighs cache misses
_TINY = torch.finfo(torch.float32).tiny


def _entr_sum(p: Tensor) -> Tensor:
    """sum_j -p_j log p_j over the last axis (0 log 0 = 0; negative entries contribute 0).

    As q log(q + tiny), q = max(p, 0): the same as q log q for every normal q (adding the
    smallest normal changes nothing), 0 for q = 0; vectorised log, unlike ``special.entr``."""
    q = p.clamp_min(0)
    return q.add(_TINY).log_().mul_(q).sum(-1).neg_()


def _sumsq(p: Tensor) -> Tensor:
    return torch.linalg.vector_norm(p, dim=-1).square()


def _count_gt(p: Tensor, t: float) -> Tensor:
    """#entries > t along the last axis, float32 (an int32 sum: a bool sum widens to int64)."""
    return (p > t).sum(-1, dtype=torch.int32).to(torch.float32)


def _probs(chunk: Tensor, from_logits: bool) -> tuple[Tensor, Tensor]:
    """Per-head probabilities [a, G, c, N] (float32) and per-row finiteness [a, c].

    Non-finite rows are not zeroed (that would cost a pass): their statistics come out NaN and
    are dropped by ``torch.where`` on the per-row values. A head is non-finite when its softmax
    normaliser is (logits) or its max |entry| is (probabilities): NaN and +-inf propagate into
    both, while a huge finite entry does not.
    """
    xf = chunk.float()
    if from_logits:
        e = torch.exp(xf - xf.amax(dim=-1, keepdim=True))
        z = e.sum(dim=-1, keepdim=True)
        return e / z, torch.isfinite(z[..., 0]).all(1)
    finite = torch.isfinite(xf.amax(dim=-1)) & torch.isfinite(xf.amin(dim=-1))  # NaN propagates
    return xf, finite.all(1)


def _topk_indices(p: Tensor, k: int) -> Tensor:
    """Top-k indices along the last axis, descending, ties to the lower index."""
    if k == 1:  # argmax returns the first maximal index
        return p.argmax(dim=-1, keepdim=True)
    # Unique int64 keys make torch.topk's order exact: the float32 bits made order-preserving
    # (negative floats flip their magnitude bits) in the high half, the reversed index in the low
    # half, so equal values rank the lower index first. ``+ 0.0`` folds -0.0 into +0.0.
    bits = (p + 0.0).contiguous().view(torch.int32).to(torch.int64)
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    index = torch.arange(p.shape[-1], device=p.device, dtype=torch.int64)
    keys = bits * (1 << 32) + ((1 << 32) - 1 - index)
    return torch.topk(keys, k, dim=-1, sorted=True).indices


def _masses(p: Tensor, base: Tensor, offset: int, window: int, query_len: int) -> tuple[Tensor, Tensor]:
    """Future mass (keys j > q) and local mass (|j - q| <= window) per row, from one cumsum;
    q = base + offset with base = the row's query index (< query_len)."""
    n = p.shape[-1]
    cs = p.cumsum(-1)
    total = cs[..., -1]
    # bounds past either end of the row change nothing, so the Python-int shifts are clamped
    # there before they meet the int64 tensor (no overflow for any offset or window)
    far = query_len + n + 2

    def upto(shift: int) -> Tensor:  # sum_{j <= base + shift} p_j
        j = base + max(-far, min(far, shift))
        got = cs.gather(-1, j.clamp(0, n - 1).unsqueeze(-1)).squeeze(-1)
        return torch.where(j < 0, torch.zeros_like(got), got)

    future = total - upto(offset)
    if window < 0:
        return future, torch.zeros_like(future)
    return future, upto(offset + window) - upto(offset - window - 1)


def dist_stats_torch(
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
    """Torch backend of the canonical op; see ``fastdiag.ops._dist_stats`` for the contract."""
    a_dim, g_dim, c_dim, n = x4.shape
    dev = x4.device
    sums = torch.zeros(Slot.NUM, dtype=torch.float64, device=dev)
    head_sums = torch.full(
        (g_dim, HeadSlot.NUM), 0.0 if want_heads else float("nan"), dtype=torch.float64, device=dev
    )
    rows_out = torch.full(
        (a_dim * c_dim if want_rows else 0, RowSlot.NUM), float("nan"), dtype=torch.float32, device=dev
    )
    topk_out = torch.full((a_dim * c_dim, topk), -1, dtype=torch.int64, device=dev)
    if a_dim * c_dim == 0:
        return sums, head_sums, rows_out, topk_out

    is_max = torch.zeros(Slot.NUM, dtype=torch.bool)
    is_max[list(Slot.MAX_REDUCED)] = True
    is_max = is_max.to(dev)
    per_c = max(1, CHUNK_ELEMS // max(1, g_dim * n))
    per_a = max(1, per_c // c_dim) if per_c >= c_dim else 1
    c_step = c_dim if per_c >= c_dim else per_c
    inv_n = 1.0 / n
    for a0 in range(0, a_dim, per_a):
        a1 = min(a_dim, a0 + per_a)
        for c0 in range(0, c_dim, c_step):
            c1 = min(c_dim, c0 + c_step)
            ph, finite = _probs(x4[a0:a1, :, c0:c1, :], from_logits)
            r_idx = torch.arange(a0, a1, device=dev)[:, None] * c_dim + torch.arange(c0, c1, device=dev)
            allowed = row_mask[r_idx] if row_mask is not None else torch.ones_like(finite)
            valid = finite & allowed  # [a, c]
            p = ph.mean(dim=1) if g_dim > 1 else ph[:, 0]  # [a, c, N]

            ent = _entr_sum(p)
            pmax = p.amax(-1)
            sumsq = _sumsq(p)
            gt_tau = _count_gt(p, tau)
            gt_eps = _count_gt(p, eps)
            future, local = _masses(p, r_idx % query_len, query_offset, window, query_len)
            rowsum_err = (future.new_tensor(1.0) - (p.sum(-1))).abs()
            abs_dev = (p - inv_n).abs().mean(-1)

            zero = torch.zeros((), dtype=torch.float64, device=dev)

            def d(t: Tensor, valid: Tensor = valid, zero: Tensor = zero) -> Tensor:
                return torch.where(valid, t.double(), zero)  # drops NaN of invalid rows

            part = torch.stack(
                [
                    valid.double().sum(),
                    d(ent).sum(),
                    d(ent * ent).sum(),
                    d(pmax).sum(),
                    d(pmax * pmax).sum(),
                    d(sumsq).sum(),
                    d(gt_tau).sum(),
                    d(gt_eps).sum(),
                    d(rowsum_err).sum(),
                    d(rowsum_err).amax(),
                    d(future).sum(),
                    d(future).amax(),
                    d(local).sum(),
                    d(abs_dev).sum(),
                    (allowed & ~finite).double().sum(),
                    (~allowed).double().sum(),
                ]
            )
            sums = torch.where(is_max, torch.maximum(sums, part), sums + part)

            if not want_heads:
                pass
            elif g_dim > 1:
                per_head = [
                    _entr_sum(ph),
                    ph.amax(-1),
                    _count_gt(ph, tau),
                    _sumsq(ph),
                ]
            else:  # the one head is the row itself
                per_head = [ent[:, None], pmax[:, None], gt_tau[:, None], sumsq[:, None]]
            if want_heads:
                hv = valid[:, None, :]  # [a, 1, c]
                head_sums = head_sums + torch.stack(
                    [torch.where(hv, t.double(), zero).sum((0, 2)) for t in per_head], dim=-1
                )

            flat_r = r_idx.reshape(-1)
            if want_rows:
                nan = torch.full_like(ent, float("nan"))
                stats = torch.stack(
                    [torch.where(valid, v, nan) for v in (ent, pmax, gt_eps, sumsq)], dim=-1
                )
                rows_out[flat_r] = stats.reshape(-1, RowSlot.NUM)
            if topk > 0:
                idx = _topk_indices(p, topk)
                idx = torch.where(valid[..., None], idx, torch.full_like(idx, -1))
                topk_out[flat_r] = idx.reshape(-1, topk)
    return sums, head_sums, rows_out, topk_out
