"""``fastdiag.BaselineAttentionDiagnostics`` against ``fastdiag.reference``, plus the top-k Jaccards.

Attention maps come from real ``nn.MultiheadAttention`` / ``nn.TransformerEncoder`` forward
passes (``need_weights=True, average_attn_weights=False``, with and without a causal mask) and
from random softmax rows; every key, several epochs of several updates, every backend.
"""

from __future__ import annotations

import io
import math
import warnings

import pytest
import torch

from fastdiag import reference, schema
from fastdiag.diagnostics import BaselineAttentionDiagnostics
from fastdiag.ops import jaccard
from tests.conftest import assert_same_epochs, available_backends, forbid_host_sync
from tests.test_set_diagnostics import (
    ATOL,
    NONFINITE,
    RTOL,
    assert_stats_close,
    epochs_for,
    twin_generators,
)

BACKENDS = available_backends("cpu")


# ----------------------------------------------------------------------------------------------
# ops: top-k Jaccards against Python sets
# ----------------------------------------------------------------------------------------------


def test_flattened_topk_jaccard_matches_python_sets():
    gen = torch.Generator().manual_seed(0)
    nk = 11
    now = torch.stack([torch.randperm(nk, generator=gen)[:3] for _ in range(6)])
    prev = torch.stack([torch.randperm(nk, generator=gen)[:3] for _ in range(6)])
    a, b = set(now.flatten().tolist()), set(prev.flatten().tolist())
    got = jaccard.bitmap_jaccard(jaccard.index_bitmap(now, nk), jaccard.index_bitmap(prev, nk))
    assert float(got) == pytest.approx(len(a & b) / len(a | b))


def test_topk_jaccard_per_query_matches_python_sets():
    gen = torch.Generator().manual_seed(1)
    now = torch.stack([torch.randperm(9, generator=gen)[:4] for _ in range(7)]).reshape(7, 4)
    prev = torch.stack([torch.randperm(9, generator=gen)[:4] for _ in range(7)]).reshape(7, 4)
    rows = [len(set(r) & set(q)) / len(set(r) | set(q)) for r, q in zip(now.tolist(), prev.tolist(), strict=True)]
    assert jaccard.topk_jaccard_rows(now, prev).tolist() == pytest.approx(rows)
    assert float(jaccard.topk_jaccard_per_query(now, prev)) == pytest.approx(sum(rows) / len(rows))
    # rows with an invalid (-1) entry are left out of the mean
    now[2] = -1
    assert float(jaccard.topk_jaccard_per_query(now, prev)) == pytest.approx((sum(rows) - rows[2]) / 6)
    with pytest.raises(ValueError, match="same shape"):
        jaccard.topk_jaccard_rows(now, prev[:3])


# ----------------------------------------------------------------------------------------------
# parity with the reference
# ----------------------------------------------------------------------------------------------


def _run_pair(batches, ref=None, fd=None):
    ref = ref or reference.ReferenceBaselineAttentionDiagnostics()
    fd = fd or BaselineAttentionDiagnostics()
    out = []
    for epoch in batches:
        for args, seed in epoch:
            g1, g2 = twin_generators(seed)
            ref.update(*args, generator=g1)
            fd.update(*args, generator=g2)
        out.append((ref.get_epoch_stats(), fd.get_epoch_stats()))
        ref.reset()
        fd.reset()
    return out


