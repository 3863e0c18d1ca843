"""The README's two complete examples are the files in examples/ and run as they are."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ("drop_in.py", "watch_quickstart.py")


def _readme_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.parametrize("name", EXAMPLES)
def test_readme_shows_the_example_verbatim(name):
    source = (ROOT / "examples" / name).read_text(encoding="utf-8")
    assert source in _readme_blocks(), f"README.md does not show examples/{name} verbatim"


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_runs(name, tmp_path):
    if name == "watch_quickstart.py":
        pytest.importorskip("transformers")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    if name == "watch_quickstart.py":
        assert (tmp_path / "runs" / "quickstart.db").stat().st_size > 0
    else:
        assert "attention entropy" in proc.stdout
