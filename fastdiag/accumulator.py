"""``Accumulator``: named device-side running means with one host copy per ``compute()``.

All state lives in one packed float64 tensor ``[K, 3]`` (sum, count, infinite) on the device of
the values fed to it, so ``add`` is a single fused op and distributed reduction is a single
``all_reduce``. Non-finite values are skipped without looking at them on the host, so one bad
batch never turns an epoch mean into NaN; skipped infinite values are counted per name (the
third column, :meth:`compute_all`), NaN means "undefined" by convention and adds nothing.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from fastdiag.ops import summaries

SUM, COUNT, INFINITE = 0, 1, 2
COLUMNS = 3


class Accumulator:
    """Running means of named scalars, kept on the device.

    >>> acc = Accumulator()
    >>> acc.add({"loss": torch.tensor(2.0)}); acc.add({"loss": torch.tensor(4.0)})
    >>> acc.compute()
    {'loss': 3.0}
    """

    def __init__(self, device: torch.device | str | None = None) -> None:
        self._device = None if device is None else torch.device(device)
        self._index: dict[str, int] = {}
        self._state: Tensor | None = None
        self._slot_cache: dict[tuple[tuple[str, ...], torch.device], Tensor] = {}

    @property
    def names(self) -> list[str]:
        """The registered names, in slot order."""
        return list(self._index)

    @property
    def state(self) -> Tensor | None:
        """The packed float64 [K, 3] (sum, count, infinite) tensor, or None before the first add."""
        return self._state

    def _slots(self, names: Sequence[str], device: torch.device) -> Tensor:
        new = [n for n in names if n not in self._index]
        if new:
            for n in new:
                self._index[n] = len(self._index)
            grow = torch.zeros(len(new), COLUMNS, dtype=torch.float64, device=device)
            self._state = grow if self._state is None else torch.cat([self._state, grow])
        # index tensor built from host ints: a host->device copy, never a sync on device data
        return torch.tensor([self._index[n] for n in names], dtype=torch.long).to(
            device, non_blocking=True
        )

    def slots(self, names: tuple[str, ...], device: torch.device) -> Tensor:
        """The int64 slot indices of ``names`` on ``device`` (registering new names), cached.

        The cache makes a repeated update cost no host->device copy: the indices of a name tuple
        never change (``reset`` keeps the names registered).
        """
        key = (names, device)
        idx = self._slot_cache.get(key)
        if idx is None or self._state is None or self._state.device != device:
            if len(set(names)) != len(names):
                raise ValueError(f"names must be unique, got {list(names)}")
            if self._state is not None and self._state.device != device and self._device is None:
                self._state = self._state.to(device)
                self._slot_cache.clear()
            idx = self._slots(names, self._device or device)
            self._slot_cache[key] = idx
        return idx

    def add_at(self, idx: Tensor, values: Tensor, src: Tensor | None = None) -> None:
        """Add ``values[src[j]]`` to slot ``idx[j]`` (``idx`` from :meth:`slots`; ``src`` int64 of
        the same length on the state's device, default ``arange``), each counted once.

        Non-finite values add nothing. One fused op on the CPU (``fastdiag::accumulate_`` of the
        C++ extension); a few torch ops elsewhere.
        """
        state = self._state
        assert state is not None, "add_at() needs slots() first"
        if values.device != state.device or values.dtype != torch.float64:
            values = values.to(device=state.device, dtype=torch.float64)
        if src is None:
            src = torch.arange(idx.numel(), device=state.device)
        summaries.accumulate(state, idx, src, values)

    def add(
        self,
        values: Mapping[str, Tensor | float] | None = None,
        *,
        names: Sequence[str] | None = None,
        stacked: Tensor | None = None,
        counts: Tensor | None = None,
    ) -> None:
        """Add one batch value per name (each counted once unless ``counts`` says otherwise).

        Either a mapping name -> 0-d tensor / float, or ``names`` with a ``stacked`` [K] tensor
        (the fast path: one kernel for all metrics of an update). ``counts`` [K] weights each
        value (a value v with count n adds n*v to the sum and n to the count); non-finite
        values and zero counts add nothing to the mean, infinite ones count in ``INFINITE``.
        """
        if values is not None:
            if names is not None or stacked is not None:
                raise TypeError("pass either a mapping of values or names= with stacked=, not both")
            if not values:
                return
            names = list(values)
            device = self._device or _first_device(values.values())
            stacked = torch.stack(
                [torch.as_tensor(v, dtype=torch.float64, device=device).reshape(()) for v in values.values()]
            )
        elif names is None or stacked is None:
            raise TypeError("add() needs a mapping of values, or names= with stacked=")
        names = list(names)
        if stacked.shape != (len(names),):
            raise ValueError(
                f"stacked must have shape ({len(names)},) to match names, got {tuple(stacked.shape)}"
            )
        if len(set(names)) != len(names):
            raise ValueError(f"names must be unique, got {names}")
        if not names:
            return
        device = self._device or (self._state.device if self._state is not None else stacked.device)
        stacked = stacked.to(device=device, dtype=torch.float64)
        n = torch.ones_like(stacked) if counts is None else counts.to(device=device, dtype=torch.float64)
        ok = torch.isfinite(stacked) & (n > 0)
        inf = (stacked.isinf() & (n > 0)).to(torch.float64)
        n = torch.where(ok, n, torch.zeros_like(n))
        rows = torch.stack([torch.where(ok, stacked * n, torch.zeros_like(stacked)), n, inf], dim=1)
        idx = self._slots(names, device)
        assert self._state is not None
        self._state.index_add_(0, idx, rows)

    def compute(
        self, *, sync_dist: bool = False, process_group: Any = None
    ) -> dict[str, float]:
        """Mean of every name (NaN when it never got a finite value), one device->host copy.

        ``sync_dist=True`` (or a ``process_group``) first sums the state over the ranks of
        ``torch.distributed`` (a no-op when it is not initialised).
        """
        return self.compute_all(sync_dist=sync_dist, process_group=process_group)[0]

    def compute_all(
        self, *, sync_dist: bool = False, process_group: Any = None
    ) -> tuple[dict[str, float], dict[str, float]]:
        """(mean of every name, number of infinite values skipped per name), one host copy."""
        names, state = self.names, self._state
        if sync_dist or process_group is not None:
            from fastdiag.distributed import all_reduce_named

            names, state = all_reduce_named(names, state, process_group)
        if state is None or not names:
            return {}, {}
        host = state.detach().to("cpu").tolist()  # host ok: the one copy of compute()
        means = {n: (row[SUM] / row[COUNT] if row[COUNT] > 0 else math.nan) for n, row in zip(names, host)}
        return means, {n: row[INFINITE] for n, row in zip(names, host)}

    def reset(self) -> None:
        """Zero every sum and count (names stay registered)."""
        if self._state is not None:
            self._state.zero_()

    def state_dict(self) -> dict[str, Any]:
        return {"names": self.names, "state": None if self._state is None else self._state.clone()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        names, state = list(state_dict["names"]), state_dict["state"]
        if state is not None and (state.dim() != 2 or tuple(state.shape) not in ((len(names), 2), (len(names), COLUMNS))):
            raise ValueError(
                f"state must have shape ({len(names)}, {COLUMNS}) for {len(names)} names, got {tuple(state.shape)}"
            )
        if state is not None and state.shape[1] == 2:  # saved before the infinite count existed
            state = torch.cat([state, state.new_zeros(len(names), 1)], dim=1)
        self._index = {n: i for i, n in enumerate(names)}
        self._slot_cache = {}
        if state is None:
            self._state = None
        else:
            device = self._device or state.device
            self._state = state.to(device=device, dtype=torch.float64).clone()


def _first_device(values: Iterable[Any]) -> torch.device:
    for v in values:
        if isinstance(v, Tensor):
            return v.device
    return torch.device("cpu")
