"""One parameter tracker for every diagnostics class: gradient / parameter norms, non-finite
gradient entries, and the change of the parameters against a device copy of earlier ones.

:class:`ParamTracker` serves two uses:

* **grouped** (``fastdiag.watch`` / :class:`~fastdiag.diagnostics.training.TrainingDiagnostics`):
  named parameters split into groups (``group=``: ``"auto"``, ``"parameter"``, ``"module"``, an
  int depth or a callable name -> group); :meth:`ParamTracker.gradient_stats` gives per-group
  gradient and parameter norms, the total gradient norm and non-finite gradient entries (and can
  keep a copy of the parameters before an optimizer step); :meth:`ParamTracker.update_ratios`
  gives ``||after - before|| / ||before||`` per group after the step.
* **one group** (the drop-in classes): :meth:`ParamTracker.update` gives the gradient norm, the
  parameter norm and the weight change ``||params now - params at the previous update||`` of a
  name -> tensor dict; the previous parameters (:attr:`ParamTracker.prev`) are part of the
  owner's ``state_dict``.

The formulas are those of docs/metrics.md, §5 "Gradient and training health". Every norm is a
fused multi-tensor norm of :mod:`fastdiag.ops.norms`; the stored copies are refreshed in place
(``torch._foreach_copy_``) while names, shapes, dtypes and devices stay the same. Every result is
a device tensor: nothing is copied to the host, and the tracker writes into no accumulator (its
owner records the values).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from fastdiag.ops.norms import diff_norms, nonfinite_counts, norms
from fastdiag.ops.summaries import param_norms

__all__ = [
    "AUTO_GROUP_MAX_PARAMS",
    "GROUPS",
    "GroupSpec",
    "ParamTracker",
    "group_fn",
]

AUTO_GROUP_MAX_PARAMS = 512  # group="auto": per parameter up to this many tensors, else per module
GROUPS = ("auto", "parameter", "module")

GroupSpec = str | int | Callable[[str], str]
Named = Mapping[str, Tensor] | Iterable[tuple[str, Tensor]]


def group_fn(group: Any, count: int) -> Callable[[str], str]:
    """The name -> group function of ``group`` for ``count`` parameters (validates ``group``).

    ``"parameter"``: the parameter's name; ``"module"``: its owning module's name; an int k: the
    first k name components; a callable: itself; ``"auto"``: ``"parameter"`` up to
    :data:`AUTO_GROUP_MAX_PARAMS` parameters, else ``"module"`` (bounds the number of keys).
    """
    if callable(group):
        return group
    if isinstance(group, bool) or not isinstance(group, (str, int)):
        raise TypeError(
            f"group must be one of {GROUPS}, a positive int depth or a callable name -> group, got {group!r}"
        )
    if isinstance(group, int):
        if group < 1:
            raise ValueError(f"group depth must be >= 1, got {group}")
        return lambda name: ".".join(name.split(".")[:group])
    if group not in GROUPS:
        raise ValueError(
            f"group must be one of {GROUPS}, a positive int depth or a callable name -> group, got {group!r}"
        )
    if group == "auto":
        group = "parameter" if count <= AUTO_GROUP_MAX_PARAMS else "module"
    if group == "parameter":
        return lambda name: name
    return lambda name: name.rpartition(".")[0] or name


class _Plan:
    """Keys and the device index tensor of one set of parameters (those with a gradient)."""

    def __init__(
        self,
        names: Sequence[str],
        fn: Callable[[str], str],
        device: torch.device,
        tensors: Sequence[Tensor] = (),
        experts: Mapping[str, tuple[str, int]] | None = None,
    ) -> None:
        groups: dict[str, int] = {}
        member = [groups.setdefault(str(fn(n)), len(groups)) for n in names]
        self.names = tuple(names)
        self.groups = list(groups)
        self.identity = len(self.groups) == len(names)  # one tensor per group, in order
        # host ints -> device without a blocking copy
        self.member = torch.tensor(member, dtype=torch.long).to(device, non_blocking=True)
        g = self.groups
        # tuples: the owner's accumulator caches its slot indices per key tuple
        self.grad_keys = (
            *(f"grad_norm/{x}" for x in g),
            *(f"param_norm/{x}" for x in g),
            "grad_norm_total",
            "health/nan_infs",
            *(f"health/nan_infs/{x}" for x in g),
        )
        self.ratio_keys = tuple(f"update_ratio/{x}" for x in g)
        # FSDP2 / DTensor: tensors sharded over a process group hold a shard each; their square
        # sums are summed over the group (one all_reduce per group and call, on the device)
        self.shard_groups: list[tuple[Any, Tensor]] = []
        by_group: dict[Any, list[int]] = {}
        for i, t in enumerate(tensors):
            pg = _shard_group(t)
            if pg is not None:
                by_group.setdefault(pg, []).append(i)
        for pg, idx in by_group.items():
            mask = torch.zeros(len(names), dtype=torch.bool)
            mask[idx] = True
            self.shard_groups.append((pg, mask.to(device, non_blocking=True)))
        # per-expert gradient norms of fused [E, ...] expert parameters (not sharded ones)
        self.expert_idx: list[int] = []
        buckets: list[int] = []
        modules: dict[str, int] = {}
        expert_keys: list[str] = []
        for i, n in enumerate(names):
            spec = (experts or {}).get(n)
            if spec is None or (tensors and _shard_group(tensors[i]) is not None):
                continue
            module, e = spec
            if module not in modules:
                modules[module] = len(expert_keys)
                expert_keys.extend(f"grad_norm/{module}.expert_{j}" for j in range(e))
            self.expert_idx.append(i)
            buckets.extend(modules[module] + j for j in range(e))
        self.grad_keys = (*self.grad_keys, *expert_keys)
        self.expert_slots = len(expert_keys)
        self.expert_bucket = torch.tensor(buckets, dtype=torch.long).to(device, non_blocking=True)

    def reduce(self, values: Tensor, repeat: int) -> Tensor:
        """Sum over the shard groups the entries of sharded tensors in ``values`` (``repeat``
        blocks of one entry per tensor); the others unchanged."""
        if not self.shard_groups:
            return values
        import torch.distributed as dist

        for pg, mask in self.shard_groups:
            m = mask.repeat(repeat)
            part = torch.where(m, values, 0.0)
            dist.all_reduce(part, group=pg)
            values = torch.where(m, part, values)
        return values

    def group_sum(self, values: Tensor) -> Tensor:
        """Sum within each group of per-tensor values [n, ...] -> [len(groups), ...]."""
        if self.identity:
            return values
        out = torch.zeros((len(self.groups), *values.shape[1:]), dtype=values.dtype, device=values.device)
        return out.index_add_(0, self.member, values)


class ParamTracker:
    """Norms of named parameters and of their change against stored device copies.

    name: how error messages call the parameters (``"params"`` -> ``params['w']``).
    group: the grouping of :meth:`gradient_stats` / :meth:`update_ratios` (see :func:`group_fn`).

    One-group use (the drop-in classes): :meth:`check`, :meth:`update`, :attr:`prev`,
    :meth:`state_dict`, :meth:`load_state_dict`. Grouped use (``watch``):
    :meth:`gradient_stats` then, after the optimizer step, :meth:`update_ratios`.
    """

    def __init__(
        self,
        name: str = "parameters",
        *,
        group: GroupSpec = "parameter",
        experts: Mapping[str, tuple[str, int]] | None = None,
    ) -> None:
        if not isinstance(name, str):
            raise TypeError(f"name must be a str, got {type(name).__name__}")
        group_fn(group, 0)  # validate now
        if experts is not None and not isinstance(experts, Mapping):
            raise TypeError(
                f"experts must be a dict parameter name -> (module name, E) or None, got {type(experts).__name__}"
            )
        self.name = name
        self.group = group
        self.experts = dict(experts or {})
        self.prev: dict[str, Tensor] | None = None  # parameters at the previous update()
        self._plans: dict[tuple[str, ...], tuple[Callable[[str], str], dict[tuple[int, ...], _Plan]]] = {}
        self._snapshot: dict[str, Tensor] = {}  # parameters before the optimizer step
        self._pending: tuple[_Plan, list[Tensor], Tensor] | None = None

    # -- one group: gradient norm, parameter norm, weight change since the previous update ----

    def check(self, params: Any) -> None:
        """Host-side checks: a non-empty dict of tensors whose shapes match the previous update."""
        if not isinstance(params, Mapping):
            raise TypeError(f"{self.name} must be a dict name -> Parameter, got {type(params).__name__}")
        if not params:
            raise ValueError(f"{self.name} must hold at least one parameter, got an empty dict")
        prev = self.prev
        for n, p in params.items():
            if not isinstance(p, Tensor):
                raise TypeError(f"{self.name}[{n!r}] must be a torch.Tensor, got {type(p).__name__}")
            if not p.dtype.is_floating_point:
                raise TypeError(
                    f"{self.name}[{n!r}] must be a floating-point parameter, got dtype {p.dtype}"
                )
            if prev is not None and n in prev and prev[n].shape != p.shape:
                raise ValueError(
                    f"{self.name}[{n!r}] changed shape from {tuple(prev[n].shape)} "
                    f"to {tuple(p.shape)} between updates"
                )

    def update(self, params: Mapping[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """(gradient norm, parameter norm, weight change): :meth:`update_values` as three 0-d tensors."""
        grad, norm, change = self.update_values(params)[:3].unbind()
        return grad, norm, change

    def update_values(self, params: Mapping[str, Tensor]) -> Tensor:
        """float64 [5] on the device of the first parameter: (gradient norm, parameter norm,
        weight change, gradient_missing, moved) (``fastdiag.ops.summaries.PARAM_FIELDS``).

        The gradient norm covers the parameters with a ``.grad`` (0 when none has one). The
        weight change is ``||params now - params at the previous update||`` over the names
        present at both updates (0 when none is), NaN at the first update. The parameters are
        then kept (:attr:`prev`) for the next update. With the same names, shapes and dtypes as
        the previous update this is one ``fastdiag.ops.summaries.param_norms`` call (one fused
        op on the CPU) that also refreshes :attr:`prev` in place.
        """
        self.check(params)
        names = list(params)
        tensors = [params[n].detach() for n in names]
        grads = [p.grad.detach() for p in params.values() if p.grad is not None]
        prev = self.prev
        if prev is not None and _same_layout(prev, names, tensors):
            return param_norms(tensors, grads, list(prev.values()))
        values = param_norms(tensors, grads, None)
        if prev is not None:  # the parameter set changed: the change over the common names
            device = values.device
            common = [i for i, n in enumerate(names) if n in prev]
            if common:
                cur = [tensors[i] for i in common]
                old = [prev[names[i]].to(tensors[i].device) for i in common]
                change = diff_norms(cur, old).to(device).square().sum().sqrt()
            else:
                change = torch.zeros((), dtype=torch.float64, device=device)
            moved = (change > 0).to(torch.float64)
            values = torch.stack([values[0], values[1], change, values[3], moved])
        self.prev = _refresh(prev, names, tensors)
        return values

    def state_dict(self) -> dict[str, Tensor] | None:
        """A copy of :attr:`prev` (None before the first update)."""
        return None if self.prev is None else {k: v.clone() for k, v in self.prev.items()}

    def load_state_dict(self, prev: Mapping[str, Tensor] | None) -> None:
        """Restore :attr:`prev` from :meth:`state_dict`'s result."""
        if prev is not None and not isinstance(prev, Mapping):
            raise TypeError(f"{self.name} state must be a dict name -> tensor or None, got {type(prev).__name__}")
        if prev is not None:
            for k, v in prev.items():
                if not isinstance(v, Tensor):
                    raise TypeError(f"{self.name} state [{k!r}] must be a torch.Tensor, got {type(v).__name__}")
        self.prev = None if prev is None else {k: _copy(v) for k, v in prev.items()}

    # -- groups: gradient health and update ratio across an optimizer step --------------------

    def gradient_stats(self, parameters: Named, *, snapshot: bool = False) -> tuple[tuple[str, ...], Tensor] | None:
        """Gradient health of the named parameters that have a ``.grad``: ``(keys, values)``.

        keys: ``grad_norm/{g}`` and ``param_norm/{g}`` (L2 over the group's tensors),
        ``grad_norm_total`` (L2 over all gradients), ``health/nan_infs`` (non-finite gradient
        entries) and ``health/nan_infs/{g}``; values: float64 [len(keys)] on the parameters'
        device. None when no parameter has a gradient. With ``snapshot``, a copy of those
        parameters is kept for :meth:`update_ratios` (after the optimizer step).
        """
        named = _named(parameters, self.name)
        idx = tuple(i for i, (_, p) in enumerate(named) if p.grad is not None)
        if not idx:
            self._pending = None
            return None
        plan = self._plan(named, idx)
        params = [_local(named[i][1].detach()) for i in idx]
        grads = [_local(named[i][1].grad) for i in idx]
        n = len(idx)
        sq = norms(grads + params).square()  # one fused pass over gradients and parameters
        nonfinite = nonfinite_counts(grads)
        # FSDP2: local shards' square sums -> global ones (one all_reduce, never full_tensor())
        sums = plan.reduce(torch.cat([sq, nonfinite]), 3)
        sq, nonfinite = sums[: 2 * n], sums[2 * n :]
        per_group = plan.group_sum(torch.stack([sq[:n], sq[n:], nonfinite], dim=1))
        parts = [
            per_group[:, 0].sqrt(),
            per_group[:, 1].sqrt(),
            sq[:n].sum().sqrt().reshape(1),
            nonfinite.sum().reshape(1),
            per_group[:, 2],
        ]
        if plan.expert_idx:  # one norm per expert slice (views), on the foreach path
            slices = [s for i in plan.expert_idx for s in grads[i].unbind(0)]
            esq = norms(slices).square()
            per_expert = torch.zeros(plan.expert_slots, dtype=torch.float64, device=esq.device)
            parts.append(per_expert.index_add_(0, plan.expert_bucket, esq).sqrt().to(sq.device))
        values = torch.cat(parts)
        if snapshot:
            copies = self._copies(plan.names, params)
            self._pending = (plan, copies, per_group[:, 1])
        else:
            self._pending = None
        return plan.grad_keys, values

    def update_ratios(self, parameters: Named) -> tuple[tuple[str, ...], Tensor] | None:
        """``update_ratio/{g}`` = ||param now - snapshot|| / ||snapshot|| per group: ``(keys,
        values)`` for the parameters of the last ``gradient_stats(..., snapshot=True)``, None
        without one. A group whose snapshot norm is 0 gets NaN: undefined, not counted."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        plan, copies, before_sq = pending
        current = dict(_named(parameters, self.name))
        # in place: the copies are rewritten at the next snapshot, so no temporary per tensor
        torch._foreach_sub_(copies, [_local(current[n].detach()) for n in plan.names])
        delta_sq = plan.group_sum(plan.reduce(norms(copies).square(), 1))
        ratio = delta_sq.sqrt() / before_sq.sqrt()
        return plan.ratio_keys, torch.where(before_sq > 0, ratio, math.nan)

    def _plan(self, named: Sequence[tuple[str, Tensor]], idx: tuple[int, ...]) -> _Plan:
        names = tuple(n for n, _ in named)
        entry = self._plans.get(names)
        if entry is None:
            entry = self._plans[names] = (group_fn(self.group, len(names)), {})
        fn, plans = entry
        plan = plans.get(idx)
        if plan is None:
            plan = plans[idx] = _Plan(
                [names[i] for i in idx], fn, named[idx[0]][1].device, [named[i][1] for i in idx], self.experts
            )
        return plan

    def _copies(self, names: Sequence[str], tensors: list[Tensor]) -> list[Tensor]:
        self._snapshot = _refresh(self._snapshot, list(names), tensors, keep=self._snapshot)
        return [self._snapshot[n] for n in names]


def _is_dtensor(t: Tensor) -> bool:
    return hasattr(t, "to_local") and hasattr(t, "placements") and hasattr(t, "device_mesh")


def _local(t: Tensor) -> Tensor:
    """A DTensor's local shard (FSDP2 parameters and gradients), any other tensor itself."""
    return t.to_local() if _is_dtensor(t) else t


