"""fastdiag.ops.spectral_stats / effective_rank against numpy.linalg.svd in float64.

The C++ op (``fastdiag::spectral_stats``, the math of csrc/spectral.h) runs on CPU tensors with
both eigenvalue methods: "jacobi" (the CUDA kernel's method) and "tridiagonal" (the CPU default).
The torch path (LAPACK eigvalsh, and the batched torch Jacobi used for CUDA tensors without the
extension) is checked against the same golden values.
"""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import pytest
import torch

import fastdiag
from fastdiag import _extension, backends
from fastdiag.ops import spectral
from fastdiag.ops.spectral import (
    SpectralStats,
    effective_rank,
    jacobi_eigvalsh_torch,
    spectral_raw,
    spectral_stats,
    spectral_torch,
    torch_jacobi_sweeps,
)
from tests.conftest import forbid_cuda_sync, forbid_host_sync

MAX_SWEEPS = 40  # csrc/spectral.h: kMaxSweeps


def _have_toolchain() -> bool:
    from torch.utils import cpp_extension

    return bool(shutil.which("c++") or shutil.which("g++")) and cpp_extension.is_ninja_available()


@pytest.fixture(scope="module")
def loaded():
    """The C++ op; a build failure fails the tests (skip only without a compiler / ninja)."""
    if not _have_toolchain():
        pytest.skip("no C++ compiler or ninja: the extension cannot be built here")
    backends.load_extension()
    op = _extension.op("spectral_stats")
    assert op is not None, "the C++ extension failed to build or load (see the warning)"
    return op


class MethodOp:
    """The C++ op with its eigenvalue method bound: ``op(x)`` -> the op's four outputs."""

    def __init__(self, op, method: str) -> None:
        self.op, self.method = op, method

    def __call__(self, x: torch.Tensor) -> tuple:
        return self.op(x, self.method)

    def check_iterations(self, iterations: torch.Tensor, n: int, low: int, high: int) -> None:
        """Jacobi ran low..high sweeps; the tridiagonal QR took at most 3 n steps (about 1.7 n
        for random matrices; the give-up bound is 30 n)."""
        if self.method == "jacobi":
            assert ((iterations >= low) & (iterations <= high)).all(), iterations
        else:
            assert ((iterations >= 0) & (iterations <= 3 * n)).all(), iterations


@pytest.fixture(params=["jacobi", "tridiagonal"])
def op(loaded, request):
    return MethodOp(loaded, request.param)


