"""``Diagnostics``: the base class of every drop-in diagnostics class (like torchmetrics' ``Metric``).

A subclass declares its public keys (:meth:`Diagnostics.metric_keys`, catalogue order) and its
non-sum state once (:meth:`Diagnostics.add_state`: previous top-k, previous parameters, a token
table ...), and records each update with one call of :meth:`Diagnostics._add`: the names of the
values and one float64 tensor holding them, on the device. The base class owns everything else:

- the :class:`~fastdiag.accumulator.Accumulator` (one running (sum, count) row per name); an
  update is added with one accumulator op through a cached slot-index tensor;
- the record of which keys had their input provided since :meth:`reset` (host metadata only);
- :meth:`reset`, :meth:`get_epoch_stats` / :meth:`compute` (one device->host copy),
  :meth:`state_dict` / :meth:`load_state_dict` (validated completely before anything is
  assigned: on any error the object is unchanged).

Epoch semantics (docs/metrics.md §8): a key's epoch value is the mean of its batch values over
the updates that provided its input and where the value was defined (an undefined batch value is
NaN, skipped by the mean). A key never provided since ``reset()`` is absent; one provided but
never defined is NaN. An infinite batch value (overflow, a non-finite gradient) is skipped by the
mean too and counted: ``health/nonfinite/<key>`` is the number of them this epoch, present only
when > 0. Names starting with ``_`` are internal (error flags) and never provided.
"""

from __future__ import annotations

import copy
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from fastdiag.accumulator import Accumulator
from fastdiag.schema import NONFINITE_PREFIX

__all__ = ["NONFINITE_PREFIX", "Diagnostics"]

_STATE_KEYS = ("class", "version", "accumulator", "provided", "states")


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _is_stateful(obj: Any) -> bool:
    return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))


def _check_plain(value: Any, where: str) -> None:
    """A plain state: Tensor, None, bool/int/float/str, or a dict / list / tuple of those."""
    if value is None or isinstance(value, (Tensor, bool, numbers.Number, str)):
        return
    if isinstance(value, Mapping):
        for k, v in value.items():
            _check_plain(v, f"{where}[{k!r}]")
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
        return
    raise ValueError(f"{where} must be a Tensor, None, a number, a str, or a dict/list of those, got {type(value).__name__}")


def _copy_plain(value: Any) -> Any:
    """A copy of a plain state that shares no tensor with ``value``."""
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, Mapping):
        return {k: _copy_plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_copy_plain(v) for v in value)
    return value


