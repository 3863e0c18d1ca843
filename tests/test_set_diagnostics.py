"""``fastdiag.SetDiagnostics`` against ``fastdiag.reference.ReferenceSetDiagnostics``, plus its ops.

Parity: every key, several epochs of several updates, on every available backend, float32
rel 1e-4 / abs 1e-6. The usage and active-set Jaccard ops are checked against plain Python
formulas. Also: the one documented deviation (count_mode="seed"), no host transfer in
``update``, state_dict round trip, bad input, non-finite rows, token-table growth.
"""

from __future__ import annotations

import io
import math
import warnings

import pytest
import torch

from fastdiag import reference, schema
from fastdiag.diagnostics import SetDiagnostics
from fastdiag.ops import jaccard, usage
from tests.conftest import assert_same_epochs, available_backends, forbid_host_sync

BACKENDS = available_backends("cpu")
RTOL, ATOL = 1e-4, 1e-6
NONFINITE = "health/nonfinite_rows"


# ----------------------------------------------------------------------------------------------
# helpers shared with the other diagnostics tests
# ----------------------------------------------------------------------------------------------


def assert_stats_close(expected: dict, got: dict, extra: tuple[str, ...] = (NONFINITE,)) -> None:
    """Same keys (``got`` may add ``extra``), values within rel 1e-4 / abs 1e-6, NaN == NaN."""
    assert set(got) - set(extra) == set(expected), (sorted(set(got) ^ set(expected)))
    for key, want in expected.items():
        have = got[key]
        if math.isnan(want):
            assert math.isnan(have), f"{key}: expected NaN, got {have}"
        else:
            assert have == pytest.approx(want, rel=RTOL, abs=ATOL), f"{key}: {have} != {want}"


def epochs_for(name: str) -> int:
    """Epochs of the parity runs: 3, or 2 under the (slow) Triton interpreter."""
    return 2 if name == "triton" else 3


def twin_generators(seed: int) -> tuple[torch.Generator, torch.Generator]:
    return torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# ops: usage statistics and active-set Jaccard
# ----------------------------------------------------------------------------------------------


def python_usage(values: list[int], s: int) -> dict[str, float]:
    c = [0] * s
    for x in values:
        if x >= 0:
            c[x] += 1
    t = sum(c)
    act = [x for x in c if x > 0]
    mean_c = sum(c) / s
    out = {
        "total": t,
        "active_ratio": len(act) / s,
        "variance": sum((x - mean_c) ** 2 for x in c) / (s - 1) if s > 1 else math.nan,
    }
    if t == 0:
        out.update(dict.fromkeys(("size_mean", "size_std", "entropy", "entropy_norm", "gini", "top1_share"), math.nan))
        return out
    m = t / len(act)
    out["size_mean"] = m
    out["size_std"] = math.sqrt(sum((x - m) ** 2 for x in act) / (len(act) - 1)) if len(act) > 1 else math.nan
    h = -sum(x / t * math.log(x / t) for x in act)
    out["entropy"] = h
    out["entropy_norm"] = h / math.log(s) if s > 1 else math.nan  # 0 / log 1: undefined
    out["gini"] = sum(abs(a - b) for a in c for b in c) / (2 * s * t)
    out["top1_share"] = max(c) / t
    return out


@pytest.mark.parametrize(
    "values,s",
    [
        ([0, 1, 1, 2, 2, 2, -1, -1], 5),
        ([3, 3, 3], 4),
        ([-1, -1], 3),
        ([0, 0, 1], 1 + 1),
        ([0, 0, 0], 1),
        (list(torch.randint(-1, 17, (300,)).tolist()), 17),
    ],
)
def test_usage_stats_matches_python(values, s):
    stats = usage.usage_stats(torch.tensor(values).reshape(-1, 1), s)
    want = python_usage(values, s)
    assert stats.counts.tolist() == [sum(1 for x in values if x == i) for i in range(s)]
    assert stats.active.tolist() == [any(x == i for x in values) for i in range(s)]
    assert int(stats.out_of_range) == 0
    for key, value in want.items():
        got = float(getattr(stats, key))
        if math.isnan(value):
            assert math.isnan(got), key
        else:
            assert got == pytest.approx(value, rel=1e-12, abs=1e-12), key


