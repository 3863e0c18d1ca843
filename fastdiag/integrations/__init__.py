"""Integrations with training code: ``watch(model)`` hooks and the registry of custom attention
modules and probes they pick up.

- :mod:`fastdiag.integrations.hooks`: :func:`watch` / :class:`Watch`, the hooks that feed a
  :class:`~fastdiag.diagnostics.training.TrainingDiagnostics`.
- :mod:`fastdiag.integrations.registry`: :func:`register_attention`, :func:`probe`.
- :mod:`fastdiag.integrations.sdpa`: the ``TorchFunctionMode`` that sees a watched module's
  ``scaled_dot_product_attention`` calls (q and k for the statistics, the call unchanged).

This layer sits above the diagnostics classes: it calls their public methods only.
"""

from fastdiag.integrations.hooks import Watch, watch
from fastdiag.integrations.registry import probe, register_attention

__all__ = ["Watch", "probe", "register_attention", "watch"]