class Diagnostics:
    """Base class: accumulator, provided keys and declared state of one diagnostics object.

    Subclasses call ``super().__init__()`` first, then :meth:`add_state` for each non-sum state,
    override :meth:`metric_keys` (and :meth:`_epoch_values` for epoch-level post-processing such
    as deltas or error flags), and record each update with :meth:`_add`.
    """

    state_version: ClassVar[int] = 1

    def __init__(self) -> None:
        self._acc = Accumulator()
        self._provided: set[str] = set()
        self._added: set[tuple[str, ...]] = set()  # name tuples already marked provided
        self._index_cache: dict[tuple[Any, ...], tuple[Tensor, Tensor]] = {}
        self._defaults: dict[str, tuple[Any, bool]] = {}

    # ------------------------------------------------------------------------------------------
    # declaration
    # ------------------------------------------------------------------------------------------

    def add_state(self, name: str, default: Any, *, reset: bool = True) -> None:
        """Declare one non-sum state, stored as attribute ``name``.

        default: a Tensor, None, int/float/str, a dict/list of those, or an object with
        ``state_dict()`` / ``load_state_dict()``. ``reset()`` restores a deep copy of ``default``
        when ``reset`` is True. Every declared state goes into :meth:`state_dict`.
        """
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"state name must be an identifier, got {name!r}")
        if name in self._defaults:
            raise ValueError(f"state {name!r} is already declared")
        if not _is_stateful(default):
            _check_plain(default, f"default of state {name!r}")
        self._defaults[name] = (default, bool(reset))
        setattr(self, name, copy.deepcopy(default))

    def metric_keys(self) -> tuple[str, ...]:
        """The public keys, in catalogue order (subclasses override)."""
        return ()

    # ------------------------------------------------------------------------------------------
    # update / epoch
    # ------------------------------------------------------------------------------------------

    def _add(self, names: Sequence[str], values: Tensor, positions: Sequence[int] | None = None) -> None:
        """Record one update: ``values`` float64 [len(names)] on the device.

        NaN = provided but undefined (skipped by the mean; the key still counts as provided).
        ``positions``: name j takes ``values[positions[j]]`` (a summary vector holding more
        fields than the names). Pass tuples (constants of the subclass): the slot and position
        index tensors are cached, so an update is one accumulator op.
        """
        key = names if isinstance(names, tuple) else tuple(names)
        pos = None if positions is None else (positions if isinstance(positions, tuple) else tuple(positions))
        device = values.device
        cached = self._index_cache.get((key, pos, device))
        if cached is None or self._acc.state is None:
            idx = self._acc.slots(key, device)
            src = torch.arange(len(key)) if pos is None else torch.tensor(pos, dtype=torch.long)
            cached = (idx, src.to(idx.device))
            self._index_cache[(key, pos, device)] = cached
        self._acc.add_at(cached[0], values, cached[1])
        if key not in self._added:
            self._added.add(key)
            self._provided.update(k for k in key if not k.startswith("_"))

    def _epoch_values(self, raw: dict[str, float]) -> dict[str, float]:
        """Hook: from every accumulated mean (internal names included) to the returned dict.

        Default: the provided :meth:`metric_keys`, in that order.
        """
        provided = self._provided
        return {k: raw[k] for k in self.metric_keys() if k in provided and k in raw}

    def reset(self) -> None:
        """Start a new epoch: zero the sums, forget the provided keys, reset the resettable states."""
        self._acc.reset()
        self._provided = set()
        self._added = set()
        for name, (default, reset) in self._defaults.items():
            if reset:
                setattr(self, name, copy.deepcopy(default))

    def get_epoch_stats(self, sync_dist: bool = False, process_group: Any = None) -> dict[str, float]:
        """The epoch values; one device->host copy.

        ``sync_dist`` / ``process_group``: sum the accumulator over the ranks first (a no-op when
        torch.distributed is not initialised). Declared states stay per rank.
        """
        raw, infinite = self._acc.compute_all(sync_dist=sync_dist, process_group=process_group)
        out = self._epoch_values(raw)
        # nothing is silently lost: infinite batch values skipped by a mean are counted per key
        out.update(
            {f"{NONFINITE_PREFIX}{k}": infinite[k] for k in list(out) if infinite.get(k, 0.0) > 0}
        )
        return out

    def compute(self, sync_dist: bool = False, process_group: Any = None) -> dict[str, float]:
        """Alias of :meth:`get_epoch_stats`."""
        return self.get_epoch_stats(sync_dist, process_group)

    # ------------------------------------------------------------------------------------------
    # checkpointing
    # ------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """``{"class", "version", "accumulator", "provided", "states"}`` (tensors are copies)."""
        states: dict[str, Any] = {}
        for name in self._defaults:
            value = getattr(self, name)
            states[name] = value.state_dict() if _is_stateful(value) else _copy_plain(value)
        return {
            "class": _qualname(type(self)),
            "version": self.state_version,
            "accumulator": self._acc.state_dict(),
            "provided": sorted(self._provided),
            "states": states,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output.

        Everything is validated before anything is assigned: a wrong class, a version mismatch, a
        missing or extra key, or a wrong type / shape raise ValueError naming what is wrong, and
        leave the object unchanged.
        """
        acc, provided, states = self._validated(state_dict)
        self._acc = acc
        self._index_cache = {}
        self._provided = provided
        self._added = set()
        for name, value in states.items():
            setattr(self, name, value)

    def _validated(self, sd: Any) -> tuple[Accumulator, set[str], dict[str, Any]]:
        """The new accumulator, provided set and states of ``sd``, built without touching self."""
        if not isinstance(sd, Mapping):
            raise ValueError(f"state_dict must be a dict, got {type(sd).__name__}")
        missing = [k for k in _STATE_KEYS if k not in sd]
        extra = sorted(str(k) for k in sd if k not in _STATE_KEYS)
        if missing or extra:
            raise ValueError(f"state_dict keys: missing {missing}, unexpected {extra} (expected {list(_STATE_KEYS)})")
        want = _qualname(type(self))
        if sd["class"] != want:
            raise ValueError(f"state_dict is for class {sd['class']!r}, this is {want!r}")
        if isinstance(sd["version"], bool) or sd["version"] != self.state_version:
            raise ValueError(
                f"state_dict has version {sd['version']!r}, {want} reads version {self.state_version}"
            )
        acc = Accumulator()
        try:
            acc.load_state_dict(_checked_accumulator(sd["accumulator"]))
        except (TypeError, KeyError, RuntimeError) as err:
            raise ValueError(f"state_dict['accumulator'] is invalid: {err}") from err
        prov = sd["provided"]
        if not isinstance(prov, (list, tuple, set, frozenset)) or not all(isinstance(k, str) for k in prov):
            raise ValueError(f"state_dict['provided'] must be a list of str, got {prov!r}")
        states = sd["states"]
        if not isinstance(states, Mapping):
            raise ValueError(f"state_dict['states'] must be a dict, got {type(states).__name__}")
        missing = [k for k in self._defaults if k not in states]
        extra = sorted(str(k) for k in states if k not in self._defaults)
        if missing or extra:
            raise ValueError(
                f"state_dict['states']: missing {missing}, unexpected {extra} "
                f"(expected {list(self._defaults)})"
            )
        new: dict[str, Any] = {}
        for name, (default, _) in self._defaults.items():
            new[name] = self._state_value(name, default, states[name])
        return acc, set(prov), new

    def _state_value(self, name: str, default: Any, value: Any) -> Any:
        where = f"state_dict['states'][{name!r}]"
        current = getattr(self, name)
        if _is_stateful(current):
            target = copy.deepcopy(current)  # loaded into a copy: self is untouched on failure
            try:
                target.load_state_dict(value)
            except ValueError as err:
                raise ValueError(f"{where} is invalid: {err}") from err
            except (TypeError, KeyError, AttributeError, RuntimeError) as err:
                raise ValueError(f"{where} is invalid: {type(err).__name__}: {err}") from err
            return target
        _check_plain(value, where)
        if isinstance(default, Tensor):
            if not isinstance(value, Tensor) or value.dtype != default.dtype or value.shape != default.shape:
                got = f"{value.dtype} {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(f"{where} must be a {default.dtype} tensor of shape {tuple(default.shape)}, got {got}")
            return value.detach().clone().to(default.device)
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise ValueError(f"{where} must be a bool, got {type(value).__name__}")
        elif isinstance(default, numbers.Integral):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"{where} must be an int, got {type(value).__name__}")
        elif isinstance(default, numbers.Real):
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(f"{where} must be a number, got {type(value).__name__}")
        elif isinstance(default, str):
            if not isinstance(value, str):
                raise ValueError(f"{where} must be a str, got {type(value).__name__}")
        elif isinstance(default, Mapping):
            if not isinstance(value, Mapping):
                raise ValueError(f"{where} must be a dict, got {type(value).__name__}")
            return _copy_plain(dict(value))
        elif isinstance(default, (list, tuple)):
            if not isinstance(value, (list, tuple)):
                raise ValueError(f"{where} must be a list, got {type(value).__name__}")
            return _copy_plain(type(default)(value))
        # default None: any plain value (a Tensor, None, ...) is accepted
        return _copy_plain(value)


def _checked_accumulator(state: Any) -> Mapping[str, Any]:
    if not isinstance(state, Mapping) or set(state) != {"names", "state"}:
        raise ValueError("must be a dict with keys 'names' and 'state'")
    names, tensor = state["names"], state["state"]
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"names must be a list of str, got {names!r}")
    if len(set(names)) != len(names):
        raise ValueError("names must be unique")
    if tensor is not None:
        if not isinstance(tensor, Tensor) or not tensor.dtype.is_floating_point:
            raise ValueError(f"state must be a float tensor or None, got {type(tensor).__name__}")
        if tensor.dim() != 2 or tuple(tensor.shape) not in ((len(names), 2), (len(names), 3)):
            raise ValueError(f"state must have shape ({len(names)}, 3), got {tuple(tensor.shape)}")
    elif names:
        raise ValueError("state is None but names are registered")
    return state

