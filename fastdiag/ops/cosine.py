"""Off-diagonal cosine similarity statistics of the rows of batched matrices.

For ``x`` [..., M, D], per leading index, with cos_ij = <x_i, x_j> / (|x_i| |x_j| + 1e-8) (the
original classes' formula; zero rows give 0) over the ordered pairs i != j:

* ``mean``     mean of cos_ij (docs/metrics.md §1, §4: set_cosine_similarity_mean, pairwise_cosine_mean)
* ``max``      max of cos_ij (duplicate detector: set_cosine_similarity_max, pairwise_cosine_max)
* ``max_abs``  max of |cos_ij| (docs/metrics.md §3: an atom bank's coherence)

Exact by default, blockwise so that no M x M matrix is held: the Triton kernel
(``fastdiag.kernels.cosine``) on the triton backend, row blocks of at most ~16M cosines in torch
otherwise. ``sample=n`` reproduces the original classes' estimate: ``idx = torch.randperm(M,
generator=generator)[:n]`` (on the generator's device, the CPU default generator when None), then
the statistics of those rows. With M < 2 there is no pair and every output is NaN. Outputs are
float32 tensors of the leading shape; the mean is accumulated in float64. A NaN / inf entry
makes that matrix's three outputs NaN.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from fastdiag import backends
from fastdiag.ops._cosine_layout import COSINE_EPS
from fastdiag.ops._cosine_torch import cosine_torch


def _triton_impl():
    from fastdiag.kernels.cosine import cosine_triton

    return cosine_triton


backends.register(
    "cosine_stats",
    {
        # the kernel accumulates in float32: float64 input runs in torch
        "triton": backends.Impl(
            _triton_impl, devices=("cuda",), dtypes=(torch.float32, torch.float16, torch.bfloat16)
        ),
        "torch": backends.Impl(lambda: cosine_torch),
    },
)

__all__ = [
    "COSINE_EPS",
    "CosineStats",
    "bank_coherence",
    "check_sample",
    "cosine_stats",
    "cosine_torch",
    "sample_rows",
]



class CosineStats(NamedTuple):
    """Off-diagonal cosine statistics, each of the leading shape of ``x`` (float32)."""

    mean: Tensor
    max: Tensor
    max_abs: Tensor


def cosine_stats(
    x: Tensor, sample: int | None = None, generator: torch.Generator | None = None
) -> CosineStats:
    """Mean, max and max-abs off-diagonal cosine similarity of the rows of ``x`` [..., M, D].

    ``sample=n`` uses n = min(n, M) rows drawn without replacement by
    ``torch.randperm(M, generator=generator)[:n]`` (the original classes' estimate, same rows for the same
    generator state; the same rows for every leading index). Returns a :class:`CosineStats`.
    """
    _check(x, sample)
    x = x.detach()
    m = x.shape[-2]
    if sample is not None:
        idx = sample_rows(m, sample, generator)
        x = x.index_select(-2, idx.to(x.device, non_blocking=True))
    return _cosine_exact(x)


def sample_rows(m: int, n: int, generator: torch.Generator | None = None) -> Tensor:
    """The original classes' draw of min(n, m) of m rows: ``torch.randperm(m, generator=generator)[:n]``
    on the generator's device (the CPU default generator when None), int64 [min(n, m)]."""
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.randperm(m, generator=generator, device=device)[: min(n, m)]


def bank_coherence(atoms: Tensor) -> Tensor:
    """Max off-diagonal |cosine| of the rows of ``atoms`` [K, F] (a sparse-coding dictionary's
    coherence), exact, float64 0-d; NaN when K < 2.

    The rows are normalised first (zero rows stay zero: cosine 0), so the cosine's 1e-8
    denominator term cannot depend on the atoms' scale.
    """
    if not isinstance(atoms, Tensor) or atoms.dim() != 2 or atoms.shape[1] == 0:
        shape = tuple(atoms.shape) if isinstance(atoms, Tensor) else type(atoms).__name__
        raise ValueError(f"atoms must be a tensor of shape [K, F] with F >= 1, got {shape}")
    a = atoms.detach().to(torch.float64)
    if a.shape[0] < 2:
        return torch.full((), math.nan, dtype=torch.float64, device=a.device)
    norms = torch.linalg.vector_norm(a, dim=1, keepdim=True)
    unit = a / torch.where(norms > 0, norms, torch.ones_like(norms))
    return cosine_stats(unit).max_abs.to(torch.float64)


def _check(x: Tensor, sample: int | None) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor of shape [..., M, D], got {type(x).__name__}")
    shape = tuple(x.shape)
    if x.dim() < 2:
        raise ValueError(f"x must have shape [..., M, D] (at least 2 dims), got shape {shape}")
    if not x.dtype.is_floating_point:
        raise ValueError(
            f"x must be float32, float16, bfloat16 or float64, got {x.dtype} with shape {shape}"
        )
    if x.shape[-2] == 0 or x.shape[-1] == 0:
        raise ValueError(f"x needs at least one row and one column, got shape {shape}")
    check_sample(sample)


def check_sample(sample: int | None, name: str = "sample") -> int | None:
    """``sample`` (the rows to draw for a cosine estimate) validated: an int >= 2, or None
    (every row); ``name`` is the argument's name in the error."""
    if sample is not None and (
        isinstance(sample, bool) or not isinstance(sample, int) or sample < 2
    ):
        raise ValueError(f"{name} must be an int >= 2 (rows to draw) or None (every row), got {sample!r}")
    return sample


def _cosine_exact(x: Tensor) -> CosineStats:
    m = x.shape[-2]
    lead = x.shape[:-2]
    if m < 2:
        nan = torch.full(lead, float("nan"), dtype=torch.float32, device=x.device)
        return CosineStats(nan, nan.clone(), nan.clone())
    total, best, best_abs = backends.implementation("cosine_stats", x.device, x.dtype)(x)
    mean = total / (m * (m - 1))
    # NaN anywhere makes the sum NaN; make max and max_abs say so too (Triton's max skips NaN)
    nan = torch.isnan(mean)
    best = torch.where(nan, float("nan"), best.to(torch.float64))
    best_abs = torch.where(nan, float("nan"), best_abs.to(torch.float64))
    return CosineStats(mean.to(torch.float32), best.to(torch.float32), best_abs.to(torch.float32))
