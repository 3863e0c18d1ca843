"""fastdiag.schema: key lists, interpretation rules and verdicts."""

from __future__ import annotations

import dataclasses
import math

import pytest

from fastdiag import schema
from fastdiag.schema import (
    BASELINE_DIAGNOSTICS,
    COMPARISON_TABLE,
    RULES,
    SET_DIAGNOSTICS,
    Rule,
    Verdict,
    verdicts,
)

FAILURES = {
    "frozen router",
    "vanishing gradient",
    "exploding gradient",
    "mode collapse",
    "random routing",
    "overconfidence",
    "uncertain routing",
    "collapsed sets",
    "peaked routing",
    "unstable router",
    "load imbalance",
    "dead experts",
}

HEALTHY_SET = {
    "ausa/router_gradient_norm": 0.5,
    "ausa/router_confidence_mean": 0.6,
    "ausa/router_weight_change": 0.02,
    "ausa/routing_entropy_norm": 0.6,
    "ausa/set_embedding_variance": 0.8,
    "ausa/set_cosine_similarity_mean": 0.3,
    "ausa/active_set_ratio": 0.0,  # no rule on it
}
HEALTHY_BASELINE = {
    "baseline/attention_gradient_norm": 0.8,
    "baseline/attention_top1_mean": 0.42,
    "baseline/attention_weight_change": 0.02,
    "baseline/attention_entropy_norm": 0.65,
    "baseline/value_embedding_variance": 1.0,
    "baseline/value_cosine_similarity": 0.1,
}


def test_key_lists():
    assert len(SET_DIAGNOSTICS) == len(set(SET_DIAGNOSTICS)) == 27
    assert len(BASELINE_DIAGNOSTICS) == len(set(BASELINE_DIAGNOSTICS)) == 14
    assert all(k.startswith("ausa/") for k in SET_DIAGNOSTICS)
    assert all(k.startswith("baseline/") for k in BASELINE_DIAGNOSTICS)
    assert SET_DIAGNOSTICS[0] == "ausa/active_set_ratio"
    assert SET_DIAGNOSTICS[-3:] == (
        "ausa/delta_routing_entropy",
        "ausa/delta_set_variance",
        "ausa/delta_router_confidence",
    )
    assert "/" not in "".join(schema.WEIGHT_DIAGNOSTICS_SUFFIXES)
    assert schema.weight_keys("pool/")[0] == "pool/entropy_mean"
    assert len(schema.weight_keys("moe")) == len(schema.WEIGHT_DIAGNOSTICS_SUFFIXES) == 12
    assert schema.HEALTH_KEYS == ("health/nonfinite_rows", "health/nan_infs")


def test_rules_cover_named_failures_and_known_keys():
    assert {r.failure for r in RULES} == FAILURES
    names = {k.split("/", 1)[1] for k in SET_DIAGNOSTICS + BASELINE_DIAGNOSTICS}
    fixed = {r.key.removeprefix("nonfinite/") for r in RULES if not r.key.endswith("/*")}
    assert fixed - {"nan_infs"} <= names
    assert all(r.severity in schema.SEVERITIES for r in RULES)
    with pytest.raises(dataclasses.FrozenInstanceError):
        RULES[0].low = 0.0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        Verdict("k", 1.0, "f", "m").value = 2.0  # type: ignore[misc]


def test_healthy_stats_give_no_verdict():
    history = [
        {"ausa/router_weight_change": 0.05, "baseline/attention_weight_change": 0.04},
        {"ausa/router_weight_change": 0.03, "baseline/attention_weight_change": 0.03},
    ]
    assert verdicts({**HEALTHY_SET, **HEALTHY_BASELINE}, history) == []


@pytest.mark.parametrize(
    ("key", "value", "failure"),
    [
        ("router_gradient_norm", 1e-4, "vanishing gradient"),
        ("router_gradient_norm", 0.0, "vanishing gradient"),
        ("router_gradient_norm", 150.0, "exploding gradient"),
        ("router_gradient_norm", math.inf, "exploding gradient"),
        ("router_confidence_mean", 0.1, "uncertain routing"),
        ("router_confidence_mean", 0.97, "overconfidence"),
        ("router_weight_change", 0.0, "frozen router"),
        ("routing_entropy_norm", 0.05, "peaked routing"),
        ("routing_entropy_norm", 0.99, "random routing"),
        ("set_embedding_variance", 1e-5, "mode collapse"),
        ("set_cosine_similarity_mean", 0.95, "collapsed sets"),
    ],
)
@pytest.mark.parametrize("prefix", ["ausa/", "layer3/ausa/", ""])
def test_each_set_failure_triggers(key, value, failure, prefix):
    stats = {k.replace("ausa/", prefix): v for k, v in HEALTHY_SET.items()}
    stats[prefix + key] = value
    out = verdicts(stats)
    assert [(v.key, v.failure) for v in out] == [(prefix + key, failure)]
    assert out[0].value == value and out[0].message


