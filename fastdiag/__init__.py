"""fastdiag: fused, sync-free learning diagnostics for attention, routing and mixture models.

The public API is importable from here; submodules load on first use so ``import fastdiag``
stays cheap (no extension build, no triton import).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    # backends
    "set_backend": "fastdiag.backends",
    "get_backend": "fastdiag.backends",
    # ops and accumulator
    "ops": "fastdiag.ops",
    "dist_stats": "fastdiag.ops",
    "Accumulator": "fastdiag.accumulator",
    # drop-in diagnostics
    "SetDiagnostics": "fastdiag.diagnostics",
    "BaselineAttentionDiagnostics": "fastdiag.diagnostics",
    "WeightDiagnostics": "fastdiag.diagnostics",
    "schema": "fastdiag.schema",
    "verdicts": "fastdiag.schema",
    # representation quality
    "concept_analysis": "fastdiag.concept",
    "validate_attention": "fastdiag.validation",
    "ValidationReport": "fastdiag.validation",
    # training integration
    "watch": "fastdiag.integrations",
    "TrainingDiagnostics": "fastdiag.diagnostics.training",
    "register_attention": "fastdiag.integrations",
    "register_router": "fastdiag.integrations.routers",
    "probe": "fastdiag.integrations",
    # store
    "MetricsLogger": "fastdiag.store",
    "reference": "fastdiag.reference",
    # stability criteria of dictionary / mixture loops
    "stability": "fastdiag.stability",
    "StabilityCriteria": "fastdiag.stability",
    "EarlyStopping": "fastdiag.stability",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'fastdiag' has no attribute {name!r}")
    module = importlib.import_module(module_name)
    value = module if module_name.endswith("." + name) else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
