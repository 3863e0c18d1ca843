"""``fastdiag demo``: a tiny baseline transformer LM and a tiny set-routing LM trained on a
shipped corpus with the drop-in diagnostics on every step (see :func:`run_demo`)."""

from fastdiag.demo.models import BaselineLM, SetRoutingLM
from fastdiag.demo.train import FULL, QUICK, DemoConfig, DemoResult, load_corpus, run_demo

__all__ = [
    "FULL",
    "QUICK",
    "BaselineLM",
    "DemoConfig",
    "DemoResult",
    "SetRoutingLM",
    "load_corpus",
    "run_demo",
]
