"""``fastdiag.ops.summaries`` (fused C++ vs torch code), per-update op counts, ``keys=`` and
state_dict validation of the three diagnostics classes."""

from __future__ import annotations

import math

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import fastdiag
from fastdiag import (
    BaselineAttentionDiagnostics,
    SetDiagnostics,
    WeightDiagnostics,
    backends,
    ops,
    schema,
)
from fastdiag.ops import summaries

needs_cpu_ops = pytest.mark.skipif(
    not backends.cpu_extension_available(), reason="needs the C++ extension"
)


def both(fn):
    """fn() with the fused CPU ops and with the torch code."""
    out = fn()
    fastdiag.set_backend("torch")
    try:
        ref = fn()
    finally:
        fastdiag.set_backend(None)
    return out, ref


def close(a, b):
    return torch.allclose(a.double(), b.double(), rtol=1e-9, atol=1e-12, equal_nan=True)


@needs_cpu_ops
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (2, 5, 1), (1, 2, 4, 4)])
def test_dist_summary_matches_torch(shape):
    torch.manual_seed(0)
    n = shape[-1]
    four = len(shape) == 4
    k = min(5, n)
    x_prev = torch.softmax(torch.randn(shape), -1)
    x = torch.softmax(torch.randn(shape), -1)
    x[0, 0] = math.nan
    prev = ops.dist_stats(x_prev, reduce_dim=1 if four else None, topk=k)
    st = ops.dist_stats(x, reduce_dim=1 if four else None, topk=k)
    _, bitmap = summaries.dist_summary(prev, n, from_heads=four, jaccard=True)
    (v, b), (rv, rb) = both(
        lambda: summaries.dist_summary(
            st, n, from_heads=four, prev_top=prev.topk, prev_bitmap=bitmap, jaccard=True
        )
    )
    assert close(v, rv) and torch.equal(b, rb)
    assert not torch.isnan(v[summaries.DIST["pattern_jaccard"]])


@needs_cpu_ops
@pytest.mark.parametrize("num_sets", [1, 3, 9])
def test_usage_summary_matches_torch(num_sets):
    torch.manual_seed(1)
    idx = torch.randint(-1, num_sets + 1, (4, 6, 2))
    prev = torch.rand(num_sets + 2) > 0.5
    (v, a), (rv, ra) = both(lambda: summaries.usage_summary(idx, num_sets, prev))
    assert close(v, rv) and torch.equal(a, ra)
    empty = torch.full((3,), -1)
    (v, _), (rv, _) = both(lambda: summaries.usage_summary(empty, num_sets, None))
    assert close(v, rv)


@needs_cpu_ops
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_param_norms_match_torch_and_refresh_prev(dtype):
    torch.manual_seed(2)
    params = [torch.randn(3, 4, dtype=dtype), torch.randn(5, dtype=dtype)]
    grads = [torch.randn(3, 4, dtype=dtype)]
    prev_a = [torch.randn_like(p) for p in params]
    prev_b = [p.clone() for p in prev_a]
    v = summaries.param_norms(params, grads, prev_a)
    fastdiag.set_backend("torch")
    try:
        rv = summaries.param_norms(params, grads, prev_b)
    finally:
        fastdiag.set_backend(None)
    tol = 1e-5 if dtype == torch.float64 else 1e-2
    assert torch.allclose(v, rv, rtol=tol)
    assert all(torch.equal(a, p) and torch.equal(b, p) for a, b, p in zip(prev_a, prev_b, params))
    assert math.isnan(summaries.param_norms(params, [], None)[2])


# ------------------------------------------------------------------------------------------------
# op counts (deterministic; never a time)
# ------------------------------------------------------------------------------------------------


def top_level_ops(fn) -> list[str]:
    fn()
    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return [
        e.name
        for e in prof.events()
        if e.cpu_parent is None and not e.name.startswith("[") and "Profiler" not in e.name
    ]


def _params():
    lin = torch.nn.Linear(16, 8)
    lin(torch.randn(2, 16)).sum().backward()
    return dict(lin.named_parameters())


@needs_cpu_ops
def test_baseline_update_op_counts():
    a = torch.softmax(torch.randn(1, 2, 16, 16), -1)
    d = BaselineAttentionDiagnostics()
    assert len(top_level_ops(lambda: d.update(a))) <= 12
    params = _params()
    assert len(top_level_ops(lambda: d.update(a, params))) <= 20


@needs_cpu_ops
def test_set_update_op_counts():
    torch.manual_seed(0)
    idx = torch.randint(0, 8, (2, 16))
    probs = torch.softmax(torch.randn(2, 16, 8), -1)
    d, params = SetDiagnostics(), _params()
    # bank indices, router probs, set attention and router params: fused
    assert len(top_level_ops(lambda: d.update_with_router_state(idx, 8, probs, None, params, probs))) <= 20


@needs_cpu_ops
def test_set_update_all_inputs_op_count_target():
    torch.manual_seed(0)
    idx = torch.randint(0, 8, (2, 16))
    probs = torch.softmax(torch.randn(2, 16, 8), -1)
    emb, tok, params = torch.randn(2, 8, 16), torch.randint(0, 50, (2, 16)), _params()
    d = SetDiagnostics()
    n = len(top_level_ops(lambda: d.update_with_router_state(idx, 8, probs, emb, params, probs, token_ids=tok)))
    assert n <= 40


