"""fastdiag.ops.embedding_stats against float64 formulas on the finite rows; its C++ op (cpu
backend) against the torch implementation; no host synchronisation."""

from __future__ import annotations

import math

import pytest
import torch

from fastdiag.ops import cosine_stats, embedding_stats
from fastdiag.ops.cosine import sample_rows
from fastdiag.ops.embedding import embedding_raw
from tests.conftest import available_backends, forbid_host_sync


def golden(rows: torch.Tensor) -> dict[str, float]:
    """The statistics of the finite rows of ``rows`` [M, D] in float64, dense."""
    r = rows.to(torch.float64)
    finite = r[torch.isfinite(r).all(1)]
    n = finite.shape[0]
    out = {
        "variance": finite.var(0, unbiased=True).mean().item() if n > 1 else math.nan,
        "norm_mean": finite.norm(dim=1).mean().item(),
        "nonfinite_rows": rows.shape[0] - n,
    }
    if n > 1:
        norms = finite.norm(dim=1)
        cos = finite @ finite.T / (norms[:, None] * norms[None, :] + 1e-8)
        off = cos[~torch.eye(n, dtype=torch.bool)]
        out["cosine_mean"], out["cosine_max"] = off.mean().item(), off.max().item()
    else:
        out["cosine_mean"] = out["cosine_max"] = math.nan
    return out


def check(got, want: dict[str, float], rel: float = 1e-5) -> None:
    for key, value in want.items():
        assert getattr(got, key).item() == pytest.approx(value, rel=rel, abs=1e-7, nan_ok=True), key


def test_exact_matches_dense(backend):
    backend("auto")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 40, 16, generator=g) + 0.5
    got = embedding_stats(x, sample=None)
    check(got, golden(x.reshape(-1, 16)))
    assert got.finite_rows.shape == (120, 16)
    assert got.variance.dtype == torch.float64


def test_nonfinite_rows_are_excluded():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(50, 8, generator=g)
    x[3, 2] = float("nan")
    x[7, 0] = float("inf")
    got = embedding_stats(x, sample=None)
    check(got, golden(x))
    assert got.nonfinite_rows.item() == 2
    assert (got.finite_rows[3] == 0).all() and (got.finite_rows[7] == 0).all()
    assert torch.equal(got.finite_rows[0], x[0])


def test_sampled_is_the_sample_rows_draw():
    x = torch.randn(300, 12, generator=torch.Generator().manual_seed(2))
    got = embedding_stats(x, sample=100, generator=torch.Generator().manual_seed(7))
    idx = sample_rows(300, 100, torch.Generator().manual_seed(7))
    want = cosine_stats(x[idx])
    assert got.cosine_mean.item() == pytest.approx(want.mean.item(), rel=1e-6)
    assert got.cosine_max.item() == pytest.approx(want.max.item(), rel=1e-6)
    assert got.variance.item() == pytest.approx(golden(x)["variance"], rel=1e-5)  # all rows


def test_degenerate_sizes():
    one = embedding_stats(torch.ones(1, 4))
    assert math.isnan(one.variance.item()) and math.isnan(one.cosine_mean.item())
    assert one.norm_mean.item() == pytest.approx(2.0)
    x = torch.ones(3, 4)
    x[1:] = float("nan")  # one finite row: no pair
    got = embedding_stats(x, sample=None)
    assert math.isnan(got.cosine_mean.item()) and math.isnan(got.variance.item())
    assert got.nonfinite_rows.item() == 2


def test_half_input():
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    got = embedding_stats(x, sample=None)
    check(got, golden(x.float()))
    assert got.finite_rows.dtype == torch.float32


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        ({"x": [1.0]}, TypeError, "torch.Tensor"),
        ({"x": torch.ones(3, dtype=torch.int64)}, ValueError, "floating-point"),
        ({"x": torch.ones(3, 4), "sample": 1}, ValueError, "sample"),
        ({"x": torch.ones(3, 4), "sample": True}, ValueError, "sample"),
    ],
)
def test_bad_arguments(kwargs, err, match):
    with pytest.raises(err, match=match):
        embedding_stats(**kwargs)


def test_no_host_transfer():
    x = torch.randn(200, 16)
    embedding_stats(x, generator=torch.Generator().manual_seed(0))
    with forbid_host_sync():
        embedding_stats(x, generator=torch.Generator().manual_seed(0))
        embedding_stats(x, sample=None)


# ---- the C++ op (cpu backend) against the torch implementation --------------------------------

needs_cpu_op = pytest.mark.skipif("cpu" not in available_backends("cpu"), reason="needs the C++ extension")


def both_backends(x, perm, sample):
    from fastdiag import backends

    table = backends.table("embedding_stats")
    return table["cpu"].load()(x, perm, sample), table["torch"].load()(x, perm, sample)


def inputs():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 30, 12, generator=g) + 0.2
    nan_rows = x.clone()
    nan_rows[0, 3, 1] = float("nan")
    nan_rows[2, 7, 0] = float("-inf")
    nan_rows[3, :, :] = float("nan")  # a whole matrix
    zero_rows = x.clone()
    zero_rows[1, 2] = 0.0
    zero_rows[1, 5] = 0.0
    dup = x.clone()
    dup[0, 1] = dup[0, 0] * 3.0  # cosine max 1
    return {
        "plain": x,
        "nan_rows": nan_rows,
        "zero_rows": zero_rows,
        "duplicate": dup,
        "d1": torch.randn(25, 1, generator=g),
        "m1": torch.randn(1, 6, generator=g),
        "m1_nan": torch.full((1, 6), float("nan")),
        "m0": torch.zeros(0, 3),
        "all_nan": torch.full((5, 4), float("nan")),
        "one_finite": torch.cat([torch.ones(1, 4), torch.full((3, 4), float("inf"))]),
        "float64": x.double(),
        "bfloat16": x.to(torch.bfloat16),
        "float16": nan_rows.half(),
        "noncontiguous": x.transpose(0, 1),
    }


