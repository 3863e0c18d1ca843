"""Batch statistics of an embedding tensor: spread, scale and pairwise cosine of its rows.

For ``x`` [..., D] seen as rows [M, D] (docs/metrics.md §1-§2: set / value embedding variance, norm and
cosine similarity; a row holding a NaN / inf is *non-finite* and excluded from every value):

* ``variance``       per-column unbiased variance over the finite rows, averaged over columns
                     (NaN with fewer than two finite rows)
* ``norm_mean``      mean L2 norm of the finite rows
* ``cosine_mean``    mean off-diagonal cosine (:func:`fastdiag.ops.cosine_stats`) over pairs of
                     finite rows: of ``min(sample, M)`` rows drawn as the original classes do
                     (:func:`fastdiag.ops.cosine.sample_rows`), or of every row, blockwise, when
                     ``sample`` is None; NaN without a pair of finite rows
* ``cosine_max``     max off-diagonal cosine, same rows (reads max(true max, 0) when a
                     non-finite row was drawn: it counts as a zero row)
* ``nonfinite_rows`` number of non-finite rows
* ``finite_rows``    the rows [M, D] with the non-finite ones zeroed, for further ops on the
                     same data (e.g. :func:`fastdiag.ops.effective_rank`)

All float64 0-d tensors on ``x``'s device (``finite_rows``: ``x``'s dtype, float32 for half
inputs); no host synchronisation. Four cheap passes over the rows: the row norms, the zeroing,
the column sums, the squares.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from fastdiag.ops.cosine import check_sample, cosine_stats, sample_rows

__all__ = ["EmbeddingStats", "embedding_stats"]


class EmbeddingStats(NamedTuple):
    """See the module docstring."""

    variance: Tensor
    norm_mean: Tensor
    cosine_mean: Tensor
    cosine_max: Tensor
    nonfinite_rows: Tensor
    finite_rows: Tensor


def embedding_stats(
    x: Tensor, sample: int | None = 100, generator: torch.Generator | None = None
) -> EmbeddingStats:
    """Statistics of the rows [M, D] of ``x`` [..., D] (see the module docstring).

    ``sample``: rows drawn for the cosine values (an int >= 2; the original classes' 100 by default), or
    None for every row. ``generator``: the draw's generator (the CPU default one when None).
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor of shape [..., D], got {type(x).__name__}")
    if x.dim() < 1 or not x.dtype.is_floating_point:
        raise ValueError(
            f"x must be a floating-point tensor of shape [..., D], got {x.dtype} with shape "
            f"{tuple(x.shape)}"
        )
    check_sample(sample)
    rows = x.detach().reshape(-1, x.shape[-1])
    if rows.dtype in (torch.float16, torch.bfloat16):
        rows = rows.float()
    m = rows.shape[0]
    device = rows.device
    nan = torch.full((), math.nan, dtype=torch.float64, device=device)
    norms = torch.linalg.vector_norm(rows, dim=1)  # NaN / inf exactly for the non-finite rows
    valid = torch.isfinite(norms)
    n = valid.sum().to(torch.float64)
    clean = torch.where(valid[:, None], rows, torch.zeros((), dtype=rows.dtype, device=device))
    # two passes over all M rows (zeroed ones included): c = column mean, q = sum (x - c)^2;
    # the n finite rows have mean mu = M c / n and
    # sum_finite (x - mu)^2 = q - (M - n) c^2 - n (mu - c)^2   (= q when every row is finite)
    c = clean.sum(0) / max(m, 1)
    q = (clean - c).square().sum(0).to(torch.float64)
    c = c.to(torch.float64)
    mu = m * c / n
    variance = ((q - (m - n) * c.square() - n * (mu - c).square()) / (n - 1)).mean()
    norm_mean = torch.where(valid, norms, torch.zeros_like(norms)).to(torch.float64).sum() / n
    variance = torch.where(n > 1, variance, nan)
    if m < 2:
        return EmbeddingStats(variance, norm_mean, nan, nan, m - n, clean)
    if sample is None:
        drawn, k, v = clean, m, n
    else:
        idx = sample_rows(m, sample, generator).to(device, non_blocking=True)
        drawn, k, v = clean[idx], idx.numel(), valid[idx].sum().to(torch.float64)
    cos = cosine_stats(drawn)
    # zeroed rows have cosine 0 with every row: rescale the mean to the pairs of finite rows
    pairs = v * (v - 1)
    cosine_mean = torch.where(pairs > 0, cos.mean.to(torch.float64) * (k * (k - 1)) / pairs, nan)
    cosine_max = torch.where(pairs > 0, cos.max.to(torch.float64), nan)
    return EmbeddingStats(variance, norm_mean, cosine_mean, cosine_max, m - n, clean)
