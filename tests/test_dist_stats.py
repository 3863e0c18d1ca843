"""``fastdiag.ops.dist_stats`` on every available backend against float64 formulas.

The oracle here is written independently of every backend: plain float64 torch per row, and
``scipy.stats.entropy`` for the entropy itself.
"""

from __future__ import annotations

import math

import pytest
import scipy.stats
import torch

import fastdiag
from fastdiag.ops import HeadSlot, RowSlot, Slot, dist_stats
from tests.conftest import available_backends, forbid_host_sync

BACKENDS = available_backends("cpu")
RTOL, ATOL = 1e-4, 1e-6


def oracle(x, *, from_logits=False, reduce_dim=None, topk=0, tau=0.1, eps=1e-6, row_mask=None,
           window=None, query_offset=0):
    """Float64 per-row statistics and reduced sums, straight from the definitions."""
    xd = x.double()
    if reduce_dim is not None:
        xd = xd.movedim(reduce_dim, 0)  # [G, *L, N]
    else:
        xd = xd.unsqueeze(0)
    g = xd.shape[0]
    n = xd.shape[-1]
    lead = list(xd.shape[1:-1])
    heads = xd.reshape(g, -1, n)  # [G, R, N]
    if from_logits:
        finite = ~(torch.isnan(heads).any(-1) | torch.isposinf(heads).any(-1)
                   | torch.isneginf(heads.amax(-1))).any(0)
        ph = torch.softmax(torch.where(finite[None, :, None], heads, torch.zeros_like(heads)), -1)
    else:
        finite = torch.isfinite(heads).all(-1).all(0)
        ph = torch.where(finite[None, :, None], heads, torch.zeros_like(heads))
    p = ph.mean(0)  # [R, N]
    r = p.shape[0]
    allowed = torch.ones(r, dtype=torch.bool) if row_mask is None else row_mask.reshape(r)
    valid = finite & allowed
    ent = torch.special.entr(p.clamp_min(0)).sum(-1)
    q = torch.arange(r) % (lead[-1] if lead else 1) + query_offset
    keys = torch.arange(n)
    future = torch.where(keys[None] > q[:, None], p, 0).sum(-1)
    local = torch.where((keys[None] - q[:, None]).abs() <= window, p, 0).sum(-1) if window is not None else torch.zeros(r)
    rows = {
        "entropy": ent,
        "max": p.amax(-1),
        "sumsq": (p * p).sum(-1),
        "gt_tau": (p > tau).sum(-1).double(),
        "gt_eps": (p > eps).sum(-1).double(),
        "rowsum_err": (p.sum(-1) - 1).abs(),
        "future": future,
        "local": local,
        "abs_dev": (p - 1.0 / n).abs().mean(-1),
    }
    v = valid.double()
    sums = torch.zeros(Slot.NUM, dtype=torch.float64)
    sums[Slot.COUNT] = v.sum()
    for slot, key in [(Slot.ENTROPY, "entropy"), (Slot.MAX, "max"), (Slot.SUMSQ, "sumsq"),
                      (Slot.GT_TAU, "gt_tau"), (Slot.GT_EPS, "gt_eps"), (Slot.ROWSUM_ERR, "rowsum_err"),
                      (Slot.FUTURE, "future"), (Slot.LOCAL, "local"), (Slot.ABS_DEV, "abs_dev")]:
        sums[slot] = (rows[key] * v).sum()
    sums[Slot.ENTROPY_SQ] = (ent * ent * v).sum()
    sums[Slot.MAX_SQ] = (rows["max"] ** 2 * v).sum()
    sums[Slot.ROWSUM_ERR_MAX] = (rows["rowsum_err"] * v).max() if r else 0.0
    sums[Slot.FUTURE_MAX] = (future * v).max() if r else 0.0
    sums[Slot.NONFINITE] = (allowed & ~finite).sum()
    sums[Slot.MASKED] = (~allowed).sum()
    hv = v[None, :]
    head = torch.stack([
        (torch.special.entr(ph.clamp_min(0)).sum(-1) * hv).sum(1),
        (ph.amax(-1) * hv).sum(1),
        ((ph > tau).sum(-1) * hv).sum(1),
        ((ph * ph).sum(-1) * hv).sum(1),
    ], -1)
    order = torch.sort(p, dim=-1, descending=True, stable=True).indices[:, :topk]
    order = torch.where(valid[:, None], order, -1)
    return sums, head, rows, valid, order.reshape(*lead, topk)


