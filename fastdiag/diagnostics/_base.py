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


def call_order_warning(
    raw: Mapping[str, float], argument: str, keys: tuple[str, str], warned: set[str], stacklevel: int = 4
) -> None:
    """Warn once per object (``warned``) when every update of the epoch saw no gradient (all
    ``.grad`` None or zero) for ``argument`` while its parameters changed between updates: the
    model trains, so ``update()`` most likely runs after ``optimizer.zero_grad()``.
    ``keys``: the internal means of ``gradient_missing`` and ``moved`` (summaries.PARAM_FIELDS)."""
    missing, moved = raw.get(keys[0], 0.0), raw.get(keys[1], 0.0)
    if argument not in warned and missing >= 1.0 and moved > 0:
        warned.add(argument)
        warnings.warn(
            f"{argument} had no gradient (None or all zero) at every update of this epoch while "
            "the parameters changed between updates: update() probably runs after "
            "optimizer.zero_grad(); call it after loss.backward() and before zero_grad(), or the "
            "gradient norm reads 0 (a false 'vanishing gradient')",
            RuntimeWarning,
            stacklevel=stacklevel,
        )
