"""Per-update summaries: from the raw sums of the statistics ops to a class's value vector.

Every per-update formula of the diagnostics classes lives here (docs/metrics.md §1-§3), each as
one function producing one float64 vector whose layout is given by the ``*_FIELDS`` tuples:

* :func:`dist_summary`  every derived value of a :func:`~fastdiag.ops.dist_stats` result
  (entropy mean / normalised, top-1 mean / std, KL to uniform, sparsity, support, prune
  fraction, per-head sparsity / entropy / effective heads) and the two top-k Jaccards against
  the previous update;
* :func:`usage_summary` usage statistics of bank indices (:mod:`fastdiag.ops.usage`) and the
  set-reuse Jaccard against the previous active set;
* :func:`param_norms`   gradient norm, parameter norm and change against the previous
  parameters (refreshed in place).

On the CPU each is one fused op of the C++ extension (``csrc/summaries.cpp``); on other devices,
or with the ``torch`` backend, the torch code below computes the same values (a few dozen small
kernels, never a host synchronisation).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from fastdiag.ops._dist_stats import DistStats, HeadSlot, Slot
from fastdiag.schema import EFFECTIVE_HEAD_ENTROPY

__all__ = [
    "DIST_FIELDS",
    "USAGE_FIELDS",
    "PARAM_FIELDS",
    "cpu_ops_available",
    "dist_summary",
    "usage_summary",
    "param_norms",
]

DIST_FIELDS: tuple[str, ...] = (
    "entropy_mean",  # mean row entropy h (nats)
    "entropy_norm",  # h / log n (NaN for n = 1)
    "top1_mean",
    "top1_std",  # unbiased std of the row max
    "kl_uniform",  # log n - h
    "sparsity",  # share of entries > tau
    "support_mean",  # mean number of entries > eps
    "prune_frac",  # share of entries <= eps
    "nonfinite_rows",
    "head_sparsity",  # share of per-head entries > tau (the row itself without heads)
    "head_entropy_mean",  # mean per-head row entropy
    "effective_heads",  # share of heads whose mean H / log n < EFFECTIVE_HEAD_ENTROPY
    "pattern_jaccard",  # Jaccard of the flattened top-k sets, now vs previous update
    "topk_jaccard_per_query",  # mean per-row top-k Jaccard, now vs previous update
)
DIST = {name: i for i, name in enumerate(DIST_FIELDS)}

USAGE_FIELDS: tuple[str, ...] = (
    "active_ratio",  # #active / S, NaN when nothing was routed
    "size_mean",
    "size_std",
    "entropy",
    "entropy_norm",
    "gini",
    "top1_share",
    "reuse_jaccard",  # active set now vs previous update (NaN without one)
    "variance",
    "out_of_range",
    "active_ratio_raw",  # #active / S (0 when nothing was routed)
)
USAGE = {name: i for i, name in enumerate(USAGE_FIELDS)}

PARAM_FIELDS: tuple[str, ...] = ("gradient_norm", "param_norm", "weight_change")

_available: list[bool] = []


def cpu_ops_available() -> bool:
    """True when the C++ summary ops are registered (the extension is built and loaded)."""
    if not _available:
        from fastdiag import _extension, backends

        if backends.load_extension() is None:
            return False
        _available.append(_extension.has_kernel("dist_summary", "CPU"))
    return _available[0]


def use_cpu_op(device: torch.device) -> bool:
    """Whether the fused C++ summary ops run for tensors on ``device`` (the ``cpu`` backend)."""
    if device.type != "cpu":
        return False
    from fastdiag import backends

    return backends.get_backend() in ("auto", "cpu") and cpu_ops_available()


def _register_fakes() -> None:
    from fastdiag import _extension

    def accumulate_fake(state: Tensor, slots: Tensor, src: Tensor, values: Tensor) -> None:
        return None

    def dist_fake(sums, head_sums, topk, prev_top, prev_bitmap, n, from_heads, jaccard):
        return sums.new_empty(len(DIST_FIELDS), dtype=torch.float64), sums.new_empty(
            n if jaccard else 0, dtype=torch.bool
        )

    def usage_fake(indices, num_sets, prev_active):
        return (
            indices.new_empty(len(USAGE_FIELDS), dtype=torch.float64),
            indices.new_empty(num_sets, dtype=torch.bool),
        )

    def param_fake(params, grads, prev, has_prev):
        return params[0].new_empty(len(PARAM_FIELDS), dtype=torch.float64)

    _extension.register_fake("accumulate_", accumulate_fake)
    _extension.register_fake("dist_summary", dist_fake)
    _extension.register_fake("usage_summary", usage_fake)
    _extension.register_fake("param_norms_", param_fake)


_register_fakes()


# ------------------------------------------------------------------------------------------------
# dist_stats -> values
# ------------------------------------------------------------------------------------------------


def dist_summary(
    stats: DistStats,
    n: int,
    *,
    from_heads: bool = False,
    prev_top: Tensor | None = None,
    prev_bitmap: Tensor | None = None,
    jaccard: bool = False,
) -> tuple[Tensor, Tensor]:
    """(float64 [len(DIST_FIELDS)], bool bitmap [n] of the top-k indices or [0] without ``jaccard``).

    n: the distribution length (last axis). from_heads: per-head values from ``head_sums``
    (attention [B, H, N, Nk]); otherwise the row itself is the one head. jaccard: build the top-k
    bitmap of ``stats.topk`` and compare with ``prev_bitmap`` / ``prev_top`` (NaN without them;
    the per-query one also NaN when the top-k shapes differ).
    """
    sums = stats.sums
    if use_cpu_op(sums.device):
        return torch.ops.fastdiag.dist_summary(
            sums, stats.head_sums, stats.topk, prev_top, prev_bitmap, n, from_heads, jaccard
        )
    return _dist_summary_torch(stats, n, from_heads, prev_top, prev_bitmap, jaccard)


def _normalised(h: Tensor, n: int) -> Tensor:
    return h / math.log(n) if n > 1 else h * math.nan


def _dist_summary_torch(
    stats: DistStats,
    n: int,
    from_heads: bool,
    prev_top: Tensor | None,
    prev_bitmap: Tensor | None,
    jaccard: bool,
) -> tuple[Tensor, Tensor]:
    from fastdiag.ops import jaccard as _jaccard

    sums = stats.sums.to(torch.float64)
    device = sums.device
    nan = torch.full((), math.nan, dtype=torch.float64, device=device)
    count = sums[Slot.COUNT]
    h = sums[Slot.ENTROPY] / count
    m = sums[Slot.MAX] / count
    var = (sums[Slot.MAX_SQ] - count * m * m) / (count - 1)
    if from_heads:
        head_sums = stats.head_sums.to(torch.float64)
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
        bitmap = _jaccard.index_bitmap(stats.topk, n)
        if prev_bitmap is not None:
            pattern = _jaccard.bitmap_jaccard(bitmap, prev_bitmap)
            if prev_top is not None and prev_top.shape == stats.topk.shape:
                per_query = _jaccard.topk_jaccard_per_query(stats.topk, prev_top)
    values = torch.stack(
        [
            h,
            _normalised(h, n),
            m,
            var.clamp_min(0).sqrt(),
            math.log(n) - h,
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


# ------------------------------------------------------------------------------------------------
# bank indices -> usage values
# ------------------------------------------------------------------------------------------------


def usage_summary(indices: Tensor, num_sets: int, prev_active: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(float64 [len(USAGE_FIELDS)], bool active [num_sets]) of the choices in ``indices``.

    indices: integer, any shape (< 0 padding; >= num_sets counted in ``out_of_range`` only).
    """
    if use_cpu_op(indices.device):
        return torch.ops.fastdiag.usage_summary(indices, num_sets, prev_active)
    from fastdiag.ops import jaccard as _jaccard
    from fastdiag.ops.usage import usage_stats

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


# ------------------------------------------------------------------------------------------------
# parameters -> norms
# ------------------------------------------------------------------------------------------------


def param_norms(
    params: Sequence[Tensor], grads: Sequence[Tensor], prev: Sequence[Tensor] | None
) -> Tensor:
    """float64 [3] (gradient norm, parameter norm, change ||params - prev||; NaN without ``prev``).

    ``prev`` (same shapes and dtypes as ``params``, contiguous) is overwritten with ``params``.
    The gradient norm is 0 without gradients.
    """
    device = params[0].device
    if use_cpu_op(device) and all(p.device.type == "cpu" for p in params):
        return torch.ops.fastdiag.param_norms_(list(params), list(grads), list(prev or ()), prev is not None)
    from fastdiag.ops import norms as _norms

    zero = torch.zeros((), dtype=torch.float64, device=device)
    grad_norm = _norms.total_norm(grads).to(device) if grads else zero
    param_norm = _norms.total_norm(params).to(device)
    if prev is None:
        change = torch.full((), math.nan, dtype=torch.float64, device=device)
    else:
        change = _norms.diff_norms(params, prev).to(device).square().sum().sqrt()
        torch._foreach_copy_(list(prev), list(params))
    return torch.stack([grad_norm, param_norm, change])
