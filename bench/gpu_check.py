"""One prepared command for a lent GPU machine: build, GPU tests, benchmarks, syncs, launches.

    pip install --no-deps --no-build-isolation -e .     # first (this script installs nothing)
    python bench/gpu_check.py --out $OUT                 # < 8 min with the default budget
    python bench/gpu_check.py --out $OUT --quick         # shorter benchmarks
    python bench/gpu_check.py --dry-run --out /tmp/gc    # the driver on the CPU (tests)

Steps (``STEPS``; each isolated: an exception or a subprocess time-out fails that step only, and
a step is skipped, with the reason, once the ``--budget-s`` total is spent):

* ``env``: GPU name, torch, Triton, CUDA (torch's and nvcc's) versions.
* ``build_ext``: ``python -m fastdiag build-ext`` with ``MAX_JOBS`` set, timed.
* ``sync_launch``: in-process, per update path (``SetDiagnostics.update_with_router_state`` with
  every input, ``BaselineAttentionDiagnostics.update`` with params, ``WeightDiagnostics("moe")``
  with indices, one training step of a tiny transformer under ``fastdiag.watch``): host
  synchronisations = warnings of ``torch.cuda.set_sync_debug_mode("warn")`` (plus the
  ``cuda*Synchronize`` runtime calls the profiler saw), kernel launches = CUDA kernel events of
  ``torch.profiler``. On the CPU (dry run): the profiler's top-level CPU op counts only.
* ``cuda_graph``: capture one ``BaselineAttentionDiagnostics.update`` in a CUDA graph, replay it.
* ``pytest_gpu``: ``pytest -m gpu -q``.
* ``demo``: ``python -m fastdiag demo --quick --device cuda``.
* ``bench_dist_stats``: ``bench/run.py bench/bench_dist_stats.py -k cuda`` (the CUDA cases,
  the [8,16,2048,2048] bf16 one included; writes ``bench/results/<GPU>.json``).
* ``bench_attention_stats``, ``bench_spectral``: their script tables (``main``).
* ``bench_training``: ``bench/bench_training.py --device cuda``.
* ``bench_overhead``: skipped: a CPU-only benchmark (the ``sync_launch`` step is its GPU side).

Every subprocess's output goes to ``<out>/<step>.log``. Results: ``<out>/gpu_check.json`` and,
on a GPU, the key ``gpu_check`` of ``bench/results/<GPU name>.json`` (the file ``run.py`` writes
its rows to; other keys kept). The last lines printed are a markdown table of the steps.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TABLE_HEADER = "| step | status | seconds | key numbers |"
MIN_STEP_S = 10.0  # a step is not started with less budget left than this


class Skip(Exception):
    """Raised by a step to be reported as skipped (with the message as reason)."""


class StepFailed(Exception):
    """Raised by a step that failed, with what it measured so far."""

    def __init__(self, message: str, result: dict) -> None:
        super().__init__(message)
        self.result = result


@dataclass
class Context:
    out: Path
    dry_run: bool
    quick: bool
    budget_s: float
    start: float = field(default_factory=time.monotonic)

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)


@dataclass
class Step:
    name: str
    fn: Callable[[Context], dict]
    limit_s: float  # time limit (quick runs: the same; benchmarks shorten themselves)
    needs_gpu: bool = True


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def sanitise(name: str) -> str:
    """The file name ``bench/run.py`` gives a device."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "device"


def run_logged(ctx: Context, name: str, cmd: list[str], limit_s: float, env: dict | None = None) -> dict:
    """Run ``cmd`` in the repository root, output to ``<out>/<name>.log``, killed (its whole
    process group) after ``min(limit_s, budget left)`` seconds."""
    timeout = max(1.0, min(limit_s, ctx.left()))
    log = ctx.out / f"{name}.log"
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        try:
            rc = proc.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
            timed_out = True
    tail = log.read_text(errors="replace").splitlines()[-40:]
    result = {"cmd": " ".join(cmd), "rc": rc, "timed_out": timed_out, "timeout_s": round(timeout, 1),
              "log": str(log), "tail": tail}
    if timed_out or rc != 0:
        raise StepFailed(f"timed out after {timeout:.0f} s" if timed_out else f"exit {rc}", result)
    return result


def python(*args: str) -> list[str]:
    return [sys.executable, *args]


# ------------------------------------------------------------------------------------------------
# steps
# ------------------------------------------------------------------------------------------------


