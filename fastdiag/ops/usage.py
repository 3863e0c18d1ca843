"""Usage statistics of discrete choices (sets, experts, atoms) from index tensors, on device.

``usage_stats(indices, num_choices)`` counts how often each choice ``0 .. S-1`` occurs among
the entries of ``indices`` (entries < 0 are padding) and derives every balance statistic of
docs/metrics.md §1 from the counts, without a host synchronisation: the counts come from an
integer ``index_add_`` into a fixed-size [S + 2] buffer (slot S collects padding, slot S + 1
the out-of-range entries), so no shape depends on the data and integer adds are exact and
deterministic.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor


class UsageStats(NamedTuple):
    """Result of :func:`usage_stats` (all on the indices' device).

    counts:       int64 [S], occurrences of each choice.
    active:       bool [S], ``counts > 0``.
    out_of_range: int64 0-d, entries >= S (an error for the caller to report; not counted).
    The rest are float64 0-d tensors, with ``c = counts``, ``T = sum(c)``, ``u = c / T``:
    total (T), active_ratio (#active / S), size_mean / size_std (mean, unbiased std of c over
    the active choices), entropy (H(u), nats), entropy_norm (H(u) / log S, NaN when S = 1),
    gini (sum_ij |c_i - c_j| / (2 S T), zeros included), top1_share (max u),
    variance (unbiased variance of all S counts, zeros included).
    Undefined values are NaN: every share when T = 0, size_std with < 2 active choices,
    variance when S = 1.
    """

    counts: Tensor
    active: Tensor
    out_of_range: Tensor
    total: Tensor
    active_ratio: Tensor
    size_mean: Tensor
    size_std: Tensor
    entropy: Tensor
    entropy_norm: Tensor
    gini: Tensor
    top1_share: Tensor
    variance: Tensor


def _check(indices: Tensor, num_choices: int) -> None:
    if not isinstance(indices, Tensor):
        raise TypeError(f"indices must be a torch.Tensor, got {type(indices).__name__}")
    if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
        raise TypeError(f"indices must be an integer tensor, got dtype {indices.dtype}")
    if isinstance(num_choices, bool) or not isinstance(num_choices, int) or num_choices < 1:
        raise ValueError(f"num_choices must be a positive int, got {num_choices!r}")


def usage_counts(indices: Tensor, num_choices: int) -> tuple[Tensor, Tensor]:
    """(counts int64 [S], out_of_range int64 0-d): occurrences of each choice among ``indices``.

    Entries < 0 are padding (ignored); entries >= S are counted in ``out_of_range`` only.
    """
    _check(indices, num_choices)
    s = num_choices
    flat = indices.reshape(-1).long()
    slot = torch.where(flat < 0, s, torch.where(flat >= s, s + 1, flat))
    buf = torch.zeros(s + 2, dtype=torch.int64, device=flat.device)
    buf.index_add_(0, slot, torch.ones_like(slot))
    return buf[:s], buf[s + 1]


def counts_stats(counts: Tensor) -> UsageStats:
    """Every balance statistic of the counts [S] (int or float); see :class:`UsageStats`."""
    if counts.dim() != 1 or counts.numel() == 0:
        raise ValueError(f"counts must have shape [S] with S >= 1, got {tuple(counts.shape)}")
    s = counts.numel()
    c = counts.to(torch.float64)
    active = counts > 0
    n_active = active.sum().to(torch.float64)
    total = c.sum()
    nan = torch.full_like(total, math.nan)
    ok = total > 0
    u = c / torch.where(ok, total, torch.ones_like(total))
    entropy = torch.special.entr(u).sum()
    # Gini from the ascending sort: sum_ij |c_i - c_j| = 2 sum_i (2i - S + 1) c_(i), i = 0..S-1
    ranks = torch.arange(s, dtype=torch.float64, device=c.device)
    gini = (torch.sort(c).values * (2 * ranks - s + 1)).sum() / (s * total)
    size_mean = total / n_active
    dev = torch.where(active, c - size_mean, torch.zeros_like(c))
    size_std = (dev.square().sum() / (n_active - 1)).sqrt()
    size_std = torch.where(n_active > 1, size_std, nan)
    variance = c.var() if s > 1 else nan
    return UsageStats(
        counts=counts,
        active=active,
        out_of_range=torch.zeros((), dtype=torch.int64, device=c.device),
        total=total,
        active_ratio=n_active / s,
        size_mean=torch.where(ok, size_mean, nan),
        size_std=size_std,
        entropy=torch.where(ok, entropy, nan),
        entropy_norm=torch.where(ok, entropy / math.log(s), nan) if s > 1 else torch.full_like(entropy, math.nan),
        gini=torch.where(ok, gini, nan),
        top1_share=torch.where(ok, u.amax(), nan),
        variance=variance,
    )


def usage_stats(indices: Tensor, num_choices: int) -> UsageStats:
    """Usage counts of ``indices`` (any shape, entries < 0 padding) and their balance statistics.

    indices: integer tensor of choice ids in [0, num_choices); num_choices: S >= 1.
    Returns :class:`UsageStats`; nothing is copied to the host.
    """
    counts, out_of_range = usage_counts(indices, num_choices)
    return counts_stats(counts)._replace(out_of_range=out_of_range)