def _mha_batches(epochs=3, updates=3, b=2, n=9, d=16, heads=4, causal=False, seed=0):
    """Attention of a MultiheadAttention trained a little between updates (the same batch
    replayed every other update, so the per-query Jaccard sees both stable and changed rows)."""
    torch.manual_seed(seed)
    mha = torch.nn.MultiheadAttention(d, heads, batch_first=True)
    opt = torch.optim.SGD(mha.parameters(), lr=0.05)
    params = dict(mha.named_parameters())
    mask = torch.nn.Transformer.generate_square_subsequent_mask(n) if causal else None
    x_fixed = torch.randn(b, n, d)
    batches, step = [], 0
    for _ in range(epochs):
        epoch = []
        for u in range(updates):
            x = x_fixed if u % 2 == 0 else torch.randn(b, n, d)
            out, w = mha(x, x, x, need_weights=True, average_attn_weights=False, attn_mask=mask)
            opt.zero_grad()
            out.square().mean().backward()
            values = torch.nn.functional.linear(x, mha.in_proj_weight[2 * d :], mha.in_proj_bias[2 * d :])
            values = values.reshape(b, n, heads, d // heads).transpose(1, 2)  # [B, H, N, dh]
            epoch.append(((w.detach(), params, values.detach()), step))
            opt.step()
            step += 1
        batches.append(epoch)
    return batches


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_parity_multihead_attention(backend, name, causal):
    backend(name)
    results = _run_pair(_mha_batches(epochs=epochs_for(name), causal=causal))
    for expected, got in results:
        assert_stats_close(expected, got)
        assert got[NONFINITE] == 0
    assert set(results[0][0]) == set(schema.BASELINE_DIAGNOSTICS)


@pytest.mark.parametrize("name", BACKENDS)
def test_parity_transformer_encoder(backend, name):
    """Per-head weights of each layer of a TransformerEncoder, read at its input (3-D and 4-D)."""
    backend(name)
    torch.manual_seed(3)
    d, heads = 12, 3
    layer = torch.nn.TransformerEncoderLayer(d, heads, dim_feedforward=24, dropout=0.0, batch_first=True)
    enc = torch.nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False).eval()
    batches = []
    for e in range(2):
        epoch = []
        for u in range(3):
            x = torch.randn(2, 7, d)
            h = x
            maps = []
            with torch.no_grad():
                for mod in enc.layers:
                    _, w = mod.self_attn(h, h, h, need_weights=True, average_attn_weights=False)
                    maps.append(w)
                    h = mod(h)
            attn = maps[u % 2]
            if e == 1:  # one head-averaged 3-D map per update in the second epoch
                attn = attn.mean(1)
            epoch.append(((attn, dict(enc.layers[0].self_attn.named_parameters())), e * 3 + u))
        batches.append(epoch)
    for expected, got in _run_pair(batches):
        assert_stats_close(expected, got)


def _random_batches(seed=4, epochs=3, updates=4):
    gen = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(6, 6)
    params = dict(lin.named_parameters())
    batches, step = [], 0
    for e in range(epochs):
        epoch = []
        for u in range(updates):
            nk = 8 if u != 2 else 5  # a key length change: no per-query Jaccard for that pair
            attn = (3 * torch.randn(2, 3, 4, nk, generator=gen)).softmax(-1)
            attn[0, 1, 2] = 0.0  # an all-zero head row: entropy 0, top-1 0
            values = torch.randn(2, 4, 5, generator=gen) if u != 1 else None
            p = None
            if u != 3:
                with torch.no_grad():
                    lin.weight.add_(0.02 * torch.randn(6, 6, generator=gen))
                lin.weight.grad = torch.randn(6, 6, generator=gen) if e != 2 else None
                p = params
            args = (attn if (e, u) != (1, 0) else None, p, values)
            epoch.append((args, step))
            step += 1
        batches.append(epoch)
    return batches


@pytest.mark.parametrize("name", BACKENDS)
def test_parity_random_attention_with_missing_inputs(backend, name):
    backend(name)
    for expected, got in _run_pair(_random_batches(epochs=epochs_for(name))):
        assert_stats_close(expected, got)


@pytest.mark.parametrize("name", BACKENDS)
def test_single_key_and_one_head(backend, name):
    backend(name)
    attn = torch.ones(2, 1, 3, 1)
    ref, fd = reference.ReferenceBaselineAttentionDiagnostics(), BaselineAttentionDiagnostics()
    for _ in range(2):
        ref.update(attn)
        fd.update(attn)
    got = fd.get_epoch_stats()
    assert_stats_close(ref.get_epoch_stats(), got)
    assert math.isnan(got["baseline/attention_entropy_norm"])  # 0 / log 1: undefined
    assert got["baseline/attention_pattern_jaccard"] == 1.0


# ----------------------------------------------------------------------------------------------
# no sync, state_dict, bad input, non-finite rows
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [b for b in BACKENDS if b != "triton"])  # the interpreter itself copies
def test_update_never_syncs(backend, name):
    backend(name)
    batches = [args for epoch in _mha_batches(epochs=1, updates=4) for args, _ in epoch]
    fd = BaselineAttentionDiagnostics()
    fd.update(*batches[0], generator=torch.Generator())  # warm-up
    with forbid_host_sync():
        for args in batches[1:]:
            fd.update(*args, generator=torch.Generator().manual_seed(2))
        fd.update(None, batches[0][1])
        fd.update(batches[0][0], value_states=batches[0][2])
    stats = fd.get_epoch_stats()
    assert all(math.isfinite(stats[k]) for k in schema.BASELINE_DIAGNOSTICS)


