"""``fastdiag.ops.attention_stats`` on every backend against a float64 oracle.

The oracle materialises SDPA's attention in float64 (scores, causal / boolean / additive
masks, softmax: a row with no attendable key is NaN) and takes the row statistics straight
from their definitions (the contract of ``fastdiag.ops._dist_stats``). The triton backend runs
under ``TRITON_INTERPRET=1`` on CPU tensors: shapes stay small.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fastdiag
from fastdiag.ops import HeadSlot, RowSlot, Slot, attention_stats, dist_stats
from fastdiag.ops import _attention_stats_layout as layout
from fastdiag.ops import _attention_stats_torch as torch_path
from tests.conftest import available_backends, forbid_host_sync

BACKENDS = available_backends("cpu")


@pytest.fixture(params=BACKENDS)
def each_backend(request, backend):
    backend(request.param)
    return request.param


def probs64(q, k, attn_mask=None, is_causal=False, scale=None, enable_gqa=False):
    """SDPA's attention probabilities in float64 [B, Hq, N, Nk] (NaN rows: nothing attended)."""
    qd, kd = q.double(), k.double()
    if enable_gqa and kd.shape[1] != qd.shape[1]:
        kd = kd.repeat_interleave(qd.shape[1] // kd.shape[1], dim=1)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = qd @ kd.transpose(-2, -1) * scale
    n, nk = s.shape[-2:]
    if is_causal:
        s = s.masked_fill(~torch.ones(n, nk, dtype=torch.bool).tril(0), -math.inf)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            s = s.masked_fill(~attn_mask, -math.inf)
        else:
            s = s + attn_mask.double()
    return torch.softmax(s, -1)


def oracle(p, *, reduce_dim=1, topk=0, tau=0.1, eps=1e-6, window=None, row_mask=None):
    """(sums, head_sums, rows, topk) of the float64 probabilities p [B, H, N, Nk]."""
    b, h, n, nk = p.shape
    if reduce_dim is not None:
        ph = p.permute(1, 0, 2, 3).reshape(h, b * n, nk)
        lead = [b, n]
    else:
        ph = p.reshape(1, b * h * n, nk)
        lead = [b, h, n]
    r = ph.shape[1]
    finite = torch.isfinite(ph).all(-1).all(0)
    ph = torch.where(finite[None, :, None], ph, 0.0)
    pb = ph.mean(0)
    allowed = torch.ones(r, dtype=torch.bool) if row_mask is None else row_mask.reshape(r)
    valid = finite & allowed
    v = valid.double()
    i = torch.arange(r) % n
    j = torch.arange(nk)
    ent = torch.special.entr(pb).sum(-1)
    mx = pb.amax(-1)
    err = (pb.sum(-1) - 1).abs()
    fut = torch.where(j[None] > i[:, None], pb, 0).sum(-1)
    sums = torch.zeros(Slot.NUM, dtype=torch.float64)
    sums[Slot.COUNT] = v.sum()
    sums[Slot.ENTROPY] = (ent * v).sum()
    sums[Slot.ENTROPY_SQ] = (ent * ent * v).sum()
    sums[Slot.MAX] = (mx * v).sum()
    sums[Slot.MAX_SQ] = (mx * mx * v).sum()
    sums[Slot.SUMSQ] = ((pb * pb).sum(-1) * v).sum()
    sums[Slot.GT_TAU] = ((pb > tau).sum(-1) * v).sum()
    sums[Slot.GT_EPS] = ((pb > eps).sum(-1) * v).sum()
    sums[Slot.ROWSUM_ERR] = (err * v).sum()
    sums[Slot.ROWSUM_ERR_MAX] = (err * v).max()
    sums[Slot.FUTURE] = (fut * v).sum()
    sums[Slot.FUTURE_MAX] = (fut * v).max()
    if window is not None:
        sums[Slot.LOCAL] = (torch.where((j[None] - i[:, None]).abs() <= window, pb, 0).sum(-1) * v).sum()
    sums[Slot.ABS_DEV] = ((pb - 1 / nk).abs().mean(-1) * v).sum()
    sums[Slot.NONFINITE] = (allowed & ~finite).sum()
    sums[Slot.MASKED] = (~allowed).sum()
    head = torch.stack(
        [
            (torch.special.entr(ph).sum(-1) * v).sum(1),
            (ph.amax(-1) * v).sum(1),
            ((ph > tau).sum(-1) * v).sum(1),
            ((ph * ph).sum(-1) * v).sum(1),
        ],
        dim=1,
    )
    nan = torch.full((r,), math.nan, dtype=torch.float64)
    rows = torch.stack(
        [torch.where(valid, x, nan) for x in (ent, mx, (pb > eps).sum(-1).double(), (pb * pb).sum(-1))], 1
    )
    order = torch.sort(pb, dim=-1, descending=True, stable=True).indices[:, :topk]
    top = torch.where(valid[:, None], order, -1)
    return sums, head, rows.reshape(*lead, RowSlot.NUM), top.reshape(*lead, topk)


def check(got, want, rtol=1e-5, counts_atol=0.0, check_topk=True):
    sums, head, rows, top = want
    count = max(1.0, float(sums[Slot.COUNT]))
    # |rowsum - 1| is float32 rounding noise (~1e-7 per row): absolute tolerance only
    noise = [Slot.ROWSUM_ERR, Slot.ROWSUM_ERR_MAX]
    keep = [s for s in range(Slot.NUM) if s not in noise]
    counts = [Slot.GT_TAU, Slot.GT_EPS]
    other = [s for s in keep if s not in counts]
    torch.testing.assert_close(got.sums[other], sums[other], rtol=rtol, atol=1e-6 * count)
    torch.testing.assert_close(got.sums[counts], sums[counts], rtol=0, atol=counts_atol)
    assert (got.sums[noise] - sums[noise]).abs().max() <= 1e-5 * count
    if not torch.isnan(got.head_sums).all():
        torch.testing.assert_close(got.head_sums, head, rtol=rtol, atol=1e-6 * count)
    if got.rows.numel():
        torch.testing.assert_close(got.rows.double(), rows, rtol=rtol, atol=1e-6, equal_nan=True)
    if check_topk:
        assert torch.equal(got.topk, top)


def rand(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


B, H, N, NK, D = 2, 4, 37, 29, 16


def _masks():
    g = torch.Generator().manual_seed(3)
    bool4 = torch.rand(B, H, N, NK, generator=g) > 0.3
    bool4[0, 1, 5] = False  # one head's row fully masked: the mean row is non-finite
    bool4[1, :, 7] = False  # every head's row fully masked
    add2 = torch.randn(N, NK, generator=g)
    add2[3] = -math.inf  # fully masked row (additive)
    add2[:, 4] = -math.inf
    return {
        "bool_full": bool4,
        "additive_2d": add2,
        "bool_11": (torch.rand(1, 1, N, NK, generator=g) > 0.5),
        "additive_b1": torch.randn(B, 1, N, NK, generator=g),
        "bool_2d_sliding": (torch.arange(NK)[None] - torch.arange(N)[:, None]).abs() <= 3,
    }


MASKS = _masks()

CASES = {
    "plain": dict(),
    "causal": dict(is_causal=True, window=2),
    "causal_n_lt_nk": dict(is_causal=True, n=19, nk=41),
    "causal_n_gt_nk": dict(is_causal=True, n=41, nk=19),
    "gqa": dict(hk=2, enable_gqa=True, topk=4),
    "d32_scale": dict(d=32, scale=0.3, topk=5, rows=True),
    "heads_false": dict(heads=False, rows=True, topk=2),
    "per_head_rows": dict(reduce_dim=None, rows=True, topk=3, window=1),
    "row_mask": dict(row_mask=True, topk=2, rows=True),
    "row_mask_per_head": dict(reduce_dim=None, row_mask=True, is_causal=True),
    **{f"mask_{name}": dict(mask=name, topk=3, rows=True) for name in MASKS},
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_float64_oracle(each_backend, case):
    c = dict(CASES[case])
    n, nk, d, hk = c.pop("n", N), c.pop("nk", NK), c.pop("d", D), c.pop("hk", H)
    q = rand(B, H, n, d, seed=1)
    k = rand(B, hk, nk, d, seed=2)
    mask = MASKS[c.pop("mask")] if "mask" in c else None
    reduce_dim = c.pop("reduce_dim", 1)
    row_mask = None
    if c.pop("row_mask", False):
        shape = (B, n) if reduce_dim is not None else (B, H, n)
        row_mask = rand(*shape, seed=4) > -0.5
    sdpa = {key: c.pop(key) for key in ("is_causal", "scale", "enable_gqa") if key in c}
    stats = dict(topk=c.pop("topk", 0), window=c.pop("window", None))
    got = attention_stats(q, k, attn_mask=mask, reduce_dim=reduce_dim, row_mask=row_mask,
                          **sdpa, **stats, **c)
    p = probs64(q, k, attn_mask=mask, **sdpa)
    want = oracle(p, reduce_dim=reduce_dim, row_mask=row_mask, **stats)
    check(got, want)
    if c.get("heads") is False:
        assert got.head_sums.shape == (H, HeadSlot.NUM) and torch.isnan(got.head_sums).all()
    if mask is not None and case == "mask_bool_full":
        assert got.sums[Slot.NONFINITE] == 2  # rows (0, 5) and (1, 7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(each_backend, dtype):
    q = rand(B, H, N, D, dtype=dtype, seed=5)
    k = rand(B, H, NK, D, dtype=dtype, seed=6)
    got = attention_stats(q, k, is_causal=True, topk=2, rows=True)
    want = oracle(probs64(q, k, is_causal=True), topk=2)  # the same rounded inputs in float64
    check(got, want, rtol=1e-4, counts_atol=2, check_topk=False)
    agree = (got.topk == want[3]).float().mean()
    assert agree > 0.95


def test_topk_ties_go_to_the_lower_index(each_backend):
    g = torch.Generator().manual_seed(7)
    # small integers: every score is exact in float32 and float64 (whatever the summation order)
    q = torch.randint(-2, 3, (1, 2, 9, 16), generator=g).float()
    k = torch.randint(-2, 3, (1, 2, 20, 16), generator=g).float()
    k[:, :, 10:] = k[:, :, :10]  # every score twice: key j and j + 10 tie exactly
    got = attention_stats(q, k, topk=6, scale=0.25)
    want = oracle(probs64(q, k, scale=0.25), topk=6)
    assert torch.equal(got.topk, want[3])
    assert (got.topk < 10).sum() >= got.topk.numel() // 2


@pytest.mark.parametrize("d", [64, 128])
def test_large_head_dims(each_backend, d):
    if each_backend == "triton" and d == 128:
        pytest.skip("interpreter time: d=64 covers the padded head-dim path")
    q = rand(1, 2, 21, d, seed=9)
    k = rand(1, 2, 17, d, seed=10)
    check(attention_stats(q, k, topk=2, window=3), oracle(probs64(q, k), topk=2, window=3))


def test_non_contiguous_inputs(each_backend):
    """q / k as the [B, N, H, d] projections' transposed views, a transposed mask."""
    q = rand(B, N, H, D, seed=22).transpose(1, 2)
    k = rand(B, NK, H, D, seed=23).transpose(1, 2)
    mask = (rand(NK, N, seed=24) > -1.0).t()
    got = attention_stats(q, k, attn_mask=mask, topk=3, rows=True)
    check(got, oracle(probs64(q, k, attn_mask=mask), topk=3))


def test_nonfinite_query_row_is_counted_and_excluded(each_backend):
    q = rand(B, H, N, D, seed=25)
    k = rand(B, H, NK, D, seed=26)
    q[1, 2, 4, 3] = math.nan  # one head's row of (b=1, i=4)
    q[0, 0, 9, 0] = math.inf
    got = attention_stats(q, k, topk=2, rows=True)
    assert got.sums[Slot.NONFINITE] == 2 and got.sums[Slot.COUNT] == B * N - 2
    assert torch.isnan(got.rows[1, 4]).all() and (got.topk[1, 4] == -1).all()
    check(got, oracle(probs64(q, k), topk=2))


def test_float64_inputs_run_in_float32(backend):
    backend("auto")
    q = rand(1, 2, 11, 16, seed=11).double()
    k = rand(1, 2, 13, 16, seed=12).double()
    check(attention_stats(q, k, topk=1), oracle(probs64(q, k), topk=1))


@pytest.mark.parametrize("name", ["torch", "cpu"])
def test_query_chunks_merge(backend, monkeypatch, name):
    """Slabs of a few queries (SLAB_BYTES lowered): the merged result is the one-slab result
    (up to float32 rounding: BLAS blocks a 5-row product differently) and the oracle's."""
    if name not in BACKENDS:
        pytest.skip("no C++ extension")
    backend(name)
    q = rand(2, 3, 23, 16, seed=13)
    k = rand(2, 3, 19, 16, seed=14)
    row_mask = rand(2, 23, seed=15) > -0.7
    kw = dict(is_causal=True, topk=3, rows=True, window=2, row_mask=row_mask)
    whole = attention_stats(q, k, **kw)
    monkeypatch.setattr(torch_path, "SLAB_BYTES", 2 * 3 * 19 * 4 * 5)  # 5 queries per slab
    assert torch_path.query_block(2, 3, 23, 19) == 5
    parts = attention_stats(q, k, **kw)
    for a, b in zip(whole, parts):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, equal_nan=True)
    check(parts, oracle(probs64(q, k, is_causal=True), topk=3, window=2, row_mask=row_mask))


def test_matches_dist_stats_on_sdpa_probabilities(backend):
    """The issue's definition, literally: dist_stats of the materialised float32 softmax."""
    backend("auto")
    q = rand(B, H, N, D, seed=16)
    k = rand(B, H, NK, D, seed=17)
    mask = MASKS["bool_11"]
    scores = q @ k.transpose(-2, -1) / math.sqrt(D)
    p = torch.softmax(scores.masked_fill(~mask, -math.inf), -1)
    want = dist_stats(p, reduce_dim=1, topk=4, window=3, rows=True)
    got = attention_stats(q, k, attn_mask=mask, topk=4, window=3, rows=True)
    torch.testing.assert_close(got.sums[:Slot.ROWSUM_ERR], want.sums[:Slot.ROWSUM_ERR], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.head_sums, want.head_sums, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.topk, want.topk)
    # SDPA itself agrees on which rows exist (its output is the same weights times v)
    v = torch.eye(NK).expand(B, H, NK, NK)
    torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v, attn_mask=mask), p, atol=1e-5, rtol=1e-5)


