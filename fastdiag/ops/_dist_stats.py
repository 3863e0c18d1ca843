"""``dist_stats``: every row statistic of a distribution tensor in one read.

The last axis of ``x`` is a distribution (probabilities, or logits with ``from_logits=True``).
One pass produces per-row statistics (on request) and reduced float64 sums over the valid
rows, so a diagnostics class turns an [B, H, N, Nk] attention tensor into entropy, top-1,
top-k, sparsity, support, row-sum error, causal and local mass without a second read and
without a host synchronisation.

Canonical form shared by every backend: the wrapper views ``x`` as ``x4`` of shape
[A, G, C, N] (G = the ``reduce_dim`` axis, averaged while reading, e.g. heads; G = 1 without
``reduce_dim``). Row ``r = a * C + c`` is the distribution ``mean_g x4[a, g, c, :]``
(``mean_g softmax(x4[a, g, c, :])`` for logits). ``i = r % query_len`` is the row's index
along the last leading axis, used for future mass (keys ``j > i + query_offset``) and local
mass (``|j - (i + query_offset)| <= window``).

A row is *valid* when ``row_mask`` allows it and it is finite: for probabilities every entry
of every head is finite; for logits no entry is NaN or +inf and the row max of each head is
not -inf. (The triton backend, and the torch backend with ``heads=False``, read probability
finiteness off the head mean: finite entries beyond ~1e37 whose float32 head sum overflows
make the row non-finite there too; its statistics would be inf / NaN anyway.) Invalid rows are counted (``Slot.NONFINITE`` / ``Slot.MASKED``) and excluded from
every other sum; their per-row outputs are NaN and their top-k indices -1.

Definitions, per valid row ``p`` of length N: ``entropy = -sum_{p_j > 0} p_j log p_j``
(nats, 0 log 0 = 0, non-positive entries contribute 0), ``max = max_j p_j``,
``topk`` = indices of the k largest entries, descending, ties to the lower index,
``sumsq = sum_j p_j^2``, ``gt_tau = #{j: p_j > tau}``, ``gt_eps = #{j: p_j > eps}``,
``rowsum_err = |sum_j p_j - 1|``, ``abs_dev = mean_j |p_j - 1/N|``.
Per head g (only meaningful with ``reduce_dim``) the same entropy / max / gt_tau / sumsq
of the head's own row ``x4[a, g, c, :]`` (softmaxed for logits). They cost a logarithm per
input element per head; with ``heads=False`` (op argument ``want_heads``) no backend computes
any of them and ``head_sums`` keeps its shape [G, 4] but is all NaN, while every other output is
the same as with ``heads=True``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from fastdiag import _extension, backends
from fastdiag.ops._dist_stats_layout import MAX_TOPK, HeadSlot, RowSlot, Slot, fake
from fastdiag.ops._dist_stats_torch import dist_stats_torch_op

__all__ = [
    "MAX_TOPK",
    "DistStats",
    "HeadSlot",
    "RowSlot",
    "Slot",
    "dist_stats",
    "mean",
    "median",
    "std",
]

_extension.register_fake("dist_stats_cpu", fake)


def _triton_impl():
    from fastdiag.kernels import dist_stats as kernel

    # Compiled Triton is a triton_op (torch.compile sees and schedules the kernels); under the
    # interpreter the same launcher is an opaque custom op with a fake: the switch says which
    return kernel.register(interpreting=backends.triton_interpreting())


backends.register(
    "dist_stats",
    {
        "triton": backends.Impl(_triton_impl, devices=("cuda",)),
        "cpu": backends.Impl(
            lambda: _extension.op("dist_stats_cpu"), devices=("cpu",), kernel="dist_stats_cpu"
        ),
        "torch": backends.Impl(lambda: dist_stats_torch_op),
    },
)


class DistStats(NamedTuple):
    """Result of :func:`dist_stats` (all tensors on the input's device).

    sums:      float64 [Slot.NUM], see :class:`Slot`.
    head_sums: float64 [G, HeadSlot.NUM] per entry of ``reduce_dim`` (G = 1 without it);
               all NaN (same shape) when called with ``heads=False``.
    rows:      float32 [*L, RowSlot.NUM] when ``rows=True``, else [0, RowSlot.NUM];
               L = leading shape of ``x`` without the reduced axis.
    topk:      int64 [*L, k] top-k indices (k = ``topk``; [*L, 0] when topk = 0).
    """

    sums: Tensor
    head_sums: Tensor
    rows: Tensor
    topk: Tensor


def _canonical(x: Tensor, reduce_dim: int | None) -> tuple[Tensor, list[int]]:
    """View ``x`` as [A, G, C, N] (copying only when the leading dims cannot merge)."""
    nd = x.dim()
    n = x.shape[-1]
    if reduce_dim is None:
        lead = list(x.shape[:-1])
        rows = 1
        for s in lead:
            rows *= s
        try:
            x4 = x.view(1, 1, rows, n)
        except RuntimeError:
            x4 = x.reshape(1, 1, rows, n)
        return x4, lead
    rd = reduce_dim % nd
    before = x.shape[:rd]
    between = x.shape[rd + 1 : nd - 1]
    a = 1
    for s in before:
        a *= s
    c = 1
    for s in between:
        c *= s
    try:
        x4 = x.view(a, x.shape[rd], c, n)
    except RuntimeError:
        x4 = x.reshape(a, x.shape[rd], c, n)
    return x4, list(before) + list(between)


_INT64 = 2**63


def _check_thresholds(tau: float, eps: float, query_offset: int) -> None:
    for name, value in (("tau", tau), ("eps", eps)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number (a threshold on entries), got {value!r}")
    if isinstance(query_offset, bool) or not isinstance(query_offset, int) or not (
        -_INT64 < query_offset < _INT64
    ):
        raise ValueError(
            f"query_offset must be an int in (-2**63, 2**63) (the key index of query 0), "
            f"got {query_offset!r}"
        )


def _validate(
    x: Tensor,
    reduce_dim: int | None,
    topk: int,
    row_mask: Tensor | None,
    window: int | None,
) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise ValueError(
            f"x must be float32, bfloat16, float16 or float64, got dtype {x.dtype} (shape {tuple(x.shape)})"
        )
    if x.dim() < 1:
        raise ValueError(f"x must have at least 1 dimension (..., N), got shape {tuple(x.shape)}")
    if x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last axis, got shape {tuple(x.shape)}")
    if reduce_dim is not None:
        if isinstance(reduce_dim, bool) or not isinstance(reduce_dim, int):
            raise TypeError(f"reduce_dim must be an int or None, got {type(reduce_dim).__name__}")
        if not -x.dim() <= reduce_dim < x.dim() or reduce_dim % x.dim() == x.dim() - 1:
            raise ValueError(
                f"reduce_dim must name a leading axis of x with shape {tuple(x.shape)} "
                f"(in [-{x.dim()}, {x.dim() - 2}] and not the last axis), got {reduce_dim}"
            )
        if x.shape[reduce_dim] == 0:
            raise ValueError(
                f"reduce_dim={reduce_dim} names an empty axis of x with shape {tuple(x.shape)}: "
                "there is nothing to average"
            )
    if isinstance(topk, bool) or not isinstance(topk, int):
        raise TypeError(f"topk must be an int, got {type(topk).__name__}")
    if not 0 <= topk <= MAX_TOPK or topk > x.shape[-1]:
        raise ValueError(
            f"topk must be in [0, min({MAX_TOPK}, N={x.shape[-1]})] for x of shape "
            f"{tuple(x.shape)}, got {topk}"
        )
    if window is not None and (
        isinstance(window, bool) or not isinstance(window, int) or not 0 <= window < _INT64
    ):
        raise ValueError(f"window must be a non-negative int below 2**63 or None, got {window!r}")
    if row_mask is not None:
        if not isinstance(row_mask, Tensor):
            raise TypeError(f"row_mask must be a torch.Tensor or None, got {type(row_mask).__name__}")
        lead = list(x.shape[:-1])
        if reduce_dim is not None:
            del lead[reduce_dim % x.dim()]
        if list(row_mask.shape) != lead:
            raise ValueError(
                f"row_mask must have the leading shape of x without the reduced axis, {tuple(lead)}, "
                f"got {tuple(row_mask.shape)}"
            )
        if row_mask.device != x.device:
            raise ValueError(f"row_mask must be on {x.device}, got {row_mask.device}")


def dist_stats(
    x: Tensor,
    *,
    from_logits: bool = False,
    reduce_dim: int | None = None,
    topk: int = 0,
    tau: float = 0.1,
    eps: float = 1e-6,
    row_mask: Tensor | None = None,
    window: int | None = None,
    query_offset: int = 0,
    rows: bool = False,
    heads: bool = True,
) -> DistStats:
    """Row statistics of the distributions on the last axis of ``x``, read once.

    x:        [..., N] probabilities (or logits with ``from_logits=True``), any strides,
              float32 / bfloat16 / float16 (float64 accepted, computed in float32).
    reduce_dim: a leading axis averaged while reading (e.g. heads of [B, H, N, Nk]).
    topk:     0..16 indices per row (descending, ties to the lower index).
    tau, eps: thresholds of the sparsity (> tau) and support (> eps) counts.
    row_mask: bool [*L]; False rows are padding, ignored everywhere.
    window:   local-mass half width (|j - i| <= window); None skips local mass.
    query_offset: key index of query 0 (KV-cache offset) for future / local mass.
    rows:     also return per-row entropy / max / support / sumsq.
    heads:    compute the per-head statistics (``head_sums``); False skips them (a logarithm
              per input element per head) and fills ``head_sums`` [G, 4] with NaN.

    Returns :class:`DistStats` (detached: statistics carry no autograd graph); nothing is copied
    to the host.
    """
    _validate(x, reduce_dim, topk, row_mask, window)
    if not torch.compiler.is_compiling():  # traced floats may be symbolic: checked eagerly
        _check_thresholds(tau, eps, query_offset)
    if x.requires_grad:  # statistics, not a differentiable function: no graph on any backend
        x = x.detach()
    x4, lead = _canonical(x, reduce_dim)
    nrows = x4.shape[0] * x4.shape[2]
    mask = None
    if row_mask is not None:
        mask = row_mask.reshape(nrows).to(torch.bool)
    query_len = lead[-1] if lead else 1
    run = backends.implementation("dist_stats", x4.device, x4.dtype)
    sums, head_sums, row_out, topk_out = run(
        x4,
        mask,
        bool(from_logits),
        int(topk),
        float(tau),
        float(eps),
        -1 if window is None else int(window),
        int(query_offset),
        query_len,
        bool(rows),
        bool(heads),
    )
    if rows:
        row_out = row_out.view(*lead, RowSlot.NUM)
    return DistStats(sums, head_sums, row_out, topk_out.view(*lead, topk))


def mean(sums: Tensor, slot: int) -> Tensor:
    """Mean over valid rows of a ``Slot`` slot (NaN when no row was valid), a 0-d tensor."""
    return sums[..., slot] / sums[..., Slot.COUNT]


def std(sums: Tensor, slot: int, slot_sq: int) -> Tensor:
    """Unbiased std over valid rows from a (sum, sum of squares) slot pair, a 0-d tensor."""
    n = sums[..., Slot.COUNT]
    m = sums[..., slot] / n
    var = (sums[..., slot_sq] - n * m * m) / (n - 1)
    return var.clamp_min(0).sqrt()


def median(values: Tensor) -> Tensor:
    """Median of the non-NaN entries of ``values`` (any shape; e.g. a ``RowSlot`` column of
    ``rows``), the mean of the two middle ones for an even count (numpy's convention), float64
    0-d; NaN when there is none. One sort, no host synchronisation."""
    v = values.detach().reshape(-1).to(torch.float64)
    nan = torch.full((), math.nan, dtype=torch.float64, device=v.device)
    if v.numel() == 0:
        return nan
    n = (~torch.isnan(v)).sum()
    ordered = torch.sort(v).values  # NaN sorts last
    lo = ((n - 1) // 2).clamp_min(0).reshape(1)
    hi = (n // 2).clamp_max(v.numel() - 1).reshape(1)
    mid = (ordered.gather(0, lo) + ordered.gather(0, hi)).reshape(()) / 2
    return torch.where(n > 0, mid, nan)
