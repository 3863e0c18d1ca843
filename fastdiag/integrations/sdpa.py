"""Capture of ``torch.nn.functional.scaled_dot_product_attention`` calls inside one module.

:class:`SDPACapture` is a ``torch.overrides.TorchFunctionMode`` that :func:`fastdiag.watch`
enters in a watched attention module's forward pre-hook and leaves in its forward hook, so only
the calls made while that module runs are seen (nothing outside it is touched). Its
``__torch_function__`` runs every function unchanged (the module's output is bit-identical with
and without the mode) and, for ``F.scaled_dot_product_attention``, also keeps the arguments the
statistics need (q, k, attn_mask, is_causal, scale, enable_gqa; detached references, no copy)
for the forward hook to hand to
:meth:`~fastdiag.diagnostics.training.TrainingDiagnostics.update_attention_qk`. ``dropout_p``
is not kept: the statistics are those of the pre-dropout probabilities.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

__all__ = ["SDPACall", "SDPACapture", "sdpa_call"]

_SDPA = F.scaled_dot_product_attention
# names of scaled_dot_product_attention's parameters, in positional order
_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


class SDPACall(NamedTuple):
    """The arguments of one ``scaled_dot_product_attention`` call that shape its probabilities."""

    q: Tensor
    k: Tensor
    attn_mask: Tensor | None
    is_causal: bool
    scale: float | None
    enable_gqa: bool


def sdpa_call(args: tuple, kwargs: dict[str, Any]) -> SDPACall | None:
    """The :class:`SDPACall` of ``scaled_dot_product_attention(*args, **kwargs)``; None when it
    is not one the statistics cover (q / k not 4-D floating tensors, nested tensors)."""
    bound = dict(zip(_PARAMS, args))
    bound.update(kwargs)
    q, k = bound.get("query"), bound.get("key")
    if not (isinstance(q, Tensor) and isinstance(k, Tensor)):
        return None
    if q.is_nested or k.is_nested or q.dim() != 4 or k.dim() != 4:
        return None
    if not (q.is_floating_point() and k.is_floating_point()):
        return None
    mask = bound.get("attn_mask")
    if mask is not None and not isinstance(mask, Tensor):
        return None
    return SDPACall(
        q.detach(),
        k.detach(),
        None if mask is None else mask.detach(),
        bool(bound.get("is_causal", False)),
        bound.get("scale"),
        bool(bound.get("enable_gqa", False)),
    )


class SDPACapture(TorchFunctionMode):
    """Records the :class:`SDPACall` of every SDPA call made while the mode is active.

    ``open()`` enters the mode, ``close()`` leaves it (only when it is the innermost mode, else
    it is left to its owner's ``__exit__`` and ``close`` says False) and returns the calls seen.
    """

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[SDPACall] = []
        self._open = False

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is _SDPA:
            call = sdpa_call(args, kwargs)
            if call is not None:
                self.calls.append(call)
        return func(*args, **kwargs)

    def open(self) -> SDPACapture:
        self.__enter__()
        self._open = True
        return self

    def close(self) -> bool:
        """Leave the mode; False when it is not the innermost one (left on the stack)."""
        if not self._open:
            return True
        current = getattr(torch.overrides, "_get_current_function_mode", None)
        if current is not None and current() is not self:
            return False
        self._open = False
        self.__exit__(None, None, None)
        return True
