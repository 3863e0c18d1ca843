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
    "SEVERITIES",
    "CHANCE_SUFFIX",
    "UNCERTAIN_LIFT",
    "chance_key",
    "causal_top1_chance",
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


SEVERITIES: tuple[str, ...] = ("warning", "critical")  # in increasing order
# A top-1 rule's companion key: the top-1 weight uniform weights would have over the same rows
# (``1/N`` for N choices; ``H_N / N`` = mean of 1/(i+1) for the rows of a causal mask).
CHANCE_SUFFIX = "_chance"
# "uncertain routing" with a chance companion: top-1 below this many times chance, i.e. the top
# choice is not clearly more likely than under uniform weights over the same choices.
UNCERTAIN_LIFT = 1.5


@dataclass(frozen=True)
class Rule:
    """One line of the interpretation guide, keyed on an unprefixed metric name.

    ``key``: the metric's last path segment (``"router_confidence_mean"`` matches
    ``"ausa/router_confidence_mean"`` and ``"layer3/ausa/router_confidence_mean"``), or a
    per-layer family ``"attention_top1/*"`` matching ``attention_top1/<layer>`` (also under a
    prefix: ``"moe/attention_top1/<layer>"``): one verdict per layer.
    A value rule is broken when ``value < low`` or ``value > high``. A trend rule
    (``trend="increasing"``) is broken when the key's last ``TREND_EPOCHS`` epoch values
    (``history`` then the current one) strictly increase; ``low`` / ``high`` are unused.
    ``severity``: ``"warning"`` or ``"critical"`` (``fastdiag report --fail-on``).
    ``lift``: a top-1 rule relative to the number of choices: when the stats hold the key's
    chance companion (:func:`chance_key`), the rule is broken when ``value < lift * chance``
    instead of ``value < low``; ``chance_only``: without the companion the rule does not apply.
    """

    key: str
    low: float = -math.inf
    high: float = math.inf
    failure: str = ""
    message: str = ""
    trend: str | None = None
    severity: str = "warning"
    lift: float | None = None
    chance_only: bool = False

    def broken(self, value: float, series: Sequence[float] = (), chance: float | None = None) -> bool:
        """Whether ``value`` (with earlier epoch values ``series``, oldest first) breaks the rule;
        ``chance``: the companion value of a ``lift`` rule (None: absent)."""
        if self.trend == "increasing":
            tail = [*series, value][-TREND_EPOCHS:]
            return len(tail) == TREND_EPOCHS and all(a < b for a, b in pairwise(tail))
        if self.lift is not None and chance is not None:
            return value < self.lift * chance
        if self.chance_only:
            return False
        return value < self.low or value > self.high

    def matches(self, key: str) -> bool:
        """Whether the stats key ``key`` is one this rule reads."""
        return _matches(self.key, key)


@dataclass(frozen=True)
class Verdict:
    """A broken rule: the full stats key, its value, the failure, the explanation, the severity."""

    key: str
    value: float
    failure: str
    message: str
    severity: str = "warning"


def chance_key(key: str, rule_key: str | None = None) -> str:
    """The chance companion of a stats key: ``"ausa/router_confidence_mean"`` ->
    ``"ausa/router_confidence_mean_chance"``, ``"attention_top1/layers.0"`` ->
    ``"attention_top1_chance/layers.0"`` (per-layer family ``rule_key="attention_top1/*"``)."""
    if rule_key is not None and rule_key.endswith("/*"):
        family = rule_key[:-2]
        if key.startswith(family + "/"):
            return family + CHANCE_SUFFIX + key[len(family):]
        head, sep, tail = key.partition(f"/{family}/")
        return f"{head}/{family}{CHANCE_SUFFIX}/{tail}" if sep else key + CHANCE_SUFFIX
    return key + CHANCE_SUFFIX