def test_state_dict_round_trip_resumes_identically():
    batches = _mha_batches(epochs=3, updates=3, seed=5)
    straight, resumed = BaselineAttentionDiagnostics(), BaselineAttentionDiagnostics()
    want, got = [], []
    for e, epoch in enumerate(batches):
        for u, (args, seed) in enumerate(epoch):
            straight.update(*args, generator=torch.Generator().manual_seed(seed))
            resumed.update(*args, generator=torch.Generator().manual_seed(seed))
            if (e, u) in ((0, 1), (2, 0)):
                buf = io.BytesIO()
                torch.save(resumed.state_dict(), buf)
                buf.seek(0)
                resumed = BaselineAttentionDiagnostics()
                resumed.load_state_dict(torch.load(buf, weights_only=True))
        want.append(straight.get_epoch_stats())
        got.append(resumed.get_epoch_stats())
        straight.reset()
        resumed.reset()
    assert_same_epochs(want, got)


def test_bad_inputs_raise_value_errors():
    fd = BaselineAttentionDiagnostics()
    fd.update(torch.rand(2, 3, 4, 4).softmax(-1))
    with pytest.raises(ValueError, match="3-D .* after 4-D"):
        fd.update(torch.rand(2, 4, 4).softmax(-1))
    with pytest.raises(ValueError, match=r"\[B, H, N, Nk\] or \[B, N, Nk\]"):
        fd.update(torch.rand(4, 4))
    with pytest.raises(ValueError, match="value_states"):
        fd.update(None, value_states=torch.rand(5))
    with pytest.raises(TypeError, match="attention_weights must be a floating-point"):
        fd.update(torch.ones(2, 4, 4, dtype=torch.long))
    fd.reset()
    fd.update(torch.rand(2, 4, 4).softmax(-1))  # a new epoch may change the rank


@pytest.mark.parametrize("name", BACKENDS)
def test_nonfinite_rows_counted_and_excluded(backend, name):
    backend(name)
    gen = torch.Generator().manual_seed(6)
    attn = (2 * torch.randn(2, 3, 4, 6, generator=gen)).softmax(-1)
    attn[1, 2, 3, 0] = math.nan  # row (b=1, n=3) invalid in one head: the whole row goes
    values = torch.randn(2, 4, 5, generator=gen)
    values[0, 1, 4] = math.inf
    fd = BaselineAttentionDiagnostics()
    fd.update(attn, value_states=values)
    got = fd.get_epoch_stats()
    assert got[NONFINITE] == 2
    ref = reference.ReferenceBaselineAttentionDiagnostics()
    keep = torch.ones(2, 4, dtype=torch.bool)
    keep[1, 3] = False
    rows = values.reshape(-1, 5)
    ref.update(attn.permute(0, 2, 1, 3)[keep][None].transpose(1, 2), value_states=rows[torch.isfinite(rows).all(-1)])
    want = ref.get_epoch_stats()
    for key in (
        "baseline/attention_entropy_mean", "baseline/attention_top1_mean", "baseline/attention_top1_std",
        "baseline/attention_sparsity", "baseline/attention_head_entropy_mean",
        "baseline/attention_effective_heads", "baseline/value_embedding_variance",
    ):
        assert got[key] == pytest.approx(want[key], rel=RTOL, abs=ATOL), key
    assert math.isfinite(got["baseline/value_cosine_similarity"])


# ----------------------------------------------------------------------------------------------
# update_from_qk: the same values as update(softmax(q k^T * scale + mask)) without the weights
# ----------------------------------------------------------------------------------------------


