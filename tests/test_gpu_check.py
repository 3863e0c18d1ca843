"""bench/gpu_check.py: the GPU-machine driver, run here in its --dry-run mode (CPU only)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parent.parent / "bench" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("gpu_check", None)


def test_dry_run_writes_every_step(gpu_check, tmp_path, capsys):
    assert gpu_check.main(["--dry-run", "--quick", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    names = [s.name for s in gpu_check.STEPS]
    assert list(data["steps"]) == names
    steps = data["steps"]
    assert steps["env"]["status"] == "ok"
    assert steps["sync_launch"]["status"] == "ok"
    for path, row in steps["sync_launch"]["result"]["paths"].items():
        assert row["cpu_top_level_ops"] > 0, path
    for step in gpu_check.STEPS:
        if step.needs_gpu:
            assert steps[step.name] == {**steps[step.name], "status": "skipped", "reason": "dry run"}
    assert steps["bench_overhead"]["status"] == "skipped"
    lines = capsys.readouterr().out.rstrip().splitlines()
    table = lines[-(len(names) + 2):]
    assert table[0] == gpu_check.TABLE_HEADER
    assert [line.split("|")[1].strip() for line in table[2:]] == names


def test_budget_spent_skips_with_reason(gpu_check, tmp_path):
    ctx = gpu_check.Context(out=tmp_path, dry_run=True, quick=True, budget_s=1.0)
    record = gpu_check.run_step(gpu_check.Step("x", lambda c: {}, 5, needs_gpu=False), ctx)
    assert record["status"] == "skipped" and "budget" in record["reason"]


def test_failing_and_timed_out_steps_do_not_stop_the_driver(gpu_check, tmp_path):
    ctx = gpu_check.Context(out=tmp_path, dry_run=True, quick=True, budget_s=60.0)

    def boom(c):
        raise RuntimeError("boom")

    def slow(c):
        return gpu_check.run_logged(c, "slow", [sys.executable, "-c", "import time; time.sleep(30)"], 1.0)

    failed = gpu_check.run_step(gpu_check.Step("boom", boom, 5, needs_gpu=False), ctx)
    assert failed["status"] == "failed" and "boom" in failed["reason"]
    timed = gpu_check.run_step(gpu_check.Step("slow", slow, 5, needs_gpu=False), ctx)
    assert timed["status"] == "failed" and timed["result"]["timed_out"] and timed["seconds"] < 20
    assert (tmp_path / "slow.log").exists()
    assert gpu_check.TABLE_HEADER in gpu_check.summary({"boom": failed, "slow": timed})


@pytest.mark.parametrize("argv", [["--budget-s", "-1"], ["--budget-s", "x"], ["--nope"]])
def test_argument_errors_exit_2(gpu_check, argv):
    with pytest.raises(SystemExit) as exc:
        gpu_check.main(argv)
    assert exc.value.code == 2
