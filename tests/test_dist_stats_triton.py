"""The triton backend of ``dist_stats`` (``fastdiag.kernels.dist_stats``) on its own.

Each case runs the op on the canonical [A, G, C, N] view and compares it with the torch backend
(float32 rel 1e-4 / abs 1e-6, identical top-k indices, identical invalid-row handling) and with
an independent float64 formula written here. Without a GPU the kernels run under
TRITON_INTERPRET=1 on CPU tensors (conftest), so shapes stay small; the module constants that
size the tiles are lowered to reach the multi-block and two-stage paths. With a GPU the same
tests run natively on CUDA tensors; ``gpu`` tests need one.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fastdiag import backends
from fastdiag.ops._dist_stats_layout import HeadSlot, RowSlot, Slot

if not backends.triton_available():  # pragma: no cover - depends on the install
    pytest.skip("triton does not import", allow_module_level=True)
if not torch.cuda.is_available() and not backends.triton_interpreting():  # pragma: no cover
    pytest.skip("no GPU and TRITON_INTERPRET is not set", allow_module_level=True)

from fastdiag.kernels import dist_stats as K  # noqa: E402

from fastdiag.ops._dist_stats_torch import dist_stats_torch  # noqa: E402
from tests.conftest import op_args  # noqa: E402

OP = K.register(interpreting=backends.triton_interpreting())  # fastdiag::dist_stats_triton

DEV = "cuda" if torch.cuda.is_available() else "cpu"

# the interpreter computes invalid rows' NaN statistics too (their outputs are then masked)
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


def golden(x4, mask, logits, topk, tau, eps, window, qoff, qlen, want_rows):
    """The contract in plain float64 torch on the CPU: (sums, head_sums, rows, topk).
    Thresholds are compared as float32 numbers, as every backend does."""
    tau, eps = (torch.tensor(t, dtype=torch.float32).item() for t in (tau, eps))
    x = x4.detach().cpu().double()
    a, g, c, n = x.shape
    if logits:
        hmax = x.amax(-1, keepdim=True)
        bad = x.isnan().any(-1) | x.isposinf().any(-1) | hmax[..., 0].isneginf()
        e = torch.exp(x - torch.where(torch.isfinite(hmax), hmax, torch.zeros_like(hmax)))
        ph = e / e.sum(-1, keepdim=True)
    else:
        bad = ~torch.isfinite(x).all(-1)
        ph = x
    finite = ~bad.any(1)  # [a, c]
    ph = torch.where(finite[:, None, :, None], ph, torch.zeros_like(ph))
    r = a * c
    ph = ph.permute(1, 0, 2, 3).reshape(g, r, n)  # row r = a * C + c
    p = ph.mean(0)
    finite = finite.reshape(r)
    allowed = torch.ones(r, dtype=torch.bool) if mask is None else mask.cpu().reshape(r)
    valid = finite & allowed
    v = valid.double()

    def entr(t):
        pos = t > 0
        return torch.where(pos, -t * torch.log(torch.where(pos, t, torch.ones_like(t))), 0.0).sum(
            -1
        )

    ent = entr(p)
    mx = p.amax(-1)
    sq = (p * p).sum(-1)
    gt_tau = (p > tau).sum(-1).double()
    gt_eps = (p > eps).sum(-1).double()
    rerr = (p.sum(-1) - 1).abs()
    adev = (p - 1.0 / n).abs().mean(-1)
    qi = torch.arange(r) % qlen + qoff
    j = torch.arange(n)
    fut = torch.where(j[None] > qi[:, None], p, 0.0).sum(-1)
    if window >= 0:
        loc = torch.where((j[None] - qi[:, None]).abs() <= window, p, 0.0).sum(-1)
    else:
        loc = torch.zeros(r, dtype=torch.float64)
    sums = torch.zeros(Slot.NUM, dtype=torch.float64)
    sums[Slot.COUNT] = v.sum()
    sums[Slot.ENTROPY] = (ent * v).sum()
    sums[Slot.ENTROPY_SQ] = (ent * ent * v).sum()
    sums[Slot.MAX] = (mx * v).sum()
    sums[Slot.MAX_SQ] = (mx * mx * v).sum()
    sums[Slot.SUMSQ] = (sq * v).sum()
    sums[Slot.GT_TAU] = (gt_tau * v).sum()
    sums[Slot.GT_EPS] = (gt_eps * v).sum()
    sums[Slot.ROWSUM_ERR] = (rerr * v).sum()
    sums[Slot.ROWSUM_ERR_MAX] = (rerr * v).max().clamp_min(0)
    sums[Slot.FUTURE] = (fut * v).sum()
    sums[Slot.FUTURE_MAX] = (fut * v).max().clamp_min(0)
    sums[Slot.LOCAL] = (loc * v).sum()
    sums[Slot.ABS_DEV] = (adev * v).sum()
    sums[Slot.NONFINITE] = (allowed & ~finite).double().sum()
    sums[Slot.MASKED] = (~allowed).double().sum()
    head = torch.stack(
        [
            (entr(ph) * v).sum(-1),
            (ph.amax(-1) * v).sum(-1),
            ((ph > tau).sum(-1).double() * v).sum(-1),
            ((ph * ph).sum(-1) * v).sum(-1),
        ],
        dim=-1,
    )
    nan = torch.full((r,), math.nan, dtype=torch.float64)
    row_stats = torch.stack([torch.where(valid, t, nan) for t in (ent, mx, gt_eps, sq)], -1)
    idx = torch.sort(p, dim=-1, descending=True, stable=True).indices[:, :topk]
    idx = torch.where(valid[:, None], idx, -1)
    return sums, head, row_stats if want_rows else row_stats[:0], idx


def run(args, monkeypatch=None, **consts):
    """The triton op on ``args``, with module constants overridden for the call."""
    if consts:
        for name, value in consts.items():
            monkeypatch.setattr(K, name, value)
    return OP(*args)


def assert_same(out, ref, rtol=1e-4, atol=1e-6, topk=True):
    """Equal within float32 tolerance; top-k indices identical."""
    sums, head, rows, idx = out
    assert sums.dtype == torch.float64 and head.dtype == torch.float64
    assert rows.dtype == torch.float32 and idx.dtype == torch.int64
    for name, got, want in (
        ("sums", sums, ref[0]),
        ("head_sums", head, ref[1]),
        ("rows", rows, ref[2]),
    ):
        assert got.shape == want.shape, name
        torch.testing.assert_close(
            got.cpu().double(), want.cpu().double(), rtol=rtol, atol=atol, equal_nan=True, msg=name
        )
    assert idx.shape == ref[3].shape
    if topk:
        assert torch.equal(idx.cpu(), ref[3].cpu())


def check(args, monkeypatch=None, gold_topk=True, **consts):
    """Triton vs the torch backend (tight) and vs float64 (float32-level tolerance)."""
    out = run(args, monkeypatch, **consts)
    assert_same(out, dist_stats_torch(*args))
    assert_same(out, golden(*args), atol=1e-5, topk=gold_topk)
    return out


def softmax(*shape, scale=2.0, seed=0, dim=-1):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale).softmax(dim).to(DEV)


def logits(*shape, scale=2.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale).to(DEV)


# --------------------------------------------------------------------------- values


@pytest.mark.parametrize(
    "name, x, kw",
    [
        ("probs, 3 heads", lambda: softmax(2, 3, 5, 7), dict(topk=3, window=1, qoff=2)),
        ("probs, 1 head, N=128", lambda: softmax(1, 1, 6, 128), dict(topk=5)),
        ("probs, 4 heads (pow2)", lambda: softmax(1, 4, 3, 40), dict(topk=4, window=0)),
        ("logits, 2 heads", lambda: logits(2, 2, 3, 33), dict(logits=True, topk=4, window=3)),
        ("logits, 1 head", lambda: logits(1, 1, 4, 20, scale=3.0), dict(logits=True, topk=2)),
    ],
)
def test_random_rows(name, x, kw):
    check(op_args(x(), **kw))


def test_zeros_one_hot_and_ties():
    x = torch.zeros(6, 16)
    x[0, 3] = 1.0  # one-hot
    x[1, :4] = 0.25  # 4-way tie: indices 0, 1, 2, 3, then the zeros from index 4
    x[2, [5, 9]] = 0.5  # exact zeros elsewhere
    x[3] = 1.0 / 16  # uniform: every index tied
    x[4, 15], x[4, 0] = 0.7, 0.3
    x[5, 2:6] = torch.tensor([0.1, 0.4, 0.4, 0.1])
    out = check(op_args(x.to(DEV).view(1, 1, 6, 16), topk=5, tau=0.2, eps=0.05))
    rows, idx = out[2].cpu(), out[3].cpu()
    assert rows[0, RowSlot.ENTROPY].item() == 0.0  # 0 log 0 = 0, exactly
    assert rows[0, RowSlot.MAX].item() == 1.0
    assert idx[0].tolist() == [3, 0, 1, 2, 4]
    assert idx[1].tolist() == [0, 1, 2, 3, 4]
    assert idx[2].tolist() == [5, 9, 0, 1, 2]
    assert idx[3].tolist() == [0, 1, 2, 3, 4]
    assert idx[4].tolist() == [15, 0, 1, 2, 3]
    assert idx[5, :4].tolist() == [3, 4, 2, 5]
    assert rows[3, RowSlot.ENTROPY].item() == pytest.approx(math.log(16), rel=1e-6)


def test_ties_across_heads():
    # equal head means from different heads (exact in float32): ties still go to the lower index
    x = torch.zeros(1, 2, 1, 8)
    x[0, 0, 0, 6], x[0, 1, 0, 1] = 0.5, 0.5
    x[0, 0, 0, 2], x[0, 1, 0, 2] = 0.25, 0.25
    out = check(op_args(x.to(DEV), topk=4))
    assert out[3].cpu()[0].tolist() == [1, 2, 6, 0]


@pytest.mark.parametrize("n", [1, 7, 128])
def test_row_lengths(n):
    out = check(op_args(softmax(2, 2, 3, n, seed=n), topk=min(n, 4), window=1))
    if n == 1:  # a single key: entropy 0, max 1, top-1 index 0
        rows = out[2].cpu()
        assert torch.all(rows[:, RowSlot.ENTROPY] == 0)
        assert torch.all(rows[:, RowSlot.MAX] == 1)
        assert torch.all(out[3].cpu() == 0)


@pytest.mark.parametrize("n", [31, 32, 33, 48, 50])
@pytest.mark.parametrize("from_logits", [False, True])
def test_tile_and_block_boundaries(monkeypatch, n, from_logits):
    # single tile up to TILE_N_MAX = 32 (31: padded, 32: exact); beyond, blocks of 16 columns
    # (33 and 50: ragged last block, 48: exact); top-16 merges across the blocks
    x = logits(1, 2, 3, n, seed=n) if from_logits else softmax(1, 2, 3, n, seed=n)
    args = op_args(x, logits=from_logits, topk=16, window=4, qoff=n // 2)
    check(args, monkeypatch, TILE_N_MAX=32, LOOP_BLOCK_N=16)


def test_long_rows_one_head_and_ties_across_blocks(monkeypatch):
    x = torch.zeros(1, 1, 2, 40)
    x[0, 0, 0, [3, 17, 35]] = 0.25  # equal values in three different column blocks
    x[0, 0, 0, 20] = 0.25
    x[0, 0, 1] = 1.0 / 40  # uniform across blocks
    out = check(op_args(x.to(DEV), topk=6), monkeypatch, TILE_N_MAX=8, LOOP_BLOCK_N=8)
    idx = out[3].cpu()
    assert idx[0].tolist() == [3, 17, 20, 35, 0, 1]
    assert idx[1].tolist() == [0, 1, 2, 3, 4, 5]


def test_non_contiguous_inputs():
    t = softmax(2, 3, 9, 6, dim=2).transpose(-1, -2)  # [2, 3, 6, 9], unit stride on axis 2
    assert t.stride(-1) != 1
    check(op_args(t, topk=3, window=2))
    big = softmax(2, 4, 12, 20)
    sliced = big[:, 1:, ::2, 3:14]  # every stride and the offset differ from contiguous
    check(op_args(sliced, topk=5))
    shared = softmax(2, 1, 4, 10).expand(2, 3, 4, 10)  # head stride 0
    assert shared.stride(1) == 0
    check(op_args(shared, topk=2))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_input_dtypes(dtype):
    x = softmax(2, 2, 4, 24, seed=3).to(dtype)
    check(op_args(x, topk=4, window=2, qoff=1))
    check(op_args(logits(1, 2, 3, 17, seed=4).to(dtype), logits=True, topk=3))


def test_logits_with_masked_keys_and_nonfinite():
    x = logits(1, 2, 6, 10, seed=5).cpu()
    x[0, :, 0, 7:] = -math.inf  # causal-style masked keys: a valid row
    x[0, 1, 1, :] = -math.inf  # one head fully masked: the row is invalid
    x[0, 0, 2, 4] = math.nan
    x[0, 1, 3, 2] = math.inf
    x[0, 0, 4, 0] = -math.inf  # a single -inf entry: valid
    out = check(op_args(x.to(DEV), logits=True, topk=3, window=1))
    sums, rows, idx = out[0].cpu(), out[2].cpu(), out[3].cpu()
    assert sums[Slot.COUNT].item() == 3 and sums[Slot.NONFINITE].item() == 3
    assert torch.isnan(rows[1:4]).all() and (idx[1:4] == -1).all()
    assert set(idx[0].tolist()) <= set(range(7))  # masked keys never rank above live ones


def test_row_mask_and_nonfinite_probabilities():
    x = softmax(2, 2, 5, 8, seed=6).cpu()
    x[0, 0, 1, 3] = math.nan
    x[1, 1, 2, 0] = math.inf
    x[1, 0, 4, 5] = -math.inf
    mask = torch.ones(10, dtype=torch.bool)
    mask[[0, 6, 9]] = False  # row 9 is masked and non-finite: counted as masked only
    out = check(op_args(x.to(DEV), mask=mask.to(DEV), topk=2, window=2))
    sums, rows, idx = out[0].cpu(), out[2].cpu(), out[3].cpu()
    assert sums[Slot.MASKED].item() == 3
    assert sums[Slot.NONFINITE].item() == 2  # rows 1 and 7 (row 9 is masked)
    assert sums[Slot.COUNT].item() == 5
    bad = torch.tensor([0, 1, 6, 7, 9])
    assert torch.isnan(rows[bad]).all() and (idx[bad] == -1).all()
    assert torch.isfinite(out[0]).all() and torch.isfinite(out[1]).all()


def test_all_rows_invalid():
    x = torch.full((1, 2, 3, 5), math.nan, device=DEV)
    out = check(op_args(x, topk=2))
    sums = out[0].cpu()
    assert sums[Slot.COUNT].item() == 0 and sums[Slot.NONFINITE].item() == 3
    assert sums[Slot.ROWSUM_ERR_MAX].item() == 0 and sums[Slot.FUTURE_MAX].item() == 0
    assert torch.equal(out[1].cpu(), torch.zeros(2, HeadSlot.NUM, dtype=torch.float64))


def test_unnormalised_and_negative_probabilities():
    # not rejected: row-sum error and abs deviation report them; p <= 0 adds no entropy
    gen = torch.Generator().manual_seed(7)
    x = (torch.rand(1, 2, 4, 9, generator=gen) - 0.3).to(DEV)
    check(op_args(x, topk=3, tau=-0.1, window=2, qoff=-2))


def test_per_head_sums():
    x = softmax(2, 5, 3, 11, seed=8)
    out = check(op_args(x, tau=0.15))
    per_head = []
    for g in range(5):
        s = dist_stats_torch(*op_args(x[:, g : g + 1].contiguous(), tau=0.15))[0].cpu()
        per_head.append([s[Slot.ENTROPY], s[Slot.MAX], s[Slot.GT_TAU], s[Slot.SUMSQ]])
    torch.testing.assert_close(out[1].cpu(), torch.tensor(per_head, dtype=torch.float64))


@pytest.mark.parametrize("g", [1, 3])
@pytest.mark.parametrize("from_logits", [False, True])
def test_without_heads(g, from_logits):
    """HEADS=False: the same sums / rows / top-k as with heads, head_sums NaN; masked and
    non-finite rows, ties."""
    x = logits(2, g, 5, 9, seed=18) if from_logits else softmax(2, g, 5, 9, seed=18)
    x[0, 0, 1, 2] = float("nan")
    x[1, g - 1, 3, 0] = float("inf")
    x[1, 0, 4, :] = 0.25  # ties
    mask = torch.tensor([True, False, True, True, True] * 2, device=DEV)
    args = op_args(x, mask=mask, logits=from_logits, topk=3, window=1, qoff=1)
    on = run(args)
    off = OP(*args, False)
    assert off[1].shape == on[1].shape == (g, HeadSlot.NUM) and off[1].isnan().all()
    assert not on[1].isnan().any()
    assert_same(off, (on[0], off[1], on[2], on[3]), rtol=1e-6, atol=1e-7)
    ref = dist_stats_torch(*args, False)
    assert_same(off, ref)


def test_without_heads_multi_block(monkeypatch):
    # long rows in column blocks (logits: the online-softmax first pass), two-stage finalize
    x = logits(1, 3, 3, 40, seed=19)
    args = op_args(x, logits=True, topk=4, window=2)
    for name, value in dict(TILE_N_MAX=16, LOOP_BLOCK_N=16, FINAL_CHUNK=2).items():
        monkeypatch.setattr(K, name, value)
    off = OP(*args, False)
    on = OP(*args, True)
    assert off[1].isnan().all() and not on[1].isnan().any()
    assert_same(off, (on[0], off[1], on[2], on[3]), rtol=1e-6, atol=1e-7)
    assert_same(off, dist_stats_torch(*args, False))


@pytest.mark.parametrize("k", range(1, 17))
def test_every_topk(k):
    x = torch.zeros(1, 1, 3, 20)
    x[0, 0, 0] = softmax(20, seed=9).cpu()
    x[0, 0, 1, ::3] = 0.125  # seven ties, then zeros
    x[0, 0, 2] = torch.linspace(0, 1, 20).flip(0) / 10
    check(op_args(x.to(DEV), topk=k))


@pytest.mark.parametrize("window, qoff, qlen", [(0, 0, 4), (2, 3, 4), (1, -1, 3), (-1, 5, 8)])
def test_window_and_query_offset(window, qoff, qlen):
    check(op_args(softmax(2, 2, 4, 12, seed=10), window=window, qoff=qoff, qlen=qlen, topk=1))


def test_without_rows_and_topk():
    args = op_args(softmax(1, 3, 4, 9, seed=11), rows=False)
    out = check(args)
    assert out[2].shape == (0, RowSlot.NUM) and out[3].shape == (4, 0)


def test_empty_rows():
    x = torch.zeros(2, 3, 0, 5, device=DEV)
    out = OP(*op_args(x, topk=2))
    assert torch.equal(out[0].cpu(), torch.zeros(Slot.NUM, dtype=torch.float64))
    assert out[1].shape == (3, HeadSlot.NUM) and out[3].shape == (0, 2)


# --------------------------------------------------------------------------- reduction


@pytest.mark.parametrize("g", [1, 3])
def test_two_stage_finalize(monkeypatch, g):
    # chunks of 4 programs / rows per finalize program, then a pass over the chunk values
    x = softmax(3, g, 7, 10, seed=12)
    args = op_args(x, topk=2, window=1)
    one = run(args)
    two = check(args, monkeypatch, FINAL_CHUNK=4)
    assert_same(two, one, rtol=1e-12, atol=1e-12)


def test_deterministic():
    args = op_args(softmax(2, 3, 8, 24, seed=13), topk=3, window=2)
    a, b = run(args), run(args)
    for u, v in zip(a, b, strict=True):
        assert torch.equal(u, v)  # bitwise: fixed-order reductions, no atomics


def test_public_api_uses_the_triton_backend(backend):
    from fastdiag.ops import dist_stats

    backend("triton")
    x = softmax(2, 3, 5, 9, seed=14)
    out = dist_stats(x, reduce_dim=1, topk=2, rows=True, window=1)
    ref = dist_stats_torch(*op_args(x, topk=2, window=1))
    torch.testing.assert_close(out.sums, ref[0], rtol=1e-4, atol=1e-6)
    assert torch.equal(out.topk.reshape(-1, 2), ref[3])


# --------------------------------------------------------------------------- offsets


def test_int64_offsets_with_huge_strides():
    # every row offset of these views passes 2^31 elements while each stride fits int32, so
    # int32 row * stride arithmetic would wrap; the storage is 4 GiB of virtual memory, only
    # the three rows are touched
    n, step = 16, 2**30 + 1
    base = torch.empty(2 * step + n, dtype=torch.float16, device=DEV)
    vals = softmax(3, n, seed=15).half()
    for i in range(3):
        base[i * step : i * step + n] = vals[i]
    for shape, stride in (
        ((3, 1, 1, n), (step, 0, 0, 1)),
        ((1, 3, 1, n), (0, step, 0, 1)),
        ((1, 1, 3, n), (0, 0, step, 1)),
    ):
        x4 = base.as_strided(shape, stride)
        check(op_args(x4, topk=3, window=2))
    del base


def test_bad_topk_names_itself():
    with pytest.raises(ValueError, match="topk"):
        OP(*op_args(softmax(1, 1, 2, 20), topk=17))


# --------------------------------------------------------------------------- tracing


def test_opcheck():
    x = softmax(1, 2, 3, 6, seed=16)
    mask = torch.tensor([True, False, True], device=DEV)
    torch.library.opcheck(OP, op_args(x, topk=2, window=1))
    # opcheck compares outputs without equal_nan: no per-row outputs (NaN for masked rows)
    torch.library.opcheck(OP, op_args(x, mask=mask, topk=2, rows=False))


def test_torch_compile_fullgraph():
    x = softmax(2, 2, 3, 7, seed=17)
    args = op_args(x, topk=2, window=1)

    def step(t):
        return OP(t, *args[1:])

    # Inductor sees the kernels on CUDA; under the interpreter the op is opaque to it
    compiled = torch.compile(
        step, fullgraph=True, backend="inductor" if DEV == "cuda" else "aot_eager"
    )
    assert_same(compiled(x), run(args))


_TRACE_SCRIPT = textwrap.dedent(
    """
    import torch
    from torch._functorch.aot_autograd import aot_export_module
    from torch._subclasses.fake_tensor import FakeTensorMode
    from fastdiag.kernels import dist_stats as K
    OP = K.register(interpreting=False)

    hop = torch.ops.higher_order.triton_kernel_wrapper_functional
    src = lambda node: (node.args[0], node.args[1])  # getitem(call, key)
    for logits, n in ((False, 256), (True, 20000)):  # one tile; column blocks with 2 passes

        class M(torch.nn.Module):
            def forward(self, x, m):
                return OP(x, m, logits, 5, 0.1, 1e-6, 2, 0, 64, True)

        with FakeTensorMode():
            x = torch.empty(2, 4, 64, n, dtype=torch.bfloat16, device="cuda")
            m = torch.ones(128, dtype=torch.bool, device="cuda")
            gm, _ = aot_export_module(M(), (x, m), trace_joint=False)
        calls = [c for c in gm.graph.nodes if c.target is hop]
        assert len(calls) == 2, gm.code
        main, fin = calls
        for key in ("part_ptr", "hs_ptr", "valid_ptr"):
            assert src(fin.kwargs["kwargs"][key]) == (main, key), (key, gm.code)
        out = next(c for c in gm.graph.nodes if c.op == "output")
        outs = [src(o) for o in out.args[0]]
        for call, key in ((fin, "sums_ptr"), (fin, "head_ptr"), (main, "rows_ptr"), (main, "topk_ptr")):
            assert (call, key) in outs, (key, gm.code)
    print("OK")
    """
)


def test_triton_op_decomposes_into_its_kernels():
    # The compiled-Triton registration (a triton_op) traced on fake CUDA tensors, as
    # torch.compile does: each buffer must flow from the main kernel into the finalize kernel
    # (pointer arguments that share a tensor break this). Runs without a GPU, in a subprocess
    # because the registration is chosen when the module is imported.
    env = dict(os.environ, TRITON_INTERPRET="0")
    res = subprocess.run(
        [sys.executable, "-c", _TRACE_SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]


# --------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
def test_tensor_over_2_31_elements():
    n = 2048
    rows = 2**31 // n + 3  # 2^31 + 6144 bf16 elements (4 GiB)
    x = torch.full((1, 1, rows, n), 1.0 / n, dtype=torch.bfloat16, device="cuda")
    x[0, 0, -2] = 0
    x[0, 0, -2, 7] = 1  # a one-hot row past element 2^31
    out = OP(*op_args(x, topk=2))
    tail = out[2][-3:].cpu()
    assert tail[1, RowSlot.ENTROPY].item() == 0.0 and out[3][-2].tolist() == [7, 0]
    assert tail[0, RowSlot.ENTROPY].item() == pytest.approx(math.log(n), rel=1e-5)
    assert out[0][Slot.COUNT].item() == rows


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_gpu():
    x = softmax(2, 3, 4, 50, seed=18).to("cuda:1")
    args = op_args(x, topk=3, window=2)
    out = OP(*args)
    assert all(t.device == x.device for t in out)
    assert_same(out, dist_stats_torch(*args))


@pytest.mark.gpu
def test_benchmark_shape_matches_torch():
    # the GPU target shape class: bf16 attention, heads reduced while reading, N = 2048
    x = softmax(1, 16, 64, 2048, seed=19).bfloat16()
    args = op_args(x, topk=5, window=16)
    assert_same(OP(*args), dist_stats_torch(*args))
