"""A whole ``update`` of the drop-in diagnostics: ``fastdiag.reference`` vs ``fastdiag``.

Shapes of the seed's models:

* set-only: B=32, N=512, S=64, D=512 with router probs, set embeddings, router parameters
  (a Linear D -> S with gradients), set attention and token ids;
* baseline: attention [8, 12, 512, 512] (per-head weights) with the attention parameters of an
  ``nn.MultiheadAttention(768, 12)``.

Reported: time per update (min and median of the rounds), the speed-up, and the host
synchronisations per update: on CPU the calls to the Tensor methods that copy device data to
the host (``item``, ``tolist``, ``cpu``, ``numpy``, ``nonzero``, ``__float__``, ``__bool__``,
``__int__``, ``__index__``), counted by patching them; on a GPU the synchronising CUDA calls
reported by ``torch.cuda.set_sync_debug_mode("warn")``.

    pytest bench/bench_diagnostics.py --benchmark-only
    python bench/bench_diagnostics.py [--device cuda] [--rounds 5] [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable

import pytest
import torch

import fastdiag
from fastdiag import backends, reference
from fastdiag.diagnostics import BaselineAttentionDiagnostics, SetDiagnostics

SET_SHAPE = dict(b=32, n=512, s=64, d=512, vocab=50257)
BASELINE_SHAPE = (8, 12, 512, 512)
SYNC_METHODS = ("item", "tolist", "cpu", "numpy", "nonzero", "__float__", "__bool__", "__int__", "__index__")


# ----------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------


def set_inputs(device: str = "cpu", seed: int = 0) -> dict:
    """The keyword arguments of one ``update_with_router_state`` call at the seed's shapes."""
    b, n, s, d, vocab = (SET_SHAPE[k] for k in ("b", "n", "s", "d", "vocab"))
    gen = torch.Generator().manual_seed(seed)
    router = torch.nn.Linear(d, s).to(device)
    for p in router.parameters():
        p.grad = torch.randn(p.shape, generator=gen).to(device)
    logits = 2 * torch.randn(b, n, s, generator=gen)
    probs = logits.softmax(-1)
    return dict(
        bank_indices=probs.argmax(-1).to(device),
        num_sets=s,
        router_probs=probs.to(device),
        set_embeddings=torch.randn(b, s, d, generator=gen).to(device),
        router_params=dict(router.named_parameters()),
        set_attention_weights=(3 * torch.randn(b, n, s, generator=gen)).softmax(-1).to(device),
        token_ids=torch.randint(0, vocab, (b, n), generator=gen).to(device),
    )


def baseline_inputs(device: str = "cpu", seed: int = 0) -> tuple:
    """(attention_weights, attention_params) of one ``update`` call at the seed's shape."""
    gen = torch.Generator().manual_seed(seed)
    attn = (4 * torch.randn(*BASELINE_SHAPE, generator=gen)).softmax(-1).to(device)
    mha = torch.nn.MultiheadAttention(768, 12).to(device)
    for p in mha.parameters():
        p.grad = torch.randn(p.shape, generator=gen).to(device)
    return attn, dict(mha.named_parameters())


# ----------------------------------------------------------------------------------------------
# measurement
# ----------------------------------------------------------------------------------------------


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_update(fn: Callable[[], None], device: str, rounds: int) -> list[float]:
    """Seconds of each of ``rounds`` calls (after one warm-up call), synchronised on GPU."""
    fn()
    _sync(device)
    out = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - start)
    return out


@contextlib.contextmanager
def count_host_syncs(device: str):
    """Yields a dict whose ``"syncs"`` entry counts host synchronisations in the block."""
    counter = {"syncs": 0}
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield counter
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counter["syncs"] = sum("synchronizing" in str(w.message) for w in caught)
        return
    saved = {name: getattr(torch.Tensor, name) for name in SYNC_METHODS}

    def make(original):
        def patched(self, *args, **kwargs):
            counter["syncs"] += 1
            return original(self, *args, **kwargs)

        return patched

    try:
        for name, original in saved.items():
            setattr(torch.Tensor, name, make(original))
        yield counter
    finally:
        for name, original in saved.items():
            setattr(torch.Tensor, name, original)


def syncs_per_update(fn: Callable[[], None], device: str, updates: int = 3) -> float:
    fn()  # warm-up: lazy imports and first-call setup are not per-update costs
    with count_host_syncs(device) as counter:
        for _ in range(updates):
            fn()
    return counter["syncs"] / updates


def _set_update(diag, kwargs: dict) -> Callable[[], None]:
    gen = torch.Generator().manual_seed(0)
    return lambda: diag.update_with_router_state(**kwargs, generator=gen)


def _baseline_update(diag, args: tuple) -> Callable[[], None]:
    return lambda: diag.update(*args)


