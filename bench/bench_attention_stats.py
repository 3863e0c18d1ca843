"""``fastdiag.ops.attention_stats`` against materialising the attention, and against SDPA itself.

    pytest bench/bench_attention_stats.py --benchmark-only    # pytest-benchmark output
    python bench/run.py bench/bench_attention_stats.py        # + bench/results/*.json
    python bench/bench_attention_stats.py                     # the README table (interleaved)

Implementations per case (``impl``), q, k, v [B, H, N, 64] float32, no mask, ``topk=5``, heads
averaged while reading (``reduce_dim=1``):

* ``attention_stats``  - the op on the backend ``auto`` picks (on the CPU: the query-chunked
  path with dist_stats on the C++ kernel).
* ``materialise``      - (a) the eager way: ``softmax(q @ k^T * scale)`` in full, then
  ``dist_stats`` on it (the same statistics).
* ``sdpa``             - (b) ``F.scaled_dot_product_attention(q, k, v)``: the forward itself, for scale.

Timing: pytest-benchmark wall time; ``attention_stats`` is also timed interleaved with
``materialise`` (``extra_info["paired_s"]`` / ``["paired_materialise_s"]``, minima over the same
rounds) so that their ratio is not skewed by a load change on a shared machine. Peak extra
memory (``extra_info["peak_extra_bytes"]``): on CPU the rise of the process's peak resident set
(VmHWM, reset through /proc/self/clear_refs) above the resident set before the call, after
``malloc_trim(0)``; on CUDA ``torch.cuda.max_memory_allocated`` above the allocation before it.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from bench_dist_stats import paired_minima, synced
from bench_dist_stats import peak_extra as measure_peak_extra

from fastdiag.ops import attention_stats, dist_stats

D = 64
TOPK = 5
CASES = (  # (B, H, N): B * H = 8 .. 64, N = Nk
    (1, 8, 1024),
    (4, 16, 1024),
    (1, 8, 2048),
    (2, 16, 2048),
    (1, 8, 4096),
    (1, 8, 8192),  # (a) holds 4 GiB here
)
IMPLS = ("attention_stats", "materialise", "sdpa")
DEVICES = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
ROUNDS = 3
TABLE_ROUNDS = 5  # main(): minima over more interleaved rounds (a shared machine drifts)
PAIRED_ROUNDS = 3


def case_id(case: tuple[int, int, int]) -> str:
    return "B{}xH{}xN{}".format(*case)


@functools.lru_cache(maxsize=1)
def make_inputs(case: tuple[int, int, int], device: str) -> tuple[torch.Tensor, ...]:
    b, h, n = case
    g = torch.Generator(device=device).manual_seed(0)
    return tuple(torch.randn(b, h, n, D, generator=g, device=device) for _ in range(3))


def impl_fn(impl: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Callable[[], object]:
    if impl == "attention_stats":
        return functools.partial(attention_stats, q, k, topk=TOPK)
    if impl == "materialise":
        scale = 1.0 / math.sqrt(q.shape[-1])

        def materialise():
            p = torch.softmax(q @ k.transpose(-2, -1) * scale, dim=-1)
            return dist_stats(p, reduce_dim=1, topk=TOPK)

        return materialise
    if impl == "sdpa":
        return functools.partial(F.scaled_dot_product_attention, q, k, v)
    raise ValueError(impl)


def peak_extra(fn: Callable[[], object], device: str) -> int | None:
    """Peak memory one call of ``fn`` adds, bytes (None when it cannot be measured)."""
    return measure_peak_extra(fn, device)[0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_attention_stats(benchmark, case, impl: str, device: str) -> None:
    q, k, v = make_inputs(case, device)
    fn = synced(impl_fn(impl, q, k, v), device)
    fn()  # warm-up (extension load)
    info = benchmark.extra_info
    info.update(
        suite="attention_stats",
        case=case_id(case),
        impl=impl,
        device=device,
        shape=list(q.shape),
        threads=torch.get_num_threads(),
        peak_extra_bytes=peak_extra(fn, device),
    )
    if impl == "attention_stats":
        base = synced(impl_fn("materialise", q, k, v), device)
        info["paired_s"], info["paired_materialise_s"] = paired_minima(fn, base, PAIRED_ROUNDS)
    benchmark.pedantic(fn, rounds=ROUNDS, iterations=1, warmup_rounds=0)


def main(cases=CASES) -> None:
    """The README table: per case, interleaved minima of the three impls and their peaks."""
    device = DEVICES[-1]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}")
    print("| B x H x N | attention_stats | (a) materialise + dist_stats | (b) SDPA forward | "
          "speed-up vs (a) | peak extra: ours | (a) | (b) | memory ratio (a) / ours |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for case in cases:
        q, k, v = make_inputs(case, device)
        fns = {impl: synced(impl_fn(impl, q, k, v), device) for impl in IMPLS}
        for fn in fns.values():
            fn()
        best = {impl: float("inf") for impl in IMPLS}
        for _ in range(TABLE_ROUNDS):
            for impl, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                best[impl] = min(best[impl], time.perf_counter() - t0)
        peak = {impl: peak_extra(fn, device) or 0 for impl, fn in fns.items()}
        mib = {impl: peak[impl] / 2**20 for impl in IMPLS}
        print(
            f"| {case[0]} x {case[1]} x {case[2]} | {best['attention_stats'] * 1e3:.0f} ms | "
            f"{best['materialise'] * 1e3:.0f} ms | {best['sdpa'] * 1e3:.0f} ms | "
            f"{best['materialise'] / best['attention_stats']:.2f}x | {mib['attention_stats']:.0f} MiB | "
            f"{mib['materialise']:.0f} MiB | {mib['sdpa']:.0f} MiB | "
            f"{peak['materialise'] / max(peak['attention_stats'], 1):.0f}x |",
            flush=True,
        )


if __name__ == "__main__":
    main()