def golden(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(stats [..., 5], sigma [..., r]) from numpy's float64 SVD of x's values."""
    xs = x.detach().to(torch.float64).numpy()
    sig = np.linalg.svd(xs, compute_uv=False)
    total = sig.sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = sig / total[..., None]
        plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
        erank = np.exp(-plogp.sum(-1))
        r = sig.shape[-1]
        smax, smin = sig.max(-1), sig.min(-1)
        cond = np.where(smin > 0, smax / np.where(smin > 0, smin, 1.0), np.inf)
        stats = np.stack(
            [erank, erank / r, smax / total, (sig**2).sum(-1) / smax**2, cond], axis=-1
        )
    return stats, sig


def check(out: tuple, x: torch.Tensor, *, rel: float = 1e-5, cond_rel: float = 1e-6) -> None:
    stats, sigma, nonfinite, _ = out
    want, want_sig = golden(x)
    got = stats.numpy()
    np.testing.assert_allclose(got[..., 0], want[..., 0], rtol=rel)  # effective rank
    np.testing.assert_allclose(got[..., 1], want[..., 1], rtol=rel)
    np.testing.assert_allclose(got[..., 2], want[..., 2], rtol=1e-6)  # top-1 share
    np.testing.assert_allclose(got[..., 3], want[..., 3], rtol=1e-6)  # stable rank
    np.testing.assert_allclose(got[..., 4], want[..., 4], rtol=cond_rel)
    scale = want_sig[..., :1]
    np.testing.assert_allclose(sigma.numpy() / scale, want_sig / scale, atol=1e-9)
    assert (nonfinite == 0).all()


def gaussian(*shape: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def with_spectrum(rows: int, cols: int, sig: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """U diag(sig) V^T with Haar-random orthonormal U [rows, r], V [cols, r] (float64)."""
    g = torch.Generator().manual_seed(seed)
    r = sig.numel()
    u, _ = torch.linalg.qr(torch.randn(rows, r, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, r, generator=g, dtype=torch.float64))
    return (u * sig) @ v.T


# ---- the C++ op against numpy ------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape", [(40, 90), (90, 40), (64, 64), (1, 9), (9, 1), (1, 1), (3, 200), (200, 3), (33, 31)]
)
def test_gaussian_shapes(op, shape):
    x = gaussian(*shape)
    check(op(x), x)


def test_batched_leading_dims_and_strides(op):
    x = gaussian(2, 3, 20, 50)
    check(op(x), x)
    xt = gaussian(2, 50, 20).transpose(-1, -2)  # short side contiguous
    check(op(xt), xt)
    xs = gaussian(4, 40, 60)[::2, ::3, 1::2]  # arbitrary strides
    assert not xs.is_contiguous()
    check(op(xs), xs)


def test_identity_and_orthogonal_rows(op):
    for n in (1, 2, 17, 64):
        stats, sigma, _, iterations = op(torch.eye(n))
        np.testing.assert_allclose(stats.numpy(), [n, 1.0, 1.0 / n, n, 1.0], rtol=1e-12)
        one = 1 if n > 1 else 0
        op.check_iterations(iterations, n, one, one)  # one sweep finds every pair orthogonal
        if op.method == "tridiagonal":
            assert iterations.item() == 0  # already diagonal: no QR step
    q, _ = torch.linalg.qr(gaussian(100, 30, dtype=torch.float64))
    x = (3.0 * q.T).to(torch.float32)  # 30 orthogonal rows of length 3 in R^100
    stats, *_ = op(x)
    np.testing.assert_allclose(stats[0].item(), 30.0, rtol=1e-6)
    check(op(x), x)


def test_rank_one(op):
    # integer entries: the product is exact in float32, so numpy sees exactly rank one
    g = torch.Generator().manual_seed(3)
    u = torch.randint(-3, 4, (50, 1), generator=g).float()
    v = torch.randint(-3, 4, (1, 80), generator=g).float()
    u[0, 0], v[0, 0] = 2.0, 1.0  # not all zero
    x = u @ v
    stats, sigma, _, _ = op(x)
    assert stats[0].item() == pytest.approx(1.0, rel=1e-12)
    assert stats[2].item() == pytest.approx(1.0, rel=1e-12)
    assert stats[3].item() == pytest.approx(1.0, rel=1e-12)
    assert stats[4].item() == float("inf")
    want_sig = np.linalg.svd(x.double().numpy(), compute_uv=False)
    assert sigma[0].item() == pytest.approx(want_sig[0], rel=1e-12)
    assert (sigma[1:] == 0).all()


def test_rank_k_with_noise(op):
    for seed, (rows, cols, k) in enumerate([(64, 200, 5), (120, 48, 10)]):
        sig = torch.tensor([10.0, 7, 5, 3, 2, 1.5, 1.2, 1.0, 0.8, 0.5][:k], dtype=torch.float64)
        x = with_spectrum(rows, cols, sig, seed) + 1e-3 * gaussian(rows, cols, seed=seed + 9)
        x = x.to(torch.float32)
        check(op(x), x)


def test_ill_conditioned(op):
    n = 48
    # condition 1e4: every singular value is resolved
    x4 = with_spectrum(n, 80, torch.logspace(0, -4, n, dtype=torch.float64), 1)
    check(op(x4), x4)
    check(op(x4.float()), x4.float(), cond_rel=1e-5)
    # condition 1e8: values below ~sqrt(n eps64) sigma_1 are at the Gram's rounding level and
    # read as 0 (documented), so the condition number is >= 1e7 or inf; every other statistic
    # matches numpy.
    for dtype in (torch.float64, torch.float32):
        x8 = with_spectrum(n, 80, torch.logspace(0, -8, n, dtype=torch.float64), 2).to(dtype)
        stats, sigma, _, iterations = op(x8)
        want, want_sig = golden(x8)
        np.testing.assert_allclose(stats[:4].numpy(), want[:4], rtol=1e-5)
        assert stats[4].item() >= 1e7
        # relative error of sigma_i from the Gram: ~eps64 (sigma_1 / sigma_i)^2
        resolved = want_sig > 1e-3 * want_sig[0]
        np.testing.assert_allclose(sigma.numpy()[resolved], want_sig[resolved], rtol=1e-7)
        op.check_iterations(iterations, n, 1, 15)


def test_mixed_batch(op):
    x = gaussian(5, 12, 30)
    x[1] = 0.0  # all-zero matrix
    x[2, 3, 4] = float("nan")
    x[2, 5, 6] = float("inf")
    x[3] = torch.eye(12, 30)
    x[4, :, :] = x[4, :1, :]  # identical rows: rank one
    stats, sigma, nonfinite, iterations = op(x)
    assert nonfinite.tolist() == [0, 0, 2, 0, 0]
    # zero matrix: effective rank 0 (not NaN), condition inf
    assert stats[1].tolist() == [0.0, 0.0, 0.0, 0.0, float("inf")]
    assert (sigma[1] == 0).all()
    # the NaN matrix is NaN and only it
    assert torch.isnan(stats[2]).all() and torch.isnan(sigma[2]).all()
    good = [0, 3]
    check((stats[good], sigma[good], nonfinite[good], iterations[good]), x[good])
    assert iterations[1].item() == 0 and iterations[2].item() == 0  # zero, non-finite
    assert stats[4, 0].item() == pytest.approx(1.0, rel=1e-12)


def test_bitwise_independent_of_batch_and_threads(op):
    """Each matrix's arithmetic is the same alone, in any group of the interleaved QR, and on
    any number of threads."""
    x = gaussian(7, 20, 33)  # 7: groups of 4 and a remainder of 3
    x[2] = 0.0
    x[5, 1, 1] = float("nan")
    whole = op(x)
    alone = [op(x[b : b + 1]) for b in range(7)]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = op(x)
    finally:
        torch.set_num_threads(threads)
    for i, out in enumerate(whole):
        exact = {"rtol": 0, "atol": 0, "equal_nan": True}
        torch.testing.assert_close(torch.cat([a[i] for a in alone]), out, **exact)
        torch.testing.assert_close(serial[i], out, **exact)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs(op, dtype):
    x = gaussian(3, 24, 70).to(dtype)
    check(op(x), x)  # golden on the same (rounded) values


def test_iteration_count_is_bounded(op):
    cases = [
        gaussian(128, 128),  # square Gaussian: the slowest-converging common case
        gaussian(128, 512),
        with_spectrum(96, 96, torch.logspace(0, -6, 96, dtype=torch.float64), 4).float(),
        with_spectrum(64, 90, 1 + 1e-4 * gaussian(64, dtype=torch.float64), 5).float(),  # cluster
    ]
    for x in cases:
        iterations = op(x)[3]
        op.check_iterations(iterations, min(x.shape), 1, 12)
        assert iterations.item() > 0
    assert MAX_SWEEPS > 12


# ---- the public wrapper -----------------------------------------------------------------------


def test_public_api(loaded):
    x = gaussian(3, 16, 40)
    out = spectral_stats(x)
    assert isinstance(out, SpectralStats)
    assert out._fields == (
        "effective_rank",
        "effective_rank_ratio",
        "top1_singular_share",
        "stable_rank",
        "condition_number",
        "nonfinite",
    )
    for t in out[:5]:
        assert t.shape == (3,) and t.dtype == torch.float32
    assert out.nonfinite.dtype == torch.int64
    want, _ = golden(x)
    np.testing.assert_allclose(out.effective_rank.numpy(), want[:, 0], rtol=1e-6)
    assert torch.equal(effective_rank(x), out.effective_rank)
    assert spectral_stats(gaussian(7, 9)).effective_rank.shape == ()


def test_requires_grad_input(loaded):
    x = gaussian(2, 8, 20).requires_grad_()
    out = spectral_stats(x)
    assert not out.effective_rank.requires_grad


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.ones(5), r"\(5,\)"),
        (torch.ones(3, 4, dtype=torch.int64), r"\(3, 4\)"),
        (torch.ones(2, 0, 4), r"\(2, 0, 4\)"),
        (torch.ones(2, 4, 0), r"\(2, 4, 0\)"),
    ],
)
def test_bad_input(bad, match):
    with pytest.raises(ValueError, match=match):
        spectral_stats(bad)
    with pytest.raises(TypeError):
        spectral_stats([[1.0, 2.0]])


def test_empty_batch(loaded):
    out = spectral_stats(torch.ones(0, 3, 4))
    assert out.effective_rank.shape == (0,)


def test_torch_backend_matches(loaded, backend):
    x = gaussian(4, 20, 50)
    x[1, 0, 0] = float("nan")
    backend("torch")
    raw_torch = spectral_raw(x)
    assert (raw_torch[3] == 0).all()  # the LAPACK path reports no iterations
    backend("auto")
    raw_op = spectral_raw(x)
    for a, b in zip(raw_op[:3], raw_torch[:3], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, equal_nan=True)


def test_torch_path_golden():
    x = gaussian(3, 30, 45)
    x[2] = 0.0
    stats, sigma, nonfinite, _ = spectral_torch(x)
    check((stats[:2], sigma[:2], nonfinite[:2], None), x[:2])
    assert stats[2].tolist() == [0.0, 0.0, 0.0, 0.0, float("inf")]


@pytest.mark.parametrize("n", [1, 2, 7, 40])
def test_torch_jacobi_for_cuda_fallback(n):
    """The sync-free torch Jacobi (the CUDA path without the extension), run on CPU tensors."""
    y = gaussian(3, n, 2 * n + 3, dtype=torch.float64)
    g = y @ y.mT
    lam = jacobi_eigvalsh_torch(g, torch_jacobi_sweeps(n)).sort(-1).values
    want = torch.linalg.eigvalsh(g)
    torch.testing.assert_close(lam, want, rtol=0, atol=1e-11 * want.abs().max().item())


def test_too_large_falls_back_with_one_warning(monkeypatch):
    # the routing with a small limit (the real one, 1024, would make this test a 1025^3 solve)
    monkeypatch.setattr(spectral, "_warned_large", False)
    monkeypatch.setattr(spectral, "MAX_DIM", 8)
    x = gaussian(2, 9, 12)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = spectral_raw(x)
        spectral_raw(x)
        small = spectral_raw(x[:, :8], "jacobi")
    assert sum("both sides larger than 8" in str(w.message) for w in caught) == 1
    assert (out[3] == 0).all()  # the torch path ran
    assert (small[3] > 0).all() or _extension.op("spectral_stats") is None  # min side 8: the kernel ran
    check(out, x)


def test_kernel_limit_matches(op):
    assert spectral.MAX_DIM == 1024
    op(torch.zeros(1024, 1100))  # the limit itself is accepted
    with pytest.raises(RuntimeError, match="1024"):
        op(torch.zeros(1025, 1025))


def test_method_argument(loaded):
    x = gaussian(2, 6, 9)
    with pytest.raises(ValueError, match="'qr'"):
        spectral_stats(x, method="qr")
    with pytest.raises(RuntimeError, match="'qr'"):
        loaded(x, "qr")
    # "auto" is "tridiagonal" on the CPU
    auto, tri, jac = (spectral_raw(x, m) for m in ("auto", "tridiagonal", "jacobi"))
    for a, b in zip(auto, tri, strict=True):
        assert torch.equal(a, b)
    assert (jac[3] > 0).all() and (jac[3] <= 12).all() and (tri[3] > jac[3]).all()
    torch.testing.assert_close(jac[0], tri[0], rtol=1e-12, atol=0)
    torch.testing.assert_close(effective_rank(x, "jacobi"), spectral_stats(x).effective_rank)


@pytest.mark.parametrize("n", [2, 3, 5, 16, 33])
def test_rank_one_small_and_clusters(op, n):
    """Noise of the eigenvalue solver stays below eigen_cut at every size; exact clusters."""
    g = torch.Generator().manual_seed(n)
    scale = torch.randint(-2, 3, (n, 1), generator=g).double()
    scale[0] = 1.0
    x = scale * torch.arange(1.0, 2 * n + 2)  # integer multiples of one row: rank one exactly
    stats, sigma, _, _ = op(x)
    assert stats[0].item() == pytest.approx(1.0, rel=1e-12)
    assert (sigma[1:] == 0).all()
    stats, *_ = op(3.0 * torch.eye(n, 2 * n))  # n equal singular values
    np.testing.assert_allclose(stats.numpy(), [n, 1.0, 1.0 / n, n, 1.0], rtol=1e-12)


# ---- op registration, torch.compile -------------------------------------------------------------


def test_opcheck(loaded):
    x = gaussian(3, 6, 11)
    torch.library.opcheck(loaded, (x,))
    torch.library.opcheck(loaded, (x, "jacobi"))
    torch.library.opcheck(loaded, (gaussian(2, 2, 9, 4).to(torch.bfloat16), "tridiagonal"))


def test_torch_compile_fullgraph(loaded):
    torch._dynamo.reset()
    x = gaussian(4, 10, 24)
    compiled = torch.compile(spectral_stats, fullgraph=True, backend="aot_eager")
    got = compiled(x)
    want = spectral_stats(x)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)
    erank = torch.compile(lambda t: effective_rank(t).mean(), fullgraph=True, backend="aot_eager")(
        x
    )
    torch.testing.assert_close(erank, want.effective_rank.mean())


# ---- GPU (runs natively on a CUDA machine) -------------------------------------------------------


@pytest.mark.gpu
def test_cuda_matches_cpu_without_sync():
    backends.load_extension()
    if not _extension.has_kernel("spectral_stats", "CUDA"):
        pytest.skip("the CUDA extension is not built")
    shapes = [(64, 128, 512), (8, 200, 150), (4, 300, 300), (3, 1, 7)]
    for shape in shapes:
        x = gaussian(*shape)
        x[0, 0, 0] = float("nan")
        for dtype in (torch.float32, torch.bfloat16):
            xc = x.to(dtype).cuda()
            with forbid_cuda_sync():
                out = spectral_raw(xc)
            ref = spectral_raw(x.to(dtype))
            for a, b in zip(out[:3], ref[:3], strict=True):
                torch.testing.assert_close(a.cpu(), b, rtol=1e-9, atol=1e-9, equal_nan=True)
            assert (out[3].cpu()[1:] <= 15).all()


@pytest.mark.gpu
def test_cuda_torch_fallback_without_sync():
    x = gaussian(4, 12, 40).cuda()
    fastdiag.set_backend("torch")
    try:
        with forbid_cuda_sync():
            out = spectral_raw(x)
    finally:
        fastdiag.set_backend("auto")
    check(tuple(t.cpu() for t in out), x.cpu())


@pytest.mark.parametrize("use_backend", ["auto", "torch"])
def test_no_host_transfer(backend, use_backend):
    backend(use_backend)
    x = gaussian(3, 10, 20)
    spectral_stats(x)  # warm-up (extension load)

    with forbid_host_sync():
        spectral_stats(x)
        effective_rank(x.transpose(-1, -2))


@pytest.mark.parametrize("backend_name", ["torch", "cpu"])
@pytest.mark.parametrize("scale", [1e200, 1e-155, 1e-300])
def test_extreme_float64_scales_are_scale_free(backend_name, scale, backend):
    if backend_name == "cpu" and not fastdiag.backends.cpu_extension_available():
        pytest.skip("no C++ extension")
    backend(backend_name)
    eye = torch.eye(3, dtype=torch.float64)[None] * scale
    out = spectral_stats(eye)
    torch.testing.assert_close(out.effective_rank, torch.tensor([3.0]))
    torch.testing.assert_close(out.condition_number, torch.tensor([1.0]))
    raw = spectral_raw(eye)
    torch.testing.assert_close(raw[1], torch.full((1, 3), scale, dtype=torch.float64))
    x = torch.randn(2, 5, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for a, b in zip(spectral_stats(x * scale), spectral_stats(x), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=0)