def step_env(ctx: Context) -> dict:
    info: dict[str, object] = {"torch": torch.__version__, "cuda_torch": torch.version.cuda,
                               "python": sys.version.split()[0]}
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as e:  # noqa: BLE001
        info["triton"] = f"unavailable ({type(e).__name__})"
    nvcc = shutil.which("nvcc") or (Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc")
    try:
        out = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, timeout=20).stdout
        info["nvcc"] = (re.findall(r"release [\d.]+", out) or ["?"])[0]
    except Exception as e:  # noqa: BLE001
        info["nvcc"] = f"unavailable ({type(e).__name__})"
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        props = torch.cuda.get_device_properties(0)
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["capability"] = f"{props.major}.{props.minor}"
    else:
        info["gpu"] = None
    for k, v in info.items():
        print(f"  {k}: {v}", flush=True)
    return info


def step_build_ext(ctx: Context) -> dict:
    jobs = str(os.cpu_count() or 4)
    t0 = time.monotonic()
    result = run_logged(ctx, "build_ext", python("-m", "fastdiag", "build-ext"), 300, {"MAX_JOBS": jobs})
    result.update(build_s=round(time.monotonic() - t0, 1), max_jobs=jobs)
    return result


def step_pytest_gpu(ctx: Context) -> dict:
    result = run_logged(ctx, "pytest_gpu", python("-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"), 180)
    result["summary"] = next((line for line in reversed(result["tail"]) if re.search(r"\d+ (passed|failed)", line)), "")
    return result


def step_demo(ctx: Context) -> dict:
    return run_logged(ctx, "demo", python("-m", "fastdiag", "demo", "--quick", "--device", "cuda",
                                          "--out", str(ctx.out / "demo")), 120)


def step_bench_dist_stats(ctx: Context) -> dict:
    # DEVICES holds cpu and cuda on a GPU machine; -k cuda keeps the CUDA cases (the
    # [8,16,2048,2048] bf16 case is CUDA-only anyway)
    keyword = "cuda and (8x16x2048x2048 or 8x12x512x512)" if ctx.quick else "cuda"
    return run_logged(ctx, "bench_dist_stats", python("bench/run.py", "bench/bench_dist_stats.py", "-k", keyword), 200)


def step_bench_attention_stats(ctx: Context) -> dict:
    # main() times DEVICES[-1] = cuda; --quick: the first three cases
    cases = "b.CASES[:3]" if ctx.quick else "b.CASES"
    code = f"import sys; sys.path.insert(0, 'bench'); import bench_attention_stats as b; b.main({cases})"
    return run_logged(ctx, "bench_attention_stats", python("-c", code), 120)


def step_bench_spectral(ctx: Context) -> dict:
    # main() times every device (cpu, then cuda)
    return run_logged(ctx, "bench_spectral", python("bench/bench_spectral.py", "--rounds", "2" if ctx.quick else "5"), 120)


def step_bench_training(ctx: Context) -> dict:
    rounds, steps = ("2", "2") if ctx.quick else ("5", "3")
    out = ctx.out / "bench_training.json"
    result = run_logged(ctx, "bench_training", python("bench/bench_training.py", "--device", "cuda", "--rounds", rounds,
                                                      "--steps", steps, "--json", str(out)), 150)
    if out.exists():
        result["result"] = json.loads(out.read_text())
    return result


def step_bench_overhead(ctx: Context) -> dict:
    raise Skip("CPU-only benchmark (CPU tensors, one thread); its GPU side is the sync_launch step")


# ----- host synchronisations and kernel launches per update ------------------------------------


def update_paths(device: str) -> dict[str, Callable[[], object]]:
    """name -> one update (a closure) on ``device``."""
    from fastdiag import BaselineAttentionDiagnostics, SetDiagnostics, WeightDiagnostics

    torch.manual_seed(0)
    dev = torch.device(device)

    def params(d_in: int, d_out: int) -> dict[str, torch.Tensor]:
        lin = torch.nn.Linear(d_in, d_out).to(dev)
        lin(torch.randn(2, d_in, device=dev)).sum().backward()
        return dict(lin.named_parameters())

    b, h, n, s, d = 4, 8, 128, 16, 32
    attn = torch.softmax(torch.randn(b, h, n, n, device=dev), -1)
    attn_params = params(d, d)
    idx = torch.randint(0, s, (b, n), device=dev)
    probs = torch.softmax(torch.randn(b, n, s, device=dev), -1)
    emb, tok = torch.randn(b, s, d, device=dev), torch.randint(0, 1000, (b, n), device=dev)
    router_params = params(d, s)
    set_att = torch.softmax(torch.randn(b, n, s, device=dev), -1)
    w = torch.softmax(torch.randn(b * n, s, device=dev), -1)
    sd, bd, wd = SetDiagnostics(), BaselineAttentionDiagnostics(), WeightDiagnostics("moe")
    return {
        "set_all_inputs": lambda: sd.update_with_router_state(idx, s, probs, emb, router_params, set_att, token_ids=tok),
        "baseline_attn_params": lambda: bd.update(attn, attention_params=attn_params),
        "weight_moe_indices": lambda: wd.update(w, indices=idx.flatten()),
        "watch_train_step": watch_step(dev),
    }


