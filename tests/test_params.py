"""ParamTracker (fastdiag/diagnostics/params.py) vs plain float64 torch formulas."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fastdiag.diagnostics import params as params_module
from fastdiag.diagnostics.params import AUTO_GROUP_MAX_PARAMS, ParamTracker, group_fn
from tests.conftest import forbid_host_sync


def norm64(tensors) -> float:
    return math.sqrt(sum(float(t.detach().double().square().sum()) for t in tensors))


def make(seed: int = 0, grads: bool = True) -> dict[str, nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    out = {
        "enc.layer.w": nn.Parameter(torch.randn(6, 4, generator=g)),
        "enc.layer.b": nn.Parameter(torch.randn(6, generator=g)),
        "enc.other.w": nn.Parameter(torch.randn(3, 3, generator=g, dtype=torch.float64)),
        "head.w": nn.Parameter(torch.randn(2, 6, generator=g)),
    }
    if grads:
        for p in out.values():
            p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
    return out


def step(params: dict[str, nn.Parameter], lr: float = 0.1) -> None:
    with torch.no_grad():
        for p in params.values():
            if p.grad is not None:
                p.sub_(lr * p.grad)


# ----------------------------------------------------------------------------------------------
# one group: the drop-in classes' use
# ----------------------------------------------------------------------------------------------


def test_update_norms_and_weight_change_against_float64():
    params = make()
    tracker = ParamTracker("params")
    g, p, change = tracker.update(params)
    assert float(g) == pytest.approx(norm64(q.grad for q in params.values()), rel=1e-6)
    assert float(p) == pytest.approx(norm64(params.values()), rel=1e-6)
    assert math.isnan(float(change))  # first update: no previous parameters
    assert all(t.dtype == torch.float64 and t.dim() == 0 for t in (g, p, change))
    before = {n: q.detach().double().clone() for n, q in params.items()}
    step(params)
    _, _, change = tracker.update(params)
    expect = norm64(params[n].double() - before[n] for n in params)
    assert float(change) == pytest.approx(expect, rel=1e-6)


def test_previous_parameters_are_device_copies_refreshed_in_place():
    params = make()
    tracker = ParamTracker("params")
    tracker.update(params)
    assert tracker.prev is not None and list(tracker.prev) == list(params)
    ptrs = {n: t.data_ptr() for n, t in tracker.prev.items()}
    for n, t in tracker.prev.items():
        assert t.data_ptr() != params[n].data_ptr() and torch.equal(t, params[n].detach())
    step(params)
    tracker.update(params)
    assert {n: t.data_ptr() for n, t in tracker.prev.items()} == ptrs  # same buffers
    for n, t in tracker.prev.items():
        assert torch.equal(t, params[n].detach())


def test_missing_and_new_parameters_are_skipped():
    params = make()
    tracker = ParamTracker("params")
    tracker.update({n: params[n] for n in ("enc.layer.w", "head.w")})
    before = {n: q.detach().double().clone() for n, q in params.items()}
    step(params)
    # enc.layer.b and enc.other.w are new: not part of the change; then head.w goes missing
    _, _, change = tracker.update({n: params[n] for n in ("enc.layer.w", "enc.layer.b", "head.w")})
    expect = norm64(params[n].double() - before[n] for n in ("enc.layer.w", "head.w"))
    assert float(change) == pytest.approx(expect, rel=1e-6)
    assert list(tracker.prev) == ["enc.layer.w", "enc.layer.b", "head.w"]
    _, _, change = tracker.update({"other": nn.Parameter(torch.ones(2))})
    assert float(change) == 0.0  # no name in common


def test_no_gradient_gives_zero_gradient_norm():
    params = make(grads=False)
    g, p, _ = ParamTracker("params").update(params)
    assert float(g) == 0.0
    assert float(p) == pytest.approx(norm64(params.values()), rel=1e-6)


def test_shape_change_between_updates_names_the_parameter():
    tracker = ParamTracker("router_params")
    tracker.update({"w": nn.Parameter(torch.zeros(3, 2))})
    with pytest.raises(ValueError, match=r"router_params\['w'\] changed shape from \(3, 2\) to \(2, 3\)"):
        tracker.update({"w": nn.Parameter(torch.zeros(2, 3))})


def test_check_rejects_bad_input():
    tracker = ParamTracker("params")
    with pytest.raises(TypeError, match="params must be a dict name -> Parameter, got list"):
        tracker.check([torch.zeros(2)])
    with pytest.raises(ValueError, match="params must hold at least one parameter"):
        tracker.check({})
    with pytest.raises(TypeError, match=r"params\['w'\] must be a torch.Tensor, got float"):
        tracker.check({"w": 1.0})
    with pytest.raises(TypeError, match="name must be a str"):
        ParamTracker(3)
    with pytest.raises(TypeError, match="params state must be a dict"):
        tracker.load_state_dict([torch.zeros(1)])


def test_state_dict_round_trip():
    params = make()
    tracker = ParamTracker("params")
    assert tracker.state_dict() is None
    tracker.update(params)
    saved = tracker.state_dict()
    assert saved.keys() == params.keys()
    assert all(saved[n].data_ptr() != tracker.prev[n].data_ptr() for n in saved)  # copies
    step(params)
    fresh = ParamTracker("params")
    fresh.load_state_dict(saved)
    _, _, a = tracker.update(params)
    _, _, b = fresh.update(params)
    assert float(a) == float(b) > 0
    fresh.load_state_dict(None)
    assert fresh.prev is None


def test_same_values_as_the_original_tracker_of_the_drop_in_classes():
    """Drop-in for _base._ParamTracker (while it still exists): identical results."""
    base = pytest.importorskip("fastdiag.diagnostics._base")
    original_cls = getattr(base, "_ParamTracker", None)
    if original_cls is None:
        pytest.skip("_base._ParamTracker is gone (the classes use ParamTracker)")
    params = make()
    new, old = ParamTracker("params"), original_cls("params")
    for i in range(4):
        subset = params if i != 1 else {n: params[n] for n in list(params)[:2]}
        if i == 3 and hasattr(old, "update_values"):
            a, b = new.update_values(subset), old.update_values(subset)
            assert a.shape == b.shape == (3,)
            pairs = zip(a.unbind(), b.unbind(), strict=True)
        else:
            pairs = zip(new.update(subset), old.update(subset), strict=True)
        for a, b in pairs:
            assert torch.equal(a, b) or (a.isnan() and b.isnan())
        step(params)
    assert new.prev.keys() == old.prev.keys()
    assert all(torch.equal(new.prev[n], old.prev[n]) for n in new.prev)


def test_works_as_a_declared_state_of_a_diagnostics_class():
    """The drop-in classes declare it with add_state(..., reset=False): saved and restored."""
    from fastdiag.diagnostics.base import Diagnostics

    keys = ("grad_norm", "param_norm", "weight_change")

    class Toy(Diagnostics):
        def __init__(self) -> None:
            super().__init__()
            self.add_state("_params", ParamTracker("params"), reset=False)

        def metric_keys(self) -> tuple[str, ...]:
            return keys

        def update(self, params) -> None:
            self._params.check(params)
            self._add(keys, self._params.update_values(params))

    params = make()
    a = Toy()
    a.update(params)
    step(params)
    b = Toy()
    b.load_state_dict(a.state_dict())
    assert b._params.prev.keys() == params.keys()
    a.update(params)
    b.update(params)
    assert a.get_epoch_stats() == b.get_epoch_stats()
    a.reset()  # reset=False: the previous parameters stay
    assert a._params.prev is not None
    bad = a.state_dict()
    bad["states"]["_params"] = {"enc.layer.w": 1.0}
    with pytest.raises(ValueError, match="_params"):
        b.load_state_dict(bad)


# ----------------------------------------------------------------------------------------------
# groups: the training use
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("group", "groups"),
    [
        ("parameter", {n: [n] for n in ("enc.layer.w", "enc.layer.b", "enc.other.w", "head.w")}),
        ("module", {"enc.layer": ["enc.layer.w", "enc.layer.b"], "enc.other": ["enc.other.w"], "head": ["head.w"]}),
        (1, {"enc": ["enc.layer.w", "enc.layer.b", "enc.other.w"], "head": ["head.w"]}),
        (lambda n: "all", {"all": ["enc.layer.w", "enc.layer.b", "enc.other.w", "head.w"]}),
    ],
)
def test_gradient_stats_per_group_against_float64(group, groups):
    params = make()
    params["enc.layer.b"].grad[1] = float("nan")
    params["head.w"].grad[0, :2] = float("inf")
    keys, values = ParamTracker(group=group).gradient_stats(params)
    got = dict(zip(keys, values.tolist(), strict=True))
    names = list(groups)
    assert list(keys) == (
        [f"grad_norm/{g}" for g in names]
        + [f"param_norm/{g}" for g in names]
        + ["grad_norm_total", "health/nan_infs"]
        + [f"health/nan_infs/{g}" for g in names]
    )
    for g, members in groups.items():
        grad_norm = norm64(params[n].grad for n in members)
        if math.isfinite(grad_norm):
            assert got[f"grad_norm/{g}"] == pytest.approx(grad_norm, rel=1e-6)
        else:
            assert not math.isfinite(got[f"grad_norm/{g}"])
        assert got[f"param_norm/{g}"] == pytest.approx(norm64(params[n] for n in members), rel=1e-6)
        bad = sum(int((~torch.isfinite(params[n].grad)).sum()) for n in members)
        assert got[f"health/nan_infs/{g}"] == bad
    assert got["health/nan_infs"] == 3
    assert not math.isfinite(got["grad_norm_total"])


def test_gradient_stats_skips_parameters_without_gradient_and_caches_plans():
    params = make()
    params["head.w"].grad = None
    tracker = ParamTracker(group="parameter")
    keys, values = tracker.gradient_stats(list(params.items()))
    assert "grad_norm/head.w" not in keys and "param_norm/head.w" not in keys
    total = norm64(p.grad for p in params.values() if p.grad is not None)
    assert values[keys.index("grad_norm_total")].item() == pytest.approx(total, rel=1e-6)
    again, _ = tracker.gradient_stats(params)
    assert again is keys  # the same plan: no new keys or index tensors
    assert ParamTracker().gradient_stats(make(grads=False)) is None


def test_update_ratio_across_an_optimizer_step():
    params = make()
    params["enc.layer.b"].data.zero_()  # a zero group has no finite ratio
    tracker = ParamTracker(group="module")
    assert tracker.update_ratios(params) is None  # no snapshot yet
    tracker.gradient_stats(params, snapshot=True)
    before = {n: p.detach().double().clone() for n, p in params.items()}
    step(params)
    keys, values = tracker.update_ratios(params)
    got = dict(zip(keys, values.tolist(), strict=True))
    for g, members in {"enc.other": ["enc.other.w"], "head": ["head.w"]}.items():
        delta = norm64(params[n].double() - before[n] for n in members)
        assert got[f"update_ratio/{g}"] == pytest.approx(delta / norm64(before[n] for n in members), rel=1e-6)
    layer = norm64(params[n].double() - before[n] for n in ("enc.layer.w", "enc.layer.b"))
    assert got["update_ratio/enc.layer"] == pytest.approx(layer / norm64([before["enc.layer.w"]]), rel=1e-6)
    assert tracker.update_ratios(params) is None  # the snapshot is used once
    params["enc.layer.b"].data.zero_()
    solo = ParamTracker(group="parameter")
    solo.gradient_stats(params, snapshot=True)
    step(params)
    keys, values = solo.update_ratios(params)
    assert not math.isfinite(values[keys.index("update_ratio/enc.layer.b")].item())  # ||before|| = 0


def test_group_fn_semantics_and_errors():
    assert group_fn("parameter", 1)("a.b.c") == "a.b.c"
    assert group_fn("module", 1)("a.b.c") == "a.b" and group_fn("module", 1)("top") == "top"
    assert group_fn(2, 1)("a.b.c") == "a.b"
    assert group_fn("auto", AUTO_GROUP_MAX_PARAMS)("a.b.c") == "a.b.c"
    assert group_fn("auto", AUTO_GROUP_MAX_PARAMS + 1)("a.b.c") == "a.b"
    with pytest.raises(ValueError, match="group must be one of"):
        group_fn("layers", 1)
    with pytest.raises(ValueError, match="group depth must be >= 1, got 0"):
        group_fn(0, 1)
    with pytest.raises(TypeError, match="group must be one of"):
        group_fn(True, 1)
    with pytest.raises(ValueError, match="group must be one of"):
        ParamTracker(group="layers")


def test_auto_groups_by_module_above_the_limit(monkeypatch):
    monkeypatch.setattr(params_module, "AUTO_GROUP_MAX_PARAMS", 2)
    keys, _ = ParamTracker(group="auto").gradient_stats(make())
    assert "grad_norm/enc.layer" in keys and "grad_norm/enc.layer.w" not in keys


def test_half_precision_norms_do_not_overflow():
    p = nn.Parameter(torch.full((64,), 1000.0, dtype=torch.float16))
    p.grad = torch.full((64,), 1000.0, dtype=torch.float16)
    keys, values = ParamTracker().gradient_stats({"p": p})
    assert values[keys.index("grad_norm/p")].item() == pytest.approx(8000.0, rel=1e-3)
    g, n, _ = ParamTracker("params").update({"p": p})
    assert float(g) == pytest.approx(8000.0, rel=1e-3) and float(n) == pytest.approx(8000.0, rel=1e-3)


def test_no_host_sync_in_any_update():
    params = make()
    tracker, grouped = ParamTracker("params"), ParamTracker(group="module")
    for _ in range(3):  # first update, then the in-place refresh and the cached plans
        with forbid_host_sync():
            tracker.update(params)
            grouped.gradient_stats(params, snapshot=True)
            step(params)
            grouped.update_ratios(params)


def test_integer_parameters_are_a_type_error_naming_them():
    from fastdiag.diagnostics.params import ParamTracker

    tracker = ParamTracker("router_params")
    with pytest.raises(TypeError, match=r"router_params\['w'\] must be a floating-point parameter"):
        tracker.check({"w": torch.zeros(3, dtype=torch.int64)})