def check(x, **kw):
    rows_kw = {k: v for k, v in kw.items()}
    out = dist_stats(x, rows=True, **rows_kw)
    sums, head, rows, valid, order = oracle(x, **kw)
    # sums of many rows: tolerance relative to the magnitude of what was summed
    torch.testing.assert_close(out.sums.cpu(), sums, rtol=RTOL, atol=ATOL * max(1, int(sums[0])))
    if kw.get("reduce_dim") is not None:
        torch.testing.assert_close(out.head_sums.cpu(), head, rtol=RTOL, atol=ATOL * max(1, int(sums[0])))
    got_rows = out.rows.reshape(-1, RowSlot.NUM).cpu().double()
    for col, key in [(RowSlot.ENTROPY, "entropy"), (RowSlot.MAX, "max"),
                     (RowSlot.GT_EPS, "gt_eps"), (RowSlot.SUMSQ, "sumsq")]:
        want = torch.where(valid, rows[key], math.nan)
        torch.testing.assert_close(got_rows[:, col], want, rtol=RTOL, atol=ATOL, equal_nan=True)
    if kw.get("topk", 0):
        assert torch.equal(out.topk.cpu(), order)
    return out


@pytest.fixture(params=BACKENDS)
def each_backend(request, backend):
    backend(request.param)
    return request.param


def softmax_rows(*shape, scale=3.0, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).softmax(-1).to(dtype)


@pytest.mark.parametrize("n", [1, 7, 128, 1000, 5000])
def test_random_rows(each_backend, n):
    rows = 6 if n >= 1000 else 20
    x = softmax_rows(rows, n)
    check(x, topk=min(5, n), window=2)


def test_entropy_matches_scipy(each_backend):
    x = softmax_rows(4, 9, 33)
    out = dist_stats(x, rows=True)
    want = scipy.stats.entropy(x.double().numpy(), axis=-1)
    got = out.rows[..., RowSlot.ENTROPY].double().numpy()
    assert got.shape == want.shape
    assert abs(got - want).max() < 1e-5
    assert abs(out.sums[Slot.ENTROPY].item() - want.sum()) < 1e-4


def test_zeros_one_hot_and_ties(each_backend):
    x = torch.zeros(6, 16)
    x[0, 3] = 1.0  # one-hot
    x[1, :4] = 0.25  # ties: top-k must be 0, 1, 2, 3 in order
    x[2, [5, 9]] = 0.5  # exact zeros elsewhere
    x[3] = 1.0 / 16  # uniform: every index tied
    x[4, 15] = 0.7
    x[4, 0] = 0.3
    x[5, 2:6] = torch.tensor([0.1, 0.4, 0.4, 0.1])
    out = check(x, topk=5, tau=0.2, eps=0.05)
    assert out.topk[1].tolist() == [0, 1, 2, 3, 4]
    assert out.topk[3].tolist() == [0, 1, 2, 3, 4]
    assert out.topk[5, :4].tolist() == [3, 4, 2, 5]
    assert out.rows[0, RowSlot.ENTROPY].item() == 0.0
    torch.testing.assert_close(out.rows[3, RowSlot.ENTROPY], torch.tensor(math.log(16)))


def test_topk_ties_among_negative_and_signed_zero_entries(each_backend):
    """-0.0 ties +0.0 (lower index first), equal negative values rank by index too."""
    x = torch.zeros(3, 40)
    x[0, :10] = -0.5
    x[0, 20] = -0.25
    x[1] = -0.0
    x[1, [7, 3]] = 0.0
    x[1, 30] = -1e-30
    x[2, ::2] = -0.0
    x[2, 5] = 1e-45  # the smallest subnormal beats every zero
    out = check(x, topk=6)
    assert out.topk[0].tolist() == [10, 11, 12, 13, 14, 15]
    assert out.topk[1].tolist() == [0, 1, 2, 3, 4, 5]
    assert out.topk[2].tolist() == [5, 0, 1, 2, 3, 4]


def test_negative_large_and_subnormal_entries(each_backend):
    """Weights that are not probabilities: a negative entry adds 0 to the entropy, a huge
    finite entry is finite (the row stays valid), subnormals add ~0."""
    x = softmax_rows(5, 4, 40)
    x[0, 1, 3] = -0.25
    x[1, 0, 7] = 2.5e15  # its square still fits float32 per-row sums
    x[2, 2, :5] = 1e-40
    x[3, :, 0] = 0.0
    out = check(x, reduce_dim=1, topk=3)
    assert out.sums[Slot.NONFINITE].item() == 0


