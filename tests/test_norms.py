"""fastdiag.ops.norms against float64 formulas."""

from __future__ import annotations

import math

import pytest
import torch

from fastdiag.ops import norms as fd_norms


def _norm64(t: torch.Tensor) -> float:
    return math.sqrt(float(t.double().square().sum()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_norm_above_float16_range(dtype):
    # ||t|| = 100 * 1000 = 1e5 > 65504: a norm computed in float16 reads inf
    t = torch.full((1000, 1000), 100.0, dtype=dtype)
    got = fd_norms.norms([t])
    assert got.dtype == torch.float64
    assert math.isfinite(float(got[0]))
    assert float(got[0]) == pytest.approx(_norm64(t), rel=1e-3)
    assert float(fd_norms.total_norm([t, t])) == pytest.approx(math.sqrt(2) * _norm64(t), rel=1e-3)


def test_mixed_dtypes_keep_input_order():
    g = torch.Generator().manual_seed(0)
    ts = [
        torch.randn(7, 3, generator=g),
        torch.randn(5, generator=g).to(torch.float16),
        torch.randn(4, 4, generator=g).double(),
        torch.randn(2, generator=g),
    ]
    got = fd_norms.norms(ts)
    want = torch.tensor([_norm64(t) for t in ts], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-6)


def test_diff_norms_and_nonfinite_counts():
    a = [torch.ones(3, 3), torch.full((4,), 2.0, dtype=torch.float16)]
    b = [torch.zeros(3, 3), torch.ones(4, dtype=torch.float16)]
    torch.testing.assert_close(
        fd_norms.diff_norms(a, b), torch.tensor([3.0, 2.0], dtype=torch.float64)
    )
    bad = torch.tensor([1.0, math.nan, math.inf, -math.inf, 0.0])
    torch.testing.assert_close(
        fd_norms.nonfinite_counts([bad, torch.arange(3)]),
        torch.tensor([3.0, 0.0], dtype=torch.float64),
    )
