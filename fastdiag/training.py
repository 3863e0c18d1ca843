"""Former home of the training integration; kept so ``from fastdiag.training import ...`` works.

Where things live now:

- :class:`~fastdiag.diagnostics.training.TrainingDiagnostics` (and ``SPARSITY_TAU``,
  ``EFFECTIVE_HEAD_ENTROPY``, ``ATTENTION_METRICS``): ``fastdiag/diagnostics/training.py``;
- parameter groups, gradient / parameter norms and update ratios
  (:class:`~fastdiag.diagnostics.params.ParamTracker`, ``GROUPS``,
  ``AUTO_GROUP_MAX_PARAMS``): ``fastdiag/diagnostics/params.py``;
- :func:`~fastdiag.integrations.hooks.watch` and :class:`~fastdiag.integrations.hooks.Watch`:
  ``fastdiag/integrations/hooks.py``;
- :func:`~fastdiag.integrations.registry.register_attention` and
  :func:`~fastdiag.integrations.registry.probe`: ``fastdiag/integrations/registry.py``.

New code imports from those modules (or from ``fastdiag``).
"""

from fastdiag.diagnostics.params import AUTO_GROUP_MAX_PARAMS, GROUPS
from fastdiag.diagnostics.training import (
    ATTENTION_METRICS,
    EFFECTIVE_HEAD_ENTROPY,
    SPARSITY_TAU,
    TrainingDiagnostics,
)
from fastdiag.integrations.hooks import Watch, watch
from fastdiag.integrations.registry import PROBE_AT, probe, register_attention

__all__ = [
    "ATTENTION_METRICS",
    "AUTO_GROUP_MAX_PARAMS",
    "EFFECTIVE_HEAD_ENTROPY",
    "GROUPS",
    "PROBE_AT",
    "SPARSITY_TAU",
    "TrainingDiagnostics",
    "Watch",
    "probe",
    "register_attention",
    "watch",
]
