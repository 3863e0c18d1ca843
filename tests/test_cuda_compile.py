"""The CUDA sources compile (no GPU needed): nvcc on csrc/spectral_cuda.cu for sm_80 and sm_90,
and the torch glue csrc/spectral_cuda_glue.cpp with FASTDIAG_WITH_CUDA defined, so a CUDA build
error fails CI even on machines without a GPU. The three compilations run in parallel."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parent.parent / "csrc"
NVCC = shutil.which("nvcc")
ARCHS = ("80", "90")

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc (CUDA toolkit) not on PATH")


def _cuda_include() -> Path | None:
    candidates = [Path(os.environ["CUDA_HOME"]) / "include"] if "CUDA_HOME" in os.environ else []
    if NVCC:
        candidates.append(Path(NVCC).resolve().parent.parent / "include")
    candidates.append(Path("/usr/local/cuda/include"))
    for path in candidates:
        if (path / "cuda_runtime_api.h").exists():
            return path
    return None


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """Starts every compilation at once; yields name -> (returncode, output)."""
    out = tmp_path_factory.mktemp("cuda_compile")
    procs: dict[str, subprocess.Popen] = {}
    for arch in ARCHS:
        procs[f"sm_{arch}"] = subprocess.Popen(
            [
                NVCC,
                "-c",
                "-std=c++17",
                "-O3",
                f"-gencode=arch=compute_{arch},code=sm_{arch}",
                "--Werror",
                "all-warnings",
                f"-I{CSRC}",
                str(CSRC / "spectral_cuda.cu"),
                "-o",
                str(out / f"spectral_sm{arch}.o"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    cuda_inc = _cuda_include()
    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if cuda_inc is not None and cxx is not None:
        from torch.utils.cpp_extension import include_paths

        procs["glue"] = subprocess.Popen(
            [
                cxx,
                "-fsyntax-only",
                "-std=c++20",
                "-DFASTDIAG_WITH_CUDA",
                "-Wall",
                "-Werror",
                *[f"-isystem{p}" for p in include_paths()],
                f"-isystem{cuda_inc}",
                f"-I{CSRC}",
                str(CSRC / "spectral_cuda_glue.cpp"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    results = {}
    for name, proc in procs.items():
        text, _ = proc.communicate(timeout=600)
        results[name] = (proc.returncode, text)
    return results


@pytest.mark.parametrize("arch", ARCHS)
def test_spectral_cuda_compiles(builds, arch):
    code, text = builds[f"sm_{arch}"]
    assert code == 0, f"nvcc sm_{arch} failed:\n{text}"


def test_spectral_cuda_glue_compiles(builds):
    if "glue" not in builds:
        pytest.skip("no CUDA headers or C++ compiler for the glue check")
    code, text = builds["glue"]
    assert code == 0, f"spectral_cuda_glue.cpp (FASTDIAG_WITH_CUDA) failed:\n{text}"


def test_cuda_source_is_torch_free():
    """The .cu includes no torch header (fast nvcc builds; the glue holds the torch side)."""
    text = (CSRC / "spectral_cuda.cu").read_text()
    includes = [line for line in text.splitlines() if line.startswith("#include")]
    assert includes and not any("torch" in i or "ATen" in i or "c10" in i for i in includes)
