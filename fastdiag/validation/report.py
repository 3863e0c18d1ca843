"""The result of :func:`fastdiag.validate_attention`: checks grouped in nine sections, a summary
and a conclusion; readable text (``str(report)``), JSON (``to_dict`` / ``to_json``) and a
``MetricsLogger`` row (``log_to``)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["STATUSES", "Check", "Section", "ValidationReport"]

# worst last: a section's status is the worst of its checks ("info" and "n/a" never fail it)
STATUSES = ("n/a", "info", "pass", "warn", "fail")
_MARK = {"pass": "PASS", "warn": "WARN", "fail": "FAIL", "n/a": "n/a ", "info": "info"}


def worst(statuses: list[str]) -> str:
    """The worst status of ``statuses`` ("n/a" when empty)."""
    return max(statuses, key=STATUSES.index, default="n/a")


def _clean(value: Any) -> Any:
    """JSON-safe copy: non-finite floats become None, tuples lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


@dataclass
class Check:
    """One test: its values, a status (pass / warn / fail / n/a / info) and a one-line message."""

    name: str
    status: str
    message: str
    values: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")


@dataclass
class Section:
    """One of the nine sections: its checks, extra values (e.g. per head) and detail lines."""

    index: int
    key: str
    title: str
    checks: list[Check] = field(default_factory=list)
    values: dict[str, Any] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        return worst([c.status for c in self.checks])

    @property
    def message(self) -> str:
        bad = [c for c in self.checks if c.status == self.status]
        return bad[0].message if bad else "no check"

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "key": self.key,
            "title": self.title,
            "status": self.status,
            "message": self.message,
            "values": _clean(self.values),
            "checks": [
                {"name": c.name, "status": c.status, "message": c.message, "values": _clean(c.values)}
                for c in self.checks
            ],
        }


@dataclass
class ValidationReport:
    """Every section of an attention validation, in order (``sections``), plus the layers seen
    and the model-level facts (``meta``: causal flag and where it came from, batches, ...)."""

    sections: list[Section]
    layers: list[str]
    meta: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Section:
        for s in self.sections:
            if s.key == key:
                return s
        raise KeyError(key)

    @property
    def checks(self) -> list[Check]:
        return [c for s in self.sections for c in s.checks]

    @property
    def status(self) -> str:
        return worst([s.status for s in self.sections])

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(STATUSES, 0)
        for c in self.checks:
            out[c.status] += 1
        return out

    def conclusion(self) -> str:
        by = {s.key: s for s in self.sections}
        if any(s.status == "fail" for s in (by.get("sanity"), by.get("gradients")) if s):
            return ("Attention is not correct: fix the failing sanity / gradient checks before "
                    "reading anything else.")  # fmt: skip
        uniform = any(
            c.status == "fail"
            for key in ("statistics", "diversity")
            if key in by
            for c in by[key].checks
        )
        if uniform:
            return ("Attention is correct but close to uniform: check the query-side variation and "
                    "the ablation; causes can be the architecture (low-dimensional heads), too "
                    "little training, or hyperparameters (temperature, learning rate).")  # fmt: skip
        if self.status == "warn":
            return "Attention is correct and structured, with warnings to read above."
        return "Attention is correct and structured."

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "counts": self.counts(),
            "conclusion": self.conclusion(),
            "layers": list(self.layers),
            "meta": _clean(self.meta),
            "sections": [s.to_dict() for s in self.sections],
        }

    def to_json(self, **kwargs: Any) -> str:
        kwargs.setdefault("indent", 2)
        return json.dumps(self.to_dict(), **kwargs)

    def metrics(self, prefix: str = "validation/") -> dict[str, float]:
        """Flat ``{prefix}{section}/{value}`` numbers (finite scalars only) and a status code per
        section and check (``.../status``: 0 n/a, 1 info, 2 pass, 3 warn, 4 fail)."""
        out: dict[str, float] = {}
        for s in self.sections:
            out[f"{prefix}{s.key}/status"] = float(STATUSES.index(s.status))
            for c in s.checks:
                out[f"{prefix}{s.key}/{c.name}/status"] = float(STATUSES.index(c.status))
                for k, v in c.values.items():
                    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                        out[f"{prefix}{s.key}/{k}"] = float(v)
        return out

    def log_to(self, logger: Any, step: int, prefix: str = "validation/") -> dict[str, float]:
        """``logger.log(self.metrics(prefix), step)`` (a :class:`fastdiag.MetricsLogger` or any
        object with that method); returns the logged dict."""
        values = self.metrics(prefix)
        logger.log(values, step)
        return values

    def __str__(self) -> str:
        bar = "=" * 70
        rule = "-" * 70
        out = [bar, "ATTENTION VALIDATION REPORT", bar]
        causal = self.meta.get("causal")
        out.append(f"layers: {len(self.layers)}  batches: {self.meta.get('batches', 0)}  "
                   f"causal: {causal} ({self.meta.get('causal_source', '?')})")  # fmt: skip
        n = len(self.sections)
        for s in self.sections:
            out += ["", f"[{s.index}/{n}] {s.title}", rule]
            out += [f"  {line}" for line in s.lines]
            out += [f"{_MARK[c.status]}  {c.message}" for c in s.checks]
        counts = self.counts()
        graded = counts["pass"] + counts["warn"] + counts["fail"]
        out += ["", bar, "SUMMARY", bar]
        out.append(f"Passed: {counts['pass']}/{graded} graded checks  (warnings: {counts['warn']}, "
                   f"failures: {counts['fail']}, n/a: {counts['n/a']}, info: {counts['info']})")  # fmt: skip
        for s in self.sections:
            for c in s.checks:
                if c.status in ("fail", "warn"):
                    out.append(f"  {_MARK[c.status]}  {s.title} / {c.name}: {c.message}")
        out += ["", rule, "CONCLUSION:", rule, self.conclusion(), bar]
        return "\n".join(out)
