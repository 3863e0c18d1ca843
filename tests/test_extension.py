"""fastdiag._extension: with no compiler, one warning and every op on the torch backend."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import warnings

    import numpy as np
    import torch

    import fastdiag
    from fastdiag.ops import dist_stats
    from fastdiag.ops.spectral import spectral_raw

    x = torch.randn(3, 8, 20, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = spectral_raw(x)
        spectral_raw(x)
        probs = torch.softmax(torch.randn(4, 10), -1)
        sums = dist_stats(probs).sums
    messages = [str(w.message) for w in caught if "C++ extension" in str(w.message)]
    assert len(messages) == 1, messages
    assert "no C++ compiler" in messages[0], messages[0]
    assert fastdiag.backends.resolve("spectral_stats", x.device, x.dtype) == "torch"
    assert bool((out[3] == 0).all())  # the torch path (LAPACK) ran
    want = np.linalg.svd(x.numpy(), compute_uv=False)
    np.testing.assert_allclose(out[1].numpy(), want, rtol=0, atol=1e-12 * want.max())
    assert sums.shape[-1] > 0
    print("ok")
    """
)


def test_no_compiler_warns_once_and_falls_back(tmp_path):
    empty_bin = tmp_path / "bin"  # PATH without c++ / g++ / ninja
    empty_bin.mkdir()
    env = dict(os.environ)
    env.update(
        {
            "PATH": str(empty_bin),
            "FASTDIAG_CACHE_DIR": str(tmp_path / "cache"),
            "FASTDIAG_BACKEND": "auto",
            "PYTHONPATH": str(ROOT),
        }
    )
    env.pop("FASTDIAG_NO_EXT", None)
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")
