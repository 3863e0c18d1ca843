"""Portable PyTorch implementation of ``fastdiag::dist_stats`` (the torch backend).

Vectorised, sync-free, and chunked over rows so the temporaries stay a bounded multiple of
one chunk (``CHUNK_ELEMS`` input elements), whatever the size of ``x4``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastdiag.ops._dist_stats import HeadSlot, RowSlot, Slot

CHUNK_ELEMS = 1 << 22


def _entr(p: Tensor) -> Tensor:
    """-p log p elementwise with 0 for p <= 0 (0 log 0 = 0; negative entries ignored)."""
    pos = p > 0
    return torch.where(pos, -p * torch.log(torch.where(pos, p, torch.ones_like(p))), torch.zeros_like(p))


def _probs(chunk: Tensor, from_logits: bool) -> tuple[Tensor, Tensor]:
    """Per-head probabilities [a, G, c, N] in float32 and per-(a, c) finiteness [a, c]."""
    xf = chunk.float()
    if from_logits:
        head_max = xf.amax(dim=-1, keepdim=True)
        bad = torch.isnan(xf).any(-1) | torch.isposinf(xf).any(-1) | torch.isneginf(head_max[..., 0])
        safe_max = torch.where(torch.isfinite(head_max), head_max, torch.zeros_like(head_max))
        e = torch.exp(xf - safe_max)
        p = e / e.sum(dim=-1, keepdim=True)
    else:
        bad = ~torch.isfinite(xf).all(-1)
        p = xf
    finite = ~bad.any(1)
    return torch.where(finite[:, None, :, None], p, torch.zeros_like(p)), finite


def _topk_indices(p: Tensor, k: int) -> Tensor:
    """Top-k indices along the last axis, descending, ties to the lower index."""
    if k == 1:  # argmax returns the first maximal index
        return p.argmax(dim=-1, keepdim=True)
    # stable descending sort keeps equal values in index order
    return torch.sort(p, dim=-1, descending=True, stable=True).indices[..., :k]


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
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Torch backend of the canonical op; see ``fastdiag.ops._dist_stats`` for the contract."""
    a_dim, g_dim, c_dim, n = x4.shape
    dev = x4.device
    sums = torch.zeros(Slot.NUM, dtype=torch.float64, device=dev)
    head_sums = torch.zeros(g_dim, HeadSlot.NUM, dtype=torch.float64, device=dev)
    rows_out = torch.full(
        (a_dim * c_dim if want_rows else 0, RowSlot.NUM), float("nan"), dtype=torch.float32, device=dev
    )
    topk_out = torch.full((a_dim * c_dim, topk), -1, dtype=torch.int64, device=dev)
    if a_dim * c_dim == 0:
        return sums, head_sums, rows_out, topk_out

    keys = torch.arange(n, device=dev)
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
            chunk = x4[a0:a1, :, c0:c1, :]
            ph, finite = _probs(chunk, from_logits)  # [a, G, c, N], [a, c]
            r_idx = (torch.arange(a0, a1, device=dev)[:, None] * c_dim + torch.arange(c0, c1, device=dev)[None, :])
            if row_mask is not None:
                allowed = row_mask[r_idx]
            else:
                allowed = torch.ones_like(finite)
            valid = finite & allowed
            vf = valid.to(torch.float32)
            p = ph.mean(dim=1) if g_dim > 1 else ph[:, 0]  # [a, c, N]
            p = p * vf[..., None]

            ent = _entr(p).sum(-1)
            pmax = p.amax(-1)
            sumsq = (p * p).sum(-1)
            gt_tau = (p > tau).sum(-1).to(torch.float32)
            gt_eps = (p > eps).sum(-1).to(torch.float32)
            rowsum_err = (p.sum(-1) - 1.0).abs() * vf
            abs_dev = (p - inv_n).abs().mean(-1) * vf
            qi = (r_idx % query_len) + query_offset  # [a, c]
            future = torch.where(keys[None, None, :] > qi[..., None], p, torch.zeros_like(p)).sum(-1)
            if window >= 0:
                near = (keys[None, None, :] - qi[..., None]).abs() <= window
                local = torch.where(near, p, torch.zeros_like(p)).sum(-1)
            else:
                local = torch.zeros_like(future)

            vd = vf.double()

            def d(t: Tensor, vd: Tensor = vd) -> Tensor:
                return (t.double() * vd).sum()

            part = torch.stack(
                [
                    vd.sum(),
                    d(ent),
                    d(ent * ent),
                    d(pmax),
                    d(pmax * pmax),
                    d(sumsq),
                    d(gt_tau),
                    d(gt_eps),
                    d(rowsum_err),
                    (rowsum_err.double() * vd).amax(),
                    d(future),
                    (future.double() * vd).amax(),
                    d(local),
                    d(abs_dev),
                    (allowed & ~finite).double().sum(),
                    (~allowed).double().sum(),
                ]
            )
            sums = torch.where(is_max, torch.maximum(sums, part), sums + part)

            hv = vf[:, None, :]  # [a, 1, c]
            ph = ph * hv[..., None]
            head_part = torch.stack(
                [
                    (_entr(ph).sum(-1) * hv).double().sum((0, 2)),
                    (ph.amax(-1) * hv).double().sum((0, 2)),
                    ((ph > tau).sum(-1).to(torch.float32) * hv).double().sum((0, 2)),
                    ((ph * ph).sum(-1) * hv).double().sum((0, 2)),
                ],
                dim=-1,
            )
            head_sums = head_sums + head_part

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
