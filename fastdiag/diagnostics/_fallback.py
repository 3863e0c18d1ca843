"""Sync-free torch stand-ins for ``fastdiag.ops.effective_rank`` / ``cosine_stats``.

Used only while those ops are not exported by ``fastdiag.ops`` (they are written in
``fastdiag/ops/spectral.py`` and ``fastdiag/ops/cosine.py``); :func:`resolve` returns the
real op when it exists, so the diagnostics classes switch without a code change.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor


def effective_rank(x: Tensor) -> Tensor:
    """exp(H(sigma / sum sigma)) of each matrix of ``x`` [..., rows, cols], float64 [...].

    Singular values from the eigenvalues of the smaller Gram matrix (float64); an all-zero
    matrix has rank 0.
    """
    xd = x.to(torch.float64)
    gram = xd @ xd.mT if x.shape[-2] <= x.shape[-1] else xd.mT @ xd
    sigma = torch.linalg.eigvalsh(gram).clamp_min(0).sqrt()
    total = sigma.sum(-1, keepdim=True)
    p = sigma / torch.where(total > 0, total, torch.ones_like(total))
    erank = torch.special.entr(p).sum(-1).exp()
    return torch.where(total.squeeze(-1) > 0, erank, torch.zeros_like(erank))


class CosineStats(NamedTuple):
    """Off-diagonal cosine of the rows: mean and max (float64 0-d, NaN with < 2 rows)."""

    mean: Tensor
    max: Tensor


def cosine_stats(x: Tensor, sample: int | None = None, generator: torch.Generator | None = None) -> CosineStats:
    """Exact off-diagonal cosine mean / max of the rows of ``x`` [M, D] (``sample`` unsupported).

    cos_ij = <x_i, x_j> / (|x_i| |x_j| + 1e-8), the seed's formula.
    """
    if sample is not None:
        raise NotImplementedError("the stand-in cosine_stats computes exact statistics only")
    s = x.to(torch.float64)
    m = s.shape[0]
    norms = torch.linalg.vector_norm(s, dim=1)
    cos = (s @ s.T) / (norms[:, None] * norms[None, :] + 1e-8)
    off = ~torch.eye(m, dtype=torch.bool, device=s.device)
    n_off = m * (m - 1)
    mean = torch.where(off, cos, torch.zeros_like(cos)).sum() / n_off if n_off else cos.new_tensor(float("nan"))
    mx = torch.where(off, cos, torch.full_like(cos, -torch.inf)).amax() if n_off else cos.new_tensor(float("nan"))
    return CosineStats(mean, mx)


def resolve(name: str) -> Callable[..., Any]:
    """``fastdiag.ops.<name>`` when the ops package exports it, else the stand-in here."""
    import fastdiag.ops as ops

    op = getattr(ops, name, None)
    return op if op is not None else globals()[name]
