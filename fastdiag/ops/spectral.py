"""Spectral statistics of batched matrices: effective rank and friends (docs/metrics.md §4).

For ``x`` of shape ``[..., rows, cols]`` every leading index is one matrix X with singular
values sigma_1 >= ... >= sigma_r, r = min(rows, cols), p_i = sigma_i / sum(sigma):

* ``effective_rank``       exp(H(p)) (Roy and Vetterli 2007), 0 log 0 = 0
* ``effective_rank_ratio`` effective_rank / r
* ``top1_singular_share``  sigma_1 / sum(sigma)
* ``stable_rank``          sum(sigma^2) / sigma_1^2
* ``condition_number``     sigma_1 / sigma_r (inf when sigma_r = 0)
* ``nonfinite``            number of NaN / inf entries of the matrix (int64)

How: the smaller Gram matrix (rows x rows or cols x cols) in float64, its eigenvalues clamped
at 0, sigma = sqrt. Backends: the C++ extension (``fastdiag::spectral_stats``, CPU and CUDA
kernels, one matrix per thread / thread block), else the torch path on the same Gram matrix
(:func:`spectral_torch`). No host synchronisation on any path. The eigenvalue ``method``
(``csrc/spectral.h``):

* ``"jacobi"``: batched cyclic one-sided Jacobi on the pivoted Cholesky factor (CPU and CUDA;
  the CUDA kernel rotates a round's disjoint pairs in parallel in one thread block).
* ``"tridiagonal"``: Householder tridiagonalisation and implicit QR (CPU): some 30x fewer flops
  than Jacobi, the fastest serial method, so the choice for a CPU core.
* ``"auto"`` (default): ``"tridiagonal"`` on the CPU, ``"jacobi"`` on CUDA.

Both agree with numpy's float64 SVD to the accuracy stated below (the tests run both).

Conventions:

* A zero matrix has effective rank 0 (ratio 0, top-1 share 0, stable rank 0, condition inf).
* A matrix with NaN / inf entries gives NaN statistics; the other matrices of the batch are
  unaffected and ``nonfinite`` counts the bad entries.
* Eigenvalues of the Gram matrix below ``r * eps64 * lambda_max`` are rounding noise of the Gram
  itself and count as 0: singular values below sqrt(r * 2.2e-16) * sigma_1 (1.7e-7 sigma_1 at
  r = 128) are not resolved, so condition numbers above ~1e7 read as inf.
* float64 matrices are divided by their largest |entry| first (the statistics are scale-free,
  ``sigma`` is scaled back), so entries near float64's range limits neither overflow nor
  underflow the Gram matrix.
* Matrices with both sides larger than ``MAX_DIM`` fall back to the torch path (one warning).
* Without the extension: LAPACK ``eigvalsh`` on the Gram matrix for CPU tensors, a batched
  Jacobi in torch ops for CUDA tensors (``torch.linalg.eigvalsh`` synchronises there: it checks
  LAPACK's info on the host, and torch has no ``_ex`` variant of it).
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
from torch import Tensor

from fastdiag import _extension, backends
from fastdiag.ops._spectral_layout import MAX_DIM, METHODS, NUM_STATS, fake
from fastdiag.ops._spectral_torch import (
    jacobi_eigvalsh_torch,
    spectral_torch,
    stats_from_sigma,
    torch_jacobi_sweeps,
)

__all__ = [
    "MAX_DIM",
    "METHODS",
    "NUM_STATS",
    "SpectralStats",
    "effective_rank",
    "jacobi_eigvalsh_torch",
    "spectral_raw",
    "spectral_stats",
    "spectral_torch",
    "stats_from_sigma",
    "torch_jacobi_sweeps",
]

_warned_large = False

_extension.register_fake("spectral_stats", fake)


def _extension_op():
    return _extension.op("spectral_stats")


backends.register(
    "spectral_stats",
    {
        "cpu": backends.Impl(_extension_op, devices=("cpu",), kernel="spectral_stats"),
        "cuda": backends.Impl(_extension_op, devices=("cuda",), kernel="spectral_stats"),
        "torch": backends.Impl(lambda: spectral_torch),
    },
)


class SpectralStats(NamedTuple):
    """Per-matrix statistics, each of the leading shape of ``x`` (float32; nonfinite int64)."""

    effective_rank: Tensor
    effective_rank_ratio: Tensor
    top1_singular_share: Tensor
    stable_rank: Tensor
    condition_number: Tensor
    nonfinite: Tensor


def spectral_stats(x: Tensor, method: str = "auto") -> SpectralStats:
    """Spectral statistics of each matrix of ``x`` [..., rows, cols] (see the module docstring).

    ``method``: the eigenvalue solver of the extension, one of :data:`METHODS`.
    Returns a :class:`SpectralStats` of tensors shaped ``x.shape[:-2]`` on ``x``'s device.
    """
    stats, _, nonfinite, _ = spectral_raw(x, method)
    s = stats.to(torch.float32).unbind(-1)
    return SpectralStats(s[0], s[1], s[2], s[3], s[4], nonfinite)


def effective_rank(x: Tensor, method: str = "auto") -> Tensor:
    """Effective rank exp(H(sigma / sum sigma)) of each matrix of ``x`` [..., rows, cols]."""
    return spectral_stats(x, method).effective_rank


def spectral_raw(x: Tensor, method: str = "auto") -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The op's raw outputs: ``(stats f64[..., 5], sigma f64[..., r] descending,
    nonfinite i64[...], iterations i32[...])``; ``iterations`` counts the Jacobi sweeps
    (``"jacobi"``) or implicit QR steps (``"tridiagonal"``) of each matrix, 0 on the torch path
    with LAPACK."""
    _check(x)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "tridiagonal" and x.device.type != "cpu":
        raise ValueError(
            f"method='tridiagonal' runs on CPU tensors only, got a tensor on {x.device}; "
            "use 'auto' or 'jacobi'"
        )
    x = x.detach()
    scale = None
    if x.dtype == torch.float64:
        # the float64 Gram of entries beyond ~1e150 (or below ~1e-150) over- or underflows;
        # every statistic is scale-free, so each matrix runs divided by its largest |entry|
        # (float32 / half entries square well inside float64's range: no pass for them)
        amax = x.abs().amax(dim=(-2, -1), keepdim=True)
        scale = torch.where(torch.isfinite(amax) & (amax > 0), amax, 1.0)
        x = x / scale
    if min(x.shape[-2], x.shape[-1]) > MAX_DIM:  # beyond the kernels' static sizes
        _warn_too_large(x.shape)
        out = spectral_torch(x, method)
    else:
        out = backends.implementation("spectral_stats", x.device, x.dtype)(x, method)
    if scale is None:
        return out
    stats, sigma, nonfinite, iterations = out
    return stats, sigma * scale[..., 0], nonfinite, iterations


def _check(x: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(
            f"x must be a torch.Tensor of shape [..., rows, cols], got {type(x).__name__}"
        )
    shape = tuple(x.shape)
    if x.dim() < 2:
        raise ValueError(
            f"x must have shape [..., rows, cols] (at least 2 dims), got shape {shape}"
        )
    if not x.dtype.is_floating_point:
        raise ValueError(
            f"x must be float32, float16, bfloat16 or float64, got {x.dtype} with shape {shape}"
        )
    if x.shape[-2] == 0 or x.shape[-1] == 0:
        raise ValueError(f"x needs at least one row and one column, got shape {shape}")


def _warn_too_large(shape: torch.Size) -> None:
    global _warned_large
    if not _warned_large:
        _warned_large = True
        warnings.warn(
            f"fastdiag.spectral_stats: matrices of shape {tuple(shape[-2:])} have both sides "
            f"larger than {MAX_DIM}; using torch.linalg.eigvalsh on the Gram matrix instead of "
            "the Jacobi kernel",
            RuntimeWarning,
            stacklevel=3,
        )
