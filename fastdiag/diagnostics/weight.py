"""``WeightDiagnostics``: pooling weights, mixture / expert gates, sparse-coding coefficients.

docs/metrics.md §3: any probability-like weights over a last axis get the same row
statistics under the caller's prefix (``pool/``, ``moe/``, ``alpha/`` ...), from one
``dist_stats`` pass and one ``dist_summary``: entropy mean / norm, top-1 mean / std, KL to
uniform, sparsity (> tau), support size mean / median (#entries > eps), prune fraction
(entries <= eps); usage
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
from fastdiag.diagnostics._base import check_float, check_index, report_flags, rowsum_warnings
from fastdiag.diagnostics.base import Diagnostics
from fastdiag.ops import RowSlot, Slot, summaries
from fastdiag.ops.summaries import DIST, USAGE

_OUT_OF_RANGE = "_error/indices_out_of_range"
# internal: sum of |row sum - 1| and number of rows of the probability weights (means per update)
_ROWSUM = {"weights": ("_rowsum/weights", "_rows/weights", ": pass from_logits=True for logits")}


def _threshold(value: Any, name: str) -> float:
    """``tau`` / ``eps`` validated: a finite real number in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (
        math.isfinite(value) and 0 <= value < 1
    ):
        raise ValueError(f"{name} must be a finite number in [0, 1), got {value!r}")
    return float(value)


