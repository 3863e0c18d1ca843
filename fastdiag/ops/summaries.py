"""Per-update summaries: from the raw sums of the statistics ops to a class's value vector.

Every per-update formula of the diagnostics classes lives here (docs/metrics.md §1-§3), each as
one function producing one float64 vector whose layout is given by the ``*_FIELDS`` tuples:

* :func:`dist_summary`  every derived value of a :func:`~fastdiag.ops.dist_stats` result
  (entropy mean / normalised, top-1 mean / std, KL to uniform, sparsity, support, prune
  fraction, per-head sparsity / entropy / effective heads) and the two top-k Jaccards against
  the previous update;
* :func:`usage_summary` usage statistics of bank indices (:mod:`fastdiag.ops.usage`) and the
  set-reuse Jaccard against the previous active set;
* :func:`attention_values` the per-layer attention values of the training integration
  (per-head entropy, sparsity, top-1, effective heads, causal-aware normalised entropy;
  docs/metrics.md §5);
* :func:`router_summary` the per-layer router values of the training integration (routing
  entropy, confidence, expert load balance, routing stability, capacity overflow; §5);
* :func:`param_norms`   gradient norm, parameter norm and change against the previous
  parameters (refreshed in place).

Each is an op on the template: the C++ extension's fused CPU kernel (``csrc/summaries.cpp``, one
call per summary) or the portable torch code (``_summaries_torch.py``, a few dozen small kernels,
never a host synchronisation), as ``fastdiag.backends`` decides; the field layouts live in
``_summaries_layout.py``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from fastdiag import _extension, backends
from fastdiag.ops import _summaries_layout as _layout
from fastdiag.ops import _summaries_torch as _torch
from fastdiag.ops._dist_stats import DistStats, Slot
from fastdiag.ops._summaries_layout import (
    ATTENTION_FIELDS,
    DIST,
    DIST_FIELDS,
    PARAM_FIELDS,
    ROUTER_FIELDS,
    USAGE,
    USAGE_FIELDS,
)

__all__ = [
    "ATTENTION_FIELDS",
    "DIST",
    "DIST_FIELDS",
    "PARAM_FIELDS",
    "ROUTER_FIELDS",
    "USAGE",
    "USAGE_FIELDS",
    "accumulate",
    "attention_values",
    "dist_summary",
    "param_norms",
    "router_summary",
    "usage_summary",
]


def _register(op: str, kernel: str, torch_impl, fake) -> None:
    _extension.register_fake(kernel, fake)
    backends.register(
        op,
        {
            "cpu": backends.Impl(lambda: _extension.op(kernel), devices=("cpu",), kernel=kernel),
            "torch": backends.Impl(lambda: torch_impl),
        },
    )


_register("accumulate", "accumulate_", _torch.accumulate_torch, _layout.accumulate_fake)
_register("dist_summary", "dist_summary", _torch.dist_summary_torch, _layout.dist_summary_fake)
_register("usage_summary", "usage_summary", _torch.usage_summary_torch, _layout.usage_summary_fake)
_register("param_norms", "param_norms_", _torch.param_norms_torch, _layout.param_norms_fake)
_register(
    "attention_values", "attention_values", _torch.attention_values_torch, _layout.attention_values_fake
)


def accumulate(state: Tensor, idx: Tensor, src: Tensor, values: Tensor) -> None:
    """state[idx[j]] += (values[src[j]], 1) for every finite one (in place): state float64
    [K, 2] (sum, count), idx / src int64 [J], values float64 [V], all on one device."""
    backends.implementation("accumulate", state.device, state.dtype)(state, idx, src, values)


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
    impl = backends.implementation("dist_summary", sums.device, sums.dtype)
    return impl(sums, stats.head_sums, stats.topk, prev_top, prev_bitmap, n, from_heads, jaccard)


def usage_summary(
    indices: Tensor, num_sets: int, prev_active: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(float64 [len(USAGE_FIELDS)], bool active [num_sets]) of the choices in ``indices``.

    indices: integer, any shape (< 0 padding; >= num_sets counted in ``out_of_range`` only).
    """
    impl = backends.implementation("usage_summary", indices.device, torch.float64)
    return impl(indices, num_sets, prev_active)


