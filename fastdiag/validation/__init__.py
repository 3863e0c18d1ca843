"""Attention validation: :func:`validate_attention` runs a model on a few batches, captures
every attention layer and checks it in nine sections (sanity, positional, token-level,
statistical, per head, query-side variation, input / attention diversity, gradient flow,
ablation), returned as a :class:`ValidationReport` (docs/metrics.md, section 10)."""

from fastdiag.validation.core import Thresholds, validate_attention
from fastdiag.validation.report import Check, Section, ValidationReport

__all__ = ["Check", "Section", "Thresholds", "ValidationReport", "validate_attention"]