def test_single_key_gives_zero_entropy(each_backend):
    out = check(torch.ones(3, 1), topk=1)
    assert out.sums[Slot.ENTROPY].item() == 0.0
    assert out.topk.tolist() == [[0], [0], [0]]


def test_attention_heads_reduced_while_reading(each_backend):
    x = softmax_rows(2, 4, 9, 9)
    check(x, reduce_dim=1, topk=3, window=1)


def test_non_contiguous_inputs(each_backend):
    base = softmax_rows(3, 17, 20)
    check(base.transpose(0, 1), topk=4)  # transposed leading axes
    wide = softmax_rows(5, 40)
    check(wide[:, ::2], topk=2)  # strided last axis (rows no longer sum to 1)
    heads = softmax_rows(2, 9, 3, 9).transpose(1, 2)  # [2, 3, 9, 9] with head stride 9
    check(heads, reduce_dim=1, topk=3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(each_backend, dtype):
    x = softmax_rows(3, 5, 64, dtype=dtype)
    # the oracle reads the same rounded values, so the tolerance stays float32's
    check(x, topk=5)


def test_logits_with_masked_keys(each_backend):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 6, 6, generator=g) * 4
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    logits = logits.masked_fill(~causal, float("-inf"))
    out = check(logits, from_logits=True, reduce_dim=1, topk=2, window=1)
    assert out.sums[Slot.FUTURE].item() == 0.0  # causal mask leaves no future mass
    check(logits[:, 0], from_logits=True, topk=3)


def test_row_mask_and_nonfinite_rows(each_backend):
    x = softmax_rows(4, 6, 10)
    x[0, 1, 3] = float("nan")
    x[2, 5, 0] = float("inf")
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[1, :2] = False
    mask[2, 5] = False  # masked and non-finite: counted as masked only
    out = check(x, row_mask=mask, topk=2)
    assert out.sums[Slot.NONFINITE].item() == 1
    assert out.sums[Slot.MASKED].item() == 3
    assert out.sums[Slot.COUNT].item() == 24 - 4
    assert torch.isfinite(out.sums).all()
    assert out.topk[0, 1].tolist() == [-1, -1]


def test_nonfinite_head_invalidates_the_row(each_backend):
    x = softmax_rows(1, 3, 4, 8)
    x[0, 2, 1, 0] = float("nan")
    out = check(x, reduce_dim=1)
    assert out.sums[Slot.NONFINITE].item() == 1
    assert torch.isfinite(out.head_sums).all()


def test_query_offset_for_kv_cache(each_backend):
    x = softmax_rows(2, 3, 12)  # 3 new queries attending to 12 cached keys
    check(x, window=2, query_offset=9)


def test_all_rows_invalid_gives_nan_means_not_errors(each_backend):
    x = torch.full((3, 5), float("nan"))
    out = dist_stats(x)
    assert out.sums[Slot.COUNT].item() == 0
    assert out.sums[Slot.NONFINITE].item() == 3
    assert math.isnan(fastdiag.ops.mean(out.sums, Slot.ENTROPY).item())