def param_norms(
    params: Sequence[Tensor], grads: Sequence[Tensor], prev: Sequence[Tensor] | None
) -> Tensor:
    """float64 [5] (gradient norm, parameter norm, change ||params - prev|| (NaN without
    ``prev``), gradient_missing, moved): ``PARAM_FIELDS``.

    ``prev`` (same shapes and dtypes as ``params``, contiguous) is overwritten with ``params``.
    The gradient norm is 0 without gradients. Tensors on several devices run the torch code.
    """
    device = params[0].device
    same = all(p.device == device for p in params) and all(g.device == device for g in grads)
    op = "param_norms" if same else None
    impl = (
        backends.implementation(op, device, torch.float64)
        if op is not None
        else _torch.param_norms_torch
    )
    return impl(list(params), list(grads), list(prev or ()), prev is not None)


def attention_values(sums: Tensor, rows: Tensor, nk: int, threshold: float) -> Tensor:
    """``ATTENTION_FIELDS`` float64 [5] (entropy, sparsity, top1, effective heads, entropy_norm)
    of one :func:`~fastdiag.ops.dist_stats` / :func:`~fastdiag.ops.attention_stats` result taken
    with every (b, h, i) as its own row (no ``reduce_dim``), ``rows=True`` and ``eps=0``:
    ``sums`` [Slot.NUM] and ``rows`` [B, H, N, RowSlot.NUM], over Nk = ``nk`` keys.

    entropy / sparsity (entries > tau among the Nk) / top1: means over the valid per-head rows.
    Causal-aware normalisation: a valid row's attendable keys are its entries > 0
    (``RowSlot.GT_EPS`` with ``eps=0``: masked keys of a softmax with -inf / dtype-min masks are
    exactly 0), n of them; its normalised entropy is ``H / log n``, defined for n >= 2 (a row
    with one attendable key has no spread to measure and is left out). ``entropy_norm`` = mean
    of it over those rows (NaN when none); effective heads = share of the H heads whose mean of
    it is < ``threshold`` (a head with no such row is not effective; NaN when no row is valid).
    Uniform attention over each row's attendable keys reads 1.0, causal or padded.
    """
    impl = backends.implementation("attention_values", sums.device, torch.float64)
    return impl(sums, rows, nk, threshold)


def router_summary(
    stats: DistStats,
    num_experts: int,
    *,
    capacity_factor: float | None = None,
    prev_top: Tensor | None = None,
    prev_bitmap: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(float64 [len(ROUTER_FIELDS)], bool bitmap [E] of the experts chosen) of one router call.

    stats: ``dist_stats(logits [T, E], from_logits=True, topk=k, row_mask=valid tokens)``
    (invalid tokens have top-k -1 and count nowhere). With ``c_e`` = the number of valid tokens
    whose top-k holds expert e (``usage_summary`` of the top-k indices), T the valid tokens:
    entropy_norm = mean ``H(softmax) / log E`` (NaN for E = 1), top1 = mean softmax max,
    load_gini = ``sum_ij |c_i - c_j| / (2 E sum c)``, active_ratio = share of experts with
    ``c_e > 0``, load_max_over_mean = ``max c / mean c``, topk_jaccard = mean over the tokens
    valid now and in ``prev_top`` (same shape) of the Jaccard of their top-k sets (NaN without
    ``prev_top`` / ``prev_bitmap`` or when the shapes differ), over_capacity = share of the
    assignments beyond ``ceil(capacity_factor * T * k / E)`` per expert (NaN without a
    capacity factor). Everything NaN (not counted) when no token is valid.
    """
    dist, bitmap = dist_summary(stats, num_experts, prev_top=prev_top, prev_bitmap=prev_bitmap, jaccard=True)
    usage, _ = usage_summary(stats.topk, num_experts)
    nan = torch.full((), math.nan, dtype=torch.float64, device=dist.device)
    if capacity_factor is None:
        over = nan
    else:
        over = _torch.over_capacity_torch(stats.topk, stats.sums[Slot.COUNT], num_experts, float(capacity_factor))
    values = torch.stack(
        [
            dist[DIST["entropy_norm"]],
            dist[DIST["top1_mean"]],
            usage[USAGE["gini"]],
            usage[USAGE["active_ratio"]],
            usage[USAGE["top1_share"]] * num_experts,
            dist[DIST["topk_jaccard_per_query"]],
            over.to(torch.float64),
        ]
    )
    return values, bitmap
