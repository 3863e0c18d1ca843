"""fastdiag.ops.cosine_stats: exact (dense formula, float64 oracle), blockwise, sampled (the
original classes' estimate with the same generator), and the Triton kernel under
TRITON_INTERPRET=1."""

from __future__ import annotations

import pytest
import torch

import fastdiag
from fastdiag import backends
from fastdiag.ops import _cosine_torch
from fastdiag.ops.cosine import CosineStats, cosine_stats, cosine_torch
from tests.conftest import forbid_cuda_sync, forbid_host_sync


def dense(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Oracle in float64 on x's values: (mean, max, max |.|) of the off-diagonal cosines."""
    xd = x.detach().to(torch.float64)
    n = xd.norm(dim=-1)
    cos = (xd @ xd.mT) / (n[..., :, None] * n[..., None, :] + 1e-8)
    m = x.shape[-2]
    off = ~torch.eye(m, dtype=torch.bool)
    mean = torch.where(off, cos, 0.0).sum((-2, -1)) / (m * (m - 1))
    best = torch.where(off, cos, -torch.inf).amax((-2, -1))
    best_abs = torch.where(off, cos.abs(), -torch.inf).amax((-2, -1))
    return mean, best, best_abs


def original_estimate(flat: torch.Tensor, n_samples: int) -> torch.Tensor:
    """The original classes' sampled set_cosine_similarity_mean (SetDiagnostics), re-typed
    here, consuming the global CPU generator exactly as it does."""
    idx = torch.randperm(flat.shape[0])[:n_samples]
    samples = flat[idx]
    cos_sim = torch.mm(samples, samples.t())
    norms = samples.norm(dim=1, keepdim=True)
    cos_sim = cos_sim / (norms @ norms.t() + 1e-8)
    mask = ~torch.eye(n_samples, dtype=torch.bool)
    return cos_sim[mask].mean()


def assert_matches(out: CosineStats, x: torch.Tensor, rtol: float = 1e-5, atol: float = 1e-6):
    want = dense(x)
    for got, w in zip(out, want, strict=True):
        assert got.dtype == torch.float32 and got.shape == x.shape[:-2]
        torch.testing.assert_close(got.double(), w, rtol=rtol, atol=atol)


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---- torch path ---------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 37, 20), (50, 8), (2, 2, 2, 5)])
def test_exact_matches_dense(backend, shape):
    backend("torch")
    x = randn(*shape)
    assert_matches(cosine_stats(x), x)


def test_negative_correlation_and_zero_rows(backend):
    backend("torch")
    x = randn(6, 10)
    x[1] = -x[0]  # cos = -1: max_abs 1, max < 1
    x[4] = 0.0  # zero row: cos 0 with every row
    out = cosine_stats(x)
    assert_matches(out, x)
    assert out.max_abs.item() == pytest.approx(1.0, abs=1e-6)
    assert out.max.item() < 0.99