def _sdpa_weights(q, k, attn_mask=None, is_causal=False, scale=None, enable_gqa=False):
    """softmax(q k^T * scale + mask) [B, Hq, N, Nk] in float32, SDPA semantics (top-left causal)."""
    if enable_gqa and k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    s = (q @ k.transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if is_causal:
        n, nk = s.shape[-2:]
        attn_mask = torch.ones(n, nk, dtype=torch.bool).tril()
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask
    return s.softmax(-1)


def _qk_cases():
    gen = torch.Generator().manual_seed(11)
    b, n, d = 2, 9, 8
    pad = torch.ones(b, 1, 1, n, dtype=torch.bool)
    pad[1, ..., 6:] = False  # key padding of the second sequence
    additive = torch.randn(b, 1, n, n, generator=gen)
    return {
        "plain": dict(q=(b, 4, n, d), k=(b, 4, n, d)),
        "causal": dict(q=(b, 4, n, d), k=(b, 4, n, d), is_causal=True),
        "causal_rect": dict(q=(b, 4, 5, d), k=(b, 4, n, d), is_causal=True),
        "padding": dict(q=(b, 4, n, d), k=(b, 4, n, d), attn_mask=pad),
        "additive_scale": dict(q=(b, 4, n, d), k=(b, 4, n, d), attn_mask=additive, scale=0.2),
        "gqa_causal": dict(q=(b, 4, n, d), k=(b, 2, n, d), is_causal=True, enable_gqa=True),
        "gqa_padding": dict(q=(b, 6, n, d), k=(b, 2, n, d), attn_mask=pad, enable_gqa=True),
    }


@pytest.mark.parametrize("name", [b for b in BACKENDS if b != "triton"])
@pytest.mark.parametrize("case", sorted(_qk_cases()))
def test_update_from_qk_matches_update_of_the_softmax(backend, name, case):
    backend(name)
    spec = dict(_qk_cases()[case])
    gen = torch.Generator().manual_seed(3)
    from_qk, from_weights = BaselineAttentionDiagnostics(), BaselineAttentionDiagnostics()
    lin = torch.nn.Linear(4, 4)
    for _ in range(2):  # epochs
        for _ in range(3):  # updates: the Jaccards compare with the previous top-k
            q = torch.randn(*spec["q"], generator=gen)
            k = torch.randn(*spec["k"], generator=gen)
            kw = {key: v for key, v in spec.items() if key not in ("q", "k")}
            params = {"w": lin.weight.detach().clone()}
            from_qk.update_from_qk(q, k, attention_params=params, **kw)
            from_weights.update(_sdpa_weights(q, k, **kw), params)
            with torch.no_grad():
                lin.weight.add_(0.01)
        want, got = from_weights.get_epoch_stats(), from_qk.get_epoch_stats()
        assert_stats_close(want, got, extra=())
        from_qk.reset()
        from_weights.reset()


def test_update_from_qk_never_syncs():
    fd = BaselineAttentionDiagnostics()
    q, k = torch.randn(2, 4, 8, 8), torch.randn(2, 2, 8, 8)
    fd.update_from_qk(q, k, is_causal=True, enable_gqa=True)  # warm-up
    with forbid_host_sync():
        for _ in range(2):
            fd.update_from_qk(q, k, is_causal=True, enable_gqa=True)
    assert all(math.isfinite(v) for v in fd.get_epoch_stats().values())


def test_update_from_qk_bad_arguments_name_them():
    fd = BaselineAttentionDiagnostics()
    q, k = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    with pytest.raises(ValueError, match="q must have shape"):
        fd.update_from_qk(q[0], k)
    with pytest.raises(ValueError, match="k must have shape"):
        fd.update_from_qk(q, k[0])
    with pytest.raises(TypeError, match="q must be a"):
        fd.update_from_qk(q.long(), k)
    with pytest.raises(ValueError, match="k must hold at least one key"):
        fd.update_from_qk(q, k[:, :, :0])
    with pytest.raises(TypeError, match="attn_mask"):
        fd.update_from_qk(q, k, attn_mask=[[True]])
    with pytest.raises(ValueError, match="attn_mask must be bool"):
        fd.update_from_qk(q, k, attn_mask=torch.ones(8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="attn_mask and is_causal"):
        fd.update_from_qk(q, k, attn_mask=torch.ones(8, 8, dtype=torch.bool), is_causal=True)
    with pytest.raises(TypeError, match="is_causal"):
        fd.update_from_qk(q, k, is_causal=1)
    with pytest.raises(ValueError, match="scale"):
        fd.update_from_qk(q, k, scale=-1.0)
    with pytest.raises(TypeError, match="enable_gqa"):
        fd.update_from_qk(q, k, enable_gqa="yes")
    with pytest.raises(ValueError, match="enable_gqa"):  # the op's check: 2 kv heads need GQA
        fd.update_from_qk(q, k[:, :2])
    with pytest.raises(ValueError, match=r"attention_params"):
        fd.update_from_qk(q, k, attention_params={})
    fd.update(torch.rand(2, 8, 8).softmax(-1))
    with pytest.raises(ValueError, match="4-D .* after 3-D"):
        fd.update_from_qk(q, k)
    assert fd.get_epoch_stats()["baseline/attention_entropy_mean"] > 0  # the bad calls added nothing


# ----------------------------------------------------------------------------------------------
# reliability (cases 7 - 9 of the reliability issue)
# ----------------------------------------------------------------------------------------------


def test_value_states_shape_is_checked():
    """Cases 7 and 9: value_states with D = 0, or another batch than the attention weights, is
    a ValueError naming value_states and both shapes; nothing is recorded."""
    fd = BaselineAttentionDiagnostics()
    attn = torch.rand(2, 3, 4, 4).softmax(-1)
    with pytest.raises(ValueError, match=r"value_states .*dh >= 1.*\(2, 4, 0\)"):
        fd.update(attn, value_states=torch.rand(2, 4, 0))
    with pytest.raises(ValueError, match=r"value_states .*\(3, 4, 5\).*attention_weights .*\(2, 3, 4, 4\)"):
        fd.update(attn, value_states=torch.rand(3, 4, 5))
    assert fd.get_epoch_stats() == {}


def test_unnormalised_attention_weights_warn_once():
    """Case 8: attention weights whose rows do not sum to 1 (logits) warn once per object at
    get_epoch_stats, without a sync in update; softmax weights do not."""
    logits = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(2)) * 3
    fd = BaselineAttentionDiagnostics()
    with forbid_host_sync():
        fd.update(logits)
    with pytest.warns(RuntimeWarning, match=r"attention_weights rows do not sum to 1 \(mean \|sum-1\| = "):
        got = fd.get_epoch_stats()
    assert not any(k.startswith("_") for k in got)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fd.get_epoch_stats()
        ok = BaselineAttentionDiagnostics()
        ok.update(logits.softmax(-1))
        ok.get_epoch_stats()


@pytest.mark.parametrize("backend_name", ["torch", "cpu"])
def test_compiled_update_is_one_graph_across_sequence_lengths(backend_name, backend):
    """After its first call (which registers the keys: Python state), a compiled update keeps
    one graph while the sequence length changes every step (dynamic shapes end to end)."""
    import torch._dynamo.testing

    from fastdiag import backends

    if backend_name == "cpu" and not backends.cpu_extension_available():
        pytest.skip("no C++ extension")
    backend(backend_name)
    diag, eager = BaselineAttentionDiagnostics(), BaselineAttentionDiagnostics()
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(diag.update, fullgraph=True, dynamic=True, backend=counter)
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    with torch._dynamo.config.patch(recompile_limit=2, fail_on_recompile_limit_hit=True):
        for n in range(7, 17):  # 10 lengths (B * N never equals the key count: no duck sizing)
            a = torch.softmax(torch.randn(2, 3, n, n, generator=g), -1)
            compiled(a)
            eager.update(a)
    assert counter.frame_count == 2
    got, want = diag.get_epoch_stats(), eager.get_epoch_stats()
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-6, nan_ok=True), k
    torch._dynamo.reset()


def test_update_after_zero_grad_warns_once_at_get_epoch_stats():
    """The parameters move but every update sees no gradient: update() runs after zero_grad()."""
    import warnings

    layer = torch.nn.Linear(4, 4)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    for after_zero_grad in (True, False):
        diag = BaselineAttentionDiagnostics()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                layer(torch.randn(2, 4)).pow(2).sum().backward()
                if not after_zero_grad:
                    diag.update(None, attention_params=dict(layer.named_parameters()))
                opt.step()
                opt.zero_grad()
                if after_zero_grad:
                    with forbid_host_sync():
                        diag.update(None, attention_params=dict(layer.named_parameters()))
            diag.get_epoch_stats()
            diag.get_epoch_stats()
        messages = [str(w.message) for w in caught if "zero_grad" in str(w.message)]
        assert len(messages) == (1 if after_zero_grad else 0), messages
        if after_zero_grad:
            assert "attention_params had no gradient" in messages[0]
