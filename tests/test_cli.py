"""The ``fastdiag`` command: entry points, build-ext, report, demo argument handling."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from importlib import metadata

import pytest
import torch

from fastdiag import _extension
from fastdiag.cli import build_parser, main
from fastdiag.store import MetricsLogger


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
