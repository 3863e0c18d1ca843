"""``fastdiag.ops.spectral_stats`` against what users write: singular values per matrix.

    pytest bench/bench_spectral.py --benchmark-only      # pytest-benchmark rows
    python bench/bench_spectral.py [--rounds 7]          # interleaved timing + speed-up table

Implementations per case (``impl``):

* ``fastdiag`` - ``spectral_stats(x)``: all five statistics of every matrix (the C++ / CUDA
  extension's default method: float64 Gram, then Householder tridiagonalisation + implicit QR
  on the CPU, one-sided Jacobi on CUDA; no host synchronisation).
* ``jacobi``   - ``spectral_stats(x, method="jacobi")`` on the CPU: the GPU kernel's method
  (pivoted Cholesky + one-sided Jacobi), for comparison.
* ``loop``     - a Python loop of ``torch.linalg.svdvals`` over the matrices (what users do),
  values stacked, no statistics computed (in the loop's favour).
* ``batched``  - one batched ``torch.linalg.svdvals(x)`` call.

Cases: x [64, 128, 512], [256, 64, 256] and [512, 16, 64] (set embeddings: many small
matrices), float32, on the CPU (all torch threads) and, when present, on the GPU. Timing: wall time, minimum over rounds; on CUDA every call ends with a
synchronize. The script mode times the three implementations interleaved round by round, so a
load change on the machine hits all of them alike, and prints the speed-ups of ``fastdiag``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import pytest
import torch

from fastdiag.ops.spectral import spectral_stats

# the two cases, and set embeddings as SetDiagnostics sees them (B samples x S sets x D)
CASES = [(64, 128, 512), (256, 64, 256), (512, 16, 64)]


def devices() -> list[str]:
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def make_input(shape: tuple[int, ...], device: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(*shape, generator=g).to(device)


def impls(x: torch.Tensor) -> dict[str, Callable[[], object]]:
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)

    def fastdiag_call():
        out = spectral_stats(x)
        sync()
        return out

    def loop_call():
        out = torch.stack([torch.linalg.svdvals(m) for m in x])
        sync()
        return out

    def batched_call():
        out = torch.linalg.svdvals(x)
        sync()
        return out

    calls = {"fastdiag": fastdiag_call, "loop": loop_call, "batched": batched_call}
    if not x.is_cuda:  # on CUDA the default method is already Jacobi
        calls["jacobi"] = lambda: spectral_stats(x, method="jacobi")
    return calls


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("shape", CASES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("impl", ["fastdiag", "jacobi", "loop", "batched"])
def test_spectral(benchmark, impl, shape, device):
    x = make_input(shape, device)
    if impl not in impls(x):
        pytest.skip(f"{impl} is the default method on {device}")
    fn = impls(x)[impl]
    fn()  # warm-up: extension load / CUDA context
    benchmark.extra_info.update(
        {"case": "x".join(map(str, shape)), "impl": impl, "device": device, "dtype": "float32"}
    )
    benchmark.pedantic(fn, rounds=5, iterations=1, warmup_rounds=0)


def measure(rounds: int) -> list[dict[str, object]]:
    rows = []
    for device in devices():
        for shape in CASES:
            x = make_input(shape, device)
            fns = impls(x)
            for fn in fns.values():
                fn()
            best = {name: float("inf") for name in fns}
            for _ in range(rounds):
                for name, fn in fns.items():
                    t0 = time.perf_counter()
                    fn()
                    best[name] = min(best[name], time.perf_counter() - t0)
            rows.append({"device": device, "shape": shape, **best})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    print(
        "| device | x | fastdiag | fastdiag jacobi | loop of svdvals | batched svdvals "
        "| vs loop | vs batched | jacobi vs loop |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for row in measure(args.rounds):
        f, lo, ba = row["fastdiag"], row["loop"], row["batched"]
        ja = row.get("jacobi")
        shape = "[" + ", ".join(map(str, row["shape"])) + "]"
        ja_time = f"{ja * 1e3:.1f} ms" if ja else "(default)"
        ja_ratio = f"{lo / ja:.2f}x" if ja else ""
        print(
            f"| {row['device']} | {shape} | {f * 1e3:.1f} ms | {ja_time} | {lo * 1e3:.1f} ms | "
            f"{ba * 1e3:.1f} ms | {lo / f:.2f}x | {ba / f:.2f}x | {ja_ratio} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