class WeightDiagnostics(Diagnostics):
    """Row statistics of weights [..., N] under ``prefix`` (keys: ``fastdiag.schema.weight_keys``).

    prefix: key prefix, e.g. ``"pool"`` -> ``pool/entropy_mean`` (a trailing ``/`` is optional).
    tau: sparsity threshold (share of entries > tau). eps: support threshold (entries > eps are
    in the support; entries <= eps are pruned).

    ``get_epoch_stats`` also returns ``{prefix}/nonfinite_rows``: mean number per update of
    weight rows holding NaN or inf (excluded from every other value); and, only when > 0,
    ``{prefix}/indices_out_of_range``: mean number per update of ``indices`` entries >= num_sets
    (excluded; a RuntimeWarning at every call). Weights (not ``from_logits``) whose rows do not
    sum to 1 (mean |sum - 1| > 1e-3) give one RuntimeWarning per object.
    """

    def __init__(self, prefix: str = "pool", *, tau: float = 0.1, eps: float = 1e-6) -> None:
        if not isinstance(prefix, str) or not prefix.strip("/"):
            raise ValueError(f"prefix must be a non-empty string such as 'pool', got {prefix!r}")
        super().__init__()
        self.prefix = prefix.rstrip("/")
        self.tau = _threshold(tau, "tau")
        self.eps = _threshold(eps, "eps")
        self.keys = schema.weight_keys(self.prefix)
        self._key = dict(zip(schema.WEIGHT_DIAGNOSTICS_SUFFIXES, self.keys, strict=True))
        self.nonfinite_key = f"{self.prefix}/nonfinite_rows"
        self.out_of_range_key = f"{self.prefix}/indices_out_of_range"
        self._rowsum_warned: set[str] = set()  # row-sum warning given (once per object)
        self._rowsum = (tuple(_ROWSUM["weights"][:2]), (Slot.ROWSUM_ERR, Slot.COUNT))
        k = self._key
        dist = (
            ("entropy_mean", "entropy_mean"), ("entropy_norm", "entropy_norm"), ("top1_mean", "top1_mean"),
            ("top1_std", "top1_std"), ("kl_uniform", "kl_uniform"), ("sparsity", "sparsity"),
            ("support_mean", "support_mean"), ("prune_frac", "prune_frac"),
        )
        self._dist = (
            (*(k[key] for key, _ in dist), self.nonfinite_key),
            (*(DIST[f] for _, f in dist), DIST["nonfinite_rows"]),
        )
        self._usage = (
            (k["usage_gini"], k["active_ratio"], _OUT_OF_RANGE),
            (USAGE["gini"], USAGE["active_ratio_raw"], USAGE["out_of_range"]),
        )
        self.add_state("_config", {"prefix": self.prefix, "tau": self.tau, "eps": self.eps}, reset=False)

    def metric_keys(self) -> tuple[str, ...]:
        return (*self.keys, self.nonfinite_key)

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
            check_index(indices, "indices")
            if num_sets is None:
                if weights is None:
                    raise ValueError("num_sets is needed with indices when weights are not given")
                num_sets = weights.shape[-1]
            if isinstance(num_sets, (bool, Tensor)) or not isinstance(num_sets, numbers.Integral) or num_sets < 1:
                raise ValueError(f"num_sets must be a positive int (not a tensor), got {num_sets!r}")
        if atoms is not None:
            check_float(atoms, "atoms")
            if atoms.dim() < 2 or atoms.shape[0] == 0 or atoms[0].numel() == 0:
                raise ValueError(
                    f"atoms must have shape [K, ...] with K >= 1 atoms of at least one feature, "
                    f"got {tuple(atoms.shape)}"
                )
        k = self._key
        if weights is not None:
            st = ops.dist_stats(weights, from_logits=from_logits, tau=self.tau, eps=self.eps, rows=True)
            values, _ = summaries.dist_summary(st, weights.shape[-1])
            self._add(self._dist[0], values, self._dist[1])
            if not from_logits:  # probabilities: their row-sum error is checked at the epoch end
                self._add(self._rowsum[0], st.sums, self._rowsum[1])
            median = ops.median(st.rows[..., RowSlot.GT_EPS])
            self._add((k["support_median"],), median.reshape(1))
        if indices is not None:
            values, _ = summaries.usage_summary(indices, int(num_sets))
            self._add(self._usage[0], values, self._usage[1])
        if atoms is not None:
            coherence = ops.bank_coherence(atoms.detach().reshape(atoms.shape[0], -1))
            self._add((k["coherence"],), coherence.to(torch.float64).reshape(1))

    def _epoch_values(self, raw: dict[str, float]) -> dict[str, float]:
        """Epoch values (``{prefix}/...`` keys in schema order, then ``{prefix}/nonfinite_rows``)."""
        health = report_flags(
            raw,
            {_OUT_OF_RANGE: (
                self.out_of_range_key,
                f"indices must be < num_sets (or < 0 for padding): this epoch's updates of "
                f"{self.prefix!r} held {{value:.4g}} entries >= num_sets per update (mean); they were "
                f"excluded and are reported in {self.out_of_range_key}",
            )},
        )
        rowsum_warnings(raw, _ROWSUM, self._rowsum_warned)
        return {**super()._epoch_values(raw), **health}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; validated completely first (the base class, and
        ``_config``: this prefix, a valid tau and eps), so on any error the object is unchanged."""
        tau, eps = self.tau, self.eps
        states = state_dict.get("states") if isinstance(state_dict, Mapping) else None
        if isinstance(states, Mapping) and "_config" in states:
            config = states["_config"]
            where = "state_dict['states']['_config']"
            if not isinstance(config, Mapping) or set(config) != {"prefix", "tau", "eps"}:
                got = sorted(map(str, config)) if isinstance(config, Mapping) else type(config).__name__
                raise ValueError(f"{where} must be a dict with keys ['eps', 'prefix', 'tau'], got {got}")
            if config["prefix"] != self.prefix:
                raise ValueError(f"state_dict is for prefix {config['prefix']!r}, this is {self.prefix!r}")
            try:
                tau, eps = _threshold(config["tau"], "tau"), _threshold(config["eps"], "eps")
            except ValueError as err:
                raise ValueError(f"{where}: {err}") from err
        super().load_state_dict(state_dict)
        self.tau, self.eps = tau, eps