def causal_top1_chance(n: int) -> float:
    """Mean top-1 weight of uniform attention over the rows of an ``n``-token causal mask
    (row i has i + 1 keys): ``H_n / n``, the harmonic number over n."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    return sum(1.0 / (i + 1) for i in range(n)) / n


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
            severity="critical",
        ),
        Rule(
            gradient,
            -math.inf,
            100.0,
            "exploding gradient",
            f"the {what} gradient norm is above 100 (healthy 0.01 - 10)",
            severity="critical",
        ),
        Rule(
            confidence,
            0.2,
            math.inf,
            "uncertain routing",
            f"the {what}'s top-1 weight is below 0.2 on average (healthy 0.3 - 0.8); with the "
            f"key's {CHANCE_SUFFIX} companion: below {UNCERTAIN_LIFT} x the top-1 of uniform "
            "weights over the same choices",
            lift=UNCERTAIN_LIFT,
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
            severity="critical",
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
            severity="critical",
        ),
        Rule(
            cosine,
            -math.inf,
            0.9,
            "collapsed sets",
            f"mean cosine of the {parts} above 0.9: they are nearly identical "
            "(healthy 0.2 - 0.6, meaningful below 0.7)",
            severity="critical",
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
        severity="critical",
    )

def _layer_rules() -> tuple[Rule, ...]:
    """Per-layer rules: ``fastdiag.watch``'s keys and the MoE router keys, one verdict per layer."""
    peaked = 0.1 * math.log(2.0)  # = the normalised rule's 0.1 for the fewest choices (2)
    return (
        Rule("attention_top1/*", high=0.95, failure="overconfidence",
             message="the layer's attention puts more than 0.95 of its weight on one key on "
             "average (collapsed onto one token)"),
        Rule("attention_top1/*", failure="uncertain routing", lift=UNCERTAIN_LIFT,
             chance_only=True,
             message=f"the layer's top-1 attention weight is below {UNCERTAIN_LIFT} x that of "
             f"uniform attention over the same keys (needs attention_top1{CHANCE_SUFFIX}/<layer>)"),
        Rule("attention_entropy/*", low=peaked, failure="peaked routing",
             message=f"the layer's attention entropy is below {peaked:.3f} nats (0.1 log 2): "
             "every query attends to one key"),
        Rule("attention_entropy_norm/*", low=0.1, failure="peaked routing",
             message="normalised attention entropy of the layer below 0.1 (healthy 0.4 - 0.8)"),
        Rule("attention_entropy_norm/*", high=0.95, failure="random routing",
             message="normalised attention entropy of the layer above 0.95: as spread as uniform"),
        Rule("grad_norm/*", low=1e-3, failure="vanishing gradient", severity="critical",
             message="the module receives almost no gradient (< 0.001; healthy 0.01 - 10)"),
        Rule("grad_norm/*", high=100.0, failure="exploding gradient", severity="critical",
             message="the module's gradient norm is above 100 (healthy 0.01 - 10)"),
        Rule("update_ratio/*", low=_POSITIVE, failure="frozen router", severity="critical",
             message="the module's parameters did not change (update ratio 0)"),
        Rule("nonfinite/grad_norm/*", high=0.0, failure="exploding gradient", severity="critical",
             message="the module's gradient norm was infinite or NaN in some updates this epoch"),
        Rule("nan_infs", high=0.0, failure="exploding gradient", severity="critical",
             message="gradients held NaN or infinite entries this epoch"),
        Rule("nan_infs/*", high=0.0, failure="exploding gradient", severity="critical",
             message="the module's gradients held NaN or infinite entries this epoch"),
        Rule("router_top1/*", high=0.95, failure="overconfidence",
             message="the layer's router gives more than 0.95 to its top expert on average"),
        Rule("router_top1/*", failure="uncertain routing", lift=UNCERTAIN_LIFT, chance_only=True,
             message=f"the layer's router top-1 probability is below {UNCERTAIN_LIFT} x 1/E "
             f"(needs router_top1{CHANCE_SUFFIX}/<layer>)"),
        Rule("router_entropy_norm/*", low=0.1, failure="peaked routing", severity="critical",
             message="normalised router entropy below 0.1: nearly every token picks the same "
             "expert (healthy 0.4 - 0.8)"),
        Rule("router_entropy_norm/*", high=0.95, failure="random routing",
             message="normalised router entropy above 0.95: routing as spread as uniform"),
        Rule("expert_load_gini/*", high=0.5, failure="load imbalance",
             message="Gini of the experts' token load above 0.5: a few experts take most tokens"),
        Rule("expert_active_ratio/*", low=0.5, failure="dead experts", severity="critical",
             message="fewer than half of the layer's experts receive tokens"),
    )  # fmt: skip


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
) + _layer_rules()


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


def _family_match(family: str, key: str) -> bool:
    return key.startswith(family + "/") or f"/{family}/" in key


def _matches(rule_key: str, key: str) -> bool:
    """Whether the stats ``key`` is read by the rule keyed ``rule_key`` (see :class:`Rule`)."""
    if rule_key.endswith("/*"):
        family = rule_key[:-2]
        if family.startswith("nonfinite/"):
            return key.startswith(NONFINITE_PREFIX) and _family_match(
                family.removeprefix("nonfinite/"), key[len(NONFINITE_PREFIX):]
            )
        if key.startswith(NONFINITE_PREFIX) or CHANCE_SUFFIX + "/" in key:
            return False
        return _family_match(family, key)
    return _name(key) == rule_key


def verdicts(
    stats: Mapping[str, float], history: Sequence[Mapping[str, float]] | None = None
) -> list[Verdict]:
    """The rules of ``RULES`` broken by ``stats`` (any key prefix), in rule order.

    ``history``: earlier epoch dicts, oldest first, for the trend rules (skipped without it).
    NaN and absent values are ignored, in ``stats`` and in ``history``. A top-1 rule reads the
    key's chance companion (:func:`chance_key`) when ``stats`` holds it.
    """
    out: list[Verdict] = []
    for rule in RULES:
        for key, raw in stats.items():
            if not rule.matches(key):
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
            chance = None
            if rule.lift is not None:
                chance = _number(stats.get(chance_key(key, rule.key)))
            if rule.broken(value, series, chance):
                message = rule.message
                if chance is not None:
                    message = (f"top-1 {value:.3g} is below {rule.lift} x the {chance:.3g} of "
                               "uniform weights over the same choices: barely better than chance")  # fmt: skip
                out.append(Verdict(key, value, rule.failure, message, rule.severity))
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