@pytest.mark.parametrize(
    ("key", "value", "failure"),
    [
        ("attention_gradient_norm", 5e-4, "vanishing gradient"),
        ("attention_gradient_norm", 101.0, "exploding gradient"),
        ("attention_top1_mean", 0.15, "uncertain routing"),
        ("attention_top1_mean", 0.99, "overconfidence"),
        ("attention_weight_change", 0.0, "frozen router"),
        ("attention_entropy_norm", 0.01, "peaked routing"),
        ("attention_entropy_norm", 0.96, "random routing"),
        ("value_embedding_variance", 0.0, "mode collapse"),
        ("value_cosine_similarity", 0.92, "collapsed sets"),
    ],
)
def test_each_baseline_failure_triggers(key, value, failure):
    out = verdicts({**HEALTHY_BASELINE, f"baseline/{key}": value})
    assert [(v.key, v.failure) for v in out] == [(f"baseline/{key}", failure)]


def test_boundaries_are_healthy():
    edges = {
        "ausa/router_gradient_norm": 1e-3,
        "ausa/router_confidence_mean": 0.95,
        "ausa/routing_entropy_norm": 0.1,
        "ausa/set_cosine_similarity_mean": 0.9,
        "ausa/router_weight_change": 1e-300,
    }
    assert verdicts(edges) == []


def test_nan_and_absent_values_ignored():
    stats = {"ausa/router_gradient_norm": math.nan, "ausa/router_confidence_mean": float("nan")}
    assert verdicts(stats) == []
    assert verdicts({}) == []
    hist = [{"ausa/router_weight_change": 0.1}, {"ausa/router_weight_change": math.nan}]
    assert verdicts({"ausa/router_weight_change": 0.2}, hist) == []  # only 2 finite epochs


def test_trend_rule_unstable_router():
    increasing = [{"ausa/router_weight_change": 0.01}, {"ausa/router_weight_change": 0.02}]
    out = verdicts({"ausa/router_weight_change": 0.05}, increasing)
    assert [(v.failure, v.value) for v in out] == [("unstable router", 0.05)]
    # NaN epochs in the history are skipped, the remaining values still rise
    gappy = [increasing[0], {"ausa/router_weight_change": math.nan}, increasing[1]]
    assert [v.failure for v in verdicts({"ausa/router_weight_change": 0.05}, gappy)] == [
        "unstable router"
    ]
    # decreasing, flat, too short, or no history: not unstable
    assert verdicts({"ausa/router_weight_change": 0.015}, increasing) == []
    flat = [{"ausa/router_weight_change": 0.02}] * 2
    assert verdicts({"ausa/router_weight_change": 0.02}, flat) == []
    assert verdicts({"ausa/router_weight_change": 0.05}, increasing[1:]) == []
    assert verdicts({"ausa/router_weight_change": 0.05}) == []
    # the trend rule applies to the baseline analogue as well
    base = [{"baseline/attention_weight_change": v} for v in (0.1, 0.2)]
    out = verdicts({"baseline/attention_weight_change": 0.3}, base)
    assert [v.failure for v in out] == ["unstable router"]


def test_rule_broken_semantics():
    r = Rule("x", 1.0, 2.0, "f", "m")
    assert not r.broken(1.0) and not r.broken(2.0)
    assert r.broken(0.5) and r.broken(2.5)
    t = Rule("x", failure="f", trend="increasing")
    assert t.broken(3.0, [1.0, 2.0]) and not t.broken(3.0, [2.0, 1.0])


def test_comparison_table():
    assert [row.label for row in COMPARISON_TABLE] == [
        "Entropy (norm)",
        "Confidence",
        "Gradient norm",
        "Weight change",
        "Pattern stability",
        "Capacity usage",
    ]
    for label, baseline_key, set_key, interpretation in COMPARISON_TABLE:
        assert baseline_key in BASELINE_DIAGNOSTICS, label
        assert set_key in SET_DIAGNOSTICS, label
        assert interpretation


