"""Portable PyTorch implementations of the per-update summary ops (the torch backend; the
C++ kernels in ``csrc/summaries.cpp`` compute the same values in one call each)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from fastdiag.ops import jaccard as _jaccard
from fastdiag.ops import norms as _norms
from fastdiag.ops._dist_stats import HeadSlot, RowSlot, Slot
from fastdiag.ops.usage import usage_counts, usage_stats
from fastdiag.schema import EFFECTIVE_HEAD_ENTROPY


def _log(n: int, like: Tensor) -> Tensor:
    """log n as a float64 0-d tensor (n may be symbolic under torch.compile: no specialisation)."""
    return torch.full((), n, dtype=torch.float64, device=like.device).log()


def _normalised(h: Tensor, n: int) -> Tensor:
    return h / _log(n, h) if n > 1 else h * math.nan


def dist_summary_torch(
    sums: Tensor,
    head_sums: Tensor,
    topk: Tensor,
    prev_top: Tensor | None,
    prev_bitmap: Tensor | None,
    n: int,
    from_heads: bool,
    jaccard: bool,
) -> tuple[Tensor, Tensor]:
    """Torch implementation of ``fastdiag::dist_summary`` (see ``summaries.dist_summary``)."""
    sums = sums.to(torch.float64)
    device = sums.device
    nan = torch.full((), math.nan, dtype=torch.float64, device=device)
    count = sums[Slot.COUNT]
    h = sums[Slot.ENTROPY] / count
    m = sums[Slot.MAX] / count
    var = (sums[Slot.MAX_SQ] - count * m * m) / (count - 1)
    if from_heads:
        head_sums = head_sums.to(torch.float64)
        heads = head_sums.shape[0]
        head_entropy = head_sums[:, HeadSlot.ENTROPY]
        gt_tau = head_sums[:, HeadSlot.GT_TAU].sum()
    else:
        heads = 1
        head_entropy = sums[Slot.ENTROPY].reshape(1)
        gt_tau = sums[Slot.GT_TAU]
    per_head = _normalised(head_entropy / count, n)
    effective = (per_head < EFFECTIVE_HEAD_ENTROPY).to(torch.float64).mean()
    pattern = per_query = nan
    bitmap = torch.zeros(0, dtype=torch.bool, device=device)
    if jaccard:
        bitmap = _jaccard.index_bitmap(topk, n)
        if prev_bitmap is not None:
            pattern = _jaccard.bitmap_jaccard(bitmap, prev_bitmap)
            if prev_top is not None and prev_top.shape == topk.shape:
                per_query = _jaccard.topk_jaccard_per_query(topk, prev_top)
    values = torch.stack(
        [
            h,
            _normalised(h, n),
            m,
            var.clamp_min(0).sqrt(),
            _log(n, h) - h,
            sums[Slot.GT_TAU] / (count * n),
            sums[Slot.GT_EPS] / count,
            1 - sums[Slot.GT_EPS] / (count * n),
            sums[Slot.NONFINITE],
            gt_tau / (count * heads * n),
            head_entropy.sum() / (count * heads),
            torch.where(count > 0, effective, nan),
            pattern,
            per_query,
        ]
    )
    return values, bitmap


def usage_summary_torch(
    indices: Tensor, num_sets: int, prev_active: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Torch implementation of ``fastdiag::usage_summary``."""
    u = usage_stats(indices, num_sets)
    nan = torch.full((), math.nan, dtype=torch.float64, device=indices.device)
    reuse = nan if prev_active is None else _jaccard.bitmap_jaccard(u.active, prev_active)
    values = torch.stack(
        [
            torch.where(u.total > 0, u.active_ratio, nan),
            u.size_mean,
            u.size_std,
            u.entropy,
            u.entropy_norm,
            u.gini,
            u.top1_share,
            reuse,
            u.variance,
            u.out_of_range.to(torch.float64),
            u.active_ratio,
        ]
    )
    return values, u.active


