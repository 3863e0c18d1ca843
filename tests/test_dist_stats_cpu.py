"""The C++ op ``fastdiag::dist_stats_cpu`` against the torch backend (the executable spec).

Both ops are called on the canonical [A, G, C, N] view with the same arguments; every output
must agree: top-k indices and counts exactly, float values to rel 1e-4 / abs 1e-6 per row
(sums of R rows: abs 1e-6 * R), NaN rows and -1 top-k at the same places.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from fastdiag import _extension, backends
from fastdiag.ops import _dist_stats_layout as layout
from fastdiag.ops._dist_stats import HeadSlot, RowSlot, Slot, dist_stats
from fastdiag.ops._dist_stats_torch import dist_stats_torch
from tests.conftest import op_args

RTOL, ATOL = 1e-4, 1e-6
COUNT_SLOTS = [Slot.COUNT, Slot.GT_TAU, Slot.GT_EPS, Slot.NONFINITE, Slot.MASKED]


@pytest.fixture(scope="module")
def op():
    """The C++ op; skipped without a toolchain, a failure when a toolchain cannot build it."""
    from torch.utils import cpp_extension

    if _extension.load() is None:
        if shutil.which("c++") is None or not cpp_extension.is_ninja_available():
            pytest.skip("no C++ compiler or ninja: the cpu backend is unavailable")
        pytest.fail("a C++ toolchain is present but the fastdiag extension did not build")
    return torch.ops.fastdiag.dist_stats_cpu.default


def compare(op, a, exact_counts=True):
    """Runs both ops on the argument tuple ``a`` and asserts that they agree."""
    want = dist_stats_torch(*a)
    got = op(*a)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
    sums, head, rows, top = got
    wsums, whead, wrows, wtop = want
    n_rows = max(1, int(wsums[Slot.COUNT]))  # host ok (test)
    torch.testing.assert_close(sums, wsums, rtol=RTOL, atol=ATOL * n_rows)
    torch.testing.assert_close(head, whead, rtol=RTOL, atol=ATOL * n_rows)
    if exact_counts:
        assert torch.equal(sums[COUNT_SLOTS], wsums[COUNT_SLOTS])
        assert torch.equal(head[:, HeadSlot.GT_TAU], whead[:, HeadSlot.GT_TAU])
    else:  # logits: p differs from torch's by an ulp, an entry sitting on tau may flip
        assert torch.equal(
            sums[[Slot.COUNT, Slot.NONFINITE, Slot.MASKED]],
            wsums[[Slot.COUNT, Slot.NONFINITE, Slot.MASKED]],
        )
    torch.testing.assert_close(rows, wrows, rtol=RTOL, atol=ATOL, equal_nan=True)
    assert torch.equal(rows.isnan(), wrows.isnan())
    assert torch.equal(top, wtop)
    return got


def softmax(*shape, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).softmax(-1)


def logits(*shape, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


@pytest.mark.parametrize("n", [1, 7, 16, 17, 128, 1000, 5000])
@pytest.mark.parametrize("g", [1, 3])
def test_random_softmax_rows(op, n, g):
    x4 = softmax(2, g, 24 if n < 5000 else 6, n, seed=n)
    k = min(n, 5)
    compare(op, op_args(x4, topk=k, window=2))
    compare(
        op,
        op_args(logits(2, g, 24 if n < 5000 else 6, n, seed=n), logits=True, topk=k, window=2),
        exact_counts=False,
    )


def test_zeros_one_hot_and_ties(op):
    n = 40
    x = torch.zeros(6, n)
    x[1, 7] = 1.0  # one-hot
    x[2] = 1.0 / n  # uniform: every entry ties
    x[3, ::4] = 0.1  # ten-way tie
    x[4] = torch.arange(n) % 3 / 39.0  # repeated levels
    x[5, [3, 9, 31]] = torch.tensor([0.5, 0.25, 0.25])  # two tied runners-up
    out = compare(op, op_args(x.view(1, 1, 6, n), topk=16, window=3))
    assert out[2][1, RowSlot.ENTROPY] == 0.0  # one-hot: exactly 0 nats
    assert out[3][2].tolist() == list(range(16))  # ties to the lower index
    assert out[3][5, :3].tolist() == [3, 9, 31]


@pytest.mark.parametrize("k", [2, 5, 16])
def test_many_top_candidates(op, k):
    """Flat rows and wide ties: more than 16 (and more than 64) entries reach the top-k floor."""
    x = torch.full((6, 200), 1 / 200)  # every entry ties
    x[1, 50:90] = 0.01  # 40 tied maxima
    x[2, ::3] = 0.009  # 67 tied maxima
    x[3] = torch.linspace(0.0, 0.01, 200)  # ascending: every entry beats the previous ones
    x[4] = torch.linspace(0.01, 0.0, 200)
    x[5] = torch.rand(200, generator=torch.Generator().manual_seed(3)).round(decimals=1)
    got = compare(op, op_args(x.view(1, 1, 6, 200), topk=k))
    assert got[3][0].tolist() == list(range(k))
    assert got[3][3].tolist() == list(range(199, 199 - k, -1))
    compare(op, op_args(torch.zeros(1, 2, 3, 200), logits=True, topk=k), exact_counts=False)


def test_ties_in_head_mean_and_logits(op):
    lev = torch.randint(0, 4, (3, 2, 9, 64), generator=torch.Generator().manual_seed(1)).float()
    compare(op, op_args(lev / lev.sum(-1, keepdim=True).clamp_min(1), topk=16))
    compare(op, op_args(lev, logits=True, topk=16), exact_counts=False)  # equal logits tie exactly


@pytest.mark.parametrize("g", [1, 3, 12])
@pytest.mark.parametrize("from_logits", [False, True])
def test_without_heads_bit_identical(op, g, from_logits):
    """want_heads=False: sums, rows and top-k bit-identical to want_heads=True (same row blocks,
    same head-mean arithmetic), head_sums NaN; non-finite heads, masked rows, ties, a finite
    3e38 entry whose square overflows (the row stays valid), bf16 and strided inputs."""
    x4 = logits(3, g, 40, 77, seed=g) if from_logits else softmax(3, g, 40, 77, seed=g)
    x4[0, 0, 3, 5] = float("nan")
    x4[1, g - 1, 7, 0] = float("inf")
    x4[2, 0, 9, :] = 0.5  # ties
    if not from_logits:
        x4[2, g - 1, 11, 3] = 3e38
    mask = torch.rand(120, generator=torch.Generator().manual_seed(g)) > 0.2
    mask[[3, 40 + 7, 2 * 40 + 11]] = True  # the non-finite rows and the 3e38 one
    strided = x4.transpose(0, 2).contiguous().transpose(0, 2)  # same shape, C stride 1
    for x, m in ((x4, mask), (x4.to(torch.bfloat16), None), (strided, mask)):
        on = op(*op_args(x, mask=m, logits=from_logits, topk=5, window=3), True)
        off = op(*op_args(x, mask=m, logits=from_logits, topk=5, window=3), False)
        assert torch.equal(on[0], off[0])
        assert torch.equal(on[2].nan_to_num(7.0), off[2].nan_to_num(7.0))
        assert torch.equal(on[3], off[3])
        assert off[1].shape == on[1].shape == (x.shape[1], HeadSlot.NUM)
        assert off[1].isnan().all() and not on[1].isnan().any()
        if m is not None:
            assert on[0][Slot.NONFINITE] >= 2
            if not from_logits:
                assert not on[2][2 * 40 + 11].isnan().any()  # 3e38: valid either way
    x4[2, g - 1, 11, 3] = 0.0  # against the torch backend: no 3e38 (its masses differ)
    want = dist_stats_torch(*op_args(x4, mask=mask, logits=from_logits, topk=5, window=3), False)
    got = op(*op_args(x4, mask=mask, logits=from_logits, topk=5, window=3), False)
    torch.testing.assert_close(got[0], want[0], rtol=RTOL, atol=ATOL * 120)
    torch.testing.assert_close(got[1], want[1], equal_nan=True)
    assert torch.equal(got[3], want[3])


def test_single_key(op):
    got = compare(op, op_args(torch.ones(2, 1, 5, 1), topk=1, window=0))
    assert torch.equal(got[2][:, RowSlot.ENTROPY], torch.zeros(10))
    assert torch.equal(got[3], torch.zeros(10, 1, dtype=torch.int64))


@pytest.mark.parametrize("k", range(1, 17))
def test_every_topk(op, k):
    compare(op, op_args(softmax(1, 2, 12, 100, seed=k), topk=k))


def test_non_contiguous_strides(op):
    x4 = softmax(3, 20, 4, 33, seed=2).permute(
        0, 2, 1, 3
    )  # [A, G, C, N]: G stride 33, C stride 132
    assert not x4.is_contiguous()
    compare(op, op_args(x4, topk=4, window=5))
    xt = softmax(3, 4, 33, 20, seed=2).transpose(
        -1, -2
    )  # last-axis stride 20 (rows not normalised)
    compare(op, op_args(xt, topk=4, window=5))
    sliced = softmax(2, 3, 10, 64, seed=3)[:, :, 1::2, ::2]  # every stride unusual
    compare(op, op_args(sliced, topk=3))
    expanded = softmax(1, 1, 1, 50, seed=4).expand(2, 3, 5, 50)  # zero strides
    compare(op, op_args(expanded, topk=5))
    compare(
        op,
        op_args(logits(2, 3, 10, 64, seed=5)[:, :, 1::2, ::2], logits=True, topk=3),
        exact_counts=False,
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_dtypes(op, dtype):
    for n in (5, 37, 300):  # vector body and tail of the conversion loops
        compare(op, op_args(softmax(2, 3, 7, n, seed=n).to(dtype), topk=5, window=1))
        compare(
            op, op_args(logits(2, 3, 7, n, seed=n).to(dtype), logits=True, topk=5), exact_counts=False
        )
        compare(op, op_args(softmax(2, 3, 14, 2 * n, seed=n).to(dtype)[..., ::2], topk=5))


def test_half_specials_convert_exactly(op):
    vals = torch.tensor(
        [0.0, -0.0, 6e-8, 1e-5, 0.5, 65504.0, 2.0**-14, 1.0 - 2.0**-11], dtype=torch.float16
    )
    x = vals.repeat(3, 4).view(1, 1, 3, 32)
    compare(op, op_args(x, topk=8))  # includes fp16 subnormals (6e-8)
    bad = x.clone()
    bad[0, 0, 1, 3] = float("inf")
    bad[0, 0, 2, 20] = float("nan")
    got = compare(op, op_args(bad, topk=2))
    assert got[0][Slot.NONFINITE] == 2


def test_logits_with_masked_keys(op):
    x = logits(2, 3, 16, 50, seed=6)
    x[..., 10:20] = float("-inf")  # masked keys: probability exactly 0
    x[0, :, 3, :] = float("-inf")  # whole row -inf in every head: invalid
    x[1, 1, 4, :] = float("-inf")  # one head all -inf: the row is invalid
    x[1, 0, 5, 7] = float("inf")  # +inf: invalid
    x[0, 2, 6, 1] = float("nan")
    x[1, 2, 8, :] = -1e30  # huge but finite, equal: uniform
    got = compare(op, op_args(x, logits=True, topk=6, window=4), exact_counts=False)
    assert got[0][Slot.NONFINITE] == 4
    assert torch.all(got[3][[3, 16 + 4, 16 + 5, 6]] == -1)


def test_masks_and_nonfinite_probability_rows(op):
    x = softmax(3, 2, 11, 40, seed=7)
    x[0, 0, 2, 5] = float("nan")
    x[1, 1, 3, 0] = float("inf")
    x[2, 0, 4, 39] = float("-inf")
    x[2, 1, 5, 9] = 3e38  # finite, but its square overflows: still a valid row
    mask = torch.ones(33, dtype=torch.bool)
    mask[[0, 13, 14, 32]] = False
    mask[11 + 3] = False  # the inf row, masked: counted as masked, not non-finite
    got = compare(op, op_args(x, mask=mask, topk=3, window=2))
    assert got[0][Slot.MASKED] == 4 and got[0][Slot.NONFINITE] == 2
    assert not got[2][22 + 5].isnan().any()  # 3e38: sumsq overflows to inf, the row stays valid
    compare(op, op_args(x, mask=torch.zeros(33, dtype=torch.bool), topk=3))  # nothing valid
    compare(op, op_args(x, mask=mask.to(torch.uint8).bool(), logits=True, topk=3), exact_counts=False)


@pytest.mark.parametrize("g", [2, 8, 12, 16])
def test_reduce_over_heads(op, g):
    compare(op, op_args(softmax(2, g, 9, 70, seed=g), topk=5, window=3))


@pytest.mark.parametrize(
    "window, qoff, qlen",
    [
        (0, 0, None),
        (3, 0, None),
        (2, 5, None),
        (1, -3, None),
        (100, 0, 4),
        (2, 7, 1),
        (0, 2**40, None),
        (2**62, -(2**62), None),
    ],
)
def test_window_and_query_offset(op, window, qoff, qlen):
    compare(op, op_args(softmax(2, 2, 12, 30, seed=8), topk=2, window=window, qoff=qoff, qlen=qlen))
    compare(op, op_args(softmax(2, 2, 12, 30, seed=8), window=-1, qoff=qoff, qlen=qlen, rows=False))


def test_empty_rows(op):
    for shape in [(0, 2, 3, 5), (2, 2, 0, 5)]:
        got = compare(op, op_args(torch.rand(shape), topk=2))
        assert got[3].shape == (0, 2)


def test_schema_matches_the_shared_one(op):
    want = torch._C.parse_schema("fastdiag::dist_stats_cpu" + layout.SCHEMA)
    assert str(op._schema) == str(want)


def test_opcheck(op):
    x4 = softmax(3, 2, 4, 6, seed=9)
    mask = torch.ones(12, dtype=torch.bool)
    torch.library.opcheck(op, (x4, mask, False, 2, 0.1, 1e-6, 1, 0, 4, True))
    mask[5] = False  # rows=False: opcheck compares NaN rows as unequal
    torch.library.opcheck(op, (x4.to(torch.bfloat16), mask, True, 3, 0.1, 1e-6, -1, 2, 4, False))
    torch.library.opcheck(op, (x4.transpose(1, 2), None, False, 1, 0.2, 1e-3, 0, 0, 2, False))
    # want_heads=False: NaN head_sums compare unequal in opcheck, so schema and fake only
    torch.library.opcheck(
        op,
        (x4, mask, False, 2, 0.1, 1e-6, 1, 0, 4, False, False),
        test_utils=("test_schema", "test_faketensor"),
    )


def test_deterministic_across_thread_counts(op):
    x4 = softmax(4, 3, 700, 64, seed=10)  # 2800 rows: several row blocks
    a = op_args(x4, topk=5, window=3)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(op(*a))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for u, v in zip(results[0], other, strict=True):
            assert torch.equal(u, v)


def test_bad_arguments_raise(op):
    x4 = softmax(1, 1, 2, 4)
    with pytest.raises(RuntimeError, match="topk"):
        op(*op_args(x4, topk=5))
    with pytest.raises(RuntimeError, match="4-D"):
        op(x4[0], None, False, 1, 0.1, 1e-6, -1, 0, 2, False)
    with pytest.raises(RuntimeError, match="row_mask"):
        op(*op_args(x4, mask=torch.ones(3, dtype=torch.bool)))
    with pytest.raises(RuntimeError, match="dtype|float32"):
        op(*op_args(x4.to(torch.int32)))


def test_public_api_on_the_cpu_backend(op, backend):
    x = softmax(2, 4, 10, 30, seed=11)
    mask = torch.rand(2, 10, generator=torch.Generator().manual_seed(0)) > 0.2
    kw = dict(reduce_dim=1, topk=4, row_mask=mask, window=2, query_offset=1, rows=True)
    backend("torch")
    want = dist_stats(x, **kw)
    backend("cpu")
    assert backends.resolve("dist_stats", "cpu", torch.float32) == "cpu"
    got = dist_stats(x, **kw)
    torch.testing.assert_close(got.sums, want.sums, rtol=RTOL, atol=ATOL * 20)
    torch.testing.assert_close(got.head_sums, want.head_sums, rtol=RTOL, atol=ATOL * 20)
    torch.testing.assert_close(got.rows, want.rows, rtol=RTOL, atol=ATOL, equal_nan=True)
    assert torch.equal(got.topk, want.topk)
