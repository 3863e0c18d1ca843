"""Integrations with training code: ``watch(model)`` hooks and the registry of custom attention
modules and probes they pick up.

- :mod:`fastdiag.integrations.hooks`: :func:`watch` / :class:`Watch`, the hooks that feed a
  :class:`~fastdiag.diagnostics.training.TrainingDiagnostics`.
- :mod:`fastdiag.integrations.registry`: :func:`register_attention`, :func:`probe`.
- :mod:`fastdiag.integrations.routers`: :func:`register_router` and the discovery of
  mixture-of-experts routers and fused expert parameters.
- :mod:`fastdiag.integrations.sdpa`: the ``TorchFunctionMode`` that sees a watched module's
  ``scaled_dot_product_attention`` calls (q and k for the statistics, the call unchanged).
- :mod:`fastdiag.integrations.hf` / :mod:`fastdiag.integrations.lightning`: ``FastdiagCallback``
  for ``transformers.Trainer`` / ``lightning.pytorch.Trainer`` (imported on first use, as
  ``HFCallback`` / ``LightningCallback`` here: they need transformers / lightning).

This layer sits above the diagnostics classes: it calls their public methods only.
"""

from fastdiag.integrations.hooks import Watch, watch
from fastdiag.integrations.registry import probe, register_attention
from fastdiag.integrations.routers import register_router

__all__ = ["Watch", "probe", "register_attention", "register_router", "watch"]

# not in __all__: a star import must not need transformers / lightning
_LAZY = {"HFCallback": "hf", "LightningCallback": "lightning"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return importlib.import_module(f"{__name__}.{_LAZY[name]}").FastdiagCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
