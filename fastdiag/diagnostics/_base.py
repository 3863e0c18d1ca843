"""Argument checks shared by the diagnostics classes (host-side metadata only, never device
data). The epoch machinery is :class:`fastdiag.diagnostics.base.Diagnostics`; the parameter
norms are :class:`fastdiag.diagnostics.params.ParamTracker`."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from fastdiag.ops import effective_rank
from fastdiag.ops import norms as _norms
from fastdiag.ops import summaries as _summaries
from fastdiag.ops.cosine import check_sample


def check_tensor(x: Any, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


INDEX_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def check_index(x: Any, name: str) -> Tensor:
    """An index tensor: int8..int64 or uint8 (wider unsigned ids could exceed int64 and would
    read as padding)."""
    check_tensor(x, name)
    if x.dtype not in INDEX_DTYPES:
        raise TypeError(
            f"{name} must be an integer tensor of dtype int8, int16, int32, int64 or uint8, "
            f"got dtype {x.dtype}"
        )
    return x


def check_float(x: Any, name: str) -> Tensor:
    check_tensor(x, name)
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    return x


def raise_flags(raw: Mapping[str, float], messages: Mapping[str, str]) -> None:
    """Raise ValueError for every internal error flag (a count) that is > 0 this epoch."""
    for key, message in messages.items():
        value = raw.get(key, 0.0)
        if value > 0:
            raise ValueError(message)


def report_flags(
    raw: Mapping[str, float], flags: Mapping[str, tuple[str, str]], stacklevel: int = 4
) -> dict[str, float]:
    """The epoch's error counts, reported instead of raised: for each internal flag (a mean count
    per update) > 0 this epoch, one RuntimeWarning (``message`` formatted with ``{value}``) and the
    entry ``public key -> value`` of the returned dict. ``flags``: internal key -> (public key,
    message). The statistics of the other entries stay readable (an excluded entry is counted,
    not fatal)."""
    out: dict[str, float] = {}
    for key, (public, message) in flags.items():
        value = raw.get(key, 0.0)
        if value > 0:
            out[public] = value
            warnings.warn(message.format(value=value), RuntimeWarning, stacklevel=stacklevel)
    return out


ROWSUM_TOLERANCE = 1e-3  # mean |row sum - 1| above which probabilities are reported as not normalised


def rowsum_warnings(
    raw: Mapping[str, float], inputs: Mapping[str, tuple[str, str, str]], warned: set[str], stacklevel: int = 4
) -> None:
    """Warn (once per object: ``warned`` holds the names already reported) for each input whose
    mean |row sum - 1| this epoch is > ``ROWSUM_TOLERANCE``. ``inputs``: argument name ->
    (internal key of the summed row-sum error, internal key of the row count, hint). Both keys
    are means per update over the same updates, so their ratio is the mean over the rows."""
    for name, (err_key, rows_key, hint) in inputs.items():
        if name in warned:
            continue
        err, rows = raw.get(err_key, 0.0), raw.get(rows_key, 0.0)
        if rows > 0 and err / rows > ROWSUM_TOLERANCE:
            warned.add(name)
            warnings.warn(
                f"{name} rows do not sum to 1 (mean |sum-1| = {err / rows:.3g}){hint}; "
                "the statistics that assume probabilities are not meaningful",
                RuntimeWarning,
                stacklevel=stacklevel,
            )


class _ParamTracker:
    """Gradient norm, parameter norm and weight change of a name -> tensor dict, on device.

    The previous parameters are device copies, refreshed in place (``torch._foreach_copy_``)
    while the names, shapes and dtypes stay the same.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.prev: dict[str, Tensor] | None = None

    def check(self, params: Any) -> None:
        """Host-side checks: a non-empty dict of tensors whose shapes match the previous update."""
        if not isinstance(params, Mapping):
            raise TypeError(f"{self.name} must be a dict name -> Parameter, got {type(params).__name__}")
        if not params:
            raise ValueError(f"{self.name} must hold at least one parameter, got an empty dict")
        for n, p in params.items():
            check_tensor(p, f"{self.name}[{n!r}]")
            if self.prev is not None and n in self.prev and self.prev[n].shape != p.shape:
                raise ValueError(
                    f"{self.name}[{n!r}] changed shape from {tuple(self.prev[n].shape)} "
                    f"to {tuple(p.shape)} between updates"
                )

    def update(self, params: Mapping[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """(gradient norm, parameter norm, weight change or NaN without a previous update)."""
        grad, norm, change = self.update_values(params).unbind()
        return grad, norm, change

    def update_values(self, params: Mapping[str, Tensor]) -> Tensor:
        """float64 [3]: (gradient norm, parameter norm, weight change or NaN), one fused op on the
        CPU in the steady state (same names, shapes and dtypes as the previous update)."""
        self.check(params)
        tensors = list(params.values())
        grads = [p.grad for p in tensors if p.grad is not None]
        prev = self.prev
        if prev is None:
            values = _summaries.param_norms(tensors, grads, None)
            self.prev = {n: t.detach().clone(memory_format=torch.contiguous_format) for n, t in params.items()}
            return values
        if self._same(prev, params):
            return _summaries.param_norms(tensors, grads, list(prev.values()))
        # the parameter set changed: the change over the common names, then a fresh snapshot
        names = list(params)
        device = tensors[0].device
        common = [i for i, n in enumerate(names) if n in prev]
        values = _summaries.param_norms(tensors, grads, None)
        if common:
            cur = [tensors[i].detach() for i in common]
            old = [prev[names[i]].to(tensors[i].device) for i in common]
            change = _norms.diff_norms(cur, old).to(device).square().sum().sqrt()
        else:
            change = torch.zeros((), dtype=torch.float64, device=device)
        values = torch.stack([values[0], values[1], change.to(values.device)])
        self.prev = {n: t.detach().clone(memory_format=torch.contiguous_format) for n, t in params.items()}
        return values

    @staticmethod
    def _same(prev: Mapping[str, Tensor], params: Mapping[str, Tensor]) -> bool:
        if len(prev) != len(params):
            return False
        for (n, q), (m, p) in zip(prev.items(), params.items(), strict=True):
            if n != m or q.shape != p.shape or q.dtype != p.dtype or q.device != p.device or not q.is_contiguous():
                return False
        return True

    def state_dict(self) -> dict[str, Tensor] | None:
        return None if self.prev is None else {k: v.clone() for k, v in self.prev.items()}

    def load_state_dict(self, prev: Mapping[str, Tensor] | None) -> None:
        self.prev = None if prev is None else {
            k: v.detach().clone(memory_format=torch.contiguous_format) for k, v in prev.items()
        }


def check_cosine_samples(samples: int | None) -> int | None:
    """The classes' ``cosine_samples`` argument validated: an int >= 2, or None (every row)."""
    return check_sample(samples, "cosine_samples")


def effective_rank_mean(clean: Tensor) -> Tensor:
    """Mean over the leading axes of the effective rank of each [S, D] matrix, float64 0-d."""
    erank = effective_rank(clean)
    return erank.to(torch.float64).mean()


__all__ = [
    "ROWSUM_TOLERANCE",
    "check_cosine_samples",
    "check_float",
    "check_index",
    "check_tensor",
    "effective_rank_mean",
    "raise_flags",
    "report_flags",
    "rowsum_warnings",
]