def param_norms_torch(
    params: Sequence[Tensor], grads: Sequence[Tensor], prev: Sequence[Tensor], has_prev: bool
) -> Tensor:
    """Torch implementation of ``fastdiag::param_norms_`` (``prev`` refreshed in place)."""
    prev = prev if has_prev else None
    device = params[0].device
    zero = torch.zeros((), dtype=torch.float64, device=device)
    grad_norm = _norms.total_norm(grads).to(device) if grads else zero
    param_norm = _norms.total_norm(params).to(device)
    if prev is None:
        change = torch.full((), math.nan, dtype=torch.float64, device=device)
    else:
        change = _norms.diff_norms(params, prev).to(device).square().sum().sqrt()
        torch._foreach_copy_(list(prev), list(params))
    norms = torch.stack([grad_norm, param_norm, change])
    # a norm over NaN entries is reported as +inf: non-finite data, not "undefined" (NaN)
    bad = norms.isnan()
    if prev is None:
        bad[2] = False
    norms = torch.where(bad, math.inf, norms)
    flags = torch.stack([(norms[0] == 0).to(torch.float64), (norms[2] > 0).to(torch.float64)])
    if prev is None:
        flags[1] = math.nan
    return torch.cat([norms, flags])


def accumulate_torch(state: Tensor, idx: Tensor, src: Tensor, values: Tensor) -> None:
    """state [K, 3]: state[idx[j]] += (v, 1, 0) for a finite v = values[src[j]], (0, 0, 1) for an
    infinite one, nothing for NaN (undefined), in place (``fastdiag::accumulate_``)."""
    values = values.index_select(0, src)
    ok = torch.isfinite(values)
    rows = torch.stack(
        [torch.where(ok, values, 0.0), ok.to(values.dtype), values.isinf().to(values.dtype)], dim=1
    )
    state.index_add_(0, idx, rows)


def attention_values_torch(sums: Tensor, rows: Tensor, nk: int, threshold: float) -> Tensor:
    """``ATTENTION_FIELDS`` float64 [5] of one ``dist_stats`` / ``attention_stats`` result taken
    with every (b, h, i) as its own row (no ``reduce_dim``), ``rows=True`` and ``eps=0``:
    ``sums`` [Slot.NUM], ``rows`` [B, H, N, RowSlot.NUM] (NaN rows invalid), Nk = ``nk`` keys.

    entropy, sparsity (> tau over the Nk keys), top-1: means over the valid per-head rows.
    Normalised entropy: per valid row with n = ``rows[..., GT_EPS]`` >= 2 entries > 0 (its
    attendable keys), ``H / log n``; ``entropy_norm`` its mean over those rows, effective heads
    the share of the H heads whose mean of it is < ``threshold`` (a head without such a row is
    not effective). NaN when no row is valid; ``entropy_norm`` NaN when no row has n >= 2.
    """
    sums = sums.to(torch.float64)
    count = sums[Slot.COUNT]
    heads = rows.shape[1]
    entropy = sums[Slot.ENTROPY] / count
    sparsity = sums[Slot.GT_TAU] / (count * nk)
    top1 = sums[Slot.MAX] / count
    r = rows.to(torch.float64).transpose(0, 1).reshape(heads, -1, rows.shape[-1])
    n = r[..., RowSlot.GT_EPS]
    ok = n >= 2  # NaN (invalid) rows compare False
    u = torch.where(ok, r[..., RowSlot.ENTROPY] / n.clamp_min(2).log(), 0.0)
    per_head = u.sum(1) / ok.sum(1)  # NaN for a head without a row of >= 2 keys
    effective = (per_head < threshold).to(torch.float64).mean()
    nan = torch.full((), math.nan, dtype=torch.float64, device=sums.device)
    effective = torch.where(count > 0, effective, nan)
    norm = u.sum() / ok.sum()
    return torch.stack([entropy, sparsity, top1, effective, norm])


def over_capacity_torch(topk: Tensor, tokens: Tensor, num_experts: int, capacity_factor: float) -> Tensor:
    """Share of the top-k assignments ``topk`` [T, k] (-1 = invalid token) beyond each expert's
    capacity ``C = ceil(capacity_factor * tokens * k / E)``: ``sum_e max(c_e - C, 0) / sum_e c_e``
    (float64 0-d, NaN without an assignment); ``tokens`` = the valid tokens (a 0-d tensor)."""
    counts, _ = usage_counts(topk, num_experts)
    c = counts.to(torch.float64)
    k = topk.shape[-1]
    cap = torch.ceil(tokens.to(torch.float64) * (capacity_factor * k / num_experts))
    return (c - cap).clamp_min(0).sum() / c.sum()
