"""``WeightDiagnostics``: pooling weights, mixture / expert gates, sparse-coding coefficients.

METRICS.md section 3: any probability-like weights over a last axis get the same row
statistics under the caller's prefix (``pool/``, ``moe/``, ``alpha/`` ...), from one
``dist_stats`` pass: entropy mean / norm, top-1 mean / std, KL to uniform, sparsity (> tau),
support size mean / median (#entries > eps, seed 003), prune fraction (entries <= eps); usage
balance (Gini, active ratio) when the chosen indices are given; and the bank coherence of an
atom matrix (max off-diagonal |cosine|, exact). Epoch value = mean of the batch values.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from fastdiag import ops, schema
from fastdiag.diagnostics._base import (
    _Epoch,
    check_float,
    check_tensor,
    normalised,
    raise_flags,
)
from fastdiag.ops import RowSlot, Slot
from fastdiag.ops import usage as _usage

_OUT_OF_RANGE = "_error/indices_out_of_range"


class WeightDiagnostics:
    """Row statistics of weights [..., N] under ``prefix`` (keys: ``fastdiag.schema.weight_keys``).

    prefix: key prefix, e.g. ``"pool"`` -> ``pool/entropy_mean`` (a trailing ``/`` is optional).
    tau: sparsity threshold (share of entries > tau). eps: support threshold (entries > eps are
    in the support; entries <= eps are pruned).

    ``get_epoch_stats`` also returns ``{prefix}/nonfinite_rows``: mean number per update of
    weight rows holding NaN or inf (excluded from every other value).
    """

    def __init__(self, prefix: str = "pool", *, tau: float = 0.1, eps: float = 1e-6) -> None:
        if not isinstance(prefix, str) or not prefix.strip("/"):
            raise ValueError(f"prefix must be a non-empty string such as 'pool', got {prefix!r}")
        self.prefix = prefix.rstrip("/")
        self.tau = float(tau)
        self.eps = float(eps)
        self.keys = schema.weight_keys(self.prefix)
        self._key = dict(zip(schema.WEIGHT_DIAGNOSTICS_SUFFIXES, self.keys, strict=True))
        self.nonfinite_key = f"{self.prefix}/nonfinite_rows"
        self._epoch = _Epoch()

    def reset(self) -> None:
        """Start a new epoch."""
        self._epoch.reset()

    @torch.no_grad()
    def update(
        self,
        weights: Tensor | None = None,
        *,
        from_logits: bool = False,
        indices: Tensor | None = None,
        num_sets: int | None = None,
        atoms: Tensor | None = None,
    ) -> None:
        """Record one batch; never synchronises with the device.

        weights: [..., N] probabilities over the last axis (or logits with ``from_logits``).
        indices: int, any shape: the choices made (< 0 padding, >= num_sets an error reported by
        ``get_epoch_stats``); num_sets: number of choices (default N).
        atoms: [K, ...] an atom / basis bank, for ``coherence``.
        """
        if weights is not None:
            check_float(weights, "weights")
            if weights.dim() < 1 or weights.shape[-1] == 0:
                raise ValueError(f"weights must have shape [..., N] with N >= 1, got {tuple(weights.shape)}")
        if indices is not None:
            check_tensor(indices, "indices")
            if num_sets is None:
                if weights is None:
                    raise ValueError("num_sets is needed with indices when weights are not given")
                num_sets = weights.shape[-1]
            if isinstance(num_sets, (bool, Tensor)) or not isinstance(num_sets, numbers.Integral) or num_sets < 1:
                raise ValueError(f"num_sets must be a positive int (not a tensor), got {num_sets!r}")
        if atoms is not None:
            check_float(atoms, "atoms")
            if atoms.dim() < 2:
                raise ValueError(f"atoms must have shape [K, ...] with at least 2 dims, got {tuple(atoms.shape)}")
        k = self._key
        v: dict[str, Tensor] = {}
        if weights is not None:
            n = weights.shape[-1]
            st = ops.dist_stats(weights, from_logits=from_logits, tau=self.tau, eps=self.eps, rows=True)
            sums = st.sums
            count = sums[Slot.COUNT]
            h = ops.mean(sums, Slot.ENTROPY)
            v[k["entropy_mean"]] = h
            v[k["entropy_norm"]] = normalised(h, n)
            v[k["top1_mean"]] = ops.mean(sums, Slot.MAX)
            v[k["top1_std"]] = ops.std(sums, Slot.MAX, Slot.MAX_SQ)
            v[k["kl_uniform"]] = math.log(n) - h
            v[k["sparsity"]] = sums[Slot.GT_TAU] / (count * n)
            v[k["support_mean"]] = ops.mean(sums, Slot.GT_EPS)
            v[k["support_median"]] = ops.median(st.rows[..., RowSlot.GT_EPS])
            v[k["prune_frac"]] = 1 - sums[Slot.GT_EPS] / (count * n)
            v[self.nonfinite_key] = sums[Slot.NONFINITE]
        if indices is not None:
            usage = _usage.usage_stats(indices, int(num_sets))
            v[k["usage_gini"]] = usage.gini
            v[k["active_ratio"]] = usage.active_ratio
            v[_OUT_OF_RANGE] = usage.out_of_range
        if atoms is not None:
            v[k["coherence"]] = ops.bank_coherence(atoms.detach().reshape(atoms.shape[0], -1))
        self._epoch.add(v)

    def get_epoch_stats(self, sync_dist: bool = False, process_group: Any = None) -> dict[str, float]:
        """Epoch values (``{prefix}/...`` keys in schema order, then ``{prefix}/nonfinite_rows``)."""
        raw = self._epoch.compute(sync_dist, process_group)
        raise_flags(
            raw,
            {_OUT_OF_RANGE: f"indices must be < num_sets (or < 0 for padding); an update of this "
             f"epoch of {self.prefix!r} held an entry >= num_sets (not counted)"},
        )
        return self._epoch.provided_values(raw, (*self.keys, self.nonfinite_key))

    def state_dict(self) -> dict[str, Any]:
        return {"version": 1, "prefix": self.prefix, "tau": self.tau, "eps": self.eps,
                "epoch": self._epoch.state_dict()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        if state_dict["prefix"] != self.prefix:
            raise ValueError(f"state_dict is for prefix {state_dict['prefix']!r}, this is {self.prefix!r}")
        self.tau, self.eps = float(state_dict["tau"]), float(state_dict["eps"])
        self._epoch.load_state_dict(state_dict["epoch"])