@needs_cpu_op
@pytest.mark.parametrize("case", list(inputs()))
@pytest.mark.parametrize("draw", ["all", "sample", "sample_all"])
def test_cpu_op_matches_torch(case, draw):
    x = inputs()[case]
    m = x.numel() // x.shape[-1]
    perm, sample = None, 0
    if draw != "all" and m >= 2:
        perm = torch.randperm(m, generator=torch.Generator().manual_seed(9))
        sample = 7 if draw == "sample" else m + 5
    (v, clean), (tv, tclean) = both_backends(x, perm, sample)
    assert v.dtype == tv.dtype == torch.float64 and v.shape == tv.shape == (5,)
    torch.testing.assert_close(v, tv, rtol=2e-5, atol=1e-6, equal_nan=True)
    assert clean.dtype == tclean.dtype and clean.shape == x.shape
    assert torch.equal(clean, tclean)


@needs_cpu_op
def test_cpu_op_is_deterministic_and_thread_independent():
    x = torch.randn(3000, 40, generator=torch.Generator().manual_seed(11))
    x[17] = float("nan")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        (one, _), _ = both_backends(x, None, 0)
        torch.set_num_threads(max(2, threads))
        (many, _), _ = both_backends(x, None, 0)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one.isnan(), many.isnan())
    assert torch.equal(torch.nan_to_num(one), torch.nan_to_num(many))


@pytest.mark.parametrize("name", available_backends("cpu"))
def test_backends_agree_with_golden_under_no_host_sync(backend, name):
    backend(name)
    x = inputs()["nan_rows"]
    embedding_stats(x, sample=None)
    with forbid_host_sync():
        got = embedding_stats(x, sample=None)
        raw, clean = embedding_raw(x, generator=torch.Generator().manual_seed(0))
    check(got, golden(x.reshape(-1, 12)))
    assert clean.shape == x.shape and raw.shape == (5,)
    assert got.nonfinite_rows.item() == 32


@pytest.mark.parametrize("name", available_backends("cpu"))
def test_draw_is_the_original_rng_stream(backend, name):
    """The same rows as ``sample_rows`` and the generator advanced exactly as by it."""
    backend(name)
    x = torch.randn(150, 8, generator=torch.Generator().manual_seed(4))
    g1, g2 = torch.Generator().manual_seed(8), torch.Generator().manual_seed(8)
    got = embedding_stats(x, sample=20, generator=g1)
    want = cosine_stats(x[sample_rows(150, 20, g2)])
    assert got.cosine_mean.item() == pytest.approx(want.mean.item(), rel=1e-5)
    assert got.cosine_max.item() == pytest.approx(want.max.item(), rel=1e-5)
    assert torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g2))


def test_requires_grad_input():
    x = torch.randn(10, 4, requires_grad=True)
    got = embedding_stats(x, sample=None)
    assert not got.finite_rows.requires_grad
    check(got, golden(x.detach()))


@needs_cpu_op
def test_torch_compile_fullgraph_cpu_op(backend):
    backend("cpu")
    x = torch.randn(2, 9, 5)
    torch._dynamo.reset()
    got = torch.compile(lambda t: embedding_raw(t, sample=None), fullgraph=True, backend="aot_eager")(x)
    want = embedding_raw(x, sample=None)
    torch.testing.assert_close(got[0], want[0], equal_nan=True)
    torch.testing.assert_close(got[1], want[1])


# ----------------------------------------------------------------------------------------------
# scale (case 11b of the reliability issue)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", available_backends("cpu"))
@pytest.mark.parametrize(
    "scale, dtype", [(1e19, torch.float32), (1e30, torch.float32), (1e-30, torch.float32), (1e200, torch.float64)]
)
@pytest.mark.parametrize("m", [10, 64])  # 64 rows: the C++ op's Gram matrix goes through a GEMM
def test_huge_and_tiny_scales_against_float64(backend, name, scale, dtype, m):
    """Finite rows stay finite at any scale (the squared norm of 1e19 rows overflows float32);
    every value against the float64 formulas, returned in float64: the variance of 1e19 data is
    ~1e38 and of 1e30 data ~1e60 (finite), of float64 1e200 data inf (1e400 is not representable)."""
    backend(name)
    x = (torch.randn(m, 64, generator=torch.Generator().manual_seed(13), dtype=torch.float64) * scale).to(dtype)
    want = golden(x)
    if dtype == torch.float64:  # the oracle's own float64 norms overflow: from x / scale, exactly rescaled
        want = golden(x / scale)
        want["norm_mean"] *= scale
        want["variance"] *= scale * scale  # inf: 1e400 is not a float64
    assert want["nonfinite_rows"] == 0
    for sample in (None, 100):
        got = embedding_stats(x, sample=sample, generator=torch.Generator().manual_seed(1))
        assert got.nonfinite_rows.item() == 0
        assert got.variance.dtype == torch.float64
        for key in ("variance", "norm_mean"):
            assert getattr(got, key).item() == pytest.approx(want[key], rel=1e-5), key
        for key in ("cosine_mean", "cosine_max"):  # cosines in [-1, 1]: float32 absolute error
            assert getattr(got, key).item() == pytest.approx(want[key], rel=1e-4, abs=1e-6), key
        assert torch.equal(got.finite_rows, x.reshape(-1, 64))