def test_severities():
    by_failure = {}
    for rule in RULES:
        by_failure.setdefault(rule.failure, set()).add(rule.severity)
    assert by_failure["frozen router"] == {"critical"}
    assert by_failure["exploding gradient"] == {"critical"}
    assert by_failure["uncertain routing"] == {"warning"}
    out = verdicts({"ausa/router_weight_change": 0.0, "ausa/router_confidence_mean": 0.1})
    assert {(v.failure, v.severity) for v in out} == {
        ("frozen router", "critical"),
        ("uncertain routing", "warning"),
    }
    assert Verdict("k", 1.0, "f", "m").severity == "warning"  # old constructor still works


def test_top1_relative_to_chance():
    # causal rows: row i has i + 1 keys, uniform top-1 1 / (i + 1), mean H_n / n
    assert schema.causal_top1_chance(1) == 1.0
    assert schema.causal_top1_chance(4) == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 4) / 4)
    with pytest.raises(ValueError, match="n must"):
        schema.causal_top1_chance(0)
    chance = schema.causal_top1_chance(48)  # ~0.093
    key = "baseline/attention_top1_mean"
    assert schema.chance_key(key) == key + "_chance"
    # 0.15 is below the absolute 0.2 but 1.6x chance: not uncertain once the companion is known
    assert [v.failure for v in verdicts({key: 0.15})] == ["uncertain routing"]
    assert verdicts({key: 0.15, key + "_chance": chance}) == []
    out = verdicts({key: 0.12, key + "_chance": chance})  # 1.3x chance
    assert [v.failure for v in out] == ["uncertain routing"] and "chance" in out[0].message
    # the overconfidence side stays absolute
    assert [v.failure for v in verdicts({key: 0.97, key + "_chance": chance})] == ["overconfidence"]


def test_per_layer_rules_one_verdict_per_layer():
    stats = {
        "attention_top1/layers.0.attn": 0.99,
        "attention_top1/layers.1.attn": 0.4,
        "attention_top1_chance/layers.1.attn": 0.1,
        "attention_top1/layers.2.attn": 0.12,
        "attention_top1_chance/layers.2.attn": 0.1,
        "attention_entropy/layers.0.attn": 0.01,
        "attention_entropy/layers.1.attn": 2.0,
        "grad_norm/layers.0": 0.0,
        "grad_norm/layers.1": 0.5,
        "grad_norm/layers.2": 1e4,
        "param_norm/layers.0": 0.0,  # no rule
        "update_ratio/layers.0": 0.0,
        "health/nan_infs": 3.0,
        "health/nan_infs/layers.2": 3.0,
        "health/nonfinite/grad_norm/layers.2": 1.0,
        "moe/router_top1/block.3": 0.97,
        "router_entropy_norm/block.3": 0.05,
        "router_entropy_norm/block.4": 0.6,
        "expert_load_gini/block.3": 0.8,
        "expert_active_ratio/block.3": 0.25,
        "expert_active_ratio/block.4": 1.0,
    }
    found = {(v.key, v.failure) for v in verdicts(stats)}
    assert found == {
        ("attention_top1/layers.0.attn", "overconfidence"),
        ("attention_top1/layers.2.attn", "uncertain routing"),
        ("attention_entropy/layers.0.attn", "peaked routing"),
        ("grad_norm/layers.0", "vanishing gradient"),
        ("grad_norm/layers.2", "exploding gradient"),
        ("update_ratio/layers.0", "frozen router"),
        ("health/nan_infs", "exploding gradient"),
        ("health/nan_infs/layers.2", "exploding gradient"),
        ("health/nonfinite/grad_norm/layers.2", "exploding gradient"),
        ("moe/router_top1/block.3", "overconfidence"),
        ("router_entropy_norm/block.3", "peaked routing"),
        ("expert_load_gini/block.3", "load imbalance"),
        ("expert_active_ratio/block.3", "dead experts"),
    }
    # without a chance companion a per-layer top-1 has no "uncertain" verdict
    assert verdicts({"attention_top1/layers.0": 0.01}) == []
    assert schema.chance_key("moe/router_top1/b.3", "router_top1/*") == "moe/router_top1_chance/b.3"
