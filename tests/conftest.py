"""Test configuration.

Without a GPU, the Triton kernels run under the interpreter on CPU tensors: the variable must
be set before triton is first imported, so it is set here, at collection time.
"""

from __future__ import annotations

import contextlib
import math
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


@pytest.fixture(autouse=True)
def _fresh_backend_choice():
    """Every test starts and ends with the environment read afresh (backends caches it), so a
    test's monkeypatched FASTDIAG_BACKEND / TRITON_INTERPRET never leaks into the next one."""
    from fastdiag import backends

    backends.refresh()
    yield
    backends.set_backend(None)


@pytest.fixture
def backend():
    """Yields a function that forces a backend for the test; restores 'auto' afterwards."""
    import fastdiag

    def use(name: str) -> None:
        fastdiag.set_backend(name)

    yield use
    fastdiag.set_backend(None)


def available_backends(device: str = "cpu") -> list[str]:
    """Backends that can run tensors of ``device`` here (triton on CPU via the interpreter)."""
    from fastdiag import backends

    names = ["torch"]
    if device == "cpu" and backends.cpu_extension_available():
        names.append("cpu")
    if backends.triton_available() and (device == "cuda" or backends.triton_interpreting()):
        names.append("triton")
    return names


SYNC_METHODS = ("item", "tolist", "cpu", "numpy", "nonzero", "__float__", "__bool__", "__int__", "__index__")


@contextlib.contextmanager
def forbid_host_sync(counter: dict | None = None):
    """Patch the Tensor methods that copy device data to the host: raise (or count) on a call."""
    saved = {name: getattr(torch.Tensor, name) for name in SYNC_METHODS}

    def make(name):
        original = saved[name]

        def patched(self, *args, **kwargs):
            if counter is None:
                raise AssertionError(f"host synchronisation: Tensor.{name} called during update")
            counter[name] = counter.get(name, 0) + 1
            return original(self, *args, **kwargs)

        return patched

    try:
        for name in SYNC_METHODS:
            setattr(torch.Tensor, name, make(name))
        yield
    finally:
        for name, original in saved.items():
            setattr(torch.Tensor, name, original)


@contextlib.contextmanager
def forbid_cuda_sync():
    """Wait for the queued CUDA work, then make any synchronising CUDA call raise until exit."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def op_args(
    x4,
    mask=None,
    logits=False,
    topk=0,
    tau=0.1,
    eps=1e-6,
    window=-1,
    qoff=0,
    qlen=None,
    rows=True,
):
    """Positional arguments of a ``fastdiag::dist_stats_*`` op; query_len defaults to C, as in
    the public wrapper."""
    return (
        x4,
        mask,
        logits,
        topk,
        tau,
        eps,
        window,
        qoff,
        x4.shape[2] if qlen is None else qlen,
        rows,
    )


def assert_same_epochs(want: list[dict[str, float]], got: list[dict[str, float]]) -> None:
    """Epoch dicts equal key for key, bit for bit (NaN equals NaN)."""
    assert len(want) == len(got)
    for w, g in zip(want, got):
        assert w.keys() == g.keys()
        for key in w:
            assert (math.isnan(w[key]) and math.isnan(g[key])) or w[key] == g[key], key
