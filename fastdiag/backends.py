"""The one place that decides which backend runs an op.

``FASTDIAG_BACKEND=auto|triton|cpu|torch`` (or :func:`set_backend`) picks it:

* ``triton`` - Triton kernels (CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1``),
* ``cpu``    - the C++ extension (CPU tensors; JIT-built on first use, see ``fastdiag._extension``),
* ``torch``  - portable vectorised PyTorch, runs anywhere,
* ``auto``   - triton for CUDA tensors when triton imports, the C++ extension for CPU tensors
  when it builds, else torch.
"""

from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("auto", "triton", "cpu", "torch")
_backend: str | None = None


def _check(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


def set_backend(name: str) -> None:
    """Force a backend for every op (``'auto'`` restores the default choice)."""
    global _backend
    _backend = _check(name)


def get_backend() -> str:
    """The requested backend: set_backend() wins over FASTDIAG_BACKEND, default 'auto'."""
    if _backend is not None:
        return _backend
    return _check(os.environ.get("FASTDIAG_BACKEND", "auto").strip().lower() or "auto")


@functools.cache
def triton_available() -> bool:
    """True when triton imports and torch can register Triton ops (not whether a GPU exists)."""
    if not hasattr(torch.library, "triton_op"):  # torch < 2.6 cannot register Triton ops
        return False
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # pragma: no cover - depends on the install
        return False
    return True


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def cpu_extension_available() -> bool:
    """True when the C++ extension is (or can be) built and loaded; never raises."""
    from fastdiag import _extension

    return _extension.load() is not None


@torch._dynamo.assume_constant_result
def resolve(device: torch.device | str) -> str:
    """Concrete backend ('triton' | 'cpu' | 'torch') for a tensor on ``device``."""
    device = torch.device(device)
    requested = get_backend()
    if requested == "auto":
        if device.type == "cuda" and triton_available():
            return "triton"
        if device.type == "cpu" and cpu_extension_available():
            return "cpu"
        return "torch"
    if requested == "triton":
        if not triton_available():
            raise RuntimeError("FASTDIAG_BACKEND=triton but triton does not import")
        if device.type == "cpu" and not triton_interpreting():
            raise RuntimeError(
                "the triton backend needs a CUDA tensor, or TRITON_INTERPRET=1 for CPU tensors"
            )
        return "triton"
    if requested == "cpu":
        if device.type != "cpu":
            raise RuntimeError(f"the cpu backend runs CPU tensors only, got a {device.type} tensor")
        if not cpu_extension_available():
            raise RuntimeError("the cpu backend was requested but the C++ extension is unavailable")
        return "cpu"
    return "torch"
