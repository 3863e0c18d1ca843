"""``fastdiag demo``: a tiny baseline transformer LM and a tiny set-routing LM trained on a
shipped corpus with the drop-in diagnostics on every step (see :func:`run_demo`). Each trained
model is saved as a checkpoint directory, ``<out>/checkpoints/<run>/`` (``fastdiag_demo.json`` +
``model.pt``, see :mod:`fastdiag.demo.checkpoint`), that ``fastdiag validate`` reads."""

from fastdiag.demo.checkpoint import load_checkpoint, save_checkpoint
from fastdiag.demo.models import BaselineLM, SetRoutingLM
from fastdiag.demo.train import FULL, QUICK, DemoConfig, DemoResult, load_corpus, run_demo

__all__ = [
    "FULL",
    "QUICK",
    "BaselineLM",
    "DemoConfig",
    "DemoResult",
    "SetRoutingLM",
    "load_checkpoint",
    "load_corpus",
    "run_demo",
    "save_checkpoint",
]
