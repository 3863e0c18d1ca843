"""Metric keys, the diagnostics constants and the interpretation guide, as data.

``SET_DIAGNOSTICS`` / ``BASELINE_DIAGNOSTICS`` list every key of docs/metrics.md §1 and §2 in
catalogue order; ``WEIGHT_DIAGNOSTICS_SUFFIXES`` the §3 names that go under a caller's prefix
(``pool/``, ``moe/``, ...). The constants of the diagnostics classes (thresholds, top-k sizes,
sample sizes, the ``delta_*`` map) are defined here once. ``RULES`` is the original classes'
"Healthy Range / Bad Sign" table and its key questions; :func:`verdicts` returns the rules a
stats dict breaks. ``COMPARISON_TABLE`` pairs the baseline and set-routing keys that measure the
same thing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import NamedTuple

__all__ = [
    "SET_DIAGNOSTICS",
    "BASELINE_DIAGNOSTICS",
    "WEIGHT_DIAGNOSTICS_SUFFIXES",
    "HEALTH_KEYS",
    "Rule",
    "Verdict",
    "RULES",
    "TREND_EPOCHS",
    "verdicts",
    "ComparisonRow",
    "COMPARISON_TABLE",
    "weight_keys",
    "SPARSITY_TAU",
    "EFFECTIVE_HEAD_ENTROPY",
    "PATTERN_TOPK",
    "COSINE_SAMPLES",
    "SET_DELTAS",
    "DEFAULT_TOKEN_CAPACITY",
    "NONFINITE_ROWS",
    "BASELINE_HEAD_KEYS",
]

# ----------------------------------------------------------------------------------------------
# Constants of the diagnostics classes (docs/metrics.md §1-§3, §5)
# ----------------------------------------------------------------------------------------------

SPARSITY_TAU = 0.1  # attention_sparsity: share of per-head entries above this
EFFECTIVE_HEAD_ENTROPY = 0.9  # a head is effective when its mean H / log Nk is below this
PATTERN_TOPK = 5  # k of the attention top-k Jaccards (the original classes' top-5)
COSINE_SAMPLES = 100  # rows drawn by the original classes' sampled cosine estimate
DEFAULT_TOKEN_CAPACITY = 1 << 16  # initial size of the routing-consistency token table
NONFINITE_ROWS = "health/nonfinite_rows"
# delta key -> the key whose change from the previous epoch it is (docs/metrics.md §1)
SET_DELTAS: dict[str, str] = {
    "ausa/delta_routing_entropy": "ausa/routing_entropy",
    "ausa/delta_set_variance": "ausa/set_embedding_variance",
    "ausa/delta_router_confidence": "ausa/router_confidence_mean",
}

SET_DIAGNOSTICS: tuple[str, ...] = (
    # usage of the sets (from bank_indices)
    "ausa/active_set_ratio",
    "ausa/active_set_size_mean",
    "ausa/active_set_size_std",
    "ausa/routing_entropy",
    "ausa/routing_entropy_norm",
    "ausa/routing_gini",
    "ausa/routing_top1_prob_mean",
    "ausa/set_reuse_jaccard",
    "ausa/tokens_per_set_variance",
    # router output (router_probs / router_logits, token_ids)
    "ausa/router_confidence_mean",
    "ausa/router_confidence_std",
    "ausa/routing_confidence_std",
    "ausa/top1_vs_random_kl",
    "ausa/routing_consistency",
    # set embeddings
    "ausa/set_embedding_variance",
    "ausa/set_embedding_norm_mean",
    "ausa/set_cosine_similarity_mean",
    "ausa/set_cosine_similarity_max",
    "ausa/set_rank_effective",
    # attention within sets
    "ausa/set_attention_entropy_mean",
    "ausa/set_attention_top1_mean",
    # router parameters
    "ausa/router_gradient_norm",
    "ausa/router_param_norm",
    "ausa/router_weight_change",
    # epoch-to-epoch deltas
    "ausa/delta_routing_entropy",
    "ausa/delta_set_variance",
    "ausa/delta_router_confidence",
)

BASELINE_DIAGNOSTICS: tuple[str, ...] = (
    "baseline/attention_entropy_mean",
    "baseline/attention_entropy_norm",
    "baseline/attention_top1_mean",
    "baseline/attention_top1_std",
    "baseline/attention_pattern_jaccard",
    "baseline/attention_topk_jaccard_per_query",
    "baseline/attention_gradient_norm",
    "baseline/attention_param_norm",
    "baseline/attention_weight_change",
    "baseline/attention_sparsity",
    "baseline/attention_effective_heads",
    "baseline/attention_head_entropy_mean",
    "baseline/value_embedding_variance",
    "baseline/value_cosine_similarity",
)

WEIGHT_DIAGNOSTICS_SUFFIXES: tuple[str, ...] = (
    "entropy_mean",
    "entropy_norm",
    "top1_mean",
    "top1_std",
    "kl_uniform",
    "sparsity",
    "support_mean",
    "support_median",
    "prune_frac",
    "usage_gini",
    "active_ratio",
    "coherence",
)

HEALTH_KEYS: tuple[str, ...] = ("health/nonfinite_rows", "health/nan_infs")

# the per-head keys of BaselineAttentionDiagnostics (need dist_stats' per-head statistics)
BASELINE_HEAD_KEYS: tuple[str, ...] = (
    "baseline/attention_sparsity",
    "baseline/attention_effective_heads",
    "baseline/attention_head_entropy_mean",
)


def weight_keys(prefix: str) -> tuple[str, ...]:
    """The §3 keys under ``prefix`` (e.g. ``weight_keys("pool")`` -> ``pool/entropy_mean``, ...)."""
    return tuple(f"{prefix.rstrip('/')}/{name}" for name in WEIGHT_DIAGNOSTICS_SUFFIXES)


# ----------------------------------------------------------------------------------------------
# Interpretation guide
# ----------------------------------------------------------------------------------------------

TREND_EPOCHS = 3  # a trend rule needs this many epoch values (history + current)

# Smallest positive float: a rule with this ``low`` is broken exactly when the value is <= 0.
_POSITIVE = math.ulp(0.0)


@dataclass(frozen=True)
class Rule:
    """One line of the interpretation guide, keyed on an unprefixed metric name.

    A value rule is broken when ``value < low`` or ``value > high``. A trend rule
    (``trend="increasing"``) is broken when the key's last ``TREND_EPOCHS`` epoch values
    (``history`` then the current one) strictly increase; ``low`` / ``high`` are unused.
    """

    key: str
    low: float = -math.inf
    high: float = math.inf
    failure: str = ""
    message: str = ""
    trend: str | None = None

    def broken(self, value: float, series: Sequence[float] = ()) -> bool:
        """Whether ``value`` (with earlier epoch values ``series``, oldest first) breaks the rule."""
        if self.trend == "increasing":
            tail = [*series, value][-TREND_EPOCHS:]
            return len(tail) == TREND_EPOCHS and all(a < b for a, b in pairwise(tail))
        return value < self.low or value > self.high


@dataclass(frozen=True)
class Verdict:
    """A broken rule: the full stats key, its value, the failure and the explanation."""

    key: str
    value: float
    failure: str
    message: str


def _mechanism_rules(
    *,
    gradient: str,
    confidence: str,
    weight_change: str,
    entropy_norm: str,
    variance: str,
    cosine: str,
    what: str,
    parts: str,
) -> tuple[Rule, ...]:
    """The guide's rules for one mechanism (``what``: router / attention; ``parts``: its embeddings)."""
    return (
        Rule(
            gradient,
            1e-3,
            math.inf,
            "vanishing gradient",
            f"the {what} receives almost no gradient (< 0.001; healthy 0.01 - 10)",
        ),
        Rule(
            gradient,
            -math.inf,
            100.0,
            "exploding gradient",
            f"the {what} gradient norm is above 100 (healthy 0.01 - 10)",
        ),
        Rule(
            confidence,
            0.2,
            math.inf,
            "uncertain routing",
            f"the {what}'s top-1 weight is below 0.2 on average (healthy 0.3 - 0.8)",
        ),
        Rule(
            confidence,
            -math.inf,
            0.95,
            "overconfidence",
            f"the {what}'s top-1 weight is above 0.95 on average (healthy 0.3 - 0.8)",
        ),
        Rule(
            weight_change,
            _POSITIVE,
            math.inf,
            "frozen router",
            f"the {what} parameters did not change (weight change 0)",
        ),
        Rule(
            weight_change,
            failure="unstable router",
            trend="increasing",
            message=f"the {what} weight change grew over the last {TREND_EPOCHS} epochs "
            "(it should decrease and stay above 0)",
        ),
        Rule(
            entropy_norm,
            0.1,
            math.inf,
            "peaked routing",
            f"normalised {what} entropy below 0.1: nearly every token picks the same choice "
            "(healthy 0.4 - 0.8)",
        ),
        Rule(
            entropy_norm,
            -math.inf,
            0.95,
            "random routing",
            f"normalised {what} entropy above 0.95: as spread as uniform, no structure learned "
            "(healthy 0.4 - 0.8)",
        ),
        Rule(
            variance,
            0.1,
            math.inf,
            "mode collapse",
            f"{parts} variance below 0.1: the representations are collapsing toward one point",
        ),
        Rule(
            cosine,
            -math.inf,
            0.9,
            "collapsed sets",
            f"mean cosine of the {parts} above 0.9: they are nearly identical "
            "(healthy 0.2 - 0.6, meaningful below 0.7)",
        ),
    )


