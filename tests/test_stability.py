"""fastdiag.ops.stability against numpy float64, the stability criteria and early stopping on
synthetic stats, no host synchronisation in the ops, and the AM-loop example in quick mode."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fastdiag import ops, schema
from fastdiag.ops import stability as sops
from fastdiag.stability import (
    COLLAPSE_RULES,
    EarlyStopping,
    StabilityCriteria,
    StabilityVerdict,
    am_stats,
    to_host,
)
from tests.conftest import forbid_host_sync

# ----------------------------------------------------------------------------------------------
# ops vs numpy
# ----------------------------------------------------------------------------------------------


def _codes(rows: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, k, generator=g) * 6
    alpha = torch.softmax(logits, -1)
    alpha[0, 1:] = 0  # one one-hot row
    alpha[0, 0] = 1
    alpha[1, :3] = 0  # exact zeros
    return alpha / alpha.sum(-1, keepdim=True)


@pytest.mark.parametrize("seed", [0, 1])
def test_relative_mse_matches_numpy(seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(7, 13, generator=g)
    w_hat = w + 0.1 * torch.randn(7, 13, generator=g)
    ref = ((w.double() - w_hat.double()) ** 2).sum() / (w.double() ** 2).sum()
    out = sops.relative_mse(w, w_hat)
    assert out.dtype == torch.float64 and out.shape == ()
    np.testing.assert_allclose(out.numpy(), ref.numpy(), rtol=1e-12)
    assert math.isnan(sops.relative_mse(torch.zeros(3), torch.ones(3)))
    with pytest.raises(ValueError, match="same shape"):
        sops.relative_mse(w, w_hat[:, :3])


@pytest.mark.parametrize("eps", [1e-6, 1e-4, 0.05])
def test_coding_stats_match_numpy(eps):
    alpha = _codes(37, 8, seed=3)
    a = alpha.double().numpy()
    support = (a > eps).sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.where(a > 0, a * np.log(a), 0.0).sum(-1)
    st = sops.coding_stats(alpha, eps=eps, target_support=4, temperature=torch.tensor(0.7))
    np.testing.assert_allclose(st.median_support.numpy(), np.median(support))
    np.testing.assert_allclose(st.mean_support.numpy(), support.mean(), rtol=1e-12)
    np.testing.assert_allclose(st.entropy_mean.numpy(), ent.mean(), rtol=1e-5)
    np.testing.assert_allclose(st.prune_frac.numpy(), (a <= eps).mean(), rtol=1e-12)
    np.testing.assert_allclose(st.support_error.numpy(), abs(support.mean() - 4), rtol=1e-12)
    np.testing.assert_allclose(st.temperature.numpy(), 0.7, rtol=1e-6)
    assert st.nonfinite_rows.item() == 0
    for value in st:
        assert value.dtype == torch.float64 and value.shape == ()


def test_coding_stats_nonfinite_rows_excluded_and_defaults():
    alpha = _codes(10, 5, seed=4)
    bad = alpha.clone()
    bad[2, 1] = math.nan
    bad[5, 0] = math.inf
    st, ref = (
        sops.coding_stats(bad, eps=1e-4),
        sops.coding_stats(alpha[[0, 1, 3, 4, 6, 7, 8, 9]], eps=1e-4),
    )
    assert st.nonfinite_rows.item() == 2
    torch.testing.assert_close(st.mean_support, ref.mean_support)
    torch.testing.assert_close(st.median_support, ref.median_support)
    assert math.isnan(st.support_error) and math.isnan(st.temperature)  # no target, no T
    with pytest.raises(ValueError, match="target_support"):
        sops.coding_stats(alpha, target_support=math.inf)


def test_bank_stats_match_numpy():
    g = torch.Generator().manual_seed(5)
    bank = torch.randn(6, 3, 4, generator=g)
    flat = bank.double().reshape(6, -1).numpy()
    norms = np.linalg.norm(flat, axis=1)
    cos = (flat @ flat.T) / np.outer(norms, norms)
    np.fill_diagonal(cos, 0)
    st = sops.bank_stats(bank)
    np.testing.assert_allclose(st.atom_norm_mean.numpy(), norms.mean(), rtol=1e-12)
    np.testing.assert_allclose(st.coherence.numpy(), np.abs(cos).max(), rtol=1e-5)
    assert math.isnan(sops.bank_stats(bank[:1]).coherence)


def test_refit_stats_match_numpy():
    g = torch.Generator().manual_seed(6)
    a, b = torch.randn(5, 7, 3, generator=g), torch.randn(5, 3, 9, generator=g)
    w = a @ b + 0.2 * torch.randn(5, 7, 9, generator=g)
    an, bn, wn = (x.double().numpy() for x in (a, b, w))
    rel = [np.linalg.norm(an[i] @ bn[i] - wn[i]) / np.linalg.norm(wn[i]) for i in range(5)]
    cond = [np.linalg.cond(bn[i] @ bn[i].T) for i in range(5)]
    st = sops.refit_stats(a, b, w)
    np.testing.assert_allclose(st.resid_rel_mean.numpy(), np.mean(rel), rtol=1e-10)
    np.testing.assert_allclose(st.cond_mean.numpy(), np.mean(cond), rtol=1e-4)
    # shared basis broadcast over the batch; r > d: B B^T singular
    st = sops.refit_stats(a[:, :, :2], b[:1, :2], w)
    assert math.isfinite(st.resid_rel_mean)
    assert (
        sops.refit_stats(torch.randn(2, 4, 5), torch.randn(2, 5, 3), torch.randn(2, 4, 3)).cond_mean
        == math.inf
    )
    with pytest.raises(ValueError, match="do not fit"):
        sops.refit_stats(a, b[:, :2], w)


def test_nonfinite_logit_rows_and_nan_infs():
    logits = torch.zeros(6, 4)
    logits[1, 2] = -math.inf  # log(0) of a pruned code
    logits[3, :] = -math.inf
    logits[4, 0] = math.nan
    logits[5, 1] = math.inf
    assert sops.nonfinite_logit_rows(logits).item() == 4
    assert sops.nonfinite_logit_rows(logits[[0, 2]]).item() == 0
    assert sops.nan_infs([logits, torch.ones(3), torch.tensor([math.nan])]).item() == 8
    assert sops.nan_infs([]).item() == 0


def test_ops_do_not_synchronise():
    alpha = _codes(16, 8, seed=7)
    logits = alpha.log()
    bank = torch.randn(8, 12)
    a, b, w = torch.randn(4, 5, 3), torch.randn(4, 3, 6), torch.randn(4, 5, 6)
    ops.spectral_stats(b)  # warm-up: build / load the extension outside the check
    with forbid_host_sync():
        sops.relative_mse(w, w * 0.9)
        sops.coding_stats(alpha, eps=1e-4, target_support=4, temperature=torch.tensor(2.0))
        sops.nonfinite_logit_rows(logits)
        sops.bank_stats(bank)
        sops.refit_stats(a, b, w)
        sops.nan_infs([alpha, bank])
        stats = am_stats(recon={"up": (w, w * 0.9)}, alpha=alpha, logits=logits, bank=bank,
                         refit=(a, b, w), target_support=4, temperature=1.5)  # fmt: skip
    assert all(isinstance(v, torch.Tensor) and v.shape == () for v in stats.values())


def test_am_stats_keys_and_one_host_copy():
    alpha = _codes(16, 8, seed=8)
    w = torch.randn(16, 10)
    stats = am_stats(recon={"up": (w, w), "gate": (w, 0.5 * w)}, alpha=alpha, logits=alpha.log(),
                     bank=torch.randn(8, 10), refit=(torch.randn(3, 2), torch.randn(2, 10), w[:3]),
                     eps=1e-4, target_support=4, temperature=2.0)  # fmt: skip
    assert set(stats) == {
        "recon/rMSE_up", "recon/rMSE_gate", "alpha/median_support", "alpha/mean_support",
        "alpha/entropy_mean", "alpha/epsilon_prune_frac", "alpha/support_error", "alpha/temp_T",
        "alpha/nonfinite_logit_rows", "bank/atom_norm_mean", "bank/coherence_offdiag_max",
        "A/refit_resid_rel_mean", "A/refit_cond_BBt_mean", "health/nan_infs",
    }  # fmt: skip
    counter: dict = {}
    with forbid_host_sync(counter):
        host = to_host(stats)
    assert counter == {"cpu": 1, "tolist": 1}
    assert host["recon/rMSE_gate"] == pytest.approx(0.25) and host["recon/rMSE_up"] == 0
    assert host["alpha/nonfinite_logit_rows"] == 2  # the two rows with exact zeros
    assert host["alpha/temp_T"] == 2.0


# ----------------------------------------------------------------------------------------------
# criteria
# ----------------------------------------------------------------------------------------------

GOOD = {
    "recon/rMSE_up": 0.01,
    "recon/rMSE_gate": 0.015,
    "alpha/median_support": 4.0,
    "alpha/mean_support": 4.2,
    "alpha/support_error": 0.2,
    "alpha/nonfinite_logit_rows": 0.0,
    "bank/coherence_offdiag_max": 0.05,
    "health/nan_infs": 0.0,
}


def _failures(verdict: StabilityVerdict) -> set[str]:
    return {v.failure for v in verdict.failing}


def test_good_stats_are_stable():
    verdict = StabilityCriteria().check(GOOD)
    assert verdict.stable and bool(verdict) and verdict.failing == [] and verdict.messages == []
    assert StabilityCriteria().check({}).stable  # nothing to judge


@pytest.mark.parametrize(
    ("key", "value", "failure"),
    [
        ("alpha/support_error", 1.5, "support off target"),
        ("bank/coherence_offdiag_max", 0.2, "bank not diverse"),
        ("health/nan_infs", 3.0, "non-finite values"),
        ("alpha/median_support", 1.0, "support collapse"),
        ("alpha/nonfinite_logit_rows", 5.0, "non-finite coding logits"),
        ("alpha/support_error", math.nan, "support off target"),
    ],
)
def test_each_rule_fails(key, value, failure):
    verdict = StabilityCriteria().check({**GOOD, key: value})
    assert not verdict.stable
    assert _failures(verdict) == {failure}
    assert len(verdict.messages) == 1 and key in verdict.messages[0]
    assert all(v.severity == "critical" for v in verdict.failing)


def test_thresholds_are_parameters():
    stats = {
        **GOOD,
        "alpha/support_error": 1.5,
        "bank/coherence_offdiag_max": 0.2,
        "health/nan_infs": 2,
    }
    assert not StabilityCriteria().check(stats).stable
    assert (
        StabilityCriteria(support_error_max=2, coherence_max=0.3, nan_infs_max=2)
        .check(stats)
        .stable
    )
    with pytest.raises(ValueError, match="rmse_max"):
        StabilityCriteria(rmse_max=-1)
    with pytest.raises(ValueError, match="nan_infs_max"):
        StabilityCriteria(nan_infs_max=0.5)


def test_rmse_rule_good_or_improving():
    crit = StabilityCriteria(rmse_max=0.02, min_improvement=1e-3)
    high = {**GOOD, "recon/rMSE_up": 0.05}
    assert crit.check(high).stable  # first epoch: no history to judge the improvement
    assert crit.check(high, [{**GOOD, "recon/rMSE_up": 0.06}]).stable  # improved by 0.01
    stalled = crit.check(high, [{**GOOD, "recon/rMSE_up": 0.0505}])  # improved by 5e-4 < 1e-3
    assert not stalled.stable and _failures(stalled) == {"reconstruction stalled"}
    assert stalled.failing[0].key == "recon/rMSE_up"
    assert crit.check(GOOD, [GOOD]).stable  # below rmse_max: no improvement needed
    assert crit.check(high, [{"alpha/median_support": 4.0}]).stable  # key absent before
    nan = crit.check({**GOOD, "recon/rMSE_gate": math.nan})
    assert _failures(nan) == {"non-finite reconstruction"}


def test_coherence_rising_is_a_warning_and_prefixes_match():
    history = [{"bank/coherence_offdiag_max": 0.02}, {"bank/coherence_offdiag_max": 0.04}]
    verdict = StabilityCriteria().check({**GOOD, "bank/coherence_offdiag_max": 0.06}, history)
    assert verdict.stable  # warning only
    assert [(v.failure, v.severity) for v in verdict.failing] == [
        ("bank coherence rising", "warning")
    ]
    assert (
        StabilityCriteria().check({**GOOD, "bank/coherence_offdiag_max": 0.06}).stable
    )  # no history
    prefixed = StabilityCriteria().check({"layer0/alpha/median_support": 1.0})
    assert _failures(prefixed) == {"support collapse"}
    assert all(isinstance(rule, schema.Rule) for rule in COLLAPSE_RULES)


def test_check_accepts_tensors_with_one_host_copy():
    stats = {k: torch.tensor(v, dtype=torch.float64) for k, v in GOOD.items()}
    stats["alpha/median_support"] = torch.tensor(1.0)
    counter: dict = {}
    with forbid_host_sync(counter):
        verdict = StabilityCriteria().check(stats)
    assert counter == {"cpu": 1, "tolist": 1}
    assert _failures(verdict) == {"support collapse"}


# ----------------------------------------------------------------------------------------------
# early stopping
# ----------------------------------------------------------------------------------------------


def test_early_stopping_converges_after_patience():
    stopper = EarlyStopping(StabilityCriteria(min_improvement=1e-3), patience=2)
    values = [0.015, 0.012, 0.0115, 0.011, 0.0108]  # improvements after step 1 are < 1e-3
    stops = []
    for v in values:
        stops.append(stopper.step({**GOOD, "recon/rMSE_up": v, "recon/rMSE_gate": 0.0}))
        if stops[-1]:
            break
    assert stops == [False, False, False, True]
    assert stopper.reason.startswith("converged") and not stopper.collapsed
    assert stopper.best == pytest.approx(0.011) and stopper.best_step == 3
    assert stopper.best_stats["recon/rMSE_up"] == pytest.approx(0.011)


def test_early_stopping_min_improvement_resets_patience():
    stopper = EarlyStopping(StabilityCriteria(min_improvement=1e-4), patience=2)
    for v in (0.05, 0.04, 0.03, 0.02, 0.01):  # improving by >= 1e-4 each step: never stops
        assert not stopper.step({**GOOD, "recon/rMSE_up": v})
    assert stopper.reason == ""


def test_early_stopping_does_not_converge_while_unstable():
    stopper = EarlyStopping(patience=1)
    off = {**GOOD, "alpha/support_error": 3.0}
    assert not any(stopper.step(off) for _ in range(4))  # stale but unstable (not a collapse)
    assert stopper.step(GOOD)  # stable and stale: stop


def test_early_stopping_flags_a_collapse_after_patience():
    stopper = EarlyStopping(patience=3)
    collapsed = {**GOOD, "alpha/median_support": 1.0, "alpha/nonfinite_logit_rows": 8.0}
    assert [stopper.step({**collapsed, "recon/rMSE_up": 0.5 - 0.1 * i}) for i in range(3)] == [
        False,
        False,
        True,
    ]
    assert stopper.collapsed and stopper.reason.startswith("collapsed")
    assert "support collapse" in stopper.reason and "non-finite coding logits" in stopper.reason
    assert not stopper.verdict.stable
    with pytest.raises(ValueError, match="patience"):
        EarlyStopping(patience=0)


def test_early_stopping_monitor_key():
    stopper = EarlyStopping(patience=1, monitor="loss/total")
    assert not stopper.step({**GOOD, "loss/total": 1.0})
    assert stopper.step({**GOOD, "loss/total": 1.0})
    assert stopper.best == 1.0 and stopper.best_step == 0


# ----------------------------------------------------------------------------------------------
# the example
# ----------------------------------------------------------------------------------------------


def test_am_loop_example_quick(tmp_path, capsys):
    from examples.am_loop import main
    from fastdiag.store import history

    db = tmp_path / "am.db"
    results = main(["--quick", "--quiet", "--db", str(db)])
    before, after = results["before"], results["after"]
    assert before["collapsed"] and before["stopped"] and not before["stable"]
    assert "non-finite coding logits" in before["reason"]
    assert before["stats"]["alpha/nonfinite_logit_rows"] > 0
    assert before["stats"]["alpha/median_support"] <= 2
    assert after["stopped"] and not after["collapsed"] and after["stable"]
    assert after["reason"].startswith("converged") and after["epochs"] < 60
    assert after["stats"]["alpha/nonfinite_logit_rows"] == 0
    assert after["stats"]["alpha/support_error"] <= 1
    assert max(after["stats"]["recon/rMSE_up"], after["stats"]["recon/rMSE_gate"]) <= 0.02
    logged = history(db, "am-after-0")
    assert len(logged) == after["epochs"] and "alpha/median_support" in logged[-1]
    out = capsys.readouterr().out
    assert "collapsed" in out and "converged" in out
