"""``TokenTable``: a device hash table token id -> the set chosen at its last occurrence.

Backs ``ausa/routing_consistency`` (docs/metrics.md §1): the share of the tokens of an update,
seen before, that are routed to the same set as at their previous occurrence. Every operation
stays on the device (no host synchronisation, no data-dependent shape).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["TokenTable"]


class TokenTable:
    """Device table token id -> top-1 set of its last occurrence (routing consistency).

    Sizing without reading device data: the table is direct-mapped, slot = id % capacity, and
    stores the id with its set, so an id is "seen" only if its own id sits in its slot. With
    every id < capacity (``vocab_size`` given, or ids below the default 2^16) this is exactly
    the unbounded dict of the reference. An id >= capacity can evict another id sharing its
    slot (then counted as unseen: the value is approximate for that epoch); such ids are
    counted on device, and at ``get_epoch_stats`` (which reads them in its one host copy) the
    table grows to the next power of two above the largest id seen, rehashed on device, with a
    warning. Ties in one batch: the last occurrence in flat order wins, as in the reference
    (a scatter-max of positions picks one writer per slot, so writes never race).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.keys: Tensor | None = None  # int64 [capacity + 1]; -1 = empty; last slot = sink
        self.vals: Tensor | None = None  # int64 [capacity + 1]
        self.last: Tensor | None = None  # int64 [capacity + 1] scratch, all -1 between calls
        self.max_id: Tensor | None = None  # int64 0-d, largest valid id ever seen (-1: none)

    def _ensure(self, device: torch.device) -> None:
        if self.keys is None:
            size = self.capacity + 1
            self.keys = torch.full((size,), -1, dtype=torch.int64, device=device)
            self.vals = torch.full((size,), -1, dtype=torch.int64, device=device)
            self.max_id = torch.full((), -1, dtype=torch.int64, device=device)
        elif self.keys.device != device:
            self.keys, self.vals = self.keys.to(device), self.vals.to(device)
            self.max_id = self.max_id.to(device)
        if self.last is None or self.last.device != device or self.last.numel() != self.capacity + 1:
            self.last = torch.full((self.capacity + 1,), -1, dtype=torch.int64, device=device)

    def update(self, token_ids: Tensor, top1: Tensor) -> tuple[Tensor, Tensor]:
        """(consistency float64 0-d, NaN if no token was seen before; ids >= capacity count)."""
        ids = token_ids.reshape(-1).long()
        sets = top1.reshape(-1).long()
        device = ids.device
        self._ensure(device)
        cap = self.capacity
        valid = (ids >= 0) & (sets >= 0)
        slot = torch.where(valid, torch.remainder(ids, cap), cap)
        seen = valid & (self.keys[slot] == ids)
        same = seen & (self.vals[slot] == sets)
        value = same.sum().to(torch.float64) / seen.sum().to(torch.float64)
        pos = torch.arange(ids.numel(), device=device)
        self.last.scatter_reduce_(0, slot, pos, reduce="amax")
        writer = valid & (self.last[slot] == pos)
        self.last.index_fill_(0, slot, -1)  # back to all -1 for the next call
        wslot = torch.where(writer, slot, cap)  # non-writers go to the sink slot
        self.keys.scatter_(0, wslot, ids)
        self.vals.scatter_(0, wslot, sets)
        masked_ids = torch.where(valid, ids, -1)
        if ids.numel():
            self.max_id = torch.maximum(self.max_id, masked_ids.amax())
        overflow = (masked_ids >= cap).sum().to(torch.float64)
        return value, overflow

    def grow(self, max_id: int) -> None:
        """Rehash into a capacity above ``max_id`` (a power of two, at least double)."""
        if self.keys is None:
            return
        new_cap = max(2 * self.capacity, 1 << max(0, int(max_id)).bit_length())
        keys, vals = self.keys[:-1], self.vals[:-1]
        dev = keys.device
        nk = torch.full((new_cap + 1,), -1, dtype=torch.int64, device=dev)
        nv = torch.full((new_cap + 1,), -1, dtype=torch.int64, device=dev)
        slot = torch.where(keys >= 0, torch.remainder(keys, new_cap), new_cap)
        nk.scatter_(0, slot, keys)
        nv.scatter_(0, slot, vals)
        self.capacity, self.keys, self.vals, self.last = new_cap, nk, nv, None

    def state_dict(self) -> dict[str, Any]:
        return {
            "capacity": self.capacity,
            "keys": None if self.keys is None else self.keys.clone(),
            "vals": None if self.vals is None else self.vals.clone(),
            "max_id": None if self.max_id is None else self.max_id.clone(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.capacity = int(state["capacity"])
        self.keys = None if state["keys"] is None else state["keys"].clone()
        self.vals = None if state["vals"] is None else state["vals"].clone()
        self.max_id = None if state["max_id"] is None else state["max_id"].clone()
        self.last = None