def watch_step(dev: torch.device) -> Callable[[], object]:
    """One training step (forward, backward, optimizer step) of a tiny watched transformer."""
    from fastdiag import watch

    layer = torch.nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, batch_first=True)
    model = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).to(dev).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    handle = watch(model, optimizer=opt)
    x = torch.randn(2, 16, 32, device=dev)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        opt.step()

    step.handle = handle  # keep the hooks alive with the closure
    return step


SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def count_syncs(fn: Callable[[], object]) -> int:
    """Warnings of ``set_sync_debug_mode("warn")`` during one call."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return sum(1 for w in caught if "synchroniz" in str(w.message).lower())


def count_launches(fn: Callable[[], object], cuda: bool) -> dict[str, int]:
    """torch.profiler counts of one call: CUDA kernels, memcpy/memset, sync runtime calls, and
    the top-level CPU ops."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        fn()  # the profiler's exit waits for the device and collects the kernels
    events = prof.events()
    device = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    copies = [e for e in device if e.name.startswith(("Memcpy", "Memset"))]
    counts = {
        "cpu_top_level_ops": sum(1 for e in events if e.cpu_parent is None and e.device_type != torch.autograd.DeviceType.CUDA
                                 and not e.name.startswith("[") and "Profiler" not in e.name),
    }
    if cuda:
        counts.update(kernels=len(device) - len(copies), memcpy_memset=len(copies),
                      sync_runtime_calls=sum(1 for e in events if e.name in SYNC_CALLS))
    return counts


def step_sync_launch(ctx: Context) -> dict:
    cuda = not ctx.dry_run
    paths = update_paths("cuda" if cuda else "cpu")
    result: dict[str, dict] = {}
    for name, fn in paths.items():
        row: dict[str, object] = {}
        try:
            fn()
            fn()  # warm: first-call caches, the previous-state bases
            row["host_syncs"] = count_syncs(fn) if cuda else None
            row.update(count_launches(fn, cuda))
        except Exception as e:  # noqa: BLE001  one path's failure does not hide the others
            row["error"] = f"{type(e).__name__}: {e}"
        result[name] = row
        print(f"  {name}: {row}", flush=True)
    if any("error" in r for r in result.values()):
        raise StepFailed("a path failed", {"paths": result})
    return {"paths": result}


def step_cuda_graph(ctx: Context) -> dict:
    from fastdiag import BaselineAttentionDiagnostics

    diag = BaselineAttentionDiagnostics()
    attn = torch.softmax(torch.randn(4, 8, 128, 128, device="cuda"), -1)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm up on a side stream, as the CUDA graph docs ask
            diag.update(attn)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            diag.update(attn)
    except Exception as e:  # noqa: BLE001
        raise StepFailed("capture failed", {"captured": False, "error": f"{type(e).__name__}: {e}",
                                            "traceback": traceback.format_exc()[-3000:]}) from e
    graph.replay()
    graph.replay()
    torch.cuda.synchronize()
    stats = diag.get_epoch_stats()
    finite = {k: float(v) for k, v in stats.items() if isinstance(v, (int, float))}
    return {"captured": True, "replays": 2, "entropy_mean": finite.get("baseline/attention_entropy_mean"),
            "stats_keys": len(stats)}


STEPS = [
    Step("env", step_env, 30, needs_gpu=False),
    Step("build_ext", step_build_ext, 300),
    Step("sync_launch", step_sync_launch, 60, needs_gpu=False),  # CPU op counts in a dry run
    Step("cuda_graph", step_cuda_graph, 30),
    Step("pytest_gpu", step_pytest_gpu, 180),
    Step("demo", step_demo, 120),
    Step("bench_dist_stats", step_bench_dist_stats, 200),
    Step("bench_attention_stats", step_bench_attention_stats, 120),
    Step("bench_spectral", step_bench_spectral, 120),
    Step("bench_training", step_bench_training, 150),
    Step("bench_overhead", step_bench_overhead, 0, needs_gpu=False),
]


# ------------------------------------------------------------------------------------------------
# driver, summary
# ------------------------------------------------------------------------------------------------


