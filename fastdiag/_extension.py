"""The one door to the compiled extension: JIT build, load, and ``torch.ops.fastdiag.*``.

Nothing else in the package touches ``torch.ops.fastdiag``: op modules get an extension op with
:func:`op`, ask for a device kernel with :func:`has_kernel` and declare its fake (meta)
implementation with :func:`register_fake`, which applies it when the library loads, before any
``torch.compile`` trace can reach the op. Switches (``FASTDIAG_NO_EXT``, ``FASTDIAG_NO_CUDA_EXT``)
are read by ``fastdiag.backends``, which calls :func:`load`.

Every ``csrc/*.cpp`` file is compiled into one shared library that registers its ops in the
``fastdiag`` torch.library namespace (schemas with ``TORCH_LIBRARY_FRAGMENT``, kernels with
``TORCH_LIBRARY_IMPL``). ``csrc/*.cu`` files join the build only when CUDA is usable. The
library is cached under ``$FASTDIAG_CACHE_DIR`` (default ``~/.cache/fastdiag``) keyed by the
sources, the torch version and the CPU, so the first use pays the build (~20-25 s; it says so
on stderr, with a finished line) and later imports only load it, silently. No compiler, no
ninja, or a failed build: one warning, then the ops fall back to the torch backend.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

_lock = threading.Lock()
_state: dict[str, object] = {}
_fakes: dict[str, Callable] = {}
_fakes_done: set[str] = set()


def register_fake(name: str, fake: Callable) -> None:
    """Declare the fake implementation of the extension op ``fastdiag::name`` (applied when the
    library is loaded, at once if it already is)."""
    _fakes[name] = fake
    if _state.get("result") is not None:
        _apply_fakes()


def _apply_fakes() -> None:
    for name, fake in _fakes.items():
        if name not in _fakes_done and _defined(name):
            torch.library.register_fake(f"fastdiag::{name}")(fake)
            _fakes_done.add(name)


def _defined(name: str) -> bool:
    return hasattr(torch.ops.fastdiag, name)


def op(name: str) -> Callable | None:
    """``torch.ops.fastdiag.<name>.default`` of the loaded extension, or None when the library
    is not loaded or has no such op. Does not build: ``fastdiag.backends`` loads it."""
    if _state.get("result") is None or not hasattr(torch.ops.fastdiag, name):
        return None
    return getattr(torch.ops.fastdiag, name).default


def has_kernel(name: str, dispatch_key: str) -> bool:
    """Whether the loaded extension registered a ``dispatch_key`` ("CPU", "CUDA") kernel for
    ``fastdiag::name``."""
    return op(name) is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
        f"fastdiag::{name}", dispatch_key
    )


def source_dir() -> Path:
    """Directory holding the C++ / CUDA sources (package data, or the repository's csrc/)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "csrc", here.parent / "csrc"):
        if candidate.is_dir() and any(candidate.glob("*.cpp")):
            return candidate
    raise FileNotFoundError(f"no csrc/ directory with C++ sources next to {here}")


def _with_cuda(cuda_sources: bool) -> bool:
    if not cuda_sources:
        return False
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.cuda.is_available() and CUDA_HOME is not None


def _sources(with_cuda: bool) -> list[Path]:
    src = source_dir()
    files = sorted(src.glob("*.cpp"))
    if with_cuda:
        files += sorted(src.glob("*.cu"))
    return files


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else ``platform.processor()``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _build_dir(sources: list[Path], with_cuda: bool) -> tuple[str, Path]:
    digest = hashlib.sha256()
    for path in sources:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    for header in sorted(source_dir().glob("*.h")):
        digest.update(header.read_bytes())
    digest.update(f"{torch.__version__}|{platform.machine()}|{cpu_model()}|{with_cuda}".encode())
    tag = digest.hexdigest()[:16]
    root = Path(os.environ.get("FASTDIAG_CACHE_DIR", Path.home() / ".cache" / "fastdiag"))
    name = "fastdiag_ext_cuda" if with_cuda else "fastdiag_ext"
    return name, root / f"{name}_{tag}"


def _flags(with_cuda: bool) -> dict[str, list[str]]:
    cflags = ["-O3", "-fopenmp"]  # torch adds its own -std= (C++20 for torch >= 2.10)
    if platform.machine() in ("x86_64", "AMD64"):
        cflags.append("-march=native")
    flags = {"extra_cflags": cflags, "extra_ldflags": ["-fopenmp"]}
    if with_cuda:
        flags["extra_cuda_cflags"] = ["-O3"]
        flags["extra_cflags"] = cflags + ["-DFASTDIAG_WITH_CUDA"]
    return flags


def load(verbose: bool = False, *, disabled: bool = False, cuda_sources: bool = True) -> str | None:
    """Build (if needed) and load the extension; returns the library path or None.

    ``disabled``: do neither (None). ``cuda_sources``: compile ``csrc/*.cu`` when CUDA is usable.
    The result is cached for the process: a failed build warns once and is not retried.
    """
    if "result" in _state:  # lock-free once decided
        return _state["result"]  # type: ignore[return-value]
    with _lock:
        if "result" in _state:
            return _state["result"]  # type: ignore[return-value]
        result: str | None = None
        if disabled:
            _state["result"] = None
            return None
        try:
            result = _build_and_load(verbose=verbose, cuda_sources=cuda_sources)
        except Exception as exc:  # noqa: BLE001 - any build failure means "use torch"
            warnings.warn(
                f"fastdiag: the C++ extension could not be built or loaded ({type(exc).__name__}: "
                f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else exc!r}); "
                "falling back to the torch backend",
                RuntimeWarning,
                stacklevel=2,
            )
            result = None
        _state["result"] = result
        if result is not None:
            _apply_fakes()
        return result


def _build_and_load(verbose: bool, cuda_sources: bool) -> str:
    from torch.utils import cpp_extension

    if shutil.which(os.environ.get("CXX", "c++")) is None and shutil.which("g++") is None:
        raise RuntimeError("no C++ compiler on PATH")
    if not cpp_extension.is_ninja_available():
        raise RuntimeError("ninja is not installed")
    with_cuda = _with_cuda(cuda_sources)
    sources = _sources(with_cuda)
    name, build_dir = _build_dir(sources, with_cuda)
    build_dir.mkdir(parents=True, exist_ok=True)
    lib = build_dir / f"{name}.so"
    if lib.exists() and not verbose:
        torch.ops.load_library(str(lib))
        return str(lib)
    kind = "C++ and CUDA" if with_cuda else "C++"
    _say(
        f"fastdiag: compiling the {kind} extension ({len(sources)} sources) into {build_dir}; "
        f"this happens once per source / torch / CPU version and takes about "
        f"{'1-3 minutes' if with_cuda else '20-60 s'} (`fastdiag build-ext` does it ahead of time)"
    )
    started = time.perf_counter()
    cpp_extension.load(
        name=name,
        sources=[str(s) for s in sources],
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=verbose,
        extra_include_paths=[str(source_dir())],
        **_flags(with_cuda),
    )
    _say(f"fastdiag: extension built in {time.perf_counter() - started:.0f} s: {lib}")
    return str(lib)


def _say(message: str) -> None:
    """A progress line of the build on stderr (never on stdout: it may carry a command's data)."""
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


def build_extension(verbose: bool = True, *, cuda_sources: bool = True) -> str | None:
    """Ahead-of-time build (``python -m fastdiag build-ext``); returns the library path."""
    _state.pop("result", None)
    return load(verbose=verbose, cuda_sources=cuda_sources)
