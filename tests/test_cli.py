"""The ``fastdiag`` command: entry points, build-ext, report, demo argument handling."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch

from fastdiag import _extension
from fastdiag.cli import build_parser, main
from fastdiag.store import MetricsLogger

ROOT = Path(__file__).resolve().parents[1]


def test_python_dash_m_runs_the_cli():
    done = subprocess.run(
        [sys.executable, "-m", "fastdiag", "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0
    for command in ("build-ext", "report", "demo"):
        assert command in done.stdout


def test_console_script_points_at_main():
    scripts = {ep.name: ep.value for ep in metadata.entry_points(group="console_scripts")}
    assert scripts.get("fastdiag") == "fastdiag.cli:main"


def test_build_ext_prints_the_library_or_the_failure(monkeypatch, capsys):
    calls = []

    def fake_build(verbose=True, **kwargs):
        calls.append(verbose)
        return "/cache/fastdiag_ext_abc/fastdiag_ext.so"

    monkeypatch.setattr(_extension, "build_extension", fake_build)
    assert main(["build-ext"]) == 0
    assert capsys.readouterr().out.strip() == "/cache/fastdiag_ext_abc/fastdiag_ext.so"
    assert main(["build-ext", "--quiet"]) == 0
    assert calls == [True, False]

    monkeypatch.setattr(_extension, "build_extension", lambda verbose=True, **kwargs: None)
    assert main(["build-ext"]) == 1
    assert "could not be built" in capsys.readouterr().err


def test_report_command(tmp_path, capsys):
    db = tmp_path / "train.db"
    for run, scale in (("a", 1.0), ("b", 2.0)):
        with MetricsLogger(db, run=run) as logger:
            for step in range(12):
                logger.log({"loss": scale * (12 - step), "ausa/router_weight_change": 0.0}, step)
    assert main(["report", str(db), "--run", "a", "--run", "b", "--metric", "loss"]) == 0
    out = capsys.readouterr().out
    assert "== run a: 1 metrics" in out and "== run b: 1 metrics" in out
    assert "frozen router" in out  # verdicts use every stored metric
    assert "run a vs run b" in out
    default_html = tmp_path / "train_report.html"
    assert f"report: {default_html}" in out and default_html.exists()
    if importlib.util.find_spec("matplotlib") is not None:
        assert default_html.read_text().count("<figure class='chart single'") == 1

    custom = tmp_path / "sub" / "r.html"
    assert main(["report", str(db), "--out", str(custom), "--window", "4"]) == 0
    assert custom.exists()
    capsys.readouterr()

    assert main(["report", str(tmp_path / "missing.db")]) == 2
    assert "no such database" in capsys.readouterr().err
    assert main(["report", str(db), "--run", "zzz"]) == 2
    assert "zzz" in capsys.readouterr().err


def test_demo_arguments():
    parser = build_parser()
    args = parser.parse_args(
        ["demo", "--quick", "--device", "cpu", "--break", "router", "--out", "x"]
    )
    assert (args.quick, args.device, args.brk, args.out) == (True, "cpu", "router", "x")
    defaults = parser.parse_args(["demo"])
    assert (defaults.quick, defaults.device, defaults.brk, defaults.out) == (
        False,
        "cpu",
        None,
        "runs",
    )
    with pytest.raises(SystemExit):
        parser.parse_args(["demo", "--break", "everything"])
    with pytest.raises(SystemExit):
        parser.parse_args(["demo", "--device", "tpu"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_demo_on_cuda_without_a_gpu_fails_cleanly(tmp_path, capsys):
    assert main(["demo", "--quick", "--device", "cuda", "--out", str(tmp_path)]) == 2
    assert "cuda" in capsys.readouterr().err
    assert not (tmp_path / "demo.db").exists()


def _one_line_error(capsys, needle):
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastdiag report: "), err
    assert needle in lines[0], err
    assert "Traceback" not in err


def test_report_on_bad_inputs_is_one_line_and_exit_2(tmp_path, capsys):
    import os
    import sqlite3

    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    foreign = tmp_path / "foreign.db"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE other (x)")
    noise = tmp_path / "noise.db"
    noise.write_bytes(os.urandom(4096))
    for path in (empty, foreign, noise, tmp_path):
        assert main(["report", str(path)]) == 2
        _one_line_error(capsys, str(path))

    db = tmp_path / "ok.db"
    with MetricsLogger(db, run="a") as logger:
        logger.log({"loss": 1.0}, 0)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for out in (blocker / "r.html", tmp_path):  # under a file; a directory
        assert main(["report", str(db), "--out", str(out)]) == 2
        _one_line_error(capsys, str(out))


@pytest.mark.parametrize("option", ["--trend-window", "--window"])
@pytest.mark.parametrize("value", ["0", "-1", "x"])
def test_report_windows_must_be_positive(option, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["report", "x.db", option, value])
    assert exit_info.value.code == 2
    assert f"{option}: must be a positive integer, got {value!r}" in capsys.readouterr().err


def test_demo_with_an_unwritable_out_is_one_line_and_exit_2(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for out in (blocker / "runs", "/proc/fastdiag_demo_x"):
        assert main(["demo", "--quick", "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("fastdiag demo: ") and str(out) in err[0]


def test_extension_build_says_what_it_does_and_when_it_is_done(tmp_path, monkeypatch, capsys):
    from torch.utils import cpp_extension

    from fastdiag import _extension

    calls = []

    def fake_load(name, build_directory, **kwargs):
        calls.append(name)
        (Path(build_directory) / f"{name}.so").write_bytes(b"")

    loaded = []
    monkeypatch.setenv("FASTDIAG_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpp_extension, "load", fake_load)
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: True)
    monkeypatch.setattr(_extension.shutil, "which", lambda exe: f"/usr/bin/{exe}")
    monkeypatch.setattr(_extension.torch.ops, "load_library", loaded.append)
    path = _extension._build_and_load(verbose=False, cuda_sources=False)
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = [line for line in captured.err.splitlines() if line.startswith("fastdiag")]
    assert len(lines) == 2 and calls == ["fastdiag_ext"], captured.err
    assert lines[0].startswith("fastdiag: compiling the C++ extension") and "20-60 s" in lines[0]
    assert str(tmp_path) in lines[0]
    assert lines[1].startswith("fastdiag: extension built in ") and lines[1].endswith(path)
    # a cached build is loaded without a word
    assert _extension._build_and_load(verbose=False, cuda_sources=False) == path
    assert capsys.readouterr().err == "" and loaded == [path] and len(calls) == 1


def test_version(capsys):
    from fastdiag import __version__

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"fastdiag {__version__}"
    done = subprocess.run([sys.executable, "-m", "fastdiag", "--version"], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip() == f"fastdiag {__version__}"


def _two_dbs(tmp_path):
    """a.db: runs 'x' (healthy) and 'y'; b.db: run 'x' again (a name clash) with a frozen router."""
    a, b = tmp_path / "a.db", tmp_path / "b.db"
    with MetricsLogger(a, run="x", config={"lr": 0.1, "seed": 0}) as logger:
        for step in range(6):
            logger.log({"train/loss": 3.0 - 0.1 * step, "grad_norm/layers.0": 0.5,
                        "grad_norm/layers.1": 0.4, "param_norm/layers.0": 2.0}, step)  # fmt: skip
    with MetricsLogger(a, run="y", config={"lr": 0.1, "seed": 1}) as logger:
        for step in range(6):
            logger.log({"train/loss": 3.0 - 0.05 * step, "grad_norm/layers.0": 0.5,
                        "grad_norm/layers.1": 0.4, "param_norm/layers.0": 2.0}, step)  # fmt: skip
    with MetricsLogger(b, run="x", config={"lr": 0.2, "seed": 0}) as logger:
        for step in range(6):
            logger.log({"train/loss": 3.5, "grad_norm/layers.0": 0.5, "grad_norm/layers.1": 0.0,
                        "param_norm/layers.0": 2.0, "attention_top1/layers.0": 0.99}, step)  # fmt: skip
    return a, b


def test_report_across_databases_with_colliding_run_names(tmp_path, capsys):
    a, b = _two_dbs(tmp_path)
    out = tmp_path / "r.html"
    assert main(["report", str(a), str(b), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    for label in ("a:x", "y", "b:x"):
        assert f"== run {label}:" in text
    head = "run a:x vs run y vs run b:x (last values, largest relative difference first):"
    table = text.split(head)[1].strip().split("\n\n")[0].splitlines()
    assert table[0].split()[:4] == ["metric", "a:x", "y", "b:x"]
    rows = [line.split()[0] for line in table[2:]]
    assert rows[0] == "grad_norm/layers.1"  # 0.4 vs 0: the largest relative difference first
    assert rows.index("train/loss") < rows.index("param_norm/layers.0")  # equal ones last
    assert "config differences:" in text and "lr" in text.split("config differences:")[1]
    verdict_lines = [line.split() for line in text.splitlines() if " critical " in line]
    assert [v[:3] for v in verdict_lines] == [["b:x", "critical", "grad_norm/layers.1"]]
    assert "vanishing gradient" in " ".join(verdict_lines[0])
    page = out.read_text()
    assert "<h2 id='s-run-comparison-last-values'>" in page and "class='differs'" in page

    # --run filters: a bare name takes every database's run of that name; db:run one of them
    assert main(["report", str(a), str(b), "--run", "b:x", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "== run b:x:" in text and "== run a:x:" not in text and "== run y:" not in text
    assert main(["report", str(a), str(b), "--run", "x", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "== run a:x:" in text and "== run b:x:" in text and "== run y:" not in text
    assert main(["report", str(a), str(b), "--run", "c:x", "--out", str(out)]) == 2
    assert "c:x" in capsys.readouterr().err


def test_report_metric_and_exclude_globs(tmp_path, capsys):
    a, b = _two_dbs(tmp_path)
    out = tmp_path / "r.html"
    argv = ["report", str(a), "--run", "x", "--out", str(out)]
    assert main([*argv, "--metric", "grad_norm/*", "--metric", "train/*"]) == 0
    text = capsys.readouterr().out
    assert "== run x: 3 metrics" in text and "param_norm" not in text.split("health verdicts")[0]
    assert main([*argv, "--exclude", "*_norm/*"]) == 0
    assert "== run x: 1 metrics" in capsys.readouterr().out
    assert main([*argv, "--metric", "grad_norm/layers.[0]", "--exclude", "train/*"]) == 0
    assert "== run x: 1 metrics" in capsys.readouterr().out
    assert main([*argv, "--metric", "nothing/*"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nothing/*" in err[0] and "not logged" in err[0]


def test_report_fail_on_exit_codes(tmp_path, capsys):
    a, b = _two_dbs(tmp_path)
    out = ["--out", str(tmp_path / "r.html")]
    healthy = ["report", str(a), "--run", "x", *out]
    assert main(healthy) == 0
    assert main([*healthy, "--fail-on", "warning"]) == 0
    assert main([*healthy, "--fail-on", "critical"]) == 0
    capsys.readouterr()
    broken = ["report", str(b), *out]  # vanishing gradient (critical), overconfidence (warning)
    assert main(broken) == 0  # no gate: always 0
    assert main([*broken, "--fail-on", "critical"]) == 1
    err = capsys.readouterr().err
    assert "1 verdicts of severity critical or worse" in err
    assert main([*broken, "--fail-on", "warning"]) == 1
    assert "2 verdicts of severity warning or worse" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([*broken, "--fail-on", "fatal"])
    assert exit_info.value.code == 2
