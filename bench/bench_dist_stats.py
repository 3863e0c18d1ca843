"""``fastdiag.ops.dist_stats`` raced against the reference, the seed's code and a one-read baseline.

    pytest bench/bench_dist_stats.py --benchmark-only     # raw pytest-benchmark output
    python bench/run.py bench/bench_dist_stats.py         # + GB/s, ratios, bench/results/*.json

Implementations per case (``impl``):

* ``one_read``  - ``x.sum()``: one read of ``x``, the floor of a memory-bound op.
* ``copy``      - ``y.copy_(x)``: the device copy bandwidth (bytes counted: read + write).
* ``reference`` - ``fastdiag.reference.row_stats``: the same row statistics (entropy, max,
  argmax, top-k, sum of squares, counts, row-sum error, future mass, deviation from uniform)
  the plain way, in float64 (the oracle of the fused op).
* ``seed``      - what the seed code does per update, in plain float32 torch (written here):
  attention - head mean, entropy with ``log(p + 1e-10)``, top-1 mean/std, top-5 indices, the
  Python-set Jaccard with the previous update, every value read with ``.item()``; routing -
  router confidence (max) mean/std and entropy / top-1 of the weights, with ``.item()``.
* ``torch`` / ``cpu`` / ``triton`` - ``dist_stats`` on that backend (``cpu`` = the C++
  extension, CPU tensors only; ``triton`` on CUDA only).
* ``torch_noheads`` / ``cpu_noheads`` / ``triton_noheads`` - the same with ``heads=False`` (no
  per-head statistics: ``head_sums`` is NaN).

Timing: pytest-benchmark wall time (on CUDA each call ends with a synchronize) and, on CUDA,
``triton.testing.do_bench`` (CUDA events) in ``extra_info["device_time_s"]``. The backends are
also timed interleaved with ``one_read`` (``extra_info["paired_s"]`` and
``["paired_one_read_s"]``, minima over the same rounds) so its ratio to one read is not skewed by
a load change between tests. Peak extra memory (``extra_info["peak_extra_bytes"]``): on CUDA
``torch.cuda.max_memory_allocated`` above the allocation before the call; on CPU the rise of the
process's peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs``) above the
resident set before the call, after ``malloc_trim(0)`` has returned the heap's free pages to the
OS, so it counts every allocation the call touches (torch tensors, the C++ kernel's scratch,
Python objects) whatever ran before.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import fastdiag
from fastdiag import backends, reference
from fastdiag.ops import dist_stats


@dataclass(frozen=True)
class Case:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    reduce_dim: int | None  # 1 = heads of [B, H, N, Nk], averaged while reading
    topk: int
    kind: str  # "attention" | "routing"
    devices: tuple[str, ...] = ("cpu", "cuda")


CASES = (
    Case("attention_4x8x256x256", (4, 8, 256, 256), torch.float32, 1, 5, "attention"),
    Case("attention_8x12x512x512", (8, 12, 512, 512), torch.float32, 1, 5, "attention"),
    Case("attention_2x16x1024x1024", (2, 16, 1024, 1024), torch.float32, 1, 5, "attention"),
    Case("routing_32x512x64", (32, 512, 64), torch.float32, None, 1, "routing"),
    Case(
        "attention_8x16x2048x2048_bf16",
        (8, 16, 2048, 2048),
        torch.bfloat16,
        1,
        5,
        "attention",
        ("cuda",),
    ),
)
IMPLS = (
    "one_read",
    "copy",
    "reference",
    "seed",
    "torch",
    "torch_noheads",
    "cpu",
    "cpu_noheads",
    "triton",
    "triton_noheads",
)
BASELINES = ("one_read", "copy")
DEVICES = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
ROUNDS = {"reference": 3, "seed": 10, "torch": 5, "torch_noheads": 10}  # others: FAST_ROUNDS
FAST_ROUNDS = 20
# impls timed interleaved with one_read
PAIRED_ROUNDS = {
    "torch": 3,
    "torch_noheads": 10,
    "cpu": 20,
    "cpu_noheads": 20,
    "triton": 20,
    "triton_noheads": 20,
}


@functools.lru_cache(maxsize=2)
def make_input(case: Case, device: str) -> torch.Tensor:
    """Softmax rows of ``case.shape`` (random logits, scale 2), made on ``device``."""
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(case.shape, generator=g, device=device) * 2.0
    return torch.softmax(x, dim=-1).to(case.dtype)


# ---- the seed's per-update statistics (plain float32 torch, as users run them today) ----


class SeedAttention:
    """The seed's ``BaselineAttentionDiagnostics.update`` statistics on one attention tensor."""

    def __init__(self) -> None:
        self.prev_top: set[int] | None = None

    def __call__(self, attn: torch.Tensor) -> dict[str, float]:
        a = attn.mean(dim=1)  # [B, N, Nk]
        out = {}
        ent = -(a * torch.log(a + 1e-10)).sum(dim=-1)
        out["entropy_mean"] = ent.mean().item()
        out["entropy_norm"] = (ent.mean() / torch.log(torch.tensor(float(a.shape[-1])))).item()
        top1 = a.max(dim=-1)[0]
        out["top1_mean"] = top1.mean().item()
        out["top1_std"] = top1.std().item()
        top = a.topk(k=min(5, a.shape[-1]), dim=-1).indices
        now = set(top.flatten().cpu().tolist())
        if self.prev_top is not None:
            union = len(now | self.prev_top)
            out["pattern_jaccard"] = len(now & self.prev_top) / union if union else 0.0
        self.prev_top = now
        return out


