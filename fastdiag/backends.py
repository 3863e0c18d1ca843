"""The one place that decides which implementation of an op runs.

Every fused op declares a table ``{backend: Impl}`` with :func:`register` when its module is
imported; :func:`resolve` reads the switch below and that table and names the backend, with
every fallback decided here and nowhere else. Backends:

========  ==========================================================================
triton    Triton kernels (``kernels/``): CUDA tensors; CPU tensors under TRITON_INTERPRET=1
cpu       the C++ extension's CPU kernels (``csrc/*.cpp``, OpenMP), JIT-built on first use
cuda      the C++ extension's CUDA kernels (``csrc/*.cu``), built when CUDA is usable
torch     portable vectorised PyTorch, runs on any device
========  ==========================================================================

The switch: ``FASTDIAG_BACKEND=auto|triton|cpu|cuda|torch`` or :func:`set_backend` (which wins).
The environment is read once, at the first choice, and again by :func:`refresh` or
``set_backend(None)``; every choice is then cached (an update asks for several ops: the
choice must cost a dictionary look-up, not a read of the environment).

* ``auto`` (default): the first implementation in the op's own preference order (its table's
  order, ``torch`` last) that runs on the tensor's device and dtype and is available here.
* an explicit backend: the op's implementation for that backend when the op has one that
  takes the tensor's device and dtype; an op without one runs its ``torch`` implementation
  (never another compiled backend). A requested backend that the op has but that cannot run
  here (triton not importable, a CPU tensor without TRITON_INTERPRET=1, the extension not
  built) is a ``RuntimeError``, not a silent fallback.

Other switches (all read here):

* ``TRITON_INTERPRET=1``: Triton kernels may run on CPU tensors (Triton's interpreter; slow,
  for tests).
* ``FASTDIAG_NO_EXT=1``: never build or load the C++ extension (``cpu`` / ``cuda`` unavailable).
* ``FASTDIAG_NO_CUDA_EXT=1``: build the extension without its ``.cu`` sources.
* ``FASTDIAG_CACHE_DIR``: where the extension is built and cached (default ``~/.cache/fastdiag``).

``python -m fastdiag backends`` prints, for each op, which backend runs on this machine.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch

BACKENDS = ("auto", "triton", "cpu", "cuda", "torch")
_COMPILED = ("triton", "cpu", "cuda")
_backend: str | None = None


@dataclass(frozen=True)
class Impl:
    """One implementation of an op.

    load:    returns the callable (imports lazily: ``import fastdiag.ops`` loads no kernel).
    devices: device types it runs on, None = any (a triton impl also takes CPU tensors when
             interpreting).
    dtypes:  input dtypes it takes; None = any.
    kernel:  for ``cpu`` / ``cuda``: the ``fastdiag::`` op name whose kernel must be registered
             for the device's dispatch key once the extension is loaded.
    """

    load: Callable[[], Callable]
    devices: tuple[str, ...] | None = None
    dtypes: tuple[torch.dtype, ...] | None = None
    kernel: str | None = None


_TABLES: dict[str, dict[str, Impl]] = {}


def register(op: str, table: Mapping[str, Impl]) -> None:
    """Declare the implementations of ``op`` in its preference order (``torch`` required)."""
    unknown = set(table) - set(BACKENDS[1:])
    if unknown or "torch" not in table:
        raise ValueError(
            f"the table of {op!r} must map backends of {BACKENDS[1:]} (torch included) to Impl, "
            f"got {sorted(table)}"
        )
    _TABLES[op] = dict(table)
    _forget()


def table(op: str) -> dict[str, Impl]:
    """The registered implementations of ``op``."""
    try:
        return _TABLES[op]
    except KeyError:
        raise ValueError(f"op must be one of {sorted(_TABLES)}, got {op!r}") from None


def _check(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


class _Environment(NamedTuple):
    backend: str
    interpreting: bool
    no_ext: bool
    no_cuda_ext: bool


_env: _Environment | None = None
_impl_cache: dict[tuple[str, str, torch.dtype], Callable] = {}


def _environment() -> _Environment:
    global _env
    if _env is None:
        get = os.environ.get
        _env = _Environment(
            backend=_check(get("FASTDIAG_BACKEND", "auto").strip().lower() or "auto"),
            interpreting=get("TRITON_INTERPRET", "0") == "1",
            no_ext=get("FASTDIAG_NO_EXT", "0") == "1",
            no_cuda_ext=get("FASTDIAG_NO_CUDA_EXT", "0") == "1",
        )
    return _env


def _forget() -> None:
    _resolve.cache_clear()
    _impl_cache.clear()


def refresh() -> None:
    """Read the environment again and forget every cached choice."""
    global _env
    _env = None
    _forget()


def set_backend(name: str | None) -> None:
    """Force a backend for every op; None follows ``FASTDIAG_BACKEND`` again (re-read)."""
    global _backend
    if name is None:
        refresh()
    _backend = None if name is None else _check(name)
    _forget()


def get_backend() -> str:
    """The requested backend: set_backend() wins over FASTDIAG_BACKEND, default 'auto'."""
    if _backend is not None:
        return _backend
    return _environment().backend


def triton_interpreting() -> bool:
    """TRITON_INTERPRET=1: Triton kernels run in Triton's interpreter (on CPU tensors)."""
    return _environment().interpreting