def _nonfinite_rule(gradient: str, what: str) -> Rule:
    return Rule(
        f"nonfinite/{gradient}",
        -math.inf,
        0.0,
        "exploding gradient",
        f"the {what} gradient norm was infinite or NaN in some updates this epoch (those updates "
        "are left out of its mean): gradients overflowed",
    )


RULES: tuple[Rule, ...] = _mechanism_rules(
    gradient="router_gradient_norm",
    confidence="router_confidence_mean",
    weight_change="router_weight_change",
    entropy_norm="routing_entropy_norm",
    variance="set_embedding_variance",
    cosine="set_cosine_similarity_mean",
    what="router",
    parts="set embeddings",
) + _mechanism_rules(
    gradient="attention_gradient_norm",
    confidence="attention_top1_mean",
    weight_change="attention_weight_change",
    entropy_norm="attention_entropy_norm",
    variance="value_embedding_variance",
    cosine="value_cosine_similarity",
    what="attention",
    parts="value vectors",
) + (
    _nonfinite_rule("router_gradient_norm", "router"),
    _nonfinite_rule("attention_gradient_norm", "attention"),
)


NONFINITE_PREFIX = "health/nonfinite/"  # + key: infinite batch values of that key this epoch


def _name(key: str) -> str:
    """The rule name of a stats key: unprefixed (``"ausa/x"`` -> ``"x"``), and
    ``"nonfinite/x"`` for the count ``"health/nonfinite/ausa/x"``."""
    if key.startswith(NONFINITE_PREFIX):
        return "nonfinite/" + key.rsplit("/", 1)[-1]
    return key.rsplit("/", 1)[-1]