def _shard_group(t: Tensor) -> Any:
    """The process group over which a DTensor's local shards make up the tensor (its mesh
    dimension with a ``Shard`` placement; None for a plain tensor or a replicated DTensor).
    Sharded over several mesh dimensions: the whole mesh's group (a 1-D mesh only)."""
    if not _is_dtensor(t):
        return None
    dims = [i for i, pl in enumerate(t.placements) if type(pl).__name__.endswith("Shard")]
    if not dims:
        return None
    mesh = t.device_mesh
    if len(dims) > 1:
        raise ValueError(
            f"parameters sharded over {len(dims)} mesh dimensions are not supported (placements {t.placements})"
        )
    return mesh.get_group(dims[0])


def _named(parameters: Any, what: str) -> list[tuple[str, Tensor]]:
    """``parameters`` (a mapping or (name, tensor) pairs) as a list of pairs, checked."""
    if isinstance(parameters, Mapping):
        named = list(parameters.items())
    elif isinstance(parameters, Iterable) and not isinstance(parameters, (str, bytes, Tensor)):
        named = list(parameters)
    else:
        raise TypeError(
            f"{what} must be a dict name -> tensor or (name, tensor) pairs, got {type(parameters).__name__}"
        )
    for item in named:
        if not (isinstance(item, tuple) and len(item) == 2):
            raise TypeError(f"{what} must be (name, tensor) pairs, got an item {item!r}")
        name, p = item
        if not isinstance(name, str) or not isinstance(p, Tensor):
            raise TypeError(
                f"{what} must be (name, tensor) pairs, got ({type(name).__name__}, {type(p).__name__})"
            )
    return named


