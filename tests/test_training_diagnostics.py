"""TrainingDiagnostics (fastdiag/diagnostics/training.py) fed directly, vs hand computations."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fastdiag.diagnostics.base import Diagnostics
from fastdiag.diagnostics.params import ParamTracker
from fastdiag.diagnostics.training import ATTENTION_METRICS, TrainingDiagnostics
from fastdiag.ops.summaries import attention_values
from tests.conftest import forbid_host_sync
from tests.training_helpers import attention_expect, entr


@pytest.fixture(autouse=True)
def _torch_backend(backend):
    backend("torch")  # the numbers are backend independent


def _named(seed: int = 0) -> list[tuple[str, nn.Parameter]]:
    g = torch.Generator().manual_seed(seed)
    named = [
        ("enc.a", nn.Parameter(torch.randn(5, 3, generator=g))),
        ("enc.b", nn.Parameter(torch.randn(7, generator=g, dtype=torch.float64))),
        ("head.c", nn.Parameter(torch.randn(2, 2, generator=g))),
        ("frozen", nn.Parameter(torch.randn(3, generator=g))),  # no gradient: skipped
    ]
    for _, p in named[:3]:
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
    return named


def test_update_gradients_mixed_dtypes_and_state_dict():
    torch.manual_seed(0)
    named = [
        ("a", nn.Parameter(torch.randn(5, 3))),
        ("b", nn.Parameter(torch.randn(7, dtype=torch.float64))),
        ("c", nn.Parameter(torch.randn(2, 2))),
        ("frozen", nn.Parameter(torch.randn(3))),  # no gradient: skipped
    ]
    for _, p in named[:3]:
        p.grad = torch.randn_like(p)
    diag = TrainingDiagnostics()
    diag.update_gradients(named)
    diag.update_gradients(dict(named))
    stats = diag.get_epoch_stats()
    for n, p in named[:3]:
        assert stats[f"grad_norm/{n}"] == pytest.approx(float(p.grad.double().norm()), rel=1e-6)
        assert stats[f"param_norm/{n}"] == pytest.approx(float(p.detach().double().norm()), rel=1e-6)
    total = math.sqrt(sum(float(p.grad.double().square().sum()) for _, p in named[:3]))
    assert stats["grad_norm_total"] == pytest.approx(total, rel=1e-6)
    assert "grad_norm/frozen" not in stats and "param_norm/frozen" not in stats
    again = TrainingDiagnostics()
    again.load_state_dict(diag.state_dict())
    assert again.get_epoch_stats() == stats
    diag.reset()
    assert all(math.isnan(v) for v in diag.get_epoch_stats().values())
    # on the Diagnostics base: a key not recorded since reset() is absent
    assert diag.get_epoch_stats() == {}


def test_is_a_diagnostics_with_dynamic_keys_in_first_recorded_order():
    diag = TrainingDiagnostics()
    assert isinstance(diag, Diagnostics)
    assert diag.metric_keys() == ()
    diag.update_probe("p/x", torch.tensor(1.0))
    diag.update_attention("l0", torch.softmax(torch.randn(2, 3, 4, 5), -1))
    diag.update_gradients(_named(), group="module")
    assert diag.metric_keys()[:6] == ("p/x", *(f"{m}/l0" for m in ATTENTION_METRICS))
    assert diag.metric_keys()[6:] == (
        "grad_norm/enc", "grad_norm/head", "param_norm/enc", "param_norm/head",
        "grad_norm_total", "health/nan_infs", "health/nan_infs/enc", "health/nan_infs/head",
    )
    # health/nan_infs/{group} only where a gradient had a non-finite entry
    assert list(diag.get_epoch_stats()) == [k for k in diag.metric_keys() if not k.startswith("health/nan_infs/")]
    assert diag.accumulator.names == list(diag.metric_keys())


def test_attention_matches_the_per_head_hand_values():
    torch.manual_seed(0)
    diag = TrainingDiagnostics()
    batches = [torch.softmax(3 * torch.randn(2, 3, 4, 6), -1) for _ in range(3)]
    for w in batches:
        diag.update_attention("layer", w)
    one_head = torch.softmax(torch.randn(2, 4, 6), -1)
    diag.update_attention("single", one_head)  # [B, N, Nk]: one head
    stats = diag.get_epoch_stats()
    expect = [attention_expect(w.double()) for w in batches]
    for m in ATTENTION_METRICS:
        assert stats[f"{m}/layer"] == pytest.approx(sum(e[m] for e in expect) / 3, rel=1e-6)
        assert stats[f"{m}/single"] == pytest.approx(attention_expect(one_head.double().unsqueeze(1))[m], rel=1e-6)


def test_attention_from_logits_row_mask_and_thresholds():
    torch.manual_seed(1)
    logits = torch.randn(2, 2, 5, 4)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    diag = TrainingDiagnostics(tau=0.3, effective_head_entropy=0.95)
    diag.update_attention("l", logits, from_logits=True, row_mask=mask)
    stats = diag.get_epoch_stats()
    w = torch.softmax(logits.double(), -1)
    rows = torch.cat([w[0].reshape(-1, 4), w[1, :, :3].reshape(-1, 4)])  # valid per-head rows
    assert stats["attention_entropy/l"] == pytest.approx(float(entr(rows).mean()), rel=1e-6)
    assert stats["attention_top1/l"] == pytest.approx(float(rows.amax(-1).mean()), rel=1e-6)
    assert stats["attention_sparsity/l"] == pytest.approx(float((rows > 0.3).double().mean()), rel=1e-6)
    per_head = torch.stack(
        [torch.cat([entr(w[0, h]), entr(w[1, h, :3])]).mean() for h in range(2)]
    ) / math.log(4)
    assert stats["attention_effective_heads/l"] == pytest.approx(float((per_head < 0.95).double().mean()))


@pytest.mark.parametrize(
    "case",
    ["causal_gqa", "bool_mask_rows", "additive_scale"],
)
def test_attention_qk_matches_the_materialised_weights(case):
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(2, 4, 7, 8, generator=gen)
    k = torch.randn(2, 2 if case == "causal_gqa" else 4, 7, 8, generator=gen)
    kw: dict = {}
    rows = None
    if case == "causal_gqa":
        kw = dict(is_causal=True, enable_gqa=True)
        mask = torch.ones(7, 7, dtype=torch.bool).tril()
    elif case == "bool_mask_rows":
        mask = torch.ones(2, 1, 7, 7, dtype=torch.bool)
        mask[1, ..., 5:] = False  # padded keys; the padded queries are left out with row_mask
        rows = torch.ones(2, 7, dtype=torch.bool)
        rows[1, 5:] = False
        kw = dict(attn_mask=mask, row_mask=rows)
    else:
        mask = torch.randn(2, 1, 7, 7, generator=gen)
        kw = dict(attn_mask=mask, scale=0.3)
    qk, weights = TrainingDiagnostics(tau=0.2), TrainingDiagnostics(tau=0.2)
    qk.update_attention_qk("l", q, k, **kw)
    kk = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    s = q @ kk.transpose(-1, -2) * kw.get("scale", 8**-0.5)
    s = s + mask if mask.dtype != torch.bool else s.masked_fill(~mask, float("-inf"))
    weights.update_attention("l", s.softmax(-1), row_mask=rows)
    got, want = qk.get_epoch_stats(), weights.get_epoch_stats()
    assert got.keys() == want.keys() == {f"{m}/l" for m in ATTENTION_METRICS}
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    # the attention is pre-dropout by construction and the update never syncs
    with forbid_host_sync():
        qk.update_attention_qk("l", q, k, **kw)


def test_attention_qk_bad_arguments():
    diag = TrainingDiagnostics()
    q = torch.randn(1, 2, 3, 4)
    with pytest.raises(TypeError, match="name must be a str"):
        diag.update_attention_qk(1, q, q)
    with pytest.raises(TypeError, match="k must be a torch.Tensor"):
        diag.update_attention_qk("l", q, None)
    with pytest.raises(TypeError, match="attn_mask must be"):
        diag.update_attention_qk("l", q, q, attn_mask=[[True]])
    with pytest.raises(TypeError, match="row_mask must be"):
        diag.update_attention_qk("l", q, q, row_mask=[True])
    with pytest.raises(ValueError, match="enable_gqa"):
        diag.update_attention_qk("l", q, q[:, :1])
    assert diag.get_epoch_stats() == {}


def test_attention_values_edge_cases():
    diag = TrainingDiagnostics()
    diag.update_attention("nk1", torch.ones(2, 3, 4, 1))  # one key: H / log 1 undefined
    diag.update_attention("empty", torch.full((1, 2, 3, 4), 0.25), row_mask=torch.zeros(1, 3, dtype=torch.bool))
    stats = diag.get_epoch_stats()
    assert stats["attention_entropy/nk1"] == 0.0 and stats["attention_top1/nk1"] == 1.0
    assert stats["attention_effective_heads/nk1"] == 0.0  # NaN < threshold is False for every head
    assert all(math.isnan(stats[f"{m}/empty"]) for m in ATTENTION_METRICS)  # no valid row
    assert attention_values.__module__ == "fastdiag.ops.summaries"


def test_update_ratio_after_a_step_and_the_tracker_argument():
    named = _named()
    diag = TrainingDiagnostics()
    diag.update_ratio(named)  # no snapshot yet: nothing
    assert diag.get_epoch_stats() == {}
    diag.update_gradients(named, group=1, snapshot=True)
    before = {n: p.detach().double().clone() for n, p in named}
    with torch.no_grad():
        for _, p in named[:3]:
            p.sub_(0.1 * p.grad)
    diag.update_ratio(named, group=1)
    diag.update_ratio(named, group=1)  # the snapshot is used once
    stats = diag.get_epoch_stats()
    for g in ("enc", "head"):
        members = [n for n, _ in named[:3] if n.startswith(g + ".")]
        delta = math.sqrt(sum(float((dict(named)[n].detach().double() - before[n]).square().sum()) for n in members))
        norm = math.sqrt(sum(float(before[n].square().sum()) for n in members))
        assert stats[f"update_ratio/{g}"] == pytest.approx(delta / norm, rel=1e-6)
    assert diag.accumulator.state[diag.accumulator.names.index("update_ratio/enc"), 1] == 1
    # a tracker of the caller's: its own snapshot, whatever the object's trackers hold
    mine = ParamTracker(group="parameter")
    other = TrainingDiagnostics()
    other.update_gradients(named, snapshot=True, tracker=mine)
    other.update_ratio(named)  # the object's own tracker has no snapshot
    assert not any(k.startswith("update_ratio/") for k in other.get_epoch_stats())
    other.update_ratio(named, tracker=mine)
    assert other.get_epoch_stats()["update_ratio/enc.a"] == 0.0  # nothing moved since
    with pytest.raises(TypeError, match="tracker must be a ParamTracker"):
        other.update_gradients(named, tracker="mine")


def test_probe_values_and_nan_batches():
    diag = TrainingDiagnostics()
    diag.update_probe("p", torch.tensor([1.0, 3.0]))  # averaged over the entries
    diag.update_probe("p", 4)
    diag.update_probe("p", torch.tensor(float("nan")))  # not counted
    assert diag.get_epoch_stats() == {"p": 3.0}


def test_bad_arguments():
    diag = TrainingDiagnostics()
    with pytest.raises(ValueError, match=r"\[B, H, N, Nk\]"):
        diag.update_attention("l", torch.rand(4, 4))
    with pytest.raises(TypeError, match="name must be a str"):
        diag.update_attention(3, torch.rand(1, 2, 2))
    with pytest.raises(TypeError, match="weights must be a torch.Tensor"):
        diag.update_attention("l", [[0.5, 0.5]])
    with pytest.raises(TypeError, match="probe 'p' must return a tensor or a number"):
        diag.update_probe("p", "x")
    with pytest.raises(TypeError, match="key must be a str"):
        diag.update_probe(1, 1.0)
    with pytest.raises(ValueError, match="group must be one of"):
        diag.update_gradients(_named(), group="layers")
    with pytest.raises(TypeError, match=r"parameters must be \(name, tensor\) pairs"):
        diag.update_gradients([("a", 1.0)])
    with pytest.raises(TypeError, match="tau must be a number"):
        TrainingDiagnostics(tau="0.1")
    with pytest.raises(ValueError, match="state_dict is for class"):
        diag.load_state_dict({**diag.state_dict(), "class": "x.Y"})


def test_device_argument_keeps_the_state_there():
    diag = TrainingDiagnostics(device="cpu")
    diag.update_probe("p", torch.tensor(2.0, dtype=torch.float32))
    assert diag.accumulator.state.device == torch.device("cpu")
    assert diag.get_epoch_stats() == {"p": 2.0}


def test_updates_never_copy_to_host():
    named = _named()
    diag = TrainingDiagnostics()
    w = torch.softmax(torch.randn(2, 3, 4, 5), -1)
    for _ in range(2):  # the second round runs on the cached keys and plans
        with forbid_host_sync():
            diag.update_attention("l", w, row_mask=torch.ones(2, 4, dtype=torch.bool))
            diag.update_gradients(named, group="module", snapshot=True)
            diag.update_ratio(named, group="module")
            diag.update_probe("p", w.sum())
    assert "update_ratio/enc" in diag.get_epoch_stats()


@pytest.mark.parametrize("path", ["weights", "qk"])
def test_uniform_causal_attention_reads_one(path):
    """Causal-aware normalisation: uniform attention over each row's attendable keys (causal,
    and padded keys) has normalised entropy 1 and no effective head; the raw entropy is the
    mean of log(i + 1)."""
    n, heads = 32, 3
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    diag = TrainingDiagnostics()
    if path == "weights":
        w = causal.double() / causal.sum(-1, keepdim=True)
        diag.update_attention("l", w.float().expand(2, heads, n, n))
    else:
        q = torch.zeros(2, heads, n, 8)  # equal scores: uniform over the attendable keys
        diag.update_attention_qk("l", q, q.clone(), is_causal=True)
    stats = diag.get_epoch_stats()
    assert stats["attention_entropy_norm/l"] == pytest.approx(1.0, abs=1e-6)
    assert stats["attention_effective_heads/l"] == 0.0
    assert stats["attention_entropy/l"] == pytest.approx(sum(math.log(i + 1) for i in range(n)) / n, rel=1e-6)
    # the old normalisation by log Nk read 0.735 here
    assert sum(math.log(i + 1) for i in range(n)) / n / math.log(n) == pytest.approx(0.735, abs=1e-3)


def test_normalisation_by_attendable_keys_with_padding_and_row_mask():
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 2, 6, 4, generator=gen)
    k = torch.randn(2, 2, 6, 4, generator=gen)
    keys = torch.ones(2, 1, 6, 6, dtype=torch.bool)
    keys[1, ..., 4:] = False  # padded keys of sample 1
    mask = keys & torch.ones(6, 6, dtype=torch.bool).tril()
    rows = torch.ones(2, 6, dtype=torch.bool)
    rows[1, 4:] = False
    s = (q @ k.transpose(-1, -2) / 2).masked_fill(~mask, float("-inf"))
    w = s.softmax(-1)
    a, b = TrainingDiagnostics(effective_head_entropy=0.8), TrainingDiagnostics(effective_head_entropy=0.8)
    a.update_attention("l", w, row_mask=rows)
    b.update_attention_qk("l", q, k, attn_mask=mask, row_mask=rows)
    valid = w.double()[rows.unsqueeze(1).expand(2, 2, 6)].reshape(-1, 6)  # [rows, Nk]
    h, cnt = entr(valid), mask.expand(2, 2, 6, 6)[rows.unsqueeze(1).expand(2, 2, 6)].sum(-1).double()
    ok = cnt >= 2
    want = float((h[ok] / cnt[ok].log()).mean())
    for d in (a, b):
        stats = d.get_epoch_stats()
        assert stats["attention_entropy_norm/l"] == pytest.approx(want, rel=1e-5)
        expect = attention_expect(torch.where(rows[:, None, :, None], w.double(), 0.0))  # masked rows all 0
        assert stats["attention_effective_heads/l"] == expect["attention_effective_heads"]
