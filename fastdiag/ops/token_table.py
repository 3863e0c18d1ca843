"""``TokenTable``: a device hash table token id -> the set chosen at its last occurrence.

Backs ``ausa/routing_consistency`` (docs/metrics.md §1): the share of the tokens of an update,
seen before, that are routed to the same set as at their previous occurrence. Every operation
stays on the device (no host synchronisation, no data-dependent shape).

Backends (``backends.register("token_table_update", ...)``): ``cpu``, the C++ op
``fastdiag::token_table_update_`` (``csrc/token_table.cpp``: one sequential pass over the batch
in flat order, in place on the table); ``torch``, :func:`token_table_update_torch` (any device,
no compiler), the executable specification. Both return the same values and leave the same table.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from fastdiag import _extension, backends

__all__ = ["MAX_TOKEN_CAPACITY", "TokenTable", "token_table_update_torch"]

# the most slots :meth:`TokenTable.grow` makes (2^22: two int64 tables of 32 MiB); larger ids are
# hashed (slot = id % capacity) and counted, never sized for
MAX_TOKEN_CAPACITY = 1 << 22


def _fake(keys: Tensor, vals: Tensor, max_id: Tensor, ids: Tensor, sets: Tensor, step: int) -> Tensor:
    return keys.new_empty((3,), dtype=torch.float64)


_extension.register_fake("token_table_update_", _fake)


def token_table_update_torch(
    keys: Tensor, vals: Tensor, max_id: Tensor, ids: Tensor, sets: Tensor, step: int, last: Tensor | None = None
) -> Tensor:
    """The torch implementation of the table update (see :meth:`TokenTable.update_values`), in
    place on ``keys`` / ``vals`` / ``max_id``. ``last``: int64 [capacity + 1] scratch, all -1
    (left so); allocated when None."""
    ids = ids.reshape(-1).long()
    if sets.numel() != ids.numel():  # ids' shape + [k]: the first of the k choices
        sets = sets[..., 0]
    sets = sets.reshape(-1).long()
    device = ids.device
    cap = keys.numel() - 1
    if last is None:
        last = torch.full((cap + 1,), -1, dtype=torch.int64, device=device)
    before = max_id.to(torch.float64)
    valid = (ids >= 0) & (sets >= 0)
    slot = torch.where(valid, torch.remainder(ids, cap), cap)
    seen = valid & (keys[slot] == ids)
    same = seen & (vals[slot] == sets)
    value = same.sum().to(torch.float64) / seen.sum().to(torch.float64)
    # one writer per slot, the last position in flat order (a scatter-max: writes never race)
    pos = torch.arange(ids.numel(), device=device)
    last.scatter_reduce_(0, slot, pos, reduce="amax")
    writer = valid & (last[slot] == pos)
    last.index_fill_(0, slot, -1)  # back to all -1 for the next call
    wslot = torch.where(writer, slot, cap)  # non-writers go to the sink slot
    keys.scatter_(0, wslot, ids)
    vals.scatter_(0, wslot, sets)
    masked_ids = torch.where(valid, ids, -1)
    if ids.numel():
        torch.maximum(max_id, masked_ids.amax(), out=max_id)
    overflow = (masked_ids >= cap).sum().to(torch.float64)
    after = max_id.to(torch.float64)
    running = step * after - (step - 1) * before
    return torch.stack([value, overflow, running])


backends.register(
    "token_table_update",
    {
        "cpu": backends.Impl(
            lambda: _extension.op("token_table_update_"), devices=("cpu",), kernel="token_table_update_"
        ),
        "torch": backends.Impl(lambda: token_table_update_torch),
    },
)


class TokenTable:
    """Device table token id -> top-1 set of its last occurrence (routing consistency).

    Sizing without reading device data: the table is direct-mapped, slot = id % capacity, and
    stores the id with its set, so an id is "seen" only if its own id sits in its slot. With
    every id < capacity (``vocab_size`` given, or ids below the default 2^16) this is exactly
    the unbounded dict of the reference. An id >= capacity can evict another id sharing its
    slot (then counted as unseen: the value is approximate for that epoch); such ids are
    counted on device, and at ``get_epoch_stats`` (which reads them in its one host copy) the
    table grows to the next power of two above the largest id seen, rehashed on device, with a
    warning, up to ``MAX_TOKEN_CAPACITY`` slots (or the caller's bound): larger ids stay hashed
    (approximate, counted), so no id sizes an allocation. Every token of a batch is looked up in the table as it was before the batch; ties
    in one batch: the last occurrence in flat order wins, as in the reference (the C++ op
    writes sequentially in flat order; the torch code's scatter-max of positions picks one
    writer per slot, so its writes never race).
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
        value, overflow, _ = self.update_values(token_ids, top1).unbind()
        return value, overflow

    def update_values(self, token_ids: Tensor, top1: Tensor, step: int = 1) -> Tensor:
        """Record one batch; float64 [3] on the device:
        ``[consistency, overflow, step * max_id_after - (step - 1) * max_id_before]``.

        token_ids: integer, any shape (< 0 = padding). top1: integer, the shape of token_ids
        (< 0 = no set), or that shape + [k] (the first of the k choices is the token's set).
        consistency: the share of this batch's valid tokens seen before (their own id in their
        slot before the batch) routed to the set stored there; NaN if none was seen.
        overflow: the number of valid ids >= capacity. The last term telescopes: with ``step``
        = t, the caller's count of updates, the mean of the terms of updates 1..t is the running
        max id after update t (how ``SetDiagnostics`` reads it at the epoch end, for growth).
        """
        self._ensure(token_ids.device)
        impl = backends.implementation("token_table_update", token_ids.device, torch.int64)
        if impl is token_table_update_torch:
            return impl(self.keys, self.vals, self.max_id, token_ids, top1, step, self.last)
        return impl(self.keys, self.vals, self.max_id, token_ids, top1, step)

    def grow(self, max_id: int, max_capacity: int = MAX_TOKEN_CAPACITY) -> None:
        """Rehash into a capacity above ``max_id`` (a power of two, at least double), but never
        more than ``max_capacity`` slots (and never fewer than now): an id never sizes an
        allocation beyond the bound."""
        if self.keys is None:
            return
        want = max(2 * self.capacity, 1 << min(max(0, int(max_id)).bit_length(), 62))
        new_cap = max(self.capacity, min(want, int(max_capacity)))
        if new_cap == self.capacity:
            return
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
        """Restore :meth:`state_dict`'s output, validated first (a ValueError names the problem;
        nothing is assigned on an error)."""
        if not isinstance(state, Mapping) or set(state) != {"capacity", "keys", "vals", "max_id"}:
            got = sorted(map(str, state)) if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(f"token table state must be a dict with keys capacity, keys, vals, max_id, got {got}")
        cap = state["capacity"]
        if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
            raise ValueError(f"token table capacity must be a positive int, got {cap!r}")
        for name, shape in (("keys", (cap + 1,)), ("vals", (cap + 1,)), ("max_id", ())):
            t = state[name]
            if t is not None and (not isinstance(t, Tensor) or t.dtype != torch.int64 or tuple(t.shape) != shape):
                got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"token table {name} must be None or an int64 tensor of shape {shape}, got {got}")
        self.capacity = int(state["capacity"])
        self.keys = None if state["keys"] is None else state["keys"].clone()
        self.vals = None if state["vals"] is None else state["vals"].clone()
        self.max_id = None if state["max_id"] is None else state["max_id"].clone()
        self.last = None