def extension_disabled() -> bool:
    """FASTDIAG_NO_EXT=1: the C++ extension is never built or loaded."""
    return _environment().no_ext


def cuda_extension_disabled() -> bool:
    """FASTDIAG_NO_CUDA_EXT=1: the extension is built without its CUDA sources."""
    return _environment().no_cuda_ext


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


def load_extension(verbose: bool = False) -> str | None:
    """Build (if needed) and load the C++ extension under the switches above; the library's
    path, or None when it is disabled or could not be built (one warning). Never raises."""
    from fastdiag import _extension

    return _extension.load(
        verbose=verbose, disabled=extension_disabled(), cuda_sources=not cuda_extension_disabled()
    )


def cpu_extension_available() -> bool:
    """True when the C++ extension is (or can be) built and loaded; never raises."""
    return load_extension() is not None


def _why_not(backend: str, impl: Impl, device: str) -> str | None:
    """None when ``impl`` can run on ``device`` here, else the reason it cannot."""
    if backend == "triton":
        if not triton_available():
            return "triton does not import"
        if device == "cpu" and not triton_interpreting():
            return "the triton backend needs a CUDA tensor, or TRITON_INTERPRET=1 for CPU tensors"
        return None
    if backend in ("cpu", "cuda"):
        from fastdiag import _extension

        if extension_disabled():
            return "the C++ extension is disabled (FASTDIAG_NO_EXT=1)"
        if load_extension() is None:
            return "the C++ extension is unavailable (it did not build or load)"
        key = "CPU" if device == "cpu" else "CUDA"
        if impl.kernel is not None and not _extension.has_kernel(impl.kernel, key):
            return f"the extension has no {key} kernel of fastdiag::{impl.kernel}"
    return None


def _takes(backend: str, impl: Impl, device: str, dtype: torch.dtype) -> bool:
    runs_on = impl.devices is None or device in impl.devices or (
        backend == "triton" and device == "cpu" and "cuda" in impl.devices
    )
    return runs_on and (impl.dtypes is None or dtype in impl.dtypes)


def _choose(op: str, device: str, dtype: torch.dtype, requested: str) -> str:
    impls = table(op)
    if requested == "auto":
        for backend, impl in impls.items():
            if backend == "triton" and device == "cpu":
                continue  # the interpreter is a test tool: only an explicit request uses it
            if _takes(backend, impl, device, dtype) and _why_not(backend, impl, device) is None:
                return backend
        return "torch"
    impl = impls.get(requested)
    if impl is None or not _takes(requested, impl, device, dtype):
        return "torch"
    reason = _why_not(requested, impl, device)
    if reason is not None:
        raise RuntimeError(f"FASTDIAG_BACKEND={requested} for {op} on a {device} tensor: {reason}")
    return requested


def _constant_under_compile(fn: Callable) -> Callable:
    """``torch.compiler.assume_constant_result`` without its import of torch._dynamo (~3 s and
    triton) when fastdiag is imported; tests check the marker is still dynamo's."""
    fn._dynamo_marked_constant = True  # type: ignore[attr-defined]
    return fn


@functools.cache  # cleared with the environment snapshot (refresh, set_backend, register)
def _resolve(op: str, device: str, dtype: torch.dtype, requested: str) -> str:
    name = _choose(op, device, dtype, requested)
    # load once here, eagerly: a first load can register a custom op, which a trace cannot do
    table(op)[name].load()
    return name


@_constant_under_compile
def resolve(op: str, device: torch.device | str, dtype: torch.dtype) -> str:
    """The backend that runs ``op`` for a tensor of ``dtype`` on ``device`` (see module doc).

    A host decision, constant for a traced graph (evaluated eagerly under torch.compile)."""
    device_type = torch.device(device).type
    return _resolve(op, device_type, dtype, get_backend())


def implementation(op: str, device: torch.device | str, dtype: torch.dtype) -> Callable:
    """The callable of the backend :func:`resolve` picks (cached: one look-up per call)."""
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    if torch.compiler.is_compiling():
        # traced: resolve() runs eagerly (and has loaded the implementation, see _resolve);
        # the cache below is not consulted, so its contents are no guard of the graph
        return table(op)[resolve(op, device_type, dtype)].load()
    key = (op, device_type, dtype)
    fn = _impl_cache.get(key)
    if fn is None:
        fn = _impl_cache[key] = table(op)[resolve(op, device_type, dtype)].load()
    return fn


def summary() -> dict[str, dict[str, str]]:
    """For each registered op and device type, the backend that runs float32 input here."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    out: dict[str, dict[str, str]] = {}
    for op in sorted(_TABLES):
        out[op] = {}
        for dev in devices:
            try:
                out[op][dev] = resolve(op, dev, torch.float32)
            except RuntimeError as exc:
                out[op][dev] = f"error: {exc}"
    return out


__all__ = [
    "BACKENDS",
    "Impl",
    "cpu_extension_available",
    "get_backend",
    "implementation",
    "load_extension",
    "refresh",
    "register",
    "resolve",
    "set_backend",
    "summary",
    "table",
    "triton_available",
    "triton_interpreting",
]
