"""Jaccard similarities of index sets on device: bitmaps instead of Python sets.

- :func:`index_bitmap`: the set of all (non-negative) indices of a tensor as a bool bitmap.
- :func:`bitmap_jaccard`: ``|a & b| / |a | b|`` of two bitmaps (0 when both are empty, the
  original classes' convention), e.g. the active sets of two updates or their flattened top-k sets.
- :func:`topk_jaccard_per_query`: mean over rows of the Jaccard of each row's top-k indices
  now and at the previous update.

No host synchronisation and no data-dependent shape: bitmaps have the caller's size.
"""

from __future__ import annotations

import torch
from torch import Tensor


def index_bitmap(indices: Tensor, size: int) -> Tensor:
    """bool [size]: True at every value of ``indices`` (any shape); values < 0 or >= size ignored."""
    if indices.dtype.is_floating_point or indices.dtype == torch.bool:
        raise TypeError(f"indices must be an integer tensor, got dtype {indices.dtype}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValueError(f"size must be a non-negative int, got {size!r}")
    flat = indices.reshape(-1).long()
    slot = torch.where((flat >= 0) & (flat < size), flat, size)  # slot ``size`` = discarded
    bitmap = torch.zeros(size + 1, dtype=torch.bool, device=flat.device)
    # every write stores True, so duplicate indices cannot race to different values
    bitmap.index_fill_(0, slot, True)
    return bitmap[:size]


def bitmap_jaccard(a: Tensor, b: Tensor) -> Tensor:
    """Jaccard of two bool bitmaps (1-D; the shorter is padded with False), float64 0-d.

    0 when both are empty (the original classes' convention for two empty sets).
    """
    if a.dim() != 1 or b.dim() != 1:
        raise ValueError(f"a and b must be 1-D bitmaps, got shapes {tuple(a.shape)} and {tuple(b.shape)}")
    n = max(a.numel(), b.numel())
    if a.numel() < n:
        a = torch.cat([a, a.new_zeros(n - a.numel())])
    if b.numel() < n:
        b = torch.cat([b, b.new_zeros(n - b.numel())])
    a, b = a.to(torch.bool), b.to(torch.bool)
    inter = (a & b).sum().to(torch.float64)
    union = (a | b).sum().to(torch.float64)
    return torch.where(union > 0, inter / union.clamp_min(1), torch.zeros_like(union))


def topk_jaccard_rows(now: Tensor, prev: Tensor) -> Tensor:
    """Per-row Jaccard of two top-k index tensors [..., k] (same shape), float64 [...].

    Each row's indices are distinct (top-k); a row holding a negative index (an invalid row
    of ``dist_stats``) in either tensor gives NaN.
    """
    if now.shape != prev.shape:
        raise ValueError(
            f"now and prev must have the same shape, got {tuple(now.shape)} and {tuple(prev.shape)}"
        )
    k = now.shape[-1]
    if k == 0:
        return torch.full(now.shape[:-1], float("nan"), dtype=torch.float64, device=now.device)
    # distinct entries per row: |A & B| = number of equal (i, j) pairs; |A | B| = 2k - |A & B|
    inter = (now.unsqueeze(-1) == prev.unsqueeze(-2)).sum((-2, -1)).to(torch.float64)
    jac = inter / (2 * k - inter)
    valid = (now >= 0).all(-1) & (prev >= 0).all(-1)
    return torch.where(valid, jac, torch.full_like(jac, float("nan")))


def topk_jaccard_per_query(now: Tensor, prev: Tensor) -> Tensor:
    """Mean over the rows valid in both of :func:`topk_jaccard_rows`, float64 0-d (NaN if none)."""
    jac = topk_jaccard_rows(now, prev).reshape(-1)
    valid = ~torch.isnan(jac)
    return torch.where(valid, jac, torch.zeros_like(jac)).sum() / valid.sum().to(torch.float64)
