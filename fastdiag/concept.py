"""Concept analysis (docs/metrics.md §4): is a concept bottleneck collapsed?

``concept_analysis(x)`` takes concept vectors x [B, C, D] (B samples, C concepts of dimension D;
[C, D] is one sample) and reports, from ``fastdiag.ops``:

* ``effective_rank`` / ``effective_rank_ratio``: mean over samples of the effective rank of the
  C x D concept matrix (docs/metrics.md §4) and of its ratio to min(C, D) - the figure the
  user's original concept report prints as "concept eff. rank 5.45/128";
* ``effective_rank_pooled`` / ``effective_rank_pooled_ratio``: the same for the pooled
  [B*C, D] matrix (all concepts of all samples);
* ``top1_singular_share`` and ``stable_rank``: means over samples;
* ``pairwise_cosine_mean``: mean over samples of the mean off-diagonal cosine between the C
  concepts of a sample (exact); ``pairwise_cosine_max``: its maximum over all samples (1.0 means
  duplicate concepts);
* ``min_dimension_std``: min over the D dimensions of the (unbiased) std over the B*C concept
  vectors (a dead dimension reads ~0);
* ``nonfinite``: NaN / inf entries of x (then the statistics are NaN and every check fails).

Checks (pass/fail, overridable): effective_rank_ratio > 30/128 (the user's secondary target:
effective rank > 30 of 128 concepts), pairwise_cosine_mean < 0.3, pairwise_cosine_max < 0.6
(the user's targets); top1_singular_share < 0.5 and min_dimension_std > 0.01 are fastdiag's
reading of the user's "top-1 dominance < 50" and "no dead dimensions". The report is returned as
a :class:`ConceptReport` (dicts of floats and booleans, ``table()`` for a plain-text table). It
is a reporting call: it copies its results to the host once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fastdiag.ops.cosine import cosine_stats
from fastdiag.ops.spectral import spectral_stats

__all__ = ["CHECKS", "DEFAULT_THRESHOLDS", "ConceptReport", "concept_analysis"]

# metric -> direction of a passing value; thresholds may be set for any of these
CHECKS: dict[str, str] = {
    "effective_rank": ">",
    "effective_rank_ratio": ">",
    "effective_rank_pooled": ">",
    "effective_rank_pooled_ratio": ">",
    "top1_singular_share": "<",
    "stable_rank": ">",
    "pairwise_cosine_mean": "<",
    "pairwise_cosine_max": "<",
    "min_dimension_std": ">",
}

DEFAULT_THRESHOLDS: dict[str, float] = {
    "effective_rank_ratio": 30 / 128,
    "pairwise_cosine_mean": 0.3,
    "pairwise_cosine_max": 0.6,
    "top1_singular_share": 0.5,
    "min_dimension_std": 0.01,
}

_METRICS = (
    "effective_rank",
    "effective_rank_ratio",
    "effective_rank_pooled",
    "effective_rank_pooled_ratio",
    "top1_singular_share",
    "stable_rank",
    "pairwise_cosine_mean",
    "pairwise_cosine_max",
    "min_dimension_std",
    "nonfinite",
)


@dataclass
class ConceptReport:
    """Result of :func:`concept_analysis`: host floats, pass/fail per check, the thresholds."""

    metrics: dict[str, float]
    checks: dict[str, bool]
    thresholds: dict[str, float]
    shape: tuple[int, int, int] = field(default=(0, 0, 0))

    @property
    def passed(self) -> bool:
        """True when every check passed."""
        return all(self.checks.values())

    def as_dict(self) -> dict[str, float | bool]:
        """Flat dict for loggers: the metrics plus ``pass/<metric>`` booleans."""
        out: dict[str, float | bool] = dict(self.metrics)
        out.update({f"pass/{k}": v for k, v in self.checks.items()})
        return out

    def table(self) -> str:
        """Plain-text table: metric, value, target, PASS / FAIL."""
        b, c, d = self.shape
        lines = [
            f"concept analysis: {b} samples x {c} concepts x {d} dims",
            f"{'metric':<30} {'value':>12}  {'target':<12} status",
        ]
        for name in _METRICS:
            value = self.metrics[name]
            text = f"{value:12.0f}" if name == "nonfinite" else f"{value:12.4f}"
            target, status = "", ""
            if name in self.checks:
                target = f"{CHECKS[name]} {self.thresholds[name]:.4g}"
                status = "PASS" if self.checks[name] else "FAIL"
            lines.append(f"{name:<30} {text}  {target:<12} {status}".rstrip())
        verdict = (
            "all checks passed"
            if self.passed
            else "FAILED: " + ", ".join(k for k, ok in self.checks.items() if not ok)
        )
        lines.append(verdict)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def concept_analysis(
    x: Tensor, thresholds: Mapping[str, float | None] | None = None
) -> ConceptReport:
    """Concept-collapse report for ``x`` [B, C, D] (or [C, D]); see the module docstring.

    ``thresholds`` overrides or adds checks (metric name -> bound, direction fixed by
    :data:`CHECKS`; ``None`` drops a default check).
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor of shape [B, C, D], got {type(x).__name__}")
    if x.dim() == 2:
        x = x.unsqueeze(0)
    if x.dim() != 3:
        raise ValueError(f"x must have shape [B, C, D] or [C, D], got shape {tuple(x.shape)}")
    bounds = _thresholds(thresholds)
    b, c, d = x.shape
    x = x.detach()

    per_sample = spectral_stats(x)
    pooled = spectral_stats(x.reshape(b * c, d))
    cos = cosine_stats(x)
    if b * c > 1:
        dim_std = x.reshape(b * c, d).to(torch.float64).std(dim=0).amin()
    else:
        dim_std = torch.tensor(float("nan"), dtype=torch.float64, device=x.device)
    nonfinite = torch.isfinite(x).logical_not().sum()
    values = torch.stack(
        [
            per_sample.effective_rank.double().mean(),
            per_sample.effective_rank_ratio.double().mean(),
            pooled.effective_rank.double(),
            pooled.effective_rank_ratio.double(),
            per_sample.top1_singular_share.double().mean(),
            per_sample.stable_rank.double().mean(),
            cos.mean.double().mean(),
            cos.max.double().amax(),
            dim_std.double(),
            nonfinite.double(),
        ]
    )
    metrics = dict(zip(_METRICS, values.tolist(), strict=True))  # host ok
    checks = {
        name: (metrics[name] > bound if CHECKS[name] == ">" else metrics[name] < bound)
        for name, bound in bounds.items()
    }
    return ConceptReport(metrics=metrics, checks=checks, thresholds=bounds, shape=(b, c, d))


def _thresholds(overrides: Mapping[str, float | None] | None) -> dict[str, float]:
    bounds: dict[str, float | None] = dict(DEFAULT_THRESHOLDS)
    for name, value in (overrides or {}).items():
        if name not in CHECKS:
            raise ValueError(
                f"thresholds: unknown metric {name!r}; known: {', '.join(sorted(CHECKS))}"
            )
        if value is not None and not isinstance(value, (int, float)):
            raise TypeError(f"thresholds[{name!r}] must be a number or None, got {value!r}")
        bounds[name] = value
    return {k: float(v) for k, v in bounds.items() if v is not None}
