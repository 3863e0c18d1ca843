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
inputs); no host synchronisation. :func:`embedding_raw` gives the same values as one float64
[5] vector (``EMBEDDING_FIELDS`` order) and the zeroed rows in ``x``'s shape, for callers that
accumulate the vector as is.

Backends (``backends.register("embedding_stats", ...)``): ``cpu``, the C++ op
``fastdiag::embedding_stats`` (``csrc/embedding.cpp``: one pass over the rows for finiteness,
norms, the zeroed copy and the column sums, one for the centred squares, then the drawn rows'
Gram matrix; float64 accumulation in a fixed order); ``torch``, :func:`embedding_torch` (any
device, no compiler), the executable specification. The draw itself is always torch's
``torch.randperm(M, generator=generator)`` (on the generator's device), so the rows drawn are
the original classes' rows whatever the backend.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from fastdiag import _extension, backends
from fastdiag.ops.cosine import check_sample, cosine_stats

__all__ = ["EMBEDDING_FIELDS", "EmbeddingStats", "embedding_raw", "embedding_stats", "embedding_torch"]

EMBEDDING_FIELDS = ("variance", "norm_mean", "cosine_mean", "cosine_max", "nonfinite_rows")
# rows whose largest |entry| is beyond 2^SCALE_EXP (or below 2^-SCALE_EXP) are rescaled by a
# power of two before squaring (csrc/embedding.cpp uses the same bound)
_SCALE_EXP = 30


def _out_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _fake(x: Tensor, perm: Tensor | None, sample: int) -> tuple[Tensor, Tensor]:
    return x.new_empty((len(EMBEDDING_FIELDS),), dtype=torch.float64), x.new_empty(
        x.shape, dtype=_out_dtype(x.dtype)
    )


_extension.register_fake("embedding_stats", _fake)


def embedding_torch(x: Tensor, perm: Tensor | None, sample: int) -> tuple[Tensor, Tensor]:
    """The torch implementation: ``(values float64 [5], finite_rows)`` of ``x`` [..., D].

    ``perm``: None for the cosine values over every row, else a permutation of the M rows whose
    first ``min(sample, M)`` entries are the drawn rows.
    """
    rows = x.reshape(-1, x.shape[-1])
    if rows.dtype in (torch.float16, torch.bfloat16):
        rows = rows.float()
    m = rows.shape[0]
    device = rows.device
    nan = torch.full((), math.nan, dtype=torch.float64, device=device)
    # finite row = no NaN / inf entry (amax propagates NaN), whatever its scale: a norm of
    # finite entries may overflow (1e19 in float32) and must not make the row non-finite
    amax = rows.abs().amax(1) if rows.shape[1] else rows.new_zeros(m)
    valid = torch.isfinite(amax)
    n = valid.sum().to(torch.float64)
    zero = torch.zeros((), dtype=rows.dtype, device=device)
    clean = torch.where(valid[:, None], rows, zero)
    # scale-free: rows whose largest |entry| is outside [2^-SCALE_EXP, 2^SCALE_EXP] are scaled
    # by a power of two s (exact) so that it lies in [0.5, 1) before the norms and the squares;
    # the float64 results are scaled back (variance * s^2 may be inf: then it is not representable
    # in float64). Within the range s = 1 and every value is what it was.
    big = torch.where(valid, amax, zero).amax() if m else zero
    _, exp = torch.frexp(big.to(torch.float64))
    rescale = (big > 0) & ((exp > _SCALE_EXP) | (exp < -_SCALE_EXP))
    exp = torch.where(rescale, exp, torch.zeros_like(exp))
    scaled = torch.ldexp(clean, -exp.to(clean.dtype))  # = clean when exp == 0
    s = torch.ldexp(torch.ones((), dtype=torch.float64, device=device), exp.to(torch.float64))
    norms = torch.linalg.vector_norm(scaled, dim=1).to(torch.float64) * s
    # two passes over all M rows (zeroed ones included): c = column mean, q = sum (x - c)^2;
    # the n finite rows have mean mu = M c / n and
    # sum_finite (x - mu)^2 = q - (M - n) c^2 - n (mu - c)^2   (= q when every row is finite)
    c = scaled.sum(0) / max(m, 1)
    q = (scaled - c).square().sum(0).to(torch.float64)
    c = c.to(torch.float64)
    mu = m * c / n
    variance = ((q - (m - n) * c.square() - n * (mu - c).square()) / (n - 1)).mean() * (s * s)
    norm_mean = torch.where(valid, norms, torch.zeros_like(norms)).sum() / n
    variance = torch.where(n > 1, variance, nan)
    cosine_mean = cosine_max = nan
    if m >= 2:
        # huge rows: the cosines of the scaled rows (cos = <a, b> / (|a| |b| + 1e-8) with
        # |a| |b| >= 2^(2 SCALE_EXP): the 1e-8 is below float32 resolution either way); tiny
        # rows: of the rows as they are (their cosines are ~0, below the 1e-8, as in float64)
        source = torch.where(exp > 0, scaled, clean) if m >= 2 else clean
        if perm is None:
            drawn, k, v = source, m, n
        else:
            idx = perm[: min(sample, m)].to(device, non_blocking=True)
            drawn, k, v = source[idx], idx.numel(), valid[idx].sum().to(torch.float64)
        cos = cosine_stats(drawn)
        # zeroed rows have cosine 0 with every row: rescale the mean to the pairs of finite rows
        pairs = v * (v - 1)
        cosine_mean = torch.where(pairs > 0, cos.mean.to(torch.float64) * (k * (k - 1)) / pairs, nan)
        cosine_max = torch.where(pairs > 0, cos.max.to(torch.float64), nan)
    values = torch.stack([variance, norm_mean, cosine_mean, cosine_max, m - n])
    return values, clean.view(x.shape)


backends.register(
    "embedding_stats",
    {
        "cpu": backends.Impl(
            lambda: _extension.op("embedding_stats"), devices=("cpu",), kernel="embedding_stats"
        ),
        "torch": backends.Impl(lambda: embedding_torch),
    },
)


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
    values, clean = embedding_raw(x, sample, generator)
    v = values.unbind()
    return EmbeddingStats(v[0], v[1], v[2], v[3], v[4], clean.view(-1, x.shape[-1]))


def embedding_raw(
    x: Tensor, sample: int | None = 100, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """``(values float64 [5] in EMBEDDING_FIELDS order, finite_rows of x's shape)``: the values
    of :func:`embedding_stats` as one vector, the zeroed rows not flattened."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor of shape [..., D], got {type(x).__name__}")
    if x.dim() < 1 or not x.dtype.is_floating_point:
        raise ValueError(
            f"x must be a floating-point tensor of shape [..., D], got {x.dtype} with shape "
            f"{tuple(x.shape)}"
        )
    if x.shape[-1] == 0:
        raise ValueError(f"x needs at least one column, got shape {tuple(x.shape)}")
    check_sample(sample)
    if x.requires_grad:
        x = x.detach()
    m = x.numel() // x.shape[-1]
    perm = None
    if sample is not None and m >= 2:
        # the original classes' draw, torch.randperm(M, generator)[:sample] on the generator's
        # device (the C++ op and the torch code take the first min(sample, M) entries)
        device = generator.device if generator is not None else torch.device("cpu")
        perm = torch.randperm(m, generator=generator, device=device)
        if perm.device != x.device:
            perm = perm.to(x.device, non_blocking=True)
    return backends.implementation("embedding_stats", x.device, x.dtype)(x, perm, sample or 0)
