"""Drop-in, sync-free learning diagnostics classes (docs/metrics.md §1-§3), on :class:`Diagnostics`.

- :class:`SetDiagnostics`: set routing (``ausa/`` keys), the user's class with its interface.
- :class:`BaselineAttentionDiagnostics`: token attention (``baseline/`` keys).
- :class:`WeightDiagnostics`: pooling weights, mixture gates, sparse codes (``{prefix}/`` keys).

``update`` never synchronises with the device; ``get_epoch_stats`` copies once.
"""

from fastdiag.diagnostics.base import Diagnostics
from fastdiag.diagnostics.baseline import BaselineAttentionDiagnostics
from fastdiag.diagnostics.set_diagnostics import SetDiagnostics
from fastdiag.diagnostics.weight import WeightDiagnostics

__all__ = ["BaselineAttentionDiagnostics", "Diagnostics", "SetDiagnostics", "WeightDiagnostics"]
