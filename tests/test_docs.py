"""docs/metrics.md: every key of fastdiag.schema (and of the training integration) is defined
in its section, and the package and docs cite only documents that are in the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fastdiag import schema
from fastdiag.training import ATTENTION_METRICS

ROOT = Path(__file__).resolve().parents[1]
METRICS_DOC = ROOT / "docs" / "metrics.md"

SECTIONS = (
    "1. Set-routing diagnostics (ausa/)",
    "2. Baseline attention diagnostics (baseline/)",
    "3. Pooling and mixture weights",
    "4. Representation quality",
    "5. Gradient and training health",
    "6. Attention validation",
    "7. Health verdicts",
    "8. Epoch semantics",
    "9. Backends and numerics",
)

# keys of fastdiag.training's get_epoch_stats (its module docstring), with their placeholders
TRAINING_KEYS = (
    *(f"{name}/{{layer}}" for name in ATTENTION_METRICS),
    "grad_norm/{group}",
    "grad_norm_total",
    "param_norm/{group}",
    "update_ratio/{group}",
    "health/nan_infs",
    "health/nan_infs/{group}",
    "{probe name}/{module}",
)


def sections() -> dict[str, str]:
    """``## `` heading (without the hashes) -> the text up to the next such heading."""
    text = METRICS_DOC.read_text(encoding="utf-8")
    parts = re.split(r"^## (.+)$", text, flags=re.MULTILINE)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts), 2)}


def code_spans(text: str) -> set[str]:
    """Every inline ``code`` span of ``text`` (a key counts as documented only as a whole span)."""
    return set(re.findall(r"`([^`\n]+)`", text))


def test_sections_are_numbered_as_cited():
    found = tuple(sections())
    assert found[: len(SECTIONS)] == SECTIONS  # cited by number in the code
    numbers = [int(title.split(".", 1)[0]) for title in found]
    assert numbers == list(range(1, len(found) + 1)), found  # later sections follow on


@pytest.mark.parametrize(
    ("section", "keys"),
    [
        (SECTIONS[0], schema.SET_DIAGNOSTICS),
        (SECTIONS[1], schema.BASELINE_DIAGNOSTICS),
        (SECTIONS[2], tuple(f"{{prefix}}/{s}" for s in schema.WEIGHT_DIAGNOSTICS_SUFFIXES)),
        (SECTIONS[4], TRAINING_KEYS),
    ],
    ids=["set", "baseline", "weights", "training"],
)
def test_every_key_is_defined_in_its_section(section, keys):
    text = sections()[section]
    defined = code_spans(text)
    missing = [k for k in keys if k not in defined]
    assert not missing, f"not defined in docs/metrics.md '## {section}': {missing}"
    # each key of a table has a row of its own: `key` | input | definition | unit
    rows = {m.group(1) for m in re.finditer(r"^\| `([^`]+)` \|", text, flags=re.MULTILINE)}
    missing_rows = [k for k in keys if k not in rows]
    assert not missing_rows, f"no table row in '## {section}' for: {missing_rows}"


def test_health_keys_are_documented():
    defined = code_spans(METRICS_DOC.read_text(encoding="utf-8"))
    assert set(schema.HEALTH_KEYS) <= defined
    assert "health/nonfinite_rows" in code_spans(sections()[SECTIONS[7]])


def test_documented_numbers_match_the_code():
    from fastdiag import reference, training

    text = METRICS_DOC.read_text(encoding="utf-8")
    assert reference.SPARSITY_TAU == training.SPARSITY_TAU == 0.1
    assert reference.EFFECTIVE_HEAD_ENTROPY == training.EFFECTIVE_HEAD_ENTROPY == 0.9
    assert reference.PATTERN_TOPK == 5
    assert reference.COSINE_SAMPLES == 100
    for phrase in ("> 0.1", "< 0.9", "min(5, Nk)", "defaults to 100", "cosine_samples=100"):
        assert phrase in text, phrase


def _text_files() -> list[Path]:
    files = [ROOT / "README.md"]
    for top in ("fastdiag", "docs", "kernels", "csrc"):
        for path in sorted((ROOT / top).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".so":
                files.append(path)
    return files


def test_no_citation_outside_the_repository():
    offenders = []
    for path in _text_files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for lineno, line in enumerate(text.splitlines(), 1):
            if "METRICS.md" in line or "shared/" in line or "the seed" in line.lower():
                offenders.append(f"{path.relative_to(ROOT)}:{lineno}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