def test_mean_and_std_helpers(each_backend):
    x = softmax_rows(50, 12)
    out = dist_stats(x, rows=True)
    mx = out.rows[:, RowSlot.MAX].double()
    torch.testing.assert_close(fastdiag.ops.mean(out.sums, Slot.MAX), mx.mean(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(fastdiag.ops.std(out.sums, Slot.MAX, Slot.MAX_SQ), mx.std(), rtol=1e-4, atol=1e-6)


def test_per_head_sums(each_backend):
    x = softmax_rows(2, 3, 5, 8)
    out = dist_stats(x, reduce_dim=1, tau=0.2)
    want = torch.special.entr(x.double()).sum(-1).sum((0, 2))
    torch.testing.assert_close(out.head_sums[:, HeadSlot.ENTROPY], want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.head_sums[:, HeadSlot.GT_TAU], (x > 0.2).sum((0, 2, 3)).double())


@pytest.mark.parametrize("reduce_dim", [1, None])
@pytest.mark.parametrize("from_logits", [False, True])
def test_heads_false_skips_only_the_head_sums(each_backend, reduce_dim, from_logits):
    """heads=False: the same sums / rows / top-k (bit-identical on the cpu backend), and
    head_sums of the same shape, all NaN; masked and non-finite rows included."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 7, 12, generator=g) * 3
    if not from_logits:
        x = x.softmax(-1)
    x[0, 1, 2, 4] = float("nan")
    x[1, 0, 5, 0] = float("inf")
    x[1, 2, 3, :] = 0.25 if not from_logits else 1.0  # ties
    lead = (2, 7) if reduce_dim is not None else (2, 3, 7)
    mask = torch.rand(lead, generator=g) > 0.2
    kw = dict(from_logits=from_logits, reduce_dim=reduce_dim, topk=4, row_mask=mask, window=2,
              query_offset=1, rows=True)
    on = dist_stats(x, **kw)
    off = dist_stats(x, heads=False, **kw)
    assert off.head_sums.shape == on.head_sums.shape == (3 if reduce_dim is not None else 1, 4)
    assert off.head_sums.dtype == torch.float64 and off.head_sums.isnan().all()
    assert torch.isfinite(on.head_sums).all()
    assert on.sums[Slot.NONFINITE].item() >= 1 and on.sums[Slot.MASKED].item() >= 1
    assert torch.equal(off.topk, on.topk)
    if each_backend == "cpu":
        assert torch.equal(off.sums, on.sums)
        assert torch.equal(off.rows.isnan(), on.rows.isnan())
        assert torch.equal(off.rows.nan_to_num(), on.rows.nan_to_num())
    else:
        torch.testing.assert_close(off.sums, on.sums, rtol=RTOL, atol=ATOL * 40)
        torch.testing.assert_close(off.rows, on.rows, rtol=RTOL, atol=ATOL, equal_nan=True)
    want = oracle(x, **{k: v for k, v in kw.items() if k != "rows"})[0]
    torch.testing.assert_close(off.sums, want, rtol=RTOL, atol=ATOL * 40)


def test_heads_false_empty_batch(each_backend):
    out = dist_stats(torch.ones(0, 3, 4, 8), reduce_dim=1, topk=2, heads=False)
    assert out.sums[Slot.COUNT].item() == 0
    assert out.head_sums.shape == (3, 4) and out.head_sums.isnan().all()


def test_backends_agree_with_each_other(backend):
    x = softmax_rows(2, 4, 33, 33, seed=5)
    results = {}
    for name in BACKENDS:
        backend(name)
        results[name] = dist_stats(x, reduce_dim=1, topk=5, rows=True, window=3)
    base = results["torch"]
    for name, out in results.items():
        torch.testing.assert_close(out.sums, base.sums, rtol=RTOL, atol=1e-5, msg=name)
        torch.testing.assert_close(out.head_sums, base.head_sums, rtol=RTOL, atol=1e-5, msg=name)
        assert torch.equal(out.topk, base.topk), name


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"topk": 17}, "topk"),
        ({"topk": 9}, "topk"),  # more than N = 8
        ({"reduce_dim": 3}, "reduce_dim"),
        ({"reduce_dim": 7}, "reduce_dim"),
        ({"row_mask": torch.ones(2, 3, dtype=torch.bool)}, "row_mask"),
        ({"window": -1}, "window"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dist_stats(softmax_rows(2, 3, 4, 8), **kwargs)


def test_empty_reduce_axis_is_an_error_and_empty_batches_are_not(each_backend):
    with pytest.raises(ValueError, match="empty axis"):
        dist_stats(torch.ones(2, 0, 4, 8), reduce_dim=1)
    out = dist_stats(torch.ones(0, 3, 4, 8), reduce_dim=1, topk=2)
    assert out.sums[Slot.COUNT].item() == 0
    assert out.topk.shape == (0, 4, 2)


def test_bad_tensors():
    with pytest.raises(ValueError, match="dtype"):
        dist_stats(torch.ones(3, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="non-empty last axis"):
        dist_stats(torch.ones(3, 0))
    with pytest.raises(ValueError, match="at least 1 dimension"):
        dist_stats(torch.tensor(1.0))
    with pytest.raises(TypeError, match="torch.Tensor"):
        dist_stats([0.5, 0.5])


def test_no_host_transfer(each_backend):
    x = softmax_rows(2, 3, 8, 8)
    mask = torch.ones(2, 8, dtype=torch.bool)
    dist_stats(x, reduce_dim=1, topk=2, row_mask=mask, rows=True)  # warm-up (extension load)

    with forbid_host_sync():
        dist_stats(x, reduce_dim=1, topk=2, row_mask=mask, rows=True, window=1)


@pytest.mark.parametrize("heads", [True, False])
def test_torch_compile_fullgraph(each_backend, heads):
    x = softmax_rows(2, 3, 6, 10)

    def step(t):
        out = dist_stats(t, reduce_dim=1, topk=3, heads=heads)
        return fastdiag.ops.mean(out.sums, Slot.ENTROPY), out.topk, out.head_sums

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="eager")
    got, got_topk, got_head = compiled(x)
    want, want_topk, want_head = step(x)
    torch.testing.assert_close(got, want)
    assert torch.equal(got_topk, want_topk)
    torch.testing.assert_close(got_head, want_head, equal_nan=True)
    assert got_head.isnan().all() != heads


def test_opcheck_torch_op():
    x4 = softmax_rows(2, 3, 4, 6).transpose(0, 1).contiguous()  # A=3, G=2, C=4
    mask = torch.ones(12, dtype=torch.bool)
    torch.library.opcheck(
        torch.ops.fastdiag.dist_stats_torch.default, (x4, mask, False, 2, 0.1, 1e-6, 1, 0, 4, True)
    )
    mask[5] = False  # a masked row; rows=False since opcheck compares NaN rows as unequal
    torch.library.opcheck(
        torch.ops.fastdiag.dist_stats_torch.default, (x4, mask, True, 3, 0.1, 1e-6, -1, 2, 4, False)
    )
    # want_heads=False: head_sums is NaN, which opcheck compares as unequal: the schema only
    torch.library.opcheck(
        torch.ops.fastdiag.dist_stats_torch.default,
        (x4, mask, False, 2, 0.1, 1e-6, 1, 0, 4, False, False),
        test_utils=("test_schema", "test_faketensor"),
    )


# ---- median (of a per-row column) ----------------------------------------------------------------


def test_median_numpy_convention_ignores_nan():
    from fastdiag.ops import median

    assert median(torch.tensor([3.0, 1.0, 2.0])).item() == 2.0
    assert median(torch.tensor([4.0, 1.0, 2.0, 3.0])).item() == 2.5  # mean of the middle two
    assert median(torch.tensor([float("nan"), 5.0, 1.0])).item() == 3.0
    assert torch.isnan(median(torch.tensor([float("nan")])))
    assert torch.isnan(median(torch.ones(0)))
    got = median(torch.arange(12.0).reshape(3, 4))
    assert got.dtype == torch.float64 and got.shape == () and got.item() == 5.5


def test_one_graph_across_ten_sequence_lengths(each_backend):
    """dynamic=True: the sequence length is symbolic all the way into the op (no int())."""
    import torch._dynamo.testing

    def step(t):
        out = dist_stats(t, reduce_dim=1, topk=2, window=1)
        return out.sums, out.head_sums, out.topk

    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(step, fullgraph=True, dynamic=True, backend=counter)
    lengths = range(5, 15) if each_backend != "triton" else range(5, 9)
    with torch._dynamo.config.patch(recompile_limit=1, fail_on_recompile_limit_hit=True):
        for n in lengths:
            x = softmax_rows(2, 3, n, n + 1)
            got, want = compiled(x), step(x)
            for a, b in zip(got, want, strict=True):
                torch.testing.assert_close(a, b, equal_nan=True)
    assert counter.frame_count == 1
    torch._dynamo.reset()


def test_outputs_are_detached(each_backend):
    x = softmax_rows(2, 3, 4, 6).requires_grad_()
    out = dist_stats(x, reduce_dim=1, topk=2, rows=True)
    assert all(t.grad_fn is None and not t.requires_grad for t in out)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tau": math.nan}, "tau must be a finite number"),
        ({"eps": math.inf}, "eps must be a finite number"),
        ({"tau": "0.1"}, "tau must be a finite number"),
        ({"query_offset": 2**70}, r"query_offset must be an int in \(-2\*\*63, 2\*\*63\)"),
        ({"query_offset": 1.5}, "query_offset must be an int"),
        ({"window": 2**64}, "window must be a non-negative int below 2"),
    ],
)
def test_bad_scalars_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dist_stats(softmax_rows(1, 2, 3, 4), **kwargs)
