"""Stability criteria and early stopping for dictionary / mixture loops (docs/metrics.md §11).

An alternating-minimisation loop (coding step: softmax mixture weights ``alpha`` over a bank of
bases at temperature T; dictionary step: the bank; refit: per-target coefficients by least
squares) is computed on the device with :func:`am_stats` (the formulas are in
:mod:`fastdiag.ops.stability`; nothing is copied to the host) and judged once per epoch:

* :class:`StabilityCriteria` -- the four stability criteria (reconstruction good or still
  improving, support on target, bank diverse, no NaN / inf) and the collapse signatures
  (median support 1, non-finite coding logits, bank coherence rising), as
  :class:`fastdiag.schema.Rule` data; :meth:`StabilityCriteria.check` copies a stats dict of
  tensors to the host in one transfer and returns a :class:`StabilityVerdict`.
* :class:`EarlyStopping` -- ``step(stats) -> bool`` for any loop: stops a stable run whose
  reconstruction stopped improving, and a run that stays unstable (collapsed).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fastdiag.ops import stability as sops
from fastdiag.schema import Rule, Verdict

__all__ = [
    "COLLAPSE_FAILURES",
    "COLLAPSE_RULES",
    "EarlyStopping",
    "KEYS",
    "RMSE_PREFIX",
    "StabilityCriteria",
    "StabilityVerdict",
    "am_stats",
    "to_host",
]

RMSE_PREFIX = "recon/rMSE_"  # + group name: relative reconstruction MSE of that group

# every key am_stats can return (recon/rMSE_<group> once per group)
KEYS: tuple[str, ...] = (
    "recon/rMSE_<group>",
    "alpha/median_support",
    "alpha/mean_support",
    "alpha/entropy_mean",
    "alpha/epsilon_prune_frac",
    "alpha/support_error",
    "alpha/temp_T",
    "alpha/nonfinite_logit_rows",
    "bank/atom_norm_mean",
    "bank/coherence_offdiag_max",
    "A/refit_resid_rel_mean",
    "A/refit_cond_BBt_mean",
    "health/nan_infs",
)

# The collapse signatures (read by every StabilityCriteria; keys are unprefixed metric names).
COLLAPSE_RULES: tuple[Rule, ...] = (
    Rule(
        "median_support", low=1.5, failure="support collapse",
        message="half the codes or more keep a single basis: the softmax coding went one-hot "
                "(temperature too low or annealed too fast, weights pruned too hard)",
        severity="critical",
    ),
    Rule(
        "nonfinite_logit_rows", high=0.0, failure="non-finite coding logits",
        message="coding logits hold -inf / NaN (log of pruned, exactly zero weights): those bases "
                "can never come back; clamp the weights at epsilon before the log",
        severity="critical",
    ),
    Rule(
        "coherence_offdiag_max", trend="increasing", failure="bank coherence rising",
        message="the bases grow more alike epoch after epoch: the dictionary is collapsing "
                "towards fewer distinct atoms",
        severity="warning",
    ),
)  # fmt: skip


# failures that stop a run as collapsed (EarlyStopping); the others only block convergence
COLLAPSE_FAILURES: frozenset[str] = frozenset(
    {
        "support collapse",
        "non-finite coding logits",
        "non-finite values",
        "non-finite reconstruction",
    }
)


def _threshold(value: Any, name: str, *, integral: bool = False) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or math.isnan(value)
        or value < 0
    ):
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    if integral and value != math.inf and value != int(value):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    return float(value)


def to_host(stats: Mapping[str, Any]) -> dict[str, float]:
    """``stats`` as plain floats: every tensor value (one element each) is copied to the host in
    one transfer (stacked as float64 on its device first); other values go through ``float``."""
    out: dict[str, float] = {}
    tensors = {k: v for k, v in stats.items() if isinstance(v, Tensor)}
    by_device: dict[torch.device, list[str]] = {}
    for key, value in tensors.items():
        if value.numel() != 1:
            raise ValueError(
                f"stats[{key!r}] must have one element, got shape {tuple(value.shape)}"
            )
        by_device.setdefault(value.device, []).append(key)
    host: dict[str, float] = {}
    for keys in by_device.values():
        stacked = torch.stack([tensors[k].detach().reshape(()).to(torch.float64) for k in keys])
        host.update(zip(keys, stacked.cpu().tolist(), strict=True))  # host ok: the one copy per device
    for key, value in stats.items():
        out[key] = host[key] if key in host else float(value)
    return out


@dataclass(frozen=True)
class StabilityVerdict:
    """``stable``: no critical rule broken; ``failing``: every broken rule (critical and
    warning) as :class:`fastdiag.schema.Verdict`; ``messages``: one line per failing entry."""

    stable: bool
    failing: list[Verdict] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return self.stable


class StabilityCriteria:
    """The stability criteria of an AM loop's epoch stats (keys of :func:`am_stats`, any prefix).

    Critical (each makes the epoch unstable):

    * every ``recon/rMSE_<group>``: ``rMSE <= rmse_max`` or improved by ``>= min_improvement``
      since the previous epoch (``history[-1]``; not judged where history lacks the key);
    * ``alpha/support_error <= support_error_max``;
    * ``bank/coherence_offdiag_max <= coherence_max``;
    * ``health/nan_infs <= nan_infs_max``;
    * the collapse signatures of :data:`COLLAPSE_RULES`: ``alpha/median_support < 1.5`` and
      ``alpha/nonfinite_logit_rows > 0``.

    Warning (reported, not unstable): ``bank/coherence_offdiag_max`` rising over the last
    ``fastdiag.schema.TREND_EPOCHS`` epochs (needs ``history``).

    A key absent from the stats is not judged; a NaN value of a judged key breaks its rule.
    """

    def __init__(
        self,
        rmse_max: float = 0.02,
        min_improvement: float = 1e-4,
        support_error_max: float = 1,
        coherence_max: float = 0.15,
        nan_infs_max: float = 0,
    ) -> None:
        self.rmse_max = _threshold(rmse_max, "rmse_max")
        self.min_improvement = _threshold(min_improvement, "min_improvement")
        self.support_error_max = _threshold(support_error_max, "support_error_max")
        self.coherence_max = _threshold(coherence_max, "coherence_max")
        self.nan_infs_max = _threshold(nan_infs_max, "nan_infs_max", integral=True)
        self.rules: tuple[Rule, ...] = (
            Rule("support_error", high=self.support_error_max, failure="support off target",
                 message=f"|mean support - target| above {self.support_error_max:g}",
                 severity="critical"),
            Rule("coherence_offdiag_max", high=self.coherence_max, failure="bank not diverse",
                 message=f"two bases have |cosine| above {self.coherence_max:g}",
                 severity="critical"),
            Rule("nan_infs", high=self.nan_infs_max, failure="non-finite values",
                 message=f"more than {self.nan_infs_max:g} NaN / inf entries", severity="critical"),
            *COLLAPSE_RULES,
        )  # fmt: skip

    def __repr__(self) -> str:
        return (
            f"StabilityCriteria(rmse_max={self.rmse_max:g}, "
            f"min_improvement={self.min_improvement:g}, "
            f"support_error_max={self.support_error_max:g}, "
            f"coherence_max={self.coherence_max:g}, nan_infs_max={self.nan_infs_max:g})"
        )

    def check(
        self, stats: Mapping[str, Any], history: Sequence[Mapping[str, Any]] | None = None
    ) -> StabilityVerdict:
        """Judge one epoch's ``stats`` (floats or one-element tensors: one host copy) with
        earlier epochs ``history`` (oldest first) for the improvement and trend rules."""
        values = to_host(stats)
        past = [to_host(h) for h in history] if history else []
        failing: list[Verdict] = []
        for key, value in values.items():
            if not key.startswith(RMSE_PREFIX) and f"/{RMSE_PREFIX}" not in key:
                continue
            previous = past[-1].get(key, math.nan) if past else math.nan
            improvement = previous - value
            if math.isnan(value):
                failing.append(
                    Verdict(key, value, "non-finite reconstruction", "rMSE is NaN", "critical")
                )
            elif value > self.rmse_max and not improvement >= self.min_improvement:
                if math.isnan(previous):  # no earlier value of this key: not judged
                    continue
                failing.append(Verdict(
                    key, value, "reconstruction stalled",
                    f"rMSE {value:.4g} above {self.rmse_max:g} and improved by {improvement:.3g} "
                    f"(< {self.min_improvement:g}) since the previous epoch", "critical",
                ))  # fmt: skip
        for rule in self.rules:
            for key, value in values.items():
                if not rule.matches(key):
                    continue
                if math.isnan(value):
                    if rule.trend is None:
                        failing.append(
                            Verdict(key, value, rule.failure, "value is NaN", rule.severity)
                        )
                    continue
                series = [v for h in past if not math.isnan(v := h.get(key, math.nan))]
                if rule.trend is not None and not series:
                    continue
                if rule.broken(value, series):
                    failing.append(Verdict(key, value, rule.failure, rule.message, rule.severity))
        messages = [
            f"[{v.severity}] {v.key} = {v.value:.4g}: {v.failure} ({v.message})" for v in failing
        ]
        stable = not any(v.severity == "critical" for v in failing)
        return StabilityVerdict(stable, failing, messages)


class EarlyStopping:
    """Early stopping for any loop: ``if stopper.step(stats): break``.

    Each ``step`` judges ``stats`` with ``criteria`` (the earlier steps' stats as history) and
    tracks ``monitor`` (default: the largest ``recon/rMSE_*`` value). It returns True (and sets
    ``reason``) when

    * the run is stable and ``monitor`` has not improved on ``best`` by ``min_improvement``
      (the criteria's) for ``patience`` consecutive steps: ``reason = "converged: ..."``; or
    * a collapse signature (a failure of :data:`COLLAPSE_FAILURES`: support collapse,
      non-finite coding logits, NaN / inf values, NaN reconstruction) has held for ``patience``
      consecutive steps: ``reason = "collapsed: ..."`` and ``collapsed`` is True. (Other
      failures, e.g. support off target early in training, only keep the run from converging.)

    ``best``: the best ``monitor`` value; ``best_step``: its step (0-based); ``best_stats``: the
    stats of that step (host floats); ``verdict``: the last verdict; ``history``: every step's
    stats (host floats).
    """

    def __init__(self, criteria: StabilityCriteria | None = None, patience: int = 3,
                 monitor: str | None = None) -> None:  # fmt: skip
        if isinstance(patience, bool) or not isinstance(patience, numbers.Integral) or patience < 1:
            raise ValueError(f"patience must be an int >= 1, got {patience!r}")
        self.criteria = criteria if criteria is not None else StabilityCriteria()
        self.patience = int(patience)
        self.monitor = monitor
        self.best = math.inf
        self.best_step = -1
        self.best_stats: dict[str, float] = {}
        self.reason = ""
        self.collapsed = False
        self.verdict: StabilityVerdict | None = None
        self.history: list[dict[str, float]] = []
        self._stale = 0
        self._unstable = 0

    def _value(self, stats: Mapping[str, float]) -> float:
        if self.monitor is not None:
            return stats.get(self.monitor, math.nan)
        rmse = [v for k, v in stats.items() if k.startswith(RMSE_PREFIX) or f"/{RMSE_PREFIX}" in k]
        if not rmse:
            return math.nan
        return math.nan if any(math.isnan(v) for v in rmse) else max(rmse)

    def step(self, stats: Mapping[str, Any]) -> bool:
        """Record one step's stats; True when the loop should stop (see the class docstring)."""
        values = to_host(stats)
        verdict = self.criteria.check(values, self.history)
        self.verdict = verdict
        step = len(self.history)
        self.history.append(values)
        value = self._value(values)
        if value < self.best - self.criteria.min_improvement:
            self._stale = 0
        else:
            self._stale += 1
        if value < self.best:
            self.best, self.best_step, self.best_stats = value, step, values
        collapse = sorted({v.failure for v in verdict.failing if v.failure in COLLAPSE_FAILURES})
        self._unstable = self._unstable + 1 if collapse else 0
        if self._unstable >= self.patience:
            self.collapsed = True
            self.reason = f"collapsed: {', '.join(collapse)} for {self._unstable} steps"
            return True
        if verdict.stable and self._stale >= self.patience:
            self.reason = (
                f"converged: stable, no improvement >= {self.criteria.min_improvement:g} for "
                f"{self._stale} steps (best {self.best:.4g} at step {self.best_step})"
            )
            return True
        return False


def am_stats(
    *,
    recon: Mapping[str, tuple[Tensor, Tensor]] | None = None,
    alpha: Tensor | None = None,
    logits: Tensor | None = None,
    bank: Tensor | None = None,
    refit: tuple[Tensor, Tensor, Tensor] | None = None,
    eps: float = 1e-4,
    target_support: float | None = None,
    temperature: float | Tensor | None = None,
    check_finite: Sequence[Tensor] = (),
) -> dict[str, Tensor]:
    """One AM epoch's statistics as float64 0-d tensors on the device (no host copy).

    recon: ``{group: (W, W_hat)}`` -> ``recon/rMSE_<group>``.
    alpha: codes [..., K] (with ``eps``, ``target_support``, ``temperature``) -> ``alpha/...``.
    logits: the coding logits [..., K] -> ``alpha/nonfinite_logit_rows``.
    bank: [K, ...] -> ``bank/atom_norm_mean``, ``bank/coherence_offdiag_max``.
    refit: ``(A [..., p, r], B [..., r, d], W [..., p, d])`` -> ``A/refit_resid_rel_mean``,
    ``A/refit_cond_BBt_mean``.
    ``health/nan_infs``: NaN / inf entries of every tensor given here and of ``check_finite``.
    """
    out: dict[str, Tensor] = {}
    watched: list[Tensor] = list(check_finite)
    for group, (w, w_hat) in (recon or {}).items():
        out[f"{RMSE_PREFIX}{group}"] = sops.relative_mse(w, w_hat)
        watched.append(w_hat)
    if alpha is not None:
        c = sops.coding_stats(
            alpha, eps=eps, target_support=target_support, temperature=temperature
        )
        out["alpha/median_support"] = c.median_support
        out["alpha/mean_support"] = c.mean_support
        out["alpha/entropy_mean"] = c.entropy_mean
        out["alpha/epsilon_prune_frac"] = c.prune_frac
        if target_support is not None:
            out["alpha/support_error"] = c.support_error
        out["alpha/temp_T"] = c.temperature
        watched.append(alpha)
    if logits is not None:
        out["alpha/nonfinite_logit_rows"] = sops.nonfinite_logit_rows(logits)
    if bank is not None:
        b = sops.bank_stats(bank)
        out["bank/atom_norm_mean"] = b.atom_norm_mean
        out["bank/coherence_offdiag_max"] = b.coherence
        watched.append(bank)
    if refit is not None:
        r = sops.refit_stats(*refit)
        out["A/refit_resid_rel_mean"] = r.resid_rel_mean
        out["A/refit_cond_BBt_mean"] = r.cond_mean
        watched.append(refit[0])
    if watched:
        device = watched[0].device
        out["health/nan_infs"] = sops.nan_infs([t.to(device) for t in watched])
    return out