def test_layout_slots_are_dist_stats_slots():
    for name in dir(Slot):
        if name.isupper() and name != "MAX_REDUCED":
            assert getattr(layout, f"S_{name}") == getattr(Slot, name)
    assert layout.S_MAX_REDUCED == Slot.MAX_REDUCED
    for name in ("ENTROPY", "MAX", "GT_TAU", "SUMSQ", "NUM"):
        assert getattr(layout, f"H_{name}") == getattr(HeadSlot, name)
    for name in ("ENTROPY", "MAX", "GT_EPS", "SUMSQ", "NUM"):
        assert getattr(layout, f"R_{name}") == getattr(RowSlot, name)


def test_empty_queries(each_backend):
    q = rand(2, 2, 0, 16)
    k = rand(2, 2, 5, 16)
    out = attention_stats(q, k, topk=2, rows=True)
    assert out.sums.shape == (Slot.NUM,) and (out.sums == 0).all()
    assert out.rows.shape == (2, 0, RowSlot.NUM) and out.topk.shape == (2, 0, 2)


@pytest.mark.parametrize("name", ["torch", "cpu"])
def test_no_host_sync(backend, name):
    if name not in BACKENDS:
        pytest.skip("no C++ extension")
    backend(name)
    q = rand(B, H, N, D, seed=18)
    k = rand(B, H // 2, NK, D, seed=19)
    row_mask = torch.ones(B, N, dtype=torch.bool)
    attention_stats(q, k, enable_gqa=True, is_causal=True, topk=2, row_mask=row_mask)  # warm
    with forbid_host_sync():
        attention_stats(q, k, enable_gqa=True, is_causal=True, topk=2, row_mask=row_mask, rows=True)
        attention_stats(q, k, enable_gqa=True, attn_mask=MASKS["additive_2d"], topk=1)


def test_torch_compile_one_graph_across_lengths(each_backend):
    import torch._dynamo.testing

    counter = torch._dynamo.testing.CompileCounter()

    def step(q, k, row_mask):
        out = attention_stats(q, k, is_causal=True, topk=2, row_mask=row_mask, rows=True)
        return out.sums, out.head_sums, out.rows, out.topk

    torch.compiler.reset()
    fastdiag.backends.refresh()  # an empty implementation cache must not cost a recompile
    compiled = torch.compile(step, fullgraph=True, dynamic=True, backend=counter)
    lengths = (9, 13, 22) if each_backend != "triton" else (9, 13, 17)
    with torch._dynamo.config.patch(recompile_limit=1, fail_on_recompile_limit_hit=True):
        for n in lengths:
            q = rand(1, 2, n, 16, seed=n)
            k = rand(1, 2, n + 3, 16, seed=n + 1)
            row_mask = torch.ones(1, n, dtype=torch.bool)
            got = compiled(q, k, row_mask)
            want = step(q, k, row_mask)
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, equal_nan=True)
    assert counter.frame_count == 1
    torch.compiler.reset()


