"""JIT build and load of the C++ / CUDA extension in ``csrc/``.

Every ``csrc/*.cpp`` file is compiled into one shared library that registers its ops in the
``fastdiag`` torch.library namespace (schemas with ``TORCH_LIBRARY_FRAGMENT``, kernels with
``TORCH_LIBRARY_IMPL``). ``csrc/*.cu`` files join the build only when CUDA is usable. The
library is cached under ``$FASTDIAG_CACHE_DIR`` (default ``~/.cache/fastdiag``) keyed by the
sources, the torch version and the CPU, so the first use pays the build (~20 s) and later
imports only load it. No compiler, no ninja, or a failed build: one warning, then the ops
fall back to the torch backend.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

_lock = threading.Lock()
_state: dict[str, object] = {}
_on_load: list[Callable[[], None]] = []


def on_load(callback: Callable[[], None]) -> None:
    """Run ``callback`` once the library is loaded (now, if it already is).

    Op modules register their fake (meta) implementations this way, so the fakes exist
    before any ``torch.compile`` trace reaches the ops.
    """
    if _state.get("result") is not None:
        callback()
    else:
        _on_load.append(callback)


def source_dir() -> Path:
    """Directory holding the C++ / CUDA sources (package data, or the repository's csrc/)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "csrc", here.parent / "csrc"):
        if candidate.is_dir() and any(candidate.glob("*.cpp")):
            return candidate
    raise FileNotFoundError(f"no csrc/ directory with C++ sources next to {here}")


def _with_cuda() -> bool:
    if os.environ.get("FASTDIAG_NO_CUDA_EXT", "0") == "1":
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


def load(verbose: bool = False) -> str | None:
    """Build (if needed) and load the extension; returns the library path or None.

    The result is cached for the process: a failed build warns once and is not retried.
    """
    if "result" in _state:  # lock-free once decided
        return _state["result"]  # type: ignore[return-value]
    with _lock:
        if "result" in _state:
            return _state["result"]  # type: ignore[return-value]
        result: str | None = None
        if os.environ.get("FASTDIAG_NO_EXT", "0") == "1":
            _state["result"] = None
            return None
        try:
            result = _build_and_load(verbose=verbose)
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
            for callback in _on_load:
                callback()
            _on_load.clear()
        return result


def _build_and_load(verbose: bool) -> str:
    from torch.utils import cpp_extension

    if shutil.which(os.environ.get("CXX", "c++")) is None and shutil.which("g++") is None:
        raise RuntimeError("no C++ compiler on PATH")
    if not cpp_extension.is_ninja_available():
        raise RuntimeError("ninja is not installed")
    with_cuda = _with_cuda()
    sources = _sources(with_cuda)
    name, build_dir = _build_dir(sources, with_cuda)
    build_dir.mkdir(parents=True, exist_ok=True)
    lib = build_dir / f"{name}.so"
    if lib.exists() and not verbose:
        torch.ops.load_library(str(lib))
        return str(lib)
    cpp_extension.load(
        name=name,
        sources=[str(s) for s in sources],
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=verbose,
        extra_include_paths=[str(source_dir())],
        **_flags(with_cuda),
    )
    return str(lib)


def build_extension(verbose: bool = True) -> str | None:
    """Ahead-of-time build (``python -m fastdiag build-ext``); returns the library path."""
    _state.pop("result", None)
    return load(verbose=verbose)