def measure(device: str = "cpu", rounds: int = 5) -> list[dict]:
    """Rows of the table: one per (case, implementation)."""
    cases = [
        ("SetDiagnostics", "B=32 N=512 S=64 D=512", set_inputs(device), _set_update,
         reference.ReferenceSetDiagnostics, SetDiagnostics),
        ("BaselineAttentionDiagnostics", "[8, 12, 512, 512]", baseline_inputs(device), _baseline_update,
         reference.ReferenceBaselineAttentionDiagnostics, BaselineAttentionDiagnostics),
    ]
    rows = []
    for name, shape, inputs, make, ref_cls, fd_cls in cases:
        impls = (("reference", ref_cls), ("fastdiag", fd_cls))
        fns = {impl: make(cls(), inputs) for impl, cls in impls}
        times: dict[str, list[float]] = {impl: [] for impl, _ in impls}
        for _ in range(rounds):  # interleaved, so both see the same machine load
            for impl, fn in fns.items():
                times[impl].extend(time_update(fn, device, 1))
        for impl, cls in impls:
            t = times[impl]
            rows.append(dict(case=name, shape=shape, impl=impl, min_ms=1e3 * min(t),
                             median_ms=1e3 * statistics.median(t),
                             syncs_per_update=syncs_per_update(make(cls(), inputs), device)))
        rows[-1]["speedup"] = min(times["reference"]) / min(times["fastdiag"])
        rows[-1]["speedup_median"] = statistics.median(times["reference"]) / statistics.median(times["fastdiag"])
    return rows


def environment(device: str) -> dict:
    dev = torch.device(device)
    device_type, index = dev.type, dev.index
    env = dict(
        torch=torch.__version__,
        python=platform.python_version(),
        threads=torch.get_num_threads(),
        backend_requested=backends.get_backend(),
        dist_stats_backend=backends.resolve("dist_stats", torch.device(device), torch.float32),
        spectral_path=backends.resolve("spectral_stats", torch.device(device_type, index), torch.float32),
        load_average=os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    )
    env["device"] = torch.cuda.get_device_name(device) if device.startswith("cuda") else platform.processor() or "cpu"
    return env


def format_table(rows: list[dict], env: dict) -> str:
    lines = [
        f"device: {env['device']} ({env['threads']} threads), torch {env['torch']}, "
        f"dist_stats backend: {env['dist_stats_backend']}, effective_rank path: {env['spectral_path']}, "
        f"1-min load average at the end: {env['load_average']}",
        "",
        "| class | shape | impl | min ms | median ms | syncs / update | speed-up (min / median) |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        speed = f"{r['speedup']:.2f}x / {r['speedup_median']:.2f}x" if "speedup" in r else ""
        lines.append(
            f"| {r['case']} | {r['shape']} | {r['impl']} | {r['min_ms']:.1f} | {r['median_ms']:.1f} | "
            f"{r['syncs_per_update']:g} | {speed} |"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# pytest-benchmark entry points
# ----------------------------------------------------------------------------------------------

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def set_kwargs():
    return set_inputs(DEVICE)


@pytest.fixture(scope="module")
def baseline_args():
    return baseline_inputs(DEVICE)


def _bench(benchmark, fn, rounds):
    def run():
        fn()
        _sync(DEVICE)

    benchmark.pedantic(run, rounds=rounds, warmup_rounds=1)


@pytest.mark.parametrize("impl", ["reference", "fastdiag"])
def test_set_diagnostics_update(benchmark, set_kwargs, impl):
    cls = reference.ReferenceSetDiagnostics if impl == "reference" else SetDiagnostics
    benchmark.group = "SetDiagnostics B=32 N=512 S=64 D=512"
    benchmark.extra_info["syncs_per_update"] = syncs_per_update(_set_update(cls(), set_kwargs), DEVICE)
    benchmark.extra_info["backend"] = backends.resolve("dist_stats", torch.device(DEVICE), torch.float32)
    _bench(benchmark, _set_update(cls(), set_kwargs), rounds=5)


@pytest.mark.parametrize("impl", ["reference", "fastdiag"])
def test_baseline_diagnostics_update(benchmark, baseline_args, impl):
    cls = reference.ReferenceBaselineAttentionDiagnostics if impl == "reference" else BaselineAttentionDiagnostics
    benchmark.group = "BaselineAttentionDiagnostics [8, 12, 512, 512]"
    benchmark.extra_info["syncs_per_update"] = syncs_per_update(_baseline_update(cls(), baseline_args), DEVICE)
    benchmark.extra_info["backend"] = backends.resolve("dist_stats", torch.device(DEVICE), torch.float32)
    _bench(benchmark, _baseline_update(cls(), baseline_args), rounds=3)


def test_fastdiag_update_has_no_host_sync(set_kwargs, baseline_args):
    assert syncs_per_update(_set_update(SetDiagnostics(), set_kwargs), DEVICE) == 0
    assert syncs_per_update(_baseline_update(BaselineAttentionDiagnostics(), baseline_args), DEVICE) == 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=DEVICE)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--backend", default=None, help="auto | triton | cpu | torch")
    parser.add_argument("--json", default=None, help="also write the rows and environment here")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads first")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.backend:
        fastdiag.set_backend(args.backend)
    rows = measure(args.device, args.rounds)
    env = environment(args.device)
    print(format_table(rows, env))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"environment": env, "rows": rows}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