@needs_cpu_ops
def test_weight_update_op_counts():
    w = WeightDiagnostics("pool")
    p = torch.softmax(torch.randn(4, 8), -1)
    assert len(top_level_ops(lambda: w.update(p, indices=torch.randint(0, 8, (4,))))) <= 40


# ------------------------------------------------------------------------------------------------
# keys=
# ------------------------------------------------------------------------------------------------


def test_baseline_keys_select_values():
    torch.manual_seed(3)
    batches = [torch.softmax(torch.randn(2, 3, 6, 6), -1) for _ in range(3)]
    keys = ("baseline/attention_entropy_mean", "baseline/attention_pattern_jaccard")
    full, sub, heads = (
        BaselineAttentionDiagnostics(),
        BaselineAttentionDiagnostics(keys=keys),
        BaselineAttentionDiagnostics(keys=schema.BASELINE_HEAD_KEYS),
    )
    for a in batches:
        for d in (full, sub, heads):
            d.update(a)
    want, got = full.get_epoch_stats(), sub.get_epoch_stats()
    assert list(got) == [*keys, "health/nonfinite_rows"]
    assert all(got[k] == pytest.approx(want[k], nan_ok=True) for k in got)
    got = heads.get_epoch_stats()
    assert list(got) == [*schema.BASELINE_HEAD_KEYS, "health/nonfinite_rows"] or set(got) == {
        *schema.BASELINE_HEAD_KEYS, "health/nonfinite_rows"}
    assert all(got[k] == pytest.approx(want[k]) for k in schema.BASELINE_HEAD_KEYS)


def test_baseline_unknown_key_raises():
    with pytest.raises(ValueError, match="valid keys"):
        BaselineAttentionDiagnostics(keys=["baseline/nope"])


# ------------------------------------------------------------------------------------------------
# state_dict validation
# ------------------------------------------------------------------------------------------------


def _fed(cls):
    torch.manual_seed(4)
    if cls is SetDiagnostics:
        d = SetDiagnostics()
        d.update_with_router_state(torch.randint(0, 4, (2, 5)), 4, torch.softmax(torch.randn(2, 5, 4), -1))
    elif cls is BaselineAttentionDiagnostics:
        d = BaselineAttentionDiagnostics()
        d.update(torch.softmax(torch.randn(1, 2, 4, 4), -1))
    else:
        d = WeightDiagnostics("pool")
        d.update(torch.softmax(torch.randn(3, 4), -1))
    return d


CLASSES = [SetDiagnostics, BaselineAttentionDiagnostics, WeightDiagnostics]


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("case", ["other class", "version 99", "missing key", "missing state"])
def test_invalid_state_dict_leaves_object_unchanged(cls, case):
    d = _fed(cls)
    before = d.get_epoch_stats()
    other = _fed(CLASSES[(CLASSES.index(cls) + 1) % 3]).state_dict()
    sd = d.state_dict()
    bad = {
        "other class": other,
        "version 99": {**sd, "version": 99},
        "missing key": {k: v for k, v in sd.items() if k != "accumulator"},
        "missing state": {**sd, "states": dict(list(sd["states"].items())[1:])},
    }[case]
    with pytest.raises(ValueError):
        d.load_state_dict(bad)
    after = d.get_epoch_stats()
    # (the delta_* keys advance at every get_epoch_stats call: compare the others)
    assert {k: v for k, v in after.items() if "delta_" not in k} == pytest.approx(
        {k: v for k, v in before.items() if "delta_" not in k}, nan_ok=True
    )


@pytest.mark.parametrize("cls", CLASSES)
def test_state_dict_round_trip(cls):
    d = _fed(cls)
    e = cls() if cls is not WeightDiagnostics else WeightDiagnostics("pool")
    e.load_state_dict(d.state_dict())
    assert e.get_epoch_stats() == pytest.approx(d.get_epoch_stats(), nan_ok=True)


@needs_cpu_ops
@pytest.mark.parametrize("nk", [1, 2, 7])
def test_attention_values_cpu_op_matches_torch(nk):
    from fastdiag.ops import _summaries_torch

    g = torch.Generator().manual_seed(nk)
    x = torch.softmax(torch.randn(2, 3, 5, nk, generator=g), -1)
    causal = torch.ones(5, nk, dtype=torch.bool).tril()
    xc = torch.softmax(torch.randn(2, 3, 5, nk, generator=g).masked_fill(~causal, float("-inf")), -1)
    mask = torch.zeros(2, 3, 5, dtype=torch.bool)  # no valid row: NaN
    half = mask.clone()
    half[0, :, :3] = True
    for w, m in ((x, None), (x, mask), (xc, None), (xc, half)):
        st = ops.dist_stats(w, tau=0.1, eps=0.0, row_mask=m, rows=True, heads=False)
        got = summaries.attention_values(st.sums, st.rows, nk, 0.9)
        want = _summaries_torch.attention_values_torch(st.sums, st.rows, nk, 0.9)
        assert got.shape == (len(summaries.ATTENTION_FIELDS),)
        torch.testing.assert_close(got, want, equal_nan=True)
