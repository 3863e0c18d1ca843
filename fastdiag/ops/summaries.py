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
  (per-head entropy, sparsity, top-1, effective heads; docs/metrics.md §5);
* :func:`param_norms`   gradient norm, parameter norm and change against the previous
  parameters (refreshed in place).

Each is an op on the template: the C++ extension's fused CPU kernel (``csrc/summaries.cpp``, one
call per summary) or the portable torch code (``_summaries_torch.py``, a few dozen small kernels,
never a host synchronisation), as ``fastdiag.backends`` decides; the field layouts live in
``_summaries_layout.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fastdiag import _extension, backends
from fastdiag.ops import _summaries_layout as _layout
from fastdiag.ops import _summaries_torch as _torch
from fastdiag.ops._dist_stats import DistStats
from fastdiag.ops._summaries_layout import DIST, DIST_FIELDS, PARAM_FIELDS, USAGE, USAGE_FIELDS

__all__ = [
    "DIST",
    "DIST_FIELDS",
    "PARAM_FIELDS",
    "USAGE",
    "USAGE_FIELDS",
    "accumulate",
    "attention_values",
    "dist_summary",
    "param_norms",
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
    """float64 [3] (gradient norm, parameter norm, change ||params - prev||; NaN without ``prev``).

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


def attention_values(sums: Tensor, head_sums: Tensor, nk: int, threshold: float) -> Tensor:
    """[entropy, sparsity, top1, effective heads] float64 [4] of one ``dist_stats`` result
    (``reduce_dim=1``, per-head sums ``head_sums`` [H, ...]) over Nk = ``nk`` keys.

    Means over the valid B*H*N per-head rows; effective heads = share of heads whose mean
    entropy / log Nk is below ``threshold`` (NaN when no row is valid, none when Nk = 1).
    """
    impl = backends.implementation("attention_values", sums.device, torch.float64)
    return impl(sums, head_sums, nk, threshold)
