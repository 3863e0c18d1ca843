"""One backend switch that every op obeys: FASTDIAG_BACKEND decides, fastdiag.backends resolves.

Each value of the switch is set in the environment and the test records which implementation
of dist_stats, spectral_stats and cosine_stats actually ran on a CPU tensor (Triton through its
interpreter, which conftest turns on when there is no GPU).
"""

from __future__ import annotations

import pytest
import torch

import fastdiag
from fastdiag import backends, ops
from tests.conftest import HAS_CUDA

pytestmark = pytest.mark.skipif(HAS_CUDA, reason="the table below is the CPU-only machine's")

OPS = ("dist_stats", "spectral_stats", "cosine_stats")


def _run_all() -> None:
    g = torch.Generator().manual_seed(0)
    ops.dist_stats(torch.softmax(torch.randn(2, 3, 5, 7, generator=g), -1), reduce_dim=1, topk=2)
    ops.spectral_stats(torch.randn(2, 6, 4, generator=g))
    ops.cosine_stats(torch.randn(2, 6, 4, generator=g))


@pytest.fixture
def ran(monkeypatch):
    """Spy on every registered implementation; yields {op: [backends that ran, in order]}."""
    calls: dict[str, list[str]] = {op: [] for op in OPS}
    for op in OPS:
        table = dict(backends.table(op))
        for name, impl in table.items():

            def load(op=op, name=name, impl=impl):
                fn = impl.load()

                def spy(*args, **kwargs):
                    calls[op].append(name)
                    return fn(*args, **kwargs)

                return spy

            table[name] = backends.Impl(load, impl.devices, impl.dtypes, impl.kernel)
        monkeypatch.setitem(backends._TABLES, op, table)
    backends.refresh()
    fastdiag.set_backend(None)
    yield calls
    backends.refresh()


needs_ext = pytest.mark.skipif(
    not backends.cpu_extension_available(), reason="the C++ extension cannot be built here"
)
needs_interpreter = pytest.mark.skipif(
    not (backends.triton_available() and backends.triton_interpreting()),
    reason="needs triton and TRITON_INTERPRET=1",
)

# what runs on a float32 CPU tensor for each value of the switch
EXPECTED = {
    "auto": {"dist_stats": "cpu", "spectral_stats": "cpu", "cosine_stats": "torch"},
    "cpu": {"dist_stats": "cpu", "spectral_stats": "cpu", "cosine_stats": "torch"},
    "triton": {"dist_stats": "triton", "spectral_stats": "torch", "cosine_stats": "triton"},
    "cuda": {"dist_stats": "torch", "spectral_stats": "torch", "cosine_stats": "torch"},
    "torch": {"dist_stats": "torch", "spectral_stats": "torch", "cosine_stats": "torch"},
}


@needs_ext
@needs_interpreter
@pytest.mark.parametrize("value", list(EXPECTED))
def test_every_op_obeys_the_switch(value, ran, monkeypatch):
    monkeypatch.setenv("FASTDIAG_BACKEND", value)
    backends.refresh()
    _run_all()
    assert {op: ran[op] for op in OPS} == {op: [EXPECTED[value][op]] for op in OPS}
    for op in OPS:
        assert backends.resolve(op, "cpu", torch.float32) == EXPECTED[value][op]


@needs_interpreter
def test_dtype_the_kernel_does_not_take_runs_torch(ran, monkeypatch):
    monkeypatch.setenv("FASTDIAG_BACKEND", "triton")
    backends.refresh()
    ops.cosine_stats(torch.randn(5, 3, dtype=torch.float64))  # the Triton kernel is float32
    assert ran["cosine_stats"] == ["torch"]


def test_set_backend_wins_over_the_environment(ran, monkeypatch):
    monkeypatch.setenv("FASTDIAG_BACKEND", "cpu")
    backends.refresh()
    fastdiag.set_backend("torch")
    try:
        _run_all()
    finally:
        fastdiag.set_backend(None)
    assert all(ran[op] == ["torch"] for op in OPS)


def test_an_explicit_backend_that_cannot_run_is_an_error(monkeypatch):
    monkeypatch.setenv("FASTDIAG_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    backends.refresh()
    fastdiag.set_backend(None)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1 for CPU tensors"):
        ops.dist_stats(torch.softmax(torch.randn(3, 4), -1))


def test_unknown_values_are_rejected(monkeypatch):
    monkeypatch.setenv("FASTDIAG_BACKEND", "cudnn")
    backends.refresh()
    fastdiag.set_backend(None)
    with pytest.raises(ValueError, match="backend must be one of"):
        backends.get_backend()
    with pytest.raises(ValueError, match="backend must be one of"):
        fastdiag.set_backend("fast")
    monkeypatch.setenv("FASTDIAG_BACKEND", "auto")
    backends.refresh()
    with pytest.raises(ValueError, match="op must be one of"):
        backends.resolve("nope", "cpu", torch.float32)


def test_a_table_needs_a_torch_implementation():
    with pytest.raises(ValueError, match="torch included"):
        backends.register("x", {"cpu": backends.Impl(lambda: None, ("cpu",))})


def test_summary_names_every_op():
    fastdiag.set_backend(None)
    table = backends.summary()
    assert set(OPS) <= set(table)
    assert all(set(devs) >= {"cpu"} for devs in table.values())


def test_cli_prints_the_choice_per_op(capsys):
    from fastdiag.cli import main

    fastdiag.set_backend(None)
    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    assert "FASTDIAG_BACKEND=" in out
    assert all(op in out for op in OPS)
