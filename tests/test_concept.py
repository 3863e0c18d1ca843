"""fastdiag.concept_analysis: the concept-collapse report (docs/metrics.md §4), against numpy
computed here."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fastdiag
from fastdiag.concept import CHECKS, DEFAULT_THRESHOLDS, ConceptReport, concept_analysis


def erank_np(m: np.ndarray) -> float:
    s = np.linalg.svd(m, compute_uv=False)
    p = s / s.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def cos_np(m: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(m, axis=1)
    c = (m @ m.T) / (n[:, None] * n[None, :] + 1e-8)
    return c[~np.eye(len(m), dtype=bool)]


def oracle(x: torch.Tensor) -> dict[str, float]:
    xs = x.double().numpy()
    b, c, d = xs.shape
    r = min(c, d)
    pooled = xs.reshape(b * c, d)
    tops = []
    for m in xs:
        s = np.linalg.svd(m, compute_uv=False)
        tops.append(s[0] / s.sum())
    return {
        "effective_rank": np.mean([erank_np(m) for m in xs]),
        "effective_rank_ratio": np.mean([erank_np(m) / r for m in xs]),
        "effective_rank_pooled": erank_np(pooled),
        "effective_rank_pooled_ratio": erank_np(pooled) / min(b * c, d),
        "top1_singular_share": float(np.mean(tops)),
        "pairwise_cosine_mean": float(np.mean([cos_np(m).mean() for m in xs])),
        "pairwise_cosine_max": float(max(cos_np(m).max() for m in xs)),
        "min_dimension_std": float(pooled.std(axis=0, ddof=1).min()),
    }


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_healthy_concepts_pass():
    x = randn(6, 16, 64)
    report = concept_analysis(x)
    assert isinstance(report, ConceptReport)
    want = oracle(x)
    for name, value in want.items():
        assert report.metrics[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    assert report.metrics["nonfinite"] == 0
    assert report.passed, report.table()
    assert set(report.checks) == set(DEFAULT_THRESHOLDS)


def test_collapsed_concepts_fail():
    # every sample's 32 concepts live in a shared 2-dimensional subspace, two are duplicates
    basis = randn(2, 48, seed=1)
    coef = randn(4, 32, 2, seed=2)
    x = coef @ basis + 1e-4 * randn(4, 32, 48, seed=3)
    x[:, 5] = x[:, 9]
    report = concept_analysis(x)
    want = oracle(x)
    for name, value in want.items():
        assert report.metrics[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name
    assert report.checks["effective_rank_ratio"] is False
    assert report.checks["pairwise_cosine_max"] is False  # duplicates: max cosine 1.0
    assert report.metrics["pairwise_cosine_max"] == pytest.approx(1.0, abs=1e-5)
    assert not report.passed
    table = report.table()
    assert "FAIL" in table and "effective_rank_ratio" in table and "FAILED:" in table
    flat = report.as_dict()
    assert flat["pass/pairwise_cosine_max"] is False
    assert flat["effective_rank"] == report.metrics["effective_rank"]


def test_dead_dimension_and_thresholds():
    x = randn(3, 12, 20)
    x[..., 7] = 0.25  # constant across every concept: std 0
    report = concept_analysis(x)
    assert report.metrics["min_dimension_std"] == pytest.approx(0.0, abs=1e-7)
    assert report.checks["min_dimension_std"] is False
    relaxed = concept_analysis(
        x, thresholds={"min_dimension_std": None, "pairwise_cosine_max": 0.99, "effective_rank": 3}
    )
    assert "min_dimension_std" not in relaxed.checks
    assert relaxed.thresholds["pairwise_cosine_max"] == 0.99
    assert relaxed.checks["effective_rank"] is (relaxed.metrics["effective_rank"] > 3)
    assert "< 0.99" in relaxed.table()


def test_two_dim_input_and_nonfinite():
    x = randn(10, 30)
    report = concept_analysis(x)
    assert report.shape == (1, 10, 30)
    assert report.metrics["effective_rank"] == pytest.approx(erank_np(x.double().numpy()), rel=1e-5)
    bad = randn(2, 10, 30)
    bad[1, 2, 3] = float("nan")
    report = concept_analysis(bad)
    assert report.metrics["nonfinite"] == 1
    assert np.isnan(report.metrics["effective_rank"])
    assert not report.passed


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"\(5,\)"):
        concept_analysis(torch.ones(5))
    with pytest.raises(ValueError, match="unknown metric"):
        concept_analysis(randn(2, 4, 8), thresholds={"rank": 3})
    with pytest.raises(TypeError):
        concept_analysis(randn(2, 4, 8), thresholds={"stable_rank": "high"})
    with pytest.raises(TypeError):
        concept_analysis(np.ones((2, 4, 8)))
    assert set(DEFAULT_THRESHOLDS) <= set(CHECKS)


def test_exported_from_package():
    assert fastdiag.concept_analysis is concept_analysis
