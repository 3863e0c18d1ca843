"""``fastdiag.diagnostics.base.Diagnostics``: reset, epoch values, state_dict validation."""

from __future__ import annotations

import math

import pytest
import torch

from fastdiag.diagnostics.base import Diagnostics


class Toy(Diagnostics):
    NAMES = ("toy/a", "toy/b", "_flag")

    def __init__(self) -> None:
        super().__init__()
        self.add_state("prev", None)
        self.add_state("seen", 0, reset=False)
        self.add_state("last", torch.zeros(2))

    def metric_keys(self) -> tuple[str, ...]:
        return ("toy/a", "toy/b", "toy/never")

    def update(self, x: torch.Tensor) -> None:
        self._add(self.NAMES, torch.stack([x.mean(), x.amax(), x.amin()]).double())
        self.prev = x.clone()
        self.last = x[:2].clone()
        self.seen += 1


class Other(Toy):
    pass


def fed() -> Toy:
    t = Toy()
    t.update(torch.tensor([1.0, 2.0]))
    t.update(torch.tensor([3.0, math.nan]))
    return t


def test_means_skip_nan_and_keep_catalogue_order():
    t = fed()
    assert t.get_epoch_stats() == {"toy/a": 1.5, "toy/b": 2.0}
    assert list(t.compute()) == ["toy/a", "toy/b"]


def test_provided_but_never_defined_is_nan():
    t = Toy()
    t.update(torch.tensor([math.nan, 1.0]))
    out = t.get_epoch_stats()
    assert math.isnan(out["toy/a"]) and math.isnan(out["toy/b"])


def test_reset_restores_resettable_states_only():
    t = fed()
    t.reset()
    assert t.get_epoch_stats() == {}
    assert t.prev is None and t.seen == 2
    assert torch.equal(t.last, torch.zeros(2))
    t.update(torch.tensor([5.0, 6.0]))
    assert t.get_epoch_stats() == {"toy/a": 5.5, "toy/b": 6.0}


def test_sync_dist_without_distributed():
    t = fed()
    assert t.get_epoch_stats(sync_dist=True) == t.get_epoch_stats()


def test_state_dict_round_trip():
    t = fed()
    sd = t.state_dict()
    assert sd["class"].endswith(".Toy") and sd["version"] == 1
    assert set(sd["states"]) == {"prev", "seen", "last"}
    u = Toy()
    u.load_state_dict(sd)
    assert u.get_epoch_stats() == t.get_epoch_stats()
    assert u.seen == 2 and torch.allclose(u.last, t.last, equal_nan=True)
    u.update(torch.tensor([5.0, 6.0]))
    t.update(torch.tensor([5.0, 6.0]))
    assert u.get_epoch_stats() == t.get_epoch_stats()


def _broken(sd):
    yield "class", {**sd, "class": "x.Other"}
    yield "version", {**sd, "version": 99}
    yield "missing", {k: v for k, v in sd.items() if k != "states"}
    yield "extra", {**sd, "extra": 1}
    yield "states missing", {**sd, "states": {k: v for k, v in sd["states"].items() if k != "seen"}}
    yield "states extra", {**sd, "states": {**sd["states"], "zzz": 1}}
    yield "int type", {**sd, "states": {**sd["states"], "seen": "two"}}
    yield "tensor shape", {**sd, "states": {**sd["states"], "last": torch.zeros(3)}}
    yield "accumulator shape", {**sd, "accumulator": {"names": ["toy/a"], "state": torch.zeros(2, 2)}}
    yield "provided", {**sd, "provided": [1]}


@pytest.mark.parametrize("case", [c for c, _ in _broken(fed().state_dict())])
def test_invalid_state_dict_leaves_object_unchanged(case):
    t = fed()
    before = t.get_epoch_stats()
    bad = dict(_broken(Toy().state_dict() if case == "never" else fed().state_dict()))[case]
    fresh = Toy()
    fresh.update(torch.tensor([7.0, 8.0]))
    with pytest.raises(ValueError):
        fresh.load_state_dict(bad)
    assert fresh.get_epoch_stats() == {"toy/a": 7.5, "toy/b": 8.0}
    assert fresh.seen == 1 and torch.equal(fresh.last, torch.tensor([7.0, 8.0]))
    assert t.get_epoch_stats() == before


def test_other_class_rejected():
    with pytest.raises(ValueError, match="class"):
        Other().load_state_dict(fed().state_dict())


def test_add_state_rejects_duplicates_and_bad_defaults():
    t = Toy()
    with pytest.raises(ValueError):
        t.add_state("prev", None)
    with pytest.raises(ValueError):
        t.add_state("obj", object())


# ---- nothing hidden: infinite batch values are counted per key ----------------------------------


def _router_params(scale: float) -> dict[str, torch.nn.Parameter]:
    w = torch.nn.Parameter(torch.zeros(3, 4))
    w.grad = torch.full((3, 4), scale / math.sqrt(12.0))
    return {"w": w}


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_a_non_finite_gradient_is_counted_and_becomes_a_verdict(bad):
    import fastdiag

    diag = fastdiag.SetDiagnostics()
    idx = torch.tensor([[0, 1, 2, 1]])
    for scale in (1.0, bad, 1.0):
        diag.update_with_router_state(idx, 3, router_params=_router_params(scale))
    stats = diag.get_epoch_stats()
    assert stats["ausa/router_gradient_norm"] == pytest.approx(1.0)  # the finite updates' mean
    assert stats["health/nonfinite/ausa/router_gradient_norm"] == 1.0
    failures = {(v.key, v.failure) for v in fastdiag.verdicts(stats)}
    assert ("health/nonfinite/ausa/router_gradient_norm", "exploding gradient") in failures
    # the count is not mistaken for the gradient norm itself by the other rules
    assert not any(v.key.startswith("health/nonfinite/") and v.failure != "exploding gradient"
                   for v in fastdiag.verdicts(stats))


def test_no_nonfinite_key_when_every_value_was_finite():
    import fastdiag

    diag = fastdiag.BaselineAttentionDiagnostics()
    diag.update(torch.softmax(torch.randn(2, 2, 4, 4), -1), attention_params=_router_params(2.0))
    assert not any(k.startswith("health/nonfinite/") for k in diag.get_epoch_stats())
