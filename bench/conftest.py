"""Benchmark configuration: names the machine in the report header and in the JSON output."""

from __future__ import annotations

import os
import platform

import torch

from fastdiag._extension import cpu_model


def machine() -> dict[str, object]:
    info: dict[str, object] = {
        "cpu_model": cpu_model() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def pytest_report_header(config) -> str:
    return "fastdiag bench: " + ", ".join(f"{k}={v}" for k, v in machine().items())


def pytest_benchmark_update_machine_info(config, machine_info: dict) -> None:
    machine_info["fastdiag"] = machine()
