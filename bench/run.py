"""Run the benchmarks, write ``bench/results/<device>.json`` and print a markdown table.

    python bench/run.py                              # every bench/bench_*.py
    python bench/run.py bench/bench_dist_stats.py    # one file
    python bench/run.py -k 8x12x512x512               # pytest -k filter

The device is the GPU's name when the dist_stats benchmarks ran on CUDA, else the CPU model,
sanitised into a file name. Rows of benchmark files not run this time are kept from that
file's previous contents (``dates`` says when each file ran). For ``dist_stats`` rows (see ``bench_dist_stats.py``):

* ``time``: the minimum over the rounds (CUDA: the ``do_bench`` median, CUDA events);
* ``GB/s``: bytes of ``x`` read (``copy``: read + written) / time;
* ``vs one read``: one-read time / this time, i.e. the fraction of the one-read bandwidth,
  from the interleaved pair of minima when measured (backends), else from the two minima;
* ``vs reference`` / ``vs seed``: the time of the ``reference`` / ``seed`` impl (``seed`` = the
  user's original per-update diagnostics code) / this time (speed-up);
* ``peak extra``: the memory one call added at its peak (method in the JSON).
Other benchmark files get one generic row each (min / median time and their extra_info).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from conftest import machine  # noqa: E402


def sanitise(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "device"


def run_pytest(files: list[str], keyword: str | None) -> tuple[int, dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            *files,
            "--benchmark-only",
            f"--benchmark-json={out}",
            "-q",
            "-p",
            "no:cacheprovider",
        ]
        if keyword:
            cmd += ["-k", keyword]
        rc = subprocess.call(cmd, cwd=ROOT)
        data = json.loads(out.read_text()) if out.exists() else {"benchmarks": []}
    return rc, data


def _time(bench: dict) -> float:
    info = bench["extra_info"]
    return info.get("device_time_s") or bench["stats"]["min"]


def dist_stats_rows(benches: list[dict]) -> list[dict]:
    by_case: dict[tuple[str, str], dict[str, dict]] = {}
    for b in benches:
        info = b["extra_info"]
        by_case.setdefault((info["case"], info["device"]), {})[info["impl"]] = b
    rows = []
    for (case, device), impls in by_case.items():
        t_one = _time(impls["one_read"]) if "one_read" in impls else None
        t_ref = _time(impls["reference"]) if "reference" in impls else None
        t_seed = _time(impls["seed"]) if "seed" in impls else None
        for impl, b in impls.items():
            info = b["extra_info"]
            t = _time(b)
            if "paired_s" in info and info.get("device") != "cuda":
                vs_one = info["paired_one_read_s"] / info["paired_s"]
            else:
                vs_one = t_one / t if t_one else None
            rows.append(
                {
                    "case": case,
                    "device": device,
                    "impl": impl,
                    "dtype": info["dtype"],
                    "time_s": t,
                    "median_s": b["stats"]["median"],
                    "rounds": b["stats"]["rounds"],
                    "gb_per_s": info["bytes"] / t / 1e9,
                    "vs_one_read": vs_one,
                    "speedup_vs_reference": t_ref / t if t_ref else None,
                    "speedup_vs_seed": t_seed / t if t_seed else None,
                    "paired_s": info.get("paired_s"),
                    "paired_one_read_s": info.get("paired_one_read_s"),
                    "peak_extra_bytes": info.get("peak_extra_bytes"),
                    "peak_method": info.get("peak_method"),
                    "threads": info.get("threads"),
                }
            )
    return rows


def other_rows(benches: list[dict]) -> list[dict]:
    return [
        {
            "name": b["fullname"],
            "min_s": b["stats"]["min"],
            "median_s": b["stats"]["median"],
            "rounds": b["stats"]["rounds"],
            "extra_info": b["extra_info"],
        }
        for b in benches
    ]


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(rows: list[dict], others: list[dict]) -> str:
    lines = []
    if rows:
        lines += [
            "| case | device | impl | time (ms) | median (ms) | GB/s | vs one read | vs reference | vs seed | peak extra (MB) |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            peak = None if r["peak_extra_bytes"] is None else r["peak_extra_bytes"] / 2**20
            lines.append(
                f"| {r['case']} | {r['device']} | {r['impl']} | {r['time_s'] * 1e3:.3f} | "
                f"{r['median_s'] * 1e3:.3f} | {r['gb_per_s']:.1f} | {_fmt(r['vs_one_read'], '.2f')} | "
                f"{_fmt(r['speedup_vs_reference'], '.1f')}x | {_fmt(r['speedup_vs_seed'], '.1f')}x | "
                f"{_fmt(peak, '.1f')} |"
            )
    if others:
        lines += ["", "| benchmark | min (ms) | median (ms) | rounds |", "|---|---:|---:|---:|"]
        for o in others:
            lines.append(
                f"| {o['name']} | {o['min_s'] * 1e3:.3f} | {o['median_s'] * 1e3:.3f} | {o['rounds']} |"
            )
    return "\n".join(lines)


def merge(old: dict, new: dict) -> dict:
    """``new`` plus the rows of ``old`` (the same device's previous results) from benchmark
    files this run did not repeat; ``dates`` says when each file last ran."""
    rerun = set(new["files"])
    if "bench/bench_dist_stats.py" not in rerun:
        new["dist_stats"] = old.get("dist_stats", [])
    kept = [o for o in old.get("other", []) if o["name"].split("::")[0] not in rerun]
    new["other"] = kept + new["other"]
    dates = dict(old.get("dates", {f: old.get("date") for f in old.get("files", [])}))
    dates.update({f: new["date"] for f in rerun})
    new["dates"] = dates
    new["files"] = sorted(dates)
    return new


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="*", help="benchmark files (default: bench/bench_*.py)")
    parser.add_argument("-k", dest="keyword", default=None, help="pytest -k expression")
    parser.add_argument("--out", default=str(HERE / "results"), help="output directory")
    args = parser.parse_args(argv)
    files = args.files or [str(p.relative_to(ROOT)) for p in sorted(HERE.glob("bench_*.py"))]
    rc, data = run_pytest(files, args.keyword)
    benches = data.get("benchmarks", [])
    ours = [b for b in benches if b.get("extra_info", {}).get("suite") == "dist_stats"]
    others = [b for b in benches if b not in ours]
    info = machine()
    on_gpu = any(b["extra_info"]["device"] == "cuda" for b in ours)
    device = info.get("gpu") if on_gpu else info["cpu_model"]
    rows = dist_stats_rows(ours)
    result = {
        "device": device,
        "machine": info,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "files": files,
        "pytest_exit_code": rc,
        "dist_stats": rows,
        "other": other_rows(others),
    }
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{sanitise(str(device))}.json"
    if path.exists():
        result = merge(json.loads(path.read_text()), result)
    path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(
        f"\n{device} ({info['cpu_count']} CPUs, torch {info['torch']}, {info['torch_threads']} threads)\n"
    )
    print(table(rows, result["other"]))
    print(f"\nwritten: {path}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