def _number(value: object) -> float | None:
    """``value`` as a float, or None when it is absent, not numeric or NaN."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def verdicts(
    stats: Mapping[str, float], history: Sequence[Mapping[str, float]] | None = None
) -> list[Verdict]:
    """The rules of ``RULES`` broken by ``stats`` (any key prefix), in rule order.

    ``history``: earlier epoch dicts, oldest first, for the trend rules (skipped without it).
    NaN and absent values are ignored, in ``stats`` and in ``history``.
    """
    out: list[Verdict] = []
    for rule in RULES:
        for key, raw in stats.items():
            if _name(key) != rule.key:
                continue
            value = _number(raw)
            if value is None:
                continue
            series: list[float] = []
            if rule.trend is not None:
                if not history:
                    continue
                past = (_number(epoch.get(key)) for epoch in history)
                series = [v for v in past if v is not None]
            if rule.broken(value, series):
                out.append(Verdict(key, value, rule.failure, rule.message))
    return out


# ----------------------------------------------------------------------------------------------
# Baseline vs set-routing comparison (the original classes' table for the paper)
# ----------------------------------------------------------------------------------------------


class ComparisonRow(NamedTuple):
    """One row: the label, the baseline key, the set-routing key, what the pair tells."""

    label: str
    baseline_key: str
    set_key: str
    interpretation: str


COMPARISON_TABLE: tuple[ComparisonRow, ...] = (
    ComparisonRow(
        "Entropy (norm)",
        "baseline/attention_entropy_norm",
        "ausa/routing_entropy_norm",
        "selectivity normalised by the number of choices (log Nk vs log S)",
    ),
    ComparisonRow(
        "Confidence",
        "baseline/attention_top1_mean",
        "ausa/router_confidence_mean",
        "how certain each mechanism is of its top choice",
    ),
    ComparisonRow(
        "Gradient norm",
        "baseline/attention_gradient_norm",
        "ausa/router_gradient_norm",
        "whether the mechanism still receives a learning signal",
    ),
    ComparisonRow(
        "Weight change",
        "baseline/attention_weight_change",
        "ausa/router_weight_change",
        "training velocity: still learning vs converged",
    ),
    ComparisonRow(
        "Pattern stability",
        "baseline/attention_pattern_jaccard",
        "ausa/set_reuse_jaccard",
        "overlap of the chosen keys / sets between consecutive batches",
    ),
    ComparisonRow(
        "Capacity usage",
        "baseline/attention_effective_heads",
        "ausa/active_set_ratio",
        "share of the available heads / sets actually used",
    ),
)
