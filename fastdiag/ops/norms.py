"""Fused multi-tensor norms for gradient / parameter health (``torch._foreach_norm``).

The norms launch a constant number of multi-tensor kernels per (device, dtype) group, whatever
the number of tensors (half-precision inputs give float32 norms, so they cannot overflow);
``nonfinite_counts`` runs one small counting pass per tensor. Every function returns device
tensors (no host synchronisation).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def _check(tensors: Sequence[Tensor], name: str) -> None:
    for i, t in enumerate(tensors):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(t).__name__}")


def _norm_dtype(dtype: torch.dtype) -> torch.dtype | None:
    # half-precision norms in their own dtype overflow to inf above 65504 (float16): float32 out
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else None


def norms(tensors: Sequence[Tensor]) -> Tensor:
    """L2 norm of each tensor, float64 [len(tensors)] on the first tensor's device."""
    _check(tensors, "tensors")
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    device = tensors[0].device
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    if len(groups) == 1:
        ((_, dtype),) = groups
        part = torch._foreach_norm([t.detach() for t in tensors], 2, dtype=_norm_dtype(dtype))
        return torch.stack(part).to(device, torch.float64)
    out = torch.empty(len(tensors), dtype=torch.float64, device=device)
    for (_, dtype), idx in groups.items():
        part = torch.stack(
            torch._foreach_norm([tensors[i].detach() for i in idx], 2, dtype=_norm_dtype(dtype))
        )
        # host ints -> device without a blocking copy
        where = torch.tensor(idx, dtype=torch.long).to(device, non_blocking=True)
        out[where] = part.to(device, torch.float64)
    return out


def total_norm(tensors: Sequence[Tensor]) -> Tensor:
    """sqrt(sum of squared L2 norms) of all tensors, a float64 0-d tensor (0 for none)."""
    n = norms(tensors)
    return n.square().sum().sqrt()


def diff_norms(current: Sequence[Tensor], previous: Sequence[Tensor]) -> Tensor:
    """||current_i - previous_i|| for each pair, float64 [n]."""
    if len(current) != len(previous):
        raise ValueError(f"current and previous must have the same length, got {len(current)} and {len(previous)}")
    if not current:
        return torch.zeros(0, dtype=torch.float64)
    diffs = torch._foreach_sub([c.detach() for c in current], [p.to(c.dtype) for c, p in zip(current, previous)])
    return norms(diffs)


def nonfinite_counts(tensors: Sequence[Tensor]) -> Tensor:
    """Number of NaN / inf entries of each tensor, float64 [n] (exact below 2^53)."""
    _check(tensors, "tensors")
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    device = tensors[0].device
    return torch.stack([_nonfinite(t.detach()).to(device, torch.float64) for t in tensors])


def _nonfinite(t: Tensor) -> Tensor:
    # t - t is 0 where t is finite and NaN where it is NaN or +-inf: one temporary and one
    # counting pass, where isfinite() builds several temporaries
    if not (t.is_floating_point() or t.is_complex()):
        return torch.zeros((), dtype=torch.int64, device=t.device)
    return torch.count_nonzero(t - t)
