"""Statistics of a dictionary / mixture learning loop (docs/metrics.md §11), batched and sync-free.

An alternating-minimisation (AM) loop that learns a bank of basis matrices and codes each target
(e.g. each expert's weight matrix) as a softmax mixture of the bases is judged by a handful of
numbers per epoch. Every function here returns float64 0-d tensors on the input's device and
never copies device data to the host (no ``.item()``, ``.tolist()``, ``float(t)``, ``bool(t)``,
no data-dependent Python branch), so a loop can compute them every step and copy them once:

* :func:`relative_mse`        ``||W - W_hat||^2 / ||W||^2`` over all entries
* :func:`coding_stats`        support (#entries > eps per row) median / mean, row entropy, share
  of pruned entries (<= eps), ``|mean support - target|`` and the temperature, from one
  :func:`~fastdiag.ops.dist_stats` pass
* :func:`bank_stats`          mean L2 norm of the atoms and the bank coherence (max off-diagonal
  ``|cosine|``, :func:`~fastdiag.ops.bank_coherence`)
* :func:`refit_stats`         relative residual ``||A B - W|| / ||W||`` of a least-squares refit
  of ``A`` and the condition number of ``B B^T``, both averaged over a batch of matrices
* :func:`nonfinite_logit_rows` rows of a logit tensor holding ``-inf``, ``+inf`` or NaN
* :func:`nan_infs`            NaN / inf entries of any number of tensors
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from fastdiag.ops._dist_stats import RowSlot, Slot, dist_stats, median
from fastdiag.ops.cosine import bank_coherence
from fastdiag.ops.norms import nonfinite_counts
from fastdiag.ops.spectral import spectral_stats

__all__ = [
    "BankStats",
    "CodingStats",
    "RefitStats",
    "bank_stats",
    "coding_stats",
    "nan_infs",
    "nonfinite_logit_rows",
    "refit_stats",
    "relative_mse",
]

_F64 = torch.float64


def _check_tensor(x: object, name: str, min_dim: int = 0) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.dim() < min_dim:
        raise ValueError(
            f"{name} must have at least {min_dim} dimensions, got shape {tuple(x.shape)}"
        )


def _scalar(value: float | Tensor | None, device: torch.device) -> Tensor:
    """``value`` as a float64 0-d tensor on ``device`` (NaN for None); a tensor stays on device."""
    if value is None:
        return torch.full((), math.nan, dtype=_F64, device=device)
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"expected a one-element tensor, got shape {tuple(value.shape)}")
        return value.detach().reshape(()).to(device=device, dtype=_F64)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"expected a real number or a one-element tensor, got {type(value).__name__}"
        )
    return torch.full((), float(value), dtype=_F64, device=device)


# ----------------------------------------------------------------------------------------------
# Reconstruction
# ----------------------------------------------------------------------------------------------


def relative_mse(target: Tensor, approx: Tensor) -> Tensor:
    """``||target - approx||^2 / ||target||^2`` over all entries (float64 0-d; NaN for a zero
    target, NaN / inf when an input is not finite)."""
    _check_tensor(target, "target")
    _check_tensor(approx, "approx")
    if target.shape != approx.shape:
        raise ValueError(f"target and approx must have the same shape, got {tuple(target.shape)} "
                         f"and {tuple(approx.shape)}")  # fmt: skip
    t = target.detach().to(_F64)
    d = t - approx.detach().to(device=t.device, dtype=_F64)
    den = t.square().sum()
    return d.square().sum() / torch.where(den > 0, den, torch.full_like(den, math.nan))


# ----------------------------------------------------------------------------------------------
# Coding step
# ----------------------------------------------------------------------------------------------


class CodingStats(NamedTuple):
    """Float64 0-d tensors (see :func:`coding_stats`)."""

    median_support: Tensor
    mean_support: Tensor
    entropy_mean: Tensor
    prune_frac: Tensor
    support_error: Tensor
    temperature: Tensor
    nonfinite_rows: Tensor


def coding_stats(
    alpha: Tensor,
    *,
    eps: float = 1e-4,
    target_support: float | None = None,
    temperature: float | Tensor | None = None,
) -> CodingStats:
    """Statistics of mixture codes ``alpha`` [..., K] (rows of probabilities over K bases).

    Per finite row: support = #entries > ``eps``; entropy = ``-sum p log p`` (nats, 0 log 0 = 0).
    ``median_support`` / ``mean_support``: median / mean of the support over the finite rows;
    ``entropy_mean``: mean row entropy; ``prune_frac``: share of the finite rows' entries
    <= ``eps`` (what an epsilon-pruning step zeroes); ``support_error``:
    ``|mean_support - target_support|`` (NaN without a target); ``temperature``: passed through
    (NaN for None); ``nonfinite_rows``: rows holding NaN / inf (excluded from the rest).
    One :func:`~fastdiag.ops.dist_stats` pass (``rows=True``) and one sort for the median.
    """
    _check_tensor(alpha, "alpha", 1)
    if alpha.shape[-1] == 0:
        raise ValueError(f"alpha must have shape [..., K] with K >= 1, got {tuple(alpha.shape)}")
    if target_support is not None and (
        isinstance(target_support, bool)
        or not isinstance(target_support, numbers.Real)
        or not math.isfinite(target_support)
    ):
        raise ValueError(f"target_support must be a finite number or None, got {target_support!r}")
    st = dist_stats(alpha, eps=eps, rows=True, heads=False)
    sums = st.sums
    count = sums[Slot.COUNT]
    mean_support = sums[Slot.GT_EPS] / count
    entropy_mean = sums[Slot.ENTROPY] / count
    prune_frac = 1.0 - sums[Slot.GT_EPS] / (count * alpha.shape[-1])
    med = median(st.rows[..., RowSlot.GT_EPS])
    target = _scalar(target_support, sums.device)
    support_error = (mean_support - target).abs()
    temp = _scalar(temperature, sums.device)
    return CodingStats(med, mean_support, entropy_mean, prune_frac, support_error, temp,
                       sums[Slot.NONFINITE])  # fmt: skip


def nonfinite_logit_rows(logits: Tensor) -> Tensor:
    """Number of rows of ``logits`` [..., K] holding a non-finite entry (``-inf`` from
    ``log(0)``, ``+inf`` or NaN), float64 0-d.

    A ``-inf`` logit is a basis the softmax can never give weight again (its gradient is 0), a
    row of only ``-inf`` (or any NaN) makes the softmax NaN: the signature of a coding step
    that takes ``log`` of pruned (exactly zero) weights.
    """
    _check_tensor(logits, "logits", 1)
    x = logits.detach()
    bad = torch.isnan(x) | torch.isinf(x)
    return bad.any(dim=-1).sum(dtype=torch.int64).to(_F64)


# ----------------------------------------------------------------------------------------------
# Dictionary step
# ----------------------------------------------------------------------------------------------


class BankStats(NamedTuple):
    """Float64 0-d tensors (see :func:`bank_stats`)."""

    atom_norm_mean: Tensor
    coherence: Tensor


def bank_stats(bank: Tensor) -> BankStats:
    """``bank`` [K, ...]: K atoms (each flattened). ``atom_norm_mean``: mean L2 norm of the
    atoms; ``coherence``: max off-diagonal ``|cosine|`` between atoms (NaN for K < 2)."""
    _check_tensor(bank, "bank", 2)
    if bank.shape[0] == 0 or bank[0].numel() == 0:
        raise ValueError(
            f"bank must have shape [K, ...] with K >= 1 non-empty atoms, got {tuple(bank.shape)}"
        )
    flat = bank.detach().reshape(bank.shape[0], -1)
    norms = torch.linalg.vector_norm(flat.to(_F64), dim=1)
    return BankStats(norms.mean(), bank_coherence(flat))


# ----------------------------------------------------------------------------------------------
# Least-squares refit
# ----------------------------------------------------------------------------------------------


class RefitStats(NamedTuple):
    """Float64 0-d tensors (see :func:`refit_stats`)."""

    resid_rel_mean: Tensor
    cond_mean: Tensor


def refit_stats(coef: Tensor, basis: Tensor, target: Tensor) -> RefitStats:
    """A batch of refits ``target ~= coef @ basis``: ``coef`` A [..., p, r], ``basis``
    B [..., r, d], ``target`` W [..., p, d] (one matrix per leading index, e.g. per expert).

    ``resid_rel_mean``: mean over the matrices of ``||A B - W||_F / ||W||_F`` (NaN for a zero
    W); ``cond_mean``: mean over the matrices of the condition number of ``B B^T``
    (= ``cond(B)^2`` from :func:`~fastdiag.ops.spectral_stats`: inf when ``r > d`` or B is
    rank-deficient; values of cond(B) above ~1e7 are not resolved and read as inf). The
    least-squares refit ``A = W B^T (B B^T)^-1`` solves through exactly this matrix.
    """
    for x, name in ((coef, "coef"), (basis, "basis"), (target, "target")):
        _check_tensor(x, name, 2)
    a, b, w = coef.detach(), basis.detach(), target.detach()
    if a.shape[-1] != b.shape[-2] or a.shape[-2] != w.shape[-2] or b.shape[-1] != w.shape[-1]:
        raise ValueError(
            f"coef [..., p, r], basis [..., r, d] and target [..., p, d] do not fit: got "
            f"{tuple(a.shape)}, {tuple(b.shape)}, {tuple(w.shape)}"
        )
    lead = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2], w.shape[:-2])
    a64, b64, w64 = (x.to(_F64) for x in (a, b, w))
    resid = torch.linalg.matrix_norm(a64 @ b64 - w64)
    wn = torch.linalg.matrix_norm(w64)
    rel = resid / torch.where(wn > 0, wn, torch.full_like(wn, math.nan))
    rel = rel.expand(lead) if rel.dim() else rel
    cond = spectral_stats(b).condition_number.to(_F64).square()
    if b.shape[-2] > b.shape[-1]:  # B B^T is r x r of rank <= d < r: singular
        cond = torch.where(torch.isnan(cond), cond, torch.full_like(cond, math.inf))
    return RefitStats(rel.reshape(-1).mean(), cond.reshape(-1).mean())


# ----------------------------------------------------------------------------------------------
# Health
# ----------------------------------------------------------------------------------------------


def nan_infs(tensors: Sequence[Tensor]) -> Tensor:
    """Total number of NaN / inf entries of ``tensors`` (float64 0-d, 0 for none)."""
    tensors = list(tensors)
    if not tensors:
        return torch.zeros((), dtype=_F64)
    return nonfinite_counts(tensors).sum()