def _refresh(
    store: dict[str, Tensor] | None,
    names: list[str],
    tensors: list[Tensor],
    keep: dict[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Device copies of ``tensors`` under ``names``: ``store`` refreshed in place
    (``torch._foreach_copy_``) where a copy of the same shape, dtype and device exists, new
    contiguous copies elsewhere. Without ``keep``, names not in ``names`` are dropped."""
    out: dict[str, Tensor] = dict(keep) if keep is not None else {}
    reuse_dst: list[Tensor] = []
    reuse_src: list[Tensor] = []
    for n, t in zip(names, tensors, strict=True):
        old = None if store is None else store.get(n)
        if old is not None and _same_tensor_layout(old, t):
            out[n] = old
            reuse_dst.append(old)
            reuse_src.append(t)
        else:
            out[n] = _copy(t)
    if reuse_dst:
        torch._foreach_copy_(reuse_dst, reuse_src)
    return out


def _copy(t: Tensor) -> Tensor:
    """A contiguous device copy (the fused ``param_norms`` op reads and refreshes those)."""
    return t.detach().clone(memory_format=torch.contiguous_format)


def _same_tensor_layout(old: Tensor, t: Tensor) -> bool:
    return old.shape == t.shape and old.dtype == t.dtype and old.device == t.device and old.is_contiguous()


def _same_layout(prev: Mapping[str, Tensor], names: list[str], tensors: list[Tensor]) -> bool:
    """Whether ``prev`` holds a refreshable copy of each tensor, under the same names in order."""
    if len(prev) != len(names):
        return False
    return all(
        n == m and _same_tensor_layout(q, t)
        for (m, q), n, t in zip(prev.items(), names, tensors, strict=True)
    )
