"""Multi-process reduction of named accumulator state over ``torch.distributed``.

Every fastdiag diagnostics object keeps its epoch sums in one packed float64 ``[K, 2]``
(sum, count) tensor (see :class:`fastdiag.accumulator.Accumulator`). Summing that tensor over
the ranks gives global means (the mean of all batch values of all ranks, not a mean of rank
means), whatever number of updates each rank saw. Ranks may have registered different names, in
a different order, or none at all: the name lists are gathered first and every rank reduces a
tensor aligned on the sorted union, so every rank calls the same collectives in the same order
with tensors of the same shape (no hang).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor


def is_initialized() -> bool:
    """True when ``torch.distributed`` is available and its default group is initialised."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _reduce_device(state: Tensor | None, process_group: Any) -> torch.device:
    """Device of the reduced tensor: the local state's, else the one the backend needs."""
    if state is not None:
        return state.device
    backend = str(torch.distributed.get_backend(process_group)).lower()
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_named(
    names: Sequence[str], state: Tensor | None, process_group: Any = None
) -> tuple[list[str], Tensor | None]:
    """Sum named ``[K, C]`` float64 rows over the ranks of ``process_group``.

    names: the K row names of ``state`` on this rank (unique), any order.
    state: float64 [K, C] (or None when this rank never added anything); C = 3 for the
    accumulator (sum, count, infinite), the same C on every rank.
    Returns ``(union, reduced)``: the sorted union of all ranks' names and the float64
    [len(union), C] sum of every rank's rows aligned on it (on this rank's device). A no-op
    returning the inputs when torch.distributed is unavailable or not initialised.

    Collectives, identical on every rank: one ``all_gather_object`` of the name lists, then one
    ``all_reduce(SUM)`` of the aligned tensor. Host work happens here (it is only called from
    ``compute()`` / ``get_epoch_stats()``).
    """
    names = list(names)
    if state is not None and (state.dim() != 2 or state.shape[0] != len(names)):
        raise ValueError(
            f"state must have shape ({len(names)}, C) for {len(names)} names, got {tuple(state.shape)}"
        )
    if not is_initialized():
        return names, state
    dist = torch.distributed
    world = dist.get_world_size(process_group)
    if world == 1:
        return names, state

    local = names if state is not None else []
    gathered: list[list[str] | None] = [None] * world
    dist.all_gather_object(gathered, local, group=process_group)
    union = sorted(set().union(*(g or [] for g in gathered)))

    device = _reduce_device(state, process_group)
    columns = 3 if state is None else state.shape[1]  # ranks without state: the accumulator's
    aligned = torch.zeros(len(union), columns, dtype=torch.float64, device=device)
    if local:
        position = {n: i for i, n in enumerate(union)}
        index = torch.tensor([position[n] for n in local], dtype=torch.long, device=device)
        aligned.index_copy_(0, index, state.detach().to(device=device, dtype=torch.float64))
    if union:  # every rank has the same union, so every rank takes (or skips) this together
        dist.all_reduce(aligned, op=dist.ReduceOp.SUM, group=process_group)
    return union, (aligned if union else None)
