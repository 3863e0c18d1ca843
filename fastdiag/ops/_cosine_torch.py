"""Portable PyTorch implementation of the cosine-statistics op (the torch backend)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fastdiag.ops._cosine_layout import COSINE_EPS

_TILE_ELEMS = 1 << 24  # cosines per row block


def cosine_torch(x: Tensor, block_rows: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(sum f64, max, max |.|) over the off-diagonal cosines, in row blocks of ``block_rows``
    (default: ~16M cosines per block over the whole batch), never an M x M matrix beyond that."""
    work = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    m = work.shape[-2]
    lead = work.shape[:-2]
    batch = math.prod(lead)
    if block_rows is None:
        block_rows = max(1, min(m, _TILE_ELEMS // max(1, batch * m)))
    norms = torch.linalg.vector_norm(work, dim=-1)
    cols = torch.arange(m, device=x.device)
    total = torch.zeros(lead, dtype=torch.float64, device=x.device)
    best = torch.full(lead, float("-inf"), dtype=work.dtype, device=x.device)
    best_abs = torch.full(lead, float("-inf"), dtype=work.dtype, device=x.device)
    for i0 in range(0, m, block_rows):
        i1 = min(m, i0 + block_rows)
        dots = work[..., i0:i1, :] @ work.mT
        cos = dots / (norms[..., i0:i1, None] * norms[..., None, :] + COSINE_EPS)
        diag = cols[None, :] == torch.arange(i0, i1, device=x.device)[:, None]
        total = total + torch.where(diag, 0.0, cos).sum(dim=(-2, -1), dtype=torch.float64)
        best = torch.maximum(best, torch.where(diag, float("-inf"), cos).amax(dim=(-2, -1)))
        best_abs = torch.maximum(
            best_abs, torch.where(diag, float("-inf"), cos.abs()).amax(dim=(-2, -1))
        )
    return total, best, best_abs
