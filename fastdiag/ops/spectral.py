"""Spectral statistics of batched matrices: effective rank and friends (METRICS.md section 4).

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
* Matrices with both sides larger than ``MAX_DIM`` fall back to the torch path (one warning).
* Without the extension: LAPACK ``eigvalsh`` on the Gram matrix for CPU tensors, a batched
  Jacobi in torch ops for CUDA tensors (``torch.linalg.eigvalsh`` synchronises there: it checks
  LAPACK's info on the host, and torch has no ``_ex`` variant of it).
"""

from __future__ import annotations

import functools
import warnings
from typing import NamedTuple

import torch
from torch import Tensor

from fastdiag import backends

__all__ = ["MAX_DIM", "METHODS", "SpectralStats", "effective_rank", "spectral_stats"]

METHODS = ("auto", "jacobi", "tridiagonal")
MAX_DIM = 1024  # largest min(rows, cols) the extension takes (csrc/spectral.h: kMaxDim)
NUM_STATS = 5
_EPS64 = torch.finfo(torch.float64).eps
_warned_large = False


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
    rows, cols = x.shape[-2], x.shape[-1]
    if min(rows, cols) > MAX_DIM:
        _warn_too_large(x.shape)
        return spectral_torch(x)
    op = _extension_op(x.device)
    if op is None:
        return spectral_torch(x)
    return op(x, method)


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


# ---- the extension op -------------------------------------------------------------------------


def _fake(x: Tensor, method: str = "auto") -> tuple[Tensor, Tensor, Tensor, Tensor]:
    lead = tuple(x.shape[:-2])
    r = torch.sym_min(x.shape[-2], x.shape[-1])
    return (
        x.new_empty((*lead, NUM_STATS), dtype=torch.float64),
        x.new_empty((*lead, r), dtype=torch.float64),
        x.new_empty(lead, dtype=torch.int64),
        x.new_empty(lead, dtype=torch.int32),
    )


@functools.cache
def _loaded_op():
    """``torch.ops.fastdiag.spectral_stats`` with its fake registered, or None without the
    extension."""
    from fastdiag import _extension

    if _extension.load() is None or not hasattr(torch.ops.fastdiag, "spectral_stats"):
        return None
    torch.library.register_fake("fastdiag::spectral_stats")(_fake)
    return torch.ops.fastdiag.spectral_stats.default


@functools.cache
def _has_kernel(key: str) -> bool:
    return _loaded_op() is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
        "fastdiag::spectral_stats", key
    )


def _extension_op(device: torch.device):
    """The extension op for tensors on ``device``, or None when the torch path must run."""
    if _path(device.type, device.index) == "extension":
        return torch.ops.fastdiag.spectral_stats.default  # loaded, fake registered by _path
    return None


@torch.compiler.assume_constant_result
def _path(device_type: str, device_index: int | None) -> str:
    """'extension' or 'torch'. Evaluated eagerly under torch.compile (the backend choice and the
    extension load are host decisions, constant for the traced graph)."""
    device = torch.device(device_type, device_index)
    if backends.resolve(device) == "torch":
        return "torch"
    if device.type == "cpu" and _has_kernel("CPU"):
        return "extension"
    if device.type == "cuda" and _has_kernel("CUDA"):
        return "extension"
    return "torch"


# ---- the torch path (also the executable spec of the kernels) ----------------------------------


