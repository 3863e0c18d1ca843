"""Portable PyTorch implementation of ``fastdiag::spectral_stats`` (the torch backend), also the
executable specification of the C++ / CUDA kernels (see ``fastdiag.ops.spectral``)."""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from fastdiag.ops._spectral_layout import MAX_DIM

_EPS64 = torch.finfo(torch.float64).eps


def spectral_torch(x: Tensor, method: str = "auto") -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Same outputs as the op (``method`` is the kernels' choice and is ignored here) from the float64 Gram matrix in plain torch: LAPACK's
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
