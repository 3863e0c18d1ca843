"""fastdiag.ops.embedding_stats against float64 formulas on the finite rows."""

from __future__ import annotations

import math

import pytest
import torch

from fastdiag.ops import cosine_stats, embedding_stats
from fastdiag.ops.cosine import sample_rows
from tests.conftest import forbid_host_sync


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