def spectral_torch(x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Same outputs as the op from the float64 Gram matrix in plain torch: LAPACK's
    ``eigvalsh`` for CPU tensors; for other devices (CUDA without the extension) a batched
    two-sided Jacobi in torch ops, because ``torch.linalg.eigvalsh`` checks its LAPACK info on
    the host there (a synchronisation) and torch has no ``_ex`` variant of it. ``iterations``
    reports the Jacobi sweeps run (0 for LAPACK)."""
    rows, cols = x.shape[-2], x.shape[-1]
    r = min(rows, cols)
    xd = x.to(torch.float64)
    finite = torch.isfinite(xd)
    nonfinite = (~finite).sum(dim=(-2, -1))
    bad = nonfinite > 0
    xd = torch.where(finite, xd, 0.0)  # keep the solver away from NaN; those matrices read NaN
    gram = xd @ xd.mT if rows <= cols else xd.mT @ xd
    if x.device.type == "cpu" or r > MAX_DIM:
        lam = torch.linalg.eigvalsh(gram)
        n_sweeps = 0
    else:
        n_sweeps = torch_jacobi_sweeps(r)
        lam = jacobi_eigvalsh_torch(gram, n_sweeps)
    lam = lam.sort(dim=-1, descending=True).values
    cut = r * _EPS64 * lam[..., :1]
    sigma = torch.where(lam > cut, lam, 0.0).sqrt()
    stats = stats_from_sigma(sigma)
    nan = torch.tensor(float("nan"), dtype=torch.float64, device=x.device)
    stats = torch.where(bad[..., None], nan, stats)
    sigma = torch.where(bad[..., None], nan, sigma)
    sweeps = torch.full(bad.shape, n_sweeps, dtype=torch.int32, device=x.device)
    return stats, sigma, nonfinite, sweeps


def torch_jacobi_sweeps(n: int) -> int:
    """Fixed sweep count of :func:`jacobi_eigvalsh_torch` (it cannot test convergence without a
    host synchronisation): cyclic Jacobi needs O(log n) sweeps; this leaves >= 2 in reserve."""
    return 8 + max(1, n - 1).bit_length() // 2


@functools.lru_cache(maxsize=32)
def _round_robin(n: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Pairs (p, q) of the n - 1 rounds of a round-robin over n (even) indices: [n - 1, n / 2]."""
    rounds_p, rounds_q = [], []
    for rnd in range(n - 1):
        players = [0] + [1 + (slot - 1 + rnd) % (n - 1) for slot in range(1, n)]
        pairs = [(players[k], players[n - 1 - k]) for k in range(n // 2)]
        rounds_p.append([min(a, b) for a, b in pairs])
        rounds_q.append([max(a, b) for a, b in pairs])
    return (
        torch.tensor(rounds_p, dtype=torch.long, device=device),
        torch.tensor(rounds_q, dtype=torch.long, device=device),
    )


def jacobi_eigvalsh_torch(g: Tensor, sweeps: int) -> Tensor:
    """Eigenvalues [..., n] (unsorted) of symmetric ``g`` [..., n, n] by ``sweeps`` cyclic
    two-sided Jacobi sweeps, the n / 2 disjoint rotations of a round applied together. Only
    tensor ops with fixed shapes: no host synchronisation."""
    n = g.shape[-1]
    lead = g.shape[:-2]
    a = g.reshape(-1, n, n).clone()
    if n % 2:
        a = torch.nn.functional.pad(a, (0, 1, 0, 1))
    ne = a.shape[-1]
    if ne < 2:
        return a.diagonal(dim1=-2, dim2=-1)[:, :n].reshape(*lead, n)
    rp, rq = _round_robin(ne, g.device)
    for _ in range(sweeps):
        for rnd in range(ne - 1):
            p, q = rp[rnd], rq[rnd]
            app, aqq, apq = a[:, p, p], a[:, q, q], a[:, p, q]
            nz = apq != 0
            zeta = (aqq - app) / (2 * torch.where(nz, apq, 1.0))
            t = torch.where(zeta >= 0, 1.0, -1.0) / (zeta.abs() + torch.sqrt(1 + zeta * zeta))
            t = torch.where(nz, t, 0.0)
            c = torch.rsqrt(1 + t * t)
            s = t * c
            rows_p, rows_q = a[:, p, :], a[:, q, :]
            a[:, p, :] = c[..., None] * rows_p - s[..., None] * rows_q
            a[:, q, :] = s[..., None] * rows_p + c[..., None] * rows_q
            cols_p, cols_q = a[:, :, p], a[:, :, q]
            a[:, :, p] = c[:, None, :] * cols_p - s[:, None, :] * cols_q
            a[:, :, q] = s[:, None, :] * cols_p + c[:, None, :] * cols_q
    return a.diagonal(dim1=-2, dim2=-1)[:, :n].reshape(*lead, n)


def stats_from_sigma(sigma: Tensor) -> Tensor:
    """The five statistics [..., 5] from singular values [..., r] (>= 0, any order), with the
    kernels' conventions for zero matrices."""
    r = sigma.shape[-1]
    total = sigma.sum(-1)
    smax = sigma.amax(-1)
    smin = sigma.amin(-1)
    zero = total <= 0
    safe = torch.where(zero, 1.0, total)
    h = (safe.log() - torch.xlogy(sigma, sigma).sum(-1) / safe).clamp_min(0.0)
    erank = torch.where(zero, 0.0, h.exp())
    top1 = torch.where(zero, 0.0, smax / safe)
    smax_safe = torch.where(zero, 1.0, smax)
    stable = torch.where(zero, 0.0, (sigma * sigma).sum(-1) / (smax_safe * smax_safe))
    inf = torch.tensor(float("inf"), dtype=sigma.dtype, device=sigma.device)
    cond = torch.where(smin > 0, smax / torch.where(smin > 0, smin, 1.0), inf)
    return torch.stack([erank, erank / r, top1, stable, cond], dim=-1)
