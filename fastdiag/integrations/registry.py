"""The registry of custom attention modules and probes that :func:`fastdiag.watch` picks up.

:func:`register_attention` and :func:`probe` record a module's extract function / probes in a
weak registry (a module that is garbage collected leaves it) and tell every live watch, so a
registration made after ``watch()`` still attaches. A watch subscribes with :func:`subscribe`
and reads a module's registration with :func:`registration`.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any, Protocol

from torch import Tensor, nn

__all__ = [
    "PROBE_AT",
    "ExtractFn",
    "ProbeFn",
    "Registration",
    "probe",
    "register_attention",
    "registration",
    "subscribe",
    "unsubscribe",
]

ExtractFn = Callable[[nn.Module, tuple, Any], "Tensor | None"]
ProbeFn = Callable[..., Tensor]
PROBE_AT = ("forward", "grad")


class Registration:
    """What was registered for one module: its attention extract function and its probes."""

    def __init__(self) -> None:
        # (extract_fn or None: its scaled_dot_product_attention calls, from_logits)
        self.attention: tuple[ExtractFn | None, bool] | None = None
        self.probes: list[tuple[str, ProbeFn, str]] = []  # (name, fn, at)


class Subscriber(Protocol):
    def attach_registered(self, module: nn.Module, probe: tuple[str, ProbeFn, str] | None = None) -> None: ...


_REGISTRY: weakref.WeakKeyDictionary[nn.Module, Registration] = weakref.WeakKeyDictionary()
_SUBSCRIBERS: weakref.WeakSet[Any] = weakref.WeakSet()


def registration(module: nn.Module) -> Registration | None:
    """The registration of ``module``, or None."""
    return _REGISTRY.get(module)


def subscribe(subscriber: Subscriber) -> None:
    """Have ``subscriber.attach_registered(module[, probe])`` called for every later registration."""
    _SUBSCRIBERS.add(subscriber)


def unsubscribe(subscriber: Subscriber) -> None:
    _SUBSCRIBERS.discard(subscriber)


def register_attention(
    module: nn.Module, extract_fn: ExtractFn | None = None, *, from_logits: bool = False
) -> nn.Module:
    """Declare ``module`` an attention layer for :func:`fastdiag.watch`; returns ``module``.

    ``extract_fn(module, inputs, output)`` runs after the module's forward on sampled steps and
    returns its attention, [B, H, N, Nk] per-head (or [B, N, Nk]) probabilities (logits with
    ``from_logits=True``), or None to skip this call. Without ``extract_fn`` the statistics come
    from the q and k of the ``torch.nn.functional.scaled_dot_product_attention`` calls the
    module makes in its forward (run unchanged; pre-dropout probabilities, never materialised).
    Works for watches made before or after.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    if extract_fn is not None and not callable(extract_fn):
        raise TypeError(
            f"extract_fn must be callable (module, inputs, output) -> Tensor, or None, got {extract_fn!r}"
        )
    reg = _REGISTRY.setdefault(module, Registration())
    reg.attention = (extract_fn, bool(from_logits))
    for w in list(_SUBSCRIBERS):
        w.attach_registered(module)
    return module


def probe(module: nn.Module, name: str, fn: ProbeFn, *, at: str = "forward") -> nn.Module:
    """Record ``fn``'s value as ``{name}/{module's qualified name}`` on sampled steps; returns ``module``.

    ``at="forward"``: ``fn(module, inputs, output)`` after each forward of ``module`` (e.g. a
    memory read norm). ``at="grad"``: ``fn(module)`` once per sampled step when gradients are
    ready (e.g. a mixer parameter's gradient). ``fn`` returns a tensor, averaged over its
    entries on the device (it must not copy to the host), or None to skip this call.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty str, got {name!r}")
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {fn!r}")
    if at not in PROBE_AT:
        raise ValueError(f"at must be one of {PROBE_AT}, got {at!r}")
    reg = _REGISTRY.setdefault(module, Registration())
    reg.probes.append((name, fn, at))
    for w in list(_SUBSCRIBERS):
        w.attach_registered(module, probe=(name, fn, at))
    return module