def test_usage_counts_out_of_range_and_dtypes():
    counts, bad = usage.usage_counts(torch.tensor([[0, 5, 7], [-3, 1, 4]], dtype=torch.int32), 5)
    assert counts.tolist() == [1, 1, 0, 0, 1]
    assert int(bad) == 2
    with pytest.raises(TypeError, match="integer"):
        usage.usage_stats(torch.zeros(3), 4)
    with pytest.raises(ValueError, match="num_choices"):
        usage.usage_stats(torch.zeros(3, dtype=torch.long), 0)


@pytest.mark.parametrize("a,b,size", [([0, 2, 5], [2, 3], 6), ([], [], 4), ([1], [], 3), ([0, 1, 9], [1, 9, 8, -1], 10)])
def test_bitmap_jaccard_matches_sets(a, b, size):
    ba = jaccard.index_bitmap(torch.tensor(a, dtype=torch.long), size)
    bb = jaccard.index_bitmap(torch.tensor(b, dtype=torch.long), size)
    sa, sb = {x for x in a if 0 <= x < size}, {x for x in b if 0 <= x < size}
    want = len(sa & sb) / len(sa | sb) if sa | sb else 0.0
    assert float(jaccard.bitmap_jaccard(ba, bb)) == pytest.approx(want)
    # bitmaps of different lengths: the shorter one is padded
    assert float(jaccard.bitmap_jaccard(ba[: size // 2], bb)) == pytest.approx(
        len({x for x in sa if x < size // 2} & sb) / max(1, len({x for x in sa if x < size // 2} | sb))
        if ({x for x in sa if x < size // 2} | sb) else 0.0
    )


# ----------------------------------------------------------------------------------------------
# parity with the reference
# ----------------------------------------------------------------------------------------------


class Router(torch.nn.Module):
    """A small set router on top of a real TransformerEncoder."""

    def __init__(self, d: int, s: int) -> None:
        super().__init__()
        layer = torch.nn.TransformerEncoderLayer(d, nhead=2, dim_feedforward=2 * d, batch_first=True, dropout=0.0)
        self.encoder = torch.nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
        self.gate = torch.nn.Linear(d, s)
        self.sets = torch.nn.Parameter(torch.randn(s, d))

    def forward(self, x):
        h = self.encoder(x)
        logits = self.gate(h)
        probs = logits.softmax(-1)
        set_states = probs.mT @ h + self.sets  # [B, S, D]
        set_attn = (h @ set_states.mT / h.shape[-1] ** 0.5).softmax(-1)  # [B, N, S]
        return logits, probs, set_states, set_attn


def _run_pair(ref, fd, batches):
    """Feed the same batches to both; returns the epoch dicts of both, epoch by epoch."""
    out = []
    for epoch in batches:
        for kwargs, seed in epoch:
            g1, g2 = twin_generators(seed)
            ref.update_with_router_state(**kwargs, generator=g1)
            fd.update_with_router_state(**kwargs, generator=g2)
        out.append((ref.get_epoch_stats(), fd.get_epoch_stats()))
        ref.reset()
        fd.reset()
    return out


def _model_batches(epochs=3, updates=3, b=2, n=8, s=5, d=8, vocab=12, seed=0):
    """Batches from a real model trained a little between updates (params, grads change)."""
    torch.manual_seed(seed)
    model = Router(d, s)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gate = dict(model.gate.named_parameters())
    batches = []
    step = 0
    for e in range(epochs):
        epoch = []
        for u in range(updates):
            tokens = torch.randint(0, vocab, (b, n))
            x = torch.nn.functional.one_hot(tokens, vocab).float()[..., :d] + 0.1 * torch.randn(b, n, d)
            logits, probs, set_states, set_attn = model(x)
            loss = logits.square().mean() + set_states.square().mean()
            opt.zero_grad()
            loss.backward()
            kwargs = dict(
                bank_indices=torch.topk(probs.detach(), 2, dim=-1).indices if u % 2 else probs.detach().argmax(-1),
                num_sets=s,
                set_embeddings=set_states.detach(),
                router_params=gate,
                set_attention_weights=set_attn.detach(),
                token_ids=tokens,
            )
            if (e + u) % 2:
                kwargs["router_logits"] = logits.detach()
            else:
                kwargs["router_probs"] = probs.detach()
            epoch.append((kwargs, step))
            opt.step()
            step += 1
        batches.append(epoch)
    return batches


@pytest.mark.parametrize("name", BACKENDS)
def test_parity_with_model(backend, name):
    backend(name)
    results = _run_pair(reference.ReferenceSetDiagnostics(), SetDiagnostics(), _model_batches(epochs=epochs_for(name)))
    for expected, got in results:
        assert_stats_close(expected, got)
        assert got[NONFINITE] == 0
    assert set(results[0][0]) == set(schema.SET_DIAGNOSTICS)
    assert math.isnan(results[0][1]["ausa/delta_routing_entropy"])
    assert not math.isnan(results[1][1]["ausa/delta_router_confidence"])


def _random_batches(seed=1, epochs=3, updates=4, b=3, n=6, s=7, d=5, vocab=9):
    """Random inputs where each optional input is missing in some updates."""
    gen = torch.Generator().manual_seed(seed)
    params = {"w": torch.nn.Parameter(torch.randn(s, d, generator=gen)), "b": torch.nn.Parameter(torch.randn(s, generator=gen))}
    batches, step = [], 0
    for e in range(epochs):
        epoch = []
        for u in range(updates):
            k = 3 if (e + u) % 3 == 0 else 0
            shape = (b, n, k) if k else (b, n)
            kwargs = dict(bank_indices=torch.randint(-1, s, shape, generator=gen), num_sets=s)
            if u != 1:
                kwargs["router_probs"] = (2 * torch.randn(b, n, s, generator=gen)).softmax(-1)
            if u != 2:
                kwargs["set_embeddings"] = torch.randn(b, s, d, generator=gen) + 0.3
            if e != 1:
                kwargs["set_attention_weights"] = (3 * torch.randn(b, n, s, generator=gen)).softmax(-1)
            if u % 2 == 0:
                with torch.no_grad():
                    params["w"].add_(0.01 * torch.randn(s, d, generator=gen))
                params["w"].grad = torch.randn(s, d, generator=gen)  # "b" has no grad: skipped
                kwargs["router_params"] = params
            if u != 3:
                kwargs["token_ids"] = torch.randint(-1, vocab, (b, n), generator=gen)
            epoch.append((kwargs, step))
            step += 1
        batches.append(epoch)
    return batches


@pytest.mark.parametrize("name", BACKENDS)
def test_parity_random_inputs_with_missing_inputs(backend, name):
    backend(name)
    for expected, got in _run_pair(reference.ReferenceSetDiagnostics(), SetDiagnostics(), _random_batches(epochs=epochs_for(name))):
        assert_stats_close(expected, got)


def test_epoch_without_an_input_drops_its_keys():
    """A key whose input was not provided this epoch is absent (not a stale NaN)."""
    gen = torch.Generator().manual_seed(3)
    idx = torch.randint(0, 4, (2, 5), generator=gen)
    probs = torch.randn(2, 5, 4, generator=gen).softmax(-1)
    batches = [[(dict(bank_indices=idx, num_sets=4, router_probs=probs), 0)], [(dict(bank_indices=idx, num_sets=4), 1)]]
    (e1, g1), (e2, g2) = _run_pair(reference.ReferenceSetDiagnostics(), SetDiagnostics(), batches)
    assert_stats_close(e1, g1, extra=(NONFINITE,))
    assert_stats_close(e2, g2, extra=())
    assert "ausa/router_confidence_mean" in g1 and "ausa/router_confidence_mean" not in g2
    assert "ausa/delta_router_confidence" not in g2


def test_update_two_argument_form():
    ref, fd = reference.ReferenceSetDiagnostics(), SetDiagnostics()
    gen = torch.Generator().manual_seed(4)
    for _ in range(3):
        idx = torch.randint(-1, 6, (4, 9), generator=gen)
        ref.update(idx, 6)
        fd.update(idx, 6)
    assert_stats_close(ref.get_epoch_stats(), fd.get_epoch_stats(), extra=())


def test_all_padding_update_is_undefined_not_zero():
    ref, fd = reference.ReferenceSetDiagnostics(), SetDiagnostics()
    for idx in (torch.full((2, 3), -1), torch.tensor([[0, 1, 1], [2, -1, 0]])):
        ref.update(idx, 3)
        fd.update(idx, 3)
    got = fd.get_epoch_stats()
    assert_stats_close(ref.get_epoch_stats(), got, extra=())
    assert got["ausa/active_set_ratio"] == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------------
# the one deviation from the seed
# ----------------------------------------------------------------------------------------------


def test_deviation_from_seed_count_mode():
    """fastdiag divides each key by the updates that provided it; the seed by all updates.

    With router_probs in 2 of 5 updates (and set embeddings in 3), the seed's value of a key
    equals fastdiag's value times provided / total; keys never provided are absent in fastdiag
    and 0 / total = 0 in the seed. The Jaccard has its own count in both.
    """
    gen = torch.Generator().manual_seed(5)
    s = 6
    seed_ref = reference.ReferenceSetDiagnostics(count_mode="seed")
    fd = SetDiagnostics()
    provided_probs, provided_emb, total = 0, 0, 5
    for u in range(total):
        kwargs = dict(bank_indices=torch.randint(0, s, (3, 8), generator=gen), num_sets=s)
        if u in (1, 3):
            kwargs["router_probs"] = torch.randn(3, 8, s, generator=gen).softmax(-1)
            provided_probs += 1
        if u in (0, 2, 4):
            kwargs["set_embeddings"] = torch.randn(3, s, 4, generator=gen)
            provided_emb += 1
        g1, g2 = twin_generators(u)
        seed_ref.update_with_router_state(**kwargs, generator=g1)
        fd.update_with_router_state(**kwargs, generator=g2)
    want, got = seed_ref.get_epoch_stats(), fd.get_epoch_stats()
    for key in ("ausa/router_confidence_mean", "ausa/router_confidence_std", "ausa/top1_vs_random_kl"):
        assert want[key] == pytest.approx(got[key] * provided_probs / total, rel=RTOL)
        assert got[key] != pytest.approx(want[key], rel=1e-2)  # the deviation is real
    for key in ("ausa/set_embedding_variance", "ausa/set_embedding_norm_mean", "ausa/set_rank_effective"):
        assert want[key] == pytest.approx(got[key] * provided_emb / total, rel=RTOL)
    for key in ("ausa/routing_entropy", "ausa/set_reuse_jaccard", "ausa/routing_gini"):
        assert want[key] == pytest.approx(got[key], rel=RTOL)  # provided by every update
    for key in ("ausa/router_gradient_norm", "ausa/set_attention_entropy_mean", "ausa/routing_consistency"):
        assert want[key] == 0.0 and key not in got


# ----------------------------------------------------------------------------------------------
# no host transfer during update
# ----------------------------------------------------------------------------------------------


def _full_kwargs(gen, b=2, n=6, s=4, d=5, vocab=10):
    lin = torch.nn.Linear(d, s)
    for p in lin.parameters():
        p.grad = torch.randn(p.shape, generator=gen)
    logits = torch.randn(b, n, s, generator=gen)
    return dict(
        bank_indices=logits.argmax(-1),
        num_sets=s,
        router_probs=logits.softmax(-1),
        set_embeddings=torch.randn(b, s, d, generator=gen),
        router_params=dict(lin.named_parameters()),
        set_attention_weights=torch.randn(b, n, s, generator=gen).softmax(-1),
        token_ids=torch.randint(0, vocab, (b, n), generator=gen),
    )


@pytest.mark.parametrize("name", [b for b in BACKENDS if b != "triton"])  # the interpreter itself copies
def test_update_never_syncs(backend, name):
    backend(name)
    gen = torch.Generator().manual_seed(6)
    fd = SetDiagnostics()
    batches = [_full_kwargs(gen) for _ in range(3)]
    logits_batch = dict(batches[0])
    logits_batch["router_logits"] = logits_batch.pop("router_probs").log()
    fd.update_with_router_state(**batches[0], generator=torch.Generator())  # warm-up (lazy loads)
    with forbid_host_sync():
        for kwargs in batches[1:]:
            fd.update_with_router_state(**kwargs, generator=torch.Generator().manual_seed(1))
        fd.update_with_router_state(**logits_batch)
        fd.update(batches[0]["bank_indices"], 4)
    stats = fd.get_epoch_stats()
    assert all(not math.isnan(stats[k]) for k in schema.SET_DIAGNOSTICS if not k.startswith("ausa/delta"))


def test_forbid_host_sync_catches_item():
    with forbid_host_sync(), pytest.raises(AssertionError, match="item"):
        torch.ones(1).sum().item()


# ----------------------------------------------------------------------------------------------
# state_dict round trip
# ----------------------------------------------------------------------------------------------


def test_state_dict_round_trip_resumes_identically():
    batches = _model_batches(epochs=3, updates=3, seed=7)
    straight = SetDiagnostics(vocab_size=64)
    resumed = SetDiagnostics(vocab_size=64)
    want, got = [], []
    for e, epoch in enumerate(batches):
        for u, (kwargs, seed) in enumerate(epoch):
            straight.update_with_router_state(**kwargs, generator=torch.Generator().manual_seed(seed))
            resumed.update_with_router_state(**kwargs, generator=torch.Generator().manual_seed(seed))
            if (e, u) in ((0, 1), (1, 2)):  # interrupted mid-epoch and at the end of an epoch
                buf = io.BytesIO()
                torch.save(resumed.state_dict(), buf)
                buf.seek(0)
                resumed = SetDiagnostics(vocab_size=64)
                resumed.load_state_dict(torch.load(buf, weights_only=True))
        want.append(straight.get_epoch_stats())
        got.append(resumed.get_epoch_stats())
        straight.reset()
        resumed.reset()
    assert_same_epochs(want, got)


# ----------------------------------------------------------------------------------------------
# bad input, non-finite rows, token table
# ----------------------------------------------------------------------------------------------


def test_bad_inputs_raise_value_errors():
    fd = SetDiagnostics()
    idx = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"router_probs.*num_sets=4"):
        fd.update_with_router_state(idx, 4, router_probs=torch.rand(2, 3, 5))
    with pytest.raises(ValueError, match="token_ids must have shape"):
        fd.update_with_router_state(idx, 4, token_ids=torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="set_embeddings must have shape"):
        fd.update_with_router_state(idx, 4, set_embeddings=torch.rand(6, 5))
    with pytest.raises(ValueError, match="bank_indices must have shape"):
        fd.update_with_router_state(torch.zeros(6, dtype=torch.long), 4)
    with pytest.raises(TypeError, match="bank_indices must be an integer"):
        fd.update_with_router_state(torch.zeros(2, 3), 4)
    with pytest.raises(ValueError, match="not both"):
        fd.update_with_router_state(idx, 4, router_probs=torch.rand(2, 3, 4), router_logits=torch.rand(2, 3, 4))
    with pytest.raises(ValueError, match="num_sets"):
        fd.update_with_router_state(idx, 0)
    with pytest.raises(ValueError, match="num_sets"):
        fd.update_with_router_state(idx, torch.tensor(4))
    with pytest.raises(TypeError, match="router_params"):
        fd.update_with_router_state(idx, 4, router_params=[torch.zeros(2)])
    # nothing above was recorded
    assert fd.get_epoch_stats() == {}


def test_index_out_of_range_is_reported_without_sync():
    fd = SetDiagnostics()
    fd.update(torch.tensor([[0, 1], [2, 1]]), 3)
    with forbid_host_sync():
        fd.update(torch.tensor([[0, 3], [2, -1]]), 3)  # 3 >= num_sets: flagged on device
    with pytest.warns(RuntimeWarning, match="bank_indices must be < num_sets"):
        assert fd.get_epoch_stats()["health/indices_out_of_range"] == 0.5  # mean per update
    fd.reset()
    fd.update(torch.tensor([[0, 1], [2, -1]]), 3)
    assert fd.get_epoch_stats()["ausa/active_set_ratio"] == pytest.approx(1.0)


@pytest.mark.parametrize("name", BACKENDS)
def test_nonfinite_rows_counted_and_excluded(backend, name):
    backend(name)
    gen = torch.Generator().manual_seed(8)
    b, n, s, d = 2, 5, 4, 6
    probs = torch.randn(b, n, s, generator=gen).softmax(-1)
    attn = torch.randn(b, n, s, generator=gen).softmax(-1)
    emb = torch.randn(b, s, d, generator=gen)
    probs[0, 2, 1] = math.nan
    attn[1, 4, 0] = math.inf
    emb[1, 3, 2] = math.nan
    fd = SetDiagnostics()
    fd.update_with_router_state(probs.argmax(-1), s, probs, emb, None, attn)
    got = fd.get_epoch_stats()
    assert got[NONFINITE] == 3
    first_update_nan = ("ausa/set_reuse_jaccard", *(k for k in got if k.startswith("ausa/delta")))
    assert all(math.isfinite(v) for k, v in got.items() if k not in first_update_nan)
    # the same values as the reference on the finite rows only
    keep = torch.ones(b * n, dtype=torch.bool)
    keep[0 * n + 2] = False
    keep_a = torch.ones(b * n, dtype=torch.bool)
    keep_a[1 * n + 4] = False
    emb_rows = emb.reshape(b * s, d)
    ref = reference.ReferenceSetDiagnostics()
    ref.update_with_router_state(
        probs.argmax(-1), s,
        router_probs=probs.reshape(b * n, s)[keep][None],
        set_embeddings=emb_rows[torch.isfinite(emb_rows).all(-1)][None],
        set_attention_weights=attn.reshape(b * n, s)[keep_a][None],
    )
    want = ref.get_epoch_stats()
    for key in (
        "ausa/router_confidence_mean", "ausa/router_confidence_std", "ausa/top1_vs_random_kl",
        "ausa/set_attention_entropy_mean", "ausa/set_attention_top1_mean",
        "ausa/set_embedding_variance", "ausa/set_embedding_norm_mean",
    ):
        assert got[key] == pytest.approx(want[key], rel=RTOL, abs=ATOL), key


def test_token_table_exact_below_capacity_and_grows_above():
    """ids < capacity (2^16 by default): exact; larger ids: approximate epoch, a warning, then a
    bigger table (below the maximum capacity)."""
    gen = torch.Generator().manual_seed(9)
    s, cap = 3, schema.DEFAULT_TOKEN_CAPACITY
    fd = SetDiagnostics()
    ref = reference.ReferenceSetDiagnostics()
    for _ in range(3):
        idx = torch.randint(0, s, (2, 6), generator=gen)
        tok = torch.randint(0, 8, (2, 6), generator=gen) * (cap // 8)
        ref.update_with_router_state(idx, s, token_ids=tok)
        fd.update_with_router_state(idx, s, token_ids=tok)
    assert fd.get_epoch_stats()["ausa/routing_consistency"] == pytest.approx(
        ref.get_epoch_stats()["ausa/routing_consistency"], rel=1e-12
    )
    big = torch.tensor([[cap + 4, 3, 2 * cap + 4], [3 * cap + 4, 1, 2]])  # share slot 4 of cap
    fd.update_with_router_state(torch.zeros(2, 3, dtype=torch.long), s, token_ids=big)
    with pytest.warns(RuntimeWarning, match=f"routing-consistency table capacity {cap}"):
        fd.get_epoch_stats()
    assert fd._tokens.capacity == 4 * cap
    fd.reset()
    # after growth the ids kept their last sets: 3 -> 0 and 3 cap + 4 -> 0 (the last writer of slot 4) are "seen" and consistent
    fd.update_with_router_state(torch.zeros(1, 2, dtype=torch.long), s, token_ids=torch.tensor([[3, 3 * cap + 4]]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fd.get_epoch_stats()["ausa/routing_consistency"] == 1.0


def test_token_table_grows_once_per_overflow_without_reset():
    """get_epoch_stats called again without reset(): no second warning, no second growth,
    until an id beyond the grown table arrives; a resumed object keeps that state."""
    cap = schema.DEFAULT_TOKEN_CAPACITY
    fd = SetDiagnostics()
    idx = torch.zeros(1, 3, dtype=torch.long)
    fd.update_with_router_state(idx, 3, token_ids=torch.tensor([[1, cap + 100, 2]]))
    with pytest.warns(RuntimeWarning, match=f"capacity {cap}"):
        fd.get_epoch_stats()
    assert fd._tokens.capacity == 2 * cap
    resumed = SetDiagnostics()
    resumed.load_state_dict(fd.state_dict())
    for diag in (fd, resumed):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            diag.get_epoch_stats()
            diag.get_epoch_stats()
        assert diag._tokens.capacity == 2 * cap
    fd.update_with_router_state(idx, 3, token_ids=torch.tensor([[1, 10 * cap, 2]]))
    with pytest.warns(RuntimeWarning, match=f"capacity {2 * cap}"):
        fd.get_epoch_stats()
    assert fd._tokens.capacity == 16 * cap


@pytest.mark.parametrize("name", BACKENDS)
def test_exact_cosine_over_all_rows(backend, name):
    """cosine_samples=None: every off-diagonal pair of the B*S rows (valid rows only)."""
    backend(name)
    gen = torch.Generator().manual_seed(10)
    emb = torch.randn(3, 4, 5, generator=gen) + 0.5
    emb[2, 1, 0] = math.nan
    fd = SetDiagnostics(cosine_samples=None)
    fd.update_with_router_state(torch.zeros(3, 2, dtype=torch.long), 4, set_embeddings=emb)
    got = fd.get_epoch_stats()
    rows = emb.reshape(12, 5).double()
    rows = rows[torch.isfinite(rows).all(-1)]
    unit = rows / rows.norm(dim=1, keepdim=True)
    cos = unit @ unit.T
    off = cos[~torch.eye(rows.shape[0], dtype=torch.bool)]
    assert got["ausa/set_cosine_similarity_mean"] == pytest.approx(float(off.mean()), rel=RTOL, abs=ATOL)
    assert got["ausa/set_cosine_similarity_max"] == pytest.approx(float(off.max()), rel=RTOL, abs=ATOL)
    with pytest.raises(ValueError, match="cosine_samples"):
        SetDiagnostics(cosine_samples=1)


# ----------------------------------------------------------------------------------------------
# reliability (cases 5 - 9 of the reliability issue)
# ----------------------------------------------------------------------------------------------


def test_huge_token_id_never_sizes_the_table(monkeypatch):
    """Case 5: one id 2^31 - 1 makes no allocation beyond the documented maximum capacity: the
    epoch's stats come back (and again), routing_consistency approximate, one warning, the
    overflow counted in ``health/token_table_overflow``."""
    from fastdiag.ops import token_table

    MAX_TOKEN_CAPACITY = getattr(token_table, "MAX_TOKEN_CAPACITY", 1 << 22)  # the documented bound
    real_full = torch.full

    def guarded_full(size, *args, **kwargs):
        numel = math.prod(size) if isinstance(size, (tuple, list, torch.Size)) else size
        assert numel <= MAX_TOKEN_CAPACITY + 1, f"allocation of {numel} entries driven by a token id"
        return real_full(size, *args, **kwargs)

    monkeypatch.setattr(torch, "full", guarded_full)
    fd = SetDiagnostics()
    idx = torch.zeros(1, 3, dtype=torch.long)
    fd.update_with_router_state(idx, 2, token_ids=torch.tensor([[1, 2**31 - 1, 2]]))
    with pytest.warns(RuntimeWarning, match="maximum"):
        got = fd.get_epoch_stats()
    assert got["health/token_table_overflow"] == 1.0
    assert fd._tokens.capacity <= MAX_TOKEN_CAPACITY
    with warnings.catch_warnings():  # one warning per object, every later call works
        warnings.simplefilter("error")
        fd.update_with_router_state(idx, 2, token_ids=torch.tensor([[1, 2**31 - 1, 2]]))
        again = fd.get_epoch_stats()
    assert again["ausa/routing_consistency"] == 1.0  # the huge id hashed into the bounded table
    assert again["health/token_table_overflow"] == 1.0  # mean per update


def test_vocab_size_bounds_the_table_exactly_below_it():
    """Case 5 with vocab_size: the table never grows past vocab_size; ids >= vocab_size are
    hashed and counted (approximate value, one warning)."""
    fd = SetDiagnostics(vocab_size=8)
    idx = torch.zeros(1, 3, dtype=torch.long)
    fd.update_with_router_state(idx, 3, token_ids=torch.tensor([[1, 100, 2]]))
    with pytest.warns(RuntimeWarning, match="vocab_size=8"):
        got = fd.get_epoch_stats()
    assert fd._tokens.capacity == 8
    assert got["health/token_table_overflow"] == 1.0


def test_out_of_range_batch_does_not_lock_the_epoch():
    """Case 6: one batch of 100 holding bank_indices == num_sets: the stats come back, the
    entry is excluded and reported (a key and a warning at every get_epoch_stats)."""
    gen = torch.Generator().manual_seed(11)
    fd, clean = SetDiagnostics(), SetDiagnostics()
    for i in range(100):
        idx = torch.randint(0, 4, (2, 6), generator=gen)
        clean.update(idx.clone(), 4)
        if i == 50:
            idx[0, 0] = 4
        fd.update(idx, 4)
    for _ in range(2):
        with pytest.warns(RuntimeWarning, match="bank_indices"):
            got = fd.get_epoch_stats()
        assert got["health/indices_out_of_range"] == pytest.approx(1 / 100)
        assert got["ausa/routing_entropy"] == pytest.approx(clean.get_epoch_stats()["ausa/routing_entropy"], rel=1e-2)
    fd.reset()
    fd.update(torch.tensor([[0, 1], [2, -1]]), 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "health/indices_out_of_range" not in fd.get_epoch_stats()


@pytest.mark.parametrize(
    "kwargs, name, got",
    [
        (dict(router_probs=torch.rand(5, 7, 4).softmax(-1)), "router_probs", "(5, 7, 4)"),
        (dict(router_probs=torch.rand(4).softmax(-1)), "router_probs", "(4,)"),
        (dict(router_logits=torch.rand(2, 5, 4)), "router_logits", "(2, 5, 4)"),
        (dict(set_embeddings=torch.rand(2, 7, 8)), "set_embeddings", "(2, 7, 8)"),
        (dict(set_embeddings=torch.rand(3, 4, 8)), "set_embeddings", "(3, 4, 8)"),
        (dict(set_attention_weights=torch.rand(2, 6, 5).softmax(-1)), "set_attention_weights", "(2, 6, 5)"),
        (dict(set_attention_weights=torch.rand(6, 4).softmax(-1)), "set_attention_weights", "(6, 4)"),
        (dict(token_ids=torch.zeros(2, 5, dtype=torch.long)), "token_ids", "(2, 5)"),
    ],
)
def test_mismatched_input_shapes_are_named(kwargs, name, got):
    """Case 7: every input's B, N checked against bank_indices [B, N] and S against num_sets; the
    ValueError names the argument and both shapes."""
    fd = SetDiagnostics()
    with pytest.raises(ValueError, match=f"^{name} must have shape") as err:
        fd.update_with_router_state(torch.zeros(2, 6, dtype=torch.long), 4, **kwargs)
    message = str(err.value)
    assert f"got {got}" in message and "bank_indices of shape (2, 6)" in message and "num_sets=4" in message
    assert fd.get_epoch_stats() == {}


def test_logits_passed_as_router_probs_warn_once():
    """Case 8: rows that do not sum to 1 warn once per object at get_epoch_stats (no sync in
    update); router_logits / proper probabilities do not."""
    gen = torch.Generator().manual_seed(12)
    logits = torch.randn(2, 6, 4, generator=gen) * 3
    idx = logits.argmax(-1)
    fd = SetDiagnostics()
    with forbid_host_sync():
        fd.update_with_router_state(idx, 4, router_probs=logits, set_attention_weights=logits.softmax(-1))
    with pytest.warns(RuntimeWarning, match=r"router_probs rows do not sum to 1 \(mean \|sum-1\| = .*router_logits="):
        got = fd.get_epoch_stats()
    assert not any(k.startswith("_") for k in got)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fd.get_epoch_stats()  # once per object
        ok = SetDiagnostics()
        ok.update_with_router_state(idx, 4, router_logits=logits, set_attention_weights=logits.softmax(-1))
        ok.update_with_router_state(idx, 4, router_probs=logits.softmax(-1))
        ok.get_epoch_stats()
    att = SetDiagnostics()
    att.update_with_router_state(idx, 4, set_attention_weights=logits)
    with pytest.warns(RuntimeWarning, match="set_attention_weights rows do not sum to 1"):
        att.get_epoch_stats()


def test_empty_embedding_dimension_is_named():
    """Case 9: D = 0 set embeddings are a ValueError naming the argument."""
    fd = SetDiagnostics()
    with pytest.raises(ValueError, match=r"set_embeddings .*D >= 1.*\(2, 4, 0\)"):
        fd.update_with_router_state(torch.zeros(2, 6, dtype=torch.long), 4, set_embeddings=torch.rand(2, 4, 0))
    assert fd.get_epoch_stats() == {}