def seed_routing(w: torch.Tensor) -> dict[str, float]:
    """The seed's router-confidence and set-attention statistics on [B, N, S] weights."""
    conf = w.max(dim=-1)[0]
    ent = -(w * torch.log(w + 1e-10)).sum(dim=-1)
    return {
        "router_confidence_mean": conf.mean().item(),
        "router_confidence_std": conf.std().item(),
        "set_attention_entropy_mean": ent.mean().item(),
        "set_attention_top1_mean": w.max(dim=-1)[0].mean().item(),
    }


# ---- what each impl runs ----


def impl_fn(impl: str, case: Case, x: torch.Tensor) -> Callable[[], object]:
    """A no-argument callable running ``impl`` on ``x`` (skips the test when unavailable)."""
    if impl == "one_read":
        return x.sum
    if impl == "copy":
        y = torch.empty_like(x)
        return functools.partial(y.copy_, x)
    if impl == "reference":
        return functools.partial(reference.row_stats, x, reduce_dim=case.reduce_dim, topk=case.topk)
    if impl == "seed":
        return functools.partial(SeedAttention() if case.kind == "attention" else seed_routing, x)
    backend, _, variant = impl.partition("_")  # "<backend>_noheads": heads=False
    if backend == "cpu" and (x.device.type != "cpu" or not backends.cpu_extension_available()):
        pytest.skip("the cpu backend needs CPU tensors and the C++ extension")
    if backend == "triton" and (x.device.type != "cuda" or not backends.triton_available()):
        pytest.skip("the triton backend is benchmarked on CUDA only")
    fastdiag.set_backend(backend)
    assert backends.resolve("dist_stats", x.device, x.dtype) == backend
    return functools.partial(
        dist_stats, x, reduce_dim=case.reduce_dim, topk=case.topk, heads=variant != "noheads"
    )


def synced(fn: Callable[[], object], device: str) -> Callable[[], object]:
    if device != "cuda":
        return fn

    def run() -> object:
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


def device_time(fn: Callable[[], object]) -> float:
    """Median CUDA time of ``fn`` in seconds (triton.testing.do_bench, else CUDA events)."""
    try:
        from triton.testing import do_bench

        return do_bench(fn, return_mode="median") * 1e-3
    except ImportError:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        fn()
        times = []
        for _ in range(20):
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) * 1e-3)
        return sorted(times)[len(times) // 2]


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def _rss_kib(field: str) -> int:
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", status).group(1))


def peak_extra(fn: Callable[[], object], device: str) -> tuple[int | None, str]:
    """Peak memory one call of ``fn`` adds (bytes) and how it was measured."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        del out
        return peak, "torch.cuda.max_memory_allocated"
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)  # free heap pages back to the OS, so reused memory counts again
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        before = _rss_kib("VmRSS")
        out = fn()
        peak = (_rss_kib("VmHWM") - before) * 1024
        del out
        return peak, "VmHWM rise (/proc/self/clear_refs)"
    except OSError:
        return None, "unavailable"


def paired_minima(
    fn: Callable[[], object], base: Callable[[], object], rounds: int
) -> tuple[float, float]:
    """Minimum times of ``fn`` and ``base`` measured alternately over the same rounds."""
    best_fn = best_base = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        base()
        t1 = time.perf_counter()
        fn()
        t2 = time.perf_counter()
        best_base = min(best_base, t1 - t0)
        best_fn = min(best_fn, t2 - t1)
    return best_fn, best_base


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_dist_stats(benchmark, case: Case, impl: str, device: str) -> None:
    if device not in case.devices:
        pytest.skip(f"{case.name} runs on {case.devices} only")
    slow = ("reference", "seed", "torch", "torch_noheads")
    if impl in slow and case.name.startswith("attention_8x16x2048"):
        pytest.skip("the slow implementations are not run at the GPU-target size")
    x = make_input(case, device)
    try:
        fn = synced(impl_fn(impl, case, x), device)
        fn()  # warm-up (extension load, compile caches)
        info = benchmark.extra_info
        info.update(
            suite="dist_stats",
            case=case.name,
            impl=impl,
            device=device,
            shape=list(case.shape),
            dtype=str(case.dtype).replace("torch.", ""),
            bytes=x.numel() * x.element_size() * (2 if impl == "copy" else 1),
            input_bytes=x.numel() * x.element_size(),
            threads=torch.get_num_threads(),
        )
        info["peak_extra_bytes"], info["peak_method"] = peak_extra(fn, device)
        if device == "cuda":
            info["device_time_s"] = device_time(fn)
        if impl in PAIRED_ROUNDS:
            base = synced(x.sum, device)
            info["paired_s"], info["paired_one_read_s"] = paired_minima(
                fn, base, PAIRED_ROUNDS[impl]
            )
        rounds = ROUNDS.get(impl, FAST_ROUNDS)
        benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)
    finally:
        fastdiag.set_backend("auto")