q4, k4 = torch.zeros(2, 4, 8, 16), torch.zeros(2, 4, 6, 16)


@pytest.mark.parametrize(
    "args, kwargs, exc, match",
    [
        ((torch.zeros(4, 8, 16), k4), {}, ValueError, r"q must have shape \[B, Hq, N, d\].*\(4, 8, 16\)"),
        ((q4, torch.zeros(4, 6, 16)), {}, ValueError, r"k must have shape \[B, Hk, Nk, d\]"),
        ((q4, torch.zeros(2, 2, 6, 16)), {}, ValueError, r"k must have q's 4 heads.*enable_gqa"),
        ((q4, torch.zeros(2, 3, 6, 16)), {"enable_gqa": True}, ValueError, r"head count must divide"),
        ((q4, torch.zeros(2, 4, 6, 8)), {}, ValueError, r"k must have q's head dim d=16.*\(2, 4, 6, 8\)"),
        ((q4, torch.zeros(3, 4, 6, 16)), {}, ValueError, r"k must have q's batch size B=2"),
        ((q4.long(), k4), {}, ValueError, r"q must be float32.*torch.int64"),
        ((q4, k4), {"attn_mask": torch.ones(8, 5, dtype=torch.bool)}, ValueError,
         r"attn_mask must be broadcastable to \[B, Hq, N, Nk\] = \[2, 4, 8, 6\], got shape \(8, 5\)"),
        ((q4, k4), {"attn_mask": torch.ones(3, 4, 8, 6, dtype=torch.bool)}, ValueError, r"broadcastable"),
        ((q4, k4), {"attn_mask": torch.ones(8, 6, dtype=torch.int32)}, ValueError, r"attn_mask must be bool"),
        ((q4, k4), {"attn_mask": torch.ones(8, 6, dtype=torch.bool), "is_causal": True}, ValueError,
         r"attn_mask and is_causal"),
        ((q4, k4), {"row_mask": torch.ones(2, 4, 8, dtype=torch.bool)}, ValueError,
         r"row_mask must have shape \[2, 8\].*\(2, 4, 8\)"),
        ((q4, k4), {"row_mask": torch.ones(2, 8, dtype=torch.bool), "reduce_dim": None}, ValueError,
         r"row_mask must have shape \[2, 4, 8\]"),
        ((q4, k4), {"reduce_dim": 2}, ValueError, r"reduce_dim must be 1"),
        ((q4, k4), {"topk": 7}, ValueError, r"topk must be in \[0, min\(16, Nk=6\)\]"),
        ((q4, k4), {"window": -1}, ValueError, r"window"),
        (("q", k4), {}, TypeError, r"q must be a torch.Tensor"),
    ],
)
def test_bad_arguments_name_themselves(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        attention_stats(*args, **kwargs)


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(field)


def test_peak_memory_is_far_below_one_attention_map(backend):
    """B=1, H=8, N=Nk=8192, d=64 on the CPU: the peak resident-set rise of one call (VmHWM reset
    through /proc/self/clear_refs, as bench/bench_dist_stats.py's peak_extra) is a small
    multiple of B*H*N floats plus the slabs, far below the 2 GiB of one fp32 attention map."""
    import ctypes
    import ctypes.util
    import gc

    backend("auto")
    q = rand(1, 8, 8192, 64, seed=20)
    k = rand(1, 8, 8192, 64, seed=21)
    attention_stats(q[:, :, :64], k[:, :, :64], is_causal=True, topk=5)  # warm (extension, allocator)
    gc.collect()
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
    try:
        Path("/proc/self/clear_refs").write_text("5")
        before = _rss_kib("VmRSS")
    except OSError:
        pytest.skip("needs /proc/self/clear_refs")
    out = attention_stats(q, k, is_causal=True, topk=5, rows=True)
    peak = (_rss_kib("VmHWM") - before) * 1024
    assert out.sums[Slot.COUNT] == 8192
    map_bytes = 8 * 8192 * 8192 * 4
    print(f"peak extra {peak / 2**20:.1f} MiB vs one map {map_bytes / 2**20:.0f} MiB")
    # one slab (SLAB_BYTES = 16 MiB) + a q block + outputs: measured 19 - 81 MiB from run to
    # run (the same call; the VmHWM rise varies with the allocator's and threads' state); one
    # map is 2 GiB, materialising scores and probabilities 4 GiB
    assert peak < 8 * layout.SLAB_BYTES <= map_bytes / 16
