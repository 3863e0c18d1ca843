"""Test configuration.

Without a GPU, the Triton kernels run under the interpreter on CPU tensors: the variable must
be set before triton is first imported, so it is set here, at collection time.
"""

from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture
def backend():
    """Yields a function that forces a backend for the test; restores 'auto' afterwards."""
    import fastdiag

    def use(name: str) -> None:
        fastdiag.set_backend(name)

    yield use
    fastdiag.set_backend("auto")


def available_backends(device: str = "cpu") -> list[str]:
    """Backends that can run tensors of ``device`` here (triton on CPU via the interpreter)."""
    from fastdiag import backends

    names = ["torch"]
    if device == "cpu" and backends.cpu_extension_available():
        names.append("cpu")
    if backends.triton_available() and (device == "cuda" or backends.triton_interpreting()):
        names.append("triton")
    return names