def test_blockwise_rows(backend, monkeypatch):
    backend("torch")
    x = randn(2, 53, 12)
    want = dense(x)
    for block in (1, 7, 52, 53, 54):
        total, best, best_abs = cosine_torch(x, block_rows=block)
        torch.testing.assert_close(total / (53 * 52), want[0], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(best.double(), want[1], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(best_abs.double(), want[2], rtol=1e-5, atol=1e-6)
    # the public call with a small row-block budget: several blocks, same numbers
    monkeypatch.setattr(_cosine_torch, "_TILE_ELEMS", 2 * 53 * 5)
    assert_matches(cosine_stats(x), x)


def test_single_row_and_nonfinite(backend):
    backend("torch")
    out = cosine_stats(randn(3, 1, 4))
    assert all(torch.isnan(t).all() for t in out)
    x = randn(3, 5, 4)
    x[1, 2, 3] = float("nan")
    out = cosine_stats(x)
    for t in out:
        assert torch.isnan(t[1]) and not torch.isnan(t[[0, 2]]).any()
    assert_matches(CosineStats(*(t[[0, 2]] for t in out)), x[[0, 2]])


def test_half_and_double_inputs(backend):
    backend("torch")
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        x = randn(2, 9, 16).to(dtype)
        assert_matches(cosine_stats(x), x, rtol=1e-4, atol=1e-5)


# ---- sampled: the original classes' estimate ----------------------------------------------------


def test_sample_reproduces_original_estimate(backend):
    backend("torch")
    flat = randn(300, 24)
    g = torch.Generator().manual_seed(1234)
    got = cosine_stats(flat, sample=100, generator=g)
    state = torch.get_rng_state()
    torch.manual_seed(1234)
    want = original_estimate(flat, 100)
    torch.set_rng_state(state)
    assert got.mean.item() == pytest.approx(want.item(), rel=1e-6, abs=1e-7)
    # the same generator state draws the same rows: max of that sample too
    g2 = torch.Generator().manual_seed(1234)
    idx = torch.randperm(300, generator=g2)[:100]
    assert_matches(got, flat[idx])


def test_sample_default_generator_and_small_m(backend):
    backend("torch")
    flat = randn(40, 8)
    torch.manual_seed(7)
    got = cosine_stats(flat, sample=100)  # n = min(100, M): every row, in random order
    torch.manual_seed(7)
    want = original_estimate(flat, 40)
    assert got.mean.item() == pytest.approx(want.item(), rel=1e-6, abs=1e-7)
    assert_matches(got, flat)


def test_sample_batched_uses_same_rows(backend):
    backend("torch")
    x = randn(3, 50, 6)
    got = cosine_stats(x, sample=10, generator=torch.Generator().manual_seed(5))
    idx = torch.randperm(50, generator=torch.Generator().manual_seed(5))[:10]
    assert_matches(got, x[:, idx])


@pytest.mark.parametrize(
    "args, exc",
    [
        ((torch.ones(5),), ValueError),
        ((torch.ones(3, 4, dtype=torch.int32),), ValueError),
        ((torch.ones(0, 4),), ValueError),
        ((torch.ones(4, 0),), ValueError),
        ((torch.ones(4, 3), 1), ValueError),
        ((torch.ones(4, 3), True), ValueError),
        (([[1.0]],), TypeError),
    ],
)
def test_bad_input(args, exc):
    with pytest.raises(exc):
        cosine_stats(*args)


def test_bad_shape_message():
    with pytest.raises(ValueError, match=r"\(2, 0, 4\)"):
        cosine_stats(torch.ones(2, 0, 4))


def test_torch_compile_fullgraph(backend):
    backend("torch")
    x = randn(2, 20, 8)
    torch._dynamo.reset()
    got = torch.compile(cosine_stats, fullgraph=True, backend="aot_eager")(x)
    for a, b in zip(got, cosine_stats(x), strict=True):
        torch.testing.assert_close(a, b)


# ---- Triton kernel (interpreter on CPU tensors, natively on CUDA) -----------------------------


def triton_runs_here() -> bool:
    return backends.triton_available() and (
        torch.cuda.is_available() or backends.triton_interpreting()
    )


needs_triton = pytest.mark.skipif(
    not triton_runs_here(), reason="needs triton with a GPU or TRITON_INTERPRET=1"
)


@pytest.mark.interpreter
@needs_triton
@pytest.mark.parametrize("shape", [(2, 37, 20), (70, 9), (1, 16, 16), (3, 2, 33)])
def test_triton_kernel(backend, shape):
    backend("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = randn(*shape).to(device)
    x.view(-1, shape[-1])[0] *= -3.0  # a strongly anti-correlated pair somewhere
    assert_matches(CosineStats(*(t.cpu() for t in cosine_stats(x))), x.cpu())


@pytest.mark.interpreter
@needs_triton
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_triton_kernel_strides_dtypes_nonfinite(backend):
    backend("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = randn(2, 20, 40).to(device).transpose(-1, -2)  # [2, 40, 20], stride_d != 1
    assert_matches(CosineStats(*(t.cpu() for t in cosine_stats(x))), x.cpu())
    xb = randn(2, 18, 17).to(torch.bfloat16).to(device)
    assert_matches(CosineStats(*(t.cpu() for t in cosine_stats(xb))), xb.cpu(), rtol=1e-4)
    xn = randn(2, 18, 17).to(device)
    xn[0, 3, 3] = float("inf")
    out = cosine_stats(xn)
    assert torch.isnan(out.mean[0]) and torch.isnan(out.max[0]) and torch.isnan(out.max_abs[0])
    assert not torch.isnan(out.mean[1])


@pytest.mark.interpreter
@needs_triton
def test_triton_matches_torch_sampled(backend):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = randn(120, 12).to(device)
    backend("triton")
    a = cosine_stats(x, sample=40, generator=torch.Generator().manual_seed(3))
    backend("torch")
    b = cosine_stats(x, sample=40, generator=torch.Generator().manual_seed(3))
    for u, v in zip(a, b, strict=True):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_triton_op_opcheck():
    # CUDA only: under TRITON_INTERPRET=1 the fake-tensor pass of opcheck cannot run the
    # interpreter (it needs real storage)
    from fastdiag.kernels import cosine as kern

    x = randn(2, 20, 16).cuda()
    torch.library.opcheck(kern.cosine_partials, (x, 16, 16, 2))


@pytest.mark.gpu
def test_cuda_no_sync():
    x = randn(4, 300, 64).cuda()
    fastdiag.set_backend("auto")
    cosine_stats(x)  # warm-up (compile)
    with forbid_cuda_sync():
        out = cosine_stats(x)
    assert_matches(CosineStats(*(t.cpu() for t in out)), x.cpu())


@pytest.mark.parametrize("use_backend", ["torch", "triton"])
def test_no_host_transfer(backend, use_backend):
    if use_backend == "triton" and not triton_runs_here():
        pytest.skip("needs triton with a GPU or TRITON_INTERPRET=1")
    backend(use_backend)
    x = randn(2, 20, 8)
    cosine_stats(x)  # warm-up

    with forbid_host_sync():
        cosine_stats(x)
        cosine_stats(x, sample=5, generator=torch.Generator().manual_seed(0))


# ---- bank_coherence ----------------------------------------------------------------------------


def test_bank_coherence_is_scale_free_max_abs():
    from fastdiag.ops import bank_coherence

    g = torch.Generator().manual_seed(5)
    atoms = torch.randn(20, 9, generator=g)
    atoms[4] = -2.0 * atoms[11]  # anti-parallel pair: |cos| = 1
    atoms[6] = 0.0  # a zero atom: cosine 0 with every atom
    got = bank_coherence(atoms)
    assert got.dtype == torch.float64 and got.shape == ()
    assert got.item() == pytest.approx(1.0, rel=1e-6)
    # the same atoms at 1e-6 scale: the cosine's 1e-8 term would shrink them, normalising does not
    base = torch.randn(6, 5, generator=g, dtype=torch.float64)
    torch.testing.assert_close(bank_coherence(1e-6 * base), bank_coherence(base), rtol=1e-12, atol=0)
    unit = torch.nn.functional.normalize(base, dim=1)
    dense = (unit @ unit.T - torch.eye(6, dtype=torch.float64)).abs().max()
    assert bank_coherence(base).item() == pytest.approx(dense.item(), rel=1e-6)
    assert torch.isnan(bank_coherence(torch.ones(1, 5)))
    with pytest.raises(ValueError, match=r"\[K, F\]"):
        bank_coherence(torch.ones(5))


def test_bank_coherence_needs_features():
    from fastdiag.ops import bank_coherence

    with pytest.raises(ValueError, match=r"atoms must be a tensor of shape \[K, F\] with F >= 1"):
        bank_coherence(torch.zeros(3, 0))