def run_step(step: Step, ctx: Context) -> dict:
    """{"status": ok | failed | skipped, "seconds", "reason", "result"}; never raises."""
    record: dict[str, object] = {"status": "skipped", "seconds": 0.0, "reason": "", "result": {}}
    if step.needs_gpu and ctx.dry_run:
        record["reason"] = "dry run"
        return record
    if ctx.left() < MIN_STEP_S:
        record["reason"] = f"budget spent ({ctx.budget_s:.0f} s)"
        return record
    print(f"== {step.name} ({ctx.left():.0f} s of budget left)", flush=True)
    t0 = time.monotonic()
    try:
        record["result"] = step.fn(ctx)
        record["status"] = "ok"
    except Skip as e:
        record["reason"] = str(e)
    except StepFailed as e:
        record.update(status="failed", reason=str(e), result=e.result)
    except Exception as e:  # noqa: BLE001  one failure never stops the rest
        record.update(status="failed", reason=f"{type(e).__name__}: {e}",
                      result={"traceback": traceback.format_exc()[-3000:]})
    record["seconds"] = round(time.monotonic() - t0, 1)
    print(f"   {record['status']} in {record['seconds']} s {record['reason']}", flush=True)
    return record


def key_numbers(name: str, record: dict) -> str:
    """A short cell for the summary table."""
    r = record.get("result") or {}
    if record["status"] == "skipped":
        return record["reason"]
    if record["status"] == "failed" and name not in ("sync_launch", "cuda_graph"):
        return f"{record['reason']}; log {r.get('log', '-')}"
    if name == "env":
        return f"{r.get('gpu') or 'no GPU'}, torch {r.get('torch')}, triton {r.get('triton')}, CUDA {r.get('cuda_torch')}, nvcc {r.get('nvcc')}"
    if name == "build_ext":
        return f"{r.get('build_s')} s, MAX_JOBS={r.get('max_jobs')}"
    if name == "pytest_gpu":
        return r.get("summary", "")
    if name == "sync_launch":
        cells = []
        for path, row in r.get("paths", {}).items():
            if "error" in row:
                cells.append(f"{path}: {row['error'][:80]}")
            elif row.get("kernels") is not None:
                cells.append(f"{path}: {row['host_syncs']} syncs, {row['kernels']} kernels")
            else:
                cells.append(f"{path}: {row['cpu_top_level_ops']} CPU ops")
        return "; ".join(cells)
    if name == "cuda_graph":
        return "captured, replayed" if r.get("captured") else f"capture failed: {r.get('error', record['reason'])[:120]}"
    return f"exit {r.get('rc')}, log {Path(r.get('log', '-')).name}"


def summary(records: dict[str, dict]) -> str:
    lines = [TABLE_HEADER, "|---|---|---:|---|"]
    for name, rec in records.items():
        cell = key_numbers(name, rec).replace("|", "/").replace("\n", " ")
        lines.append(f"| {name} | {rec['status']} | {rec['seconds']:.1f} | {cell} |")
    return "\n".join(lines)


def write_results(ctx: Context, records: dict[str, dict]) -> list[Path]:
    env = records.get("env", {}).get("result") or {}
    result = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "dry_run": ctx.dry_run, "quick": ctx.quick,
              "budget_s": ctx.budget_s, "env": env, "steps": records}
    paths = [ctx.out / "gpu_check.json"]
    paths[0].write_text(json.dumps(result, indent=1, default=str) + "\n")
    if not ctx.dry_run and env.get("gpu"):
        # the file bench/run.py writes the dist_stats rows to: ours under the key "gpu_check"
        path = HERE / "results" / f"{sanitise(env['gpu'])}.json"
        data = json.loads(path.read_text()) if path.exists() else {"device": env["gpu"]}
        data["gpu_check"] = result
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=1, default=str) + "\n")
        paths.append(path)
    return paths


def positive_seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu_check_out", help="directory for the logs and gpu_check.json")
    parser.add_argument("--dry-run", action="store_true", help="the driver on the CPU: GPU steps skipped")
    parser.add_argument("--quick", action="store_true", help="shorter benchmarks")
    parser.add_argument("--budget-s", type=positive_seconds, default=450.0, help="total time budget (s)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    ctx = Context(out=out, dry_run=args.dry_run, quick=args.quick, budget_s=args.budget_s)
    if not ctx.dry_run and not torch.cuda.is_available():
        print("no CUDA device: use --dry-run on a machine without a GPU", file=sys.stderr)
        return 2
    records = {step.name: run_step(step, ctx) for step in STEPS}
    for path in write_results(ctx, records):
        print(f"written: {path}")
    print()
    print(summary(records))
    return 1 if any(r["status"] == "failed" for r in records.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
