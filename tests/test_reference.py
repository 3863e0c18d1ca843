"""fastdiag.reference against hand-computed values and independent numpy / scipy formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch

from fastdiag import reference, schema
from fastdiag.reference import (
    ReferenceBaselineAttentionDiagnostics,
    ReferenceSetDiagnostics,
    bank_coherence,
    row_stats,
    weight_stats,
)

# ----------------------------------------------------------------------------------------------
# independent helpers (numpy / python only)
# ----------------------------------------------------------------------------------------------


def np_entropy_rows(p: np.ndarray) -> np.ndarray:
    """Row entropy with scipy (normalises rows, so only use it on rows that sum to 1)."""
    return np.array([scipy.stats.entropy(r) for r in p.reshape(-1, p.shape[-1])])


def np_offdiag_cos(rows: np.ndarray) -> tuple[float, float]:
    """(mean, max) off-diagonal cosine: the original formula, + 1e-8 on the denominator."""
    n = np.linalg.norm(rows, axis=1)
    cos = rows @ rows.T / (np.outer(n, n) + 1e-8)
    off = cos[~np.eye(len(rows), dtype=bool)]
    return float(off.mean()), float(off.max())


def py_topk(row: list[float], k: int) -> list[int]:
    """Top-k indices by descending value, ties to the lower index."""
    return sorted(range(len(row)), key=lambda j: (-row[j], j))[:k]


def np_erank(m: np.ndarray) -> float:
    s = np.linalg.svd(m, compute_uv=False)
    return float(np.exp(scipy.stats.entropy(s / s.sum())))


def one_hot_probs(top1: list[list[int]], s: int) -> torch.Tensor:
    """[B, N, S] probabilities whose argmax is ``top1``."""
    t = torch.tensor(top1)
    return torch.nn.functional.one_hot(t, s).double() * 0.7 + 0.3 / s


# ----------------------------------------------------------------------------------------------
# ReferenceSetDiagnostics: usage
# ----------------------------------------------------------------------------------------------


def test_usage_metrics_hand_computed():
    d = ReferenceSetDiagnostics()
    d.update(torch.tensor([[0, 0, 2, -1]]), 4)  # counts [2, 0, 1, 0]
    st = d.get_epoch_stats()
    c = np.array([2.0, 0.0, 1.0, 0.0])
    assert st["ausa/active_set_ratio"] == pytest.approx(0.5)
    assert st["ausa/active_set_size_mean"] == pytest.approx(1.5)
    assert st["ausa/active_set_size_std"] == pytest.approx(np.std([2, 1], ddof=1))
    assert st["ausa/routing_entropy"] == pytest.approx(scipy.stats.entropy(c))
    assert st["ausa/routing_entropy_norm"] == pytest.approx(scipy.stats.entropy(c) / math.log(4))
    # sum_ij |c_i - c_j| = 14 over ordered pairs; / (2 * S * sum c) = 24
    assert st["ausa/routing_gini"] == pytest.approx(14 / 24)
    assert st["ausa/routing_top1_prob_mean"] == pytest.approx(2 / 3)
    assert st["ausa/tokens_per_set_variance"] == pytest.approx(np.var(c, ddof=1))
    assert math.isnan(st["ausa/set_reuse_jaccard"])  # no previous update
    assert "ausa/router_confidence_mean" not in st  # never provided


def test_usage_topk_indices_and_padding_pooled():
    flat = ReferenceSetDiagnostics()
    flat.update(torch.tensor([[0, 0, 2, -1]]), 4)
    topk = ReferenceSetDiagnostics()
    topk.update(torch.tensor([[[0, 2], [-7, 0]]]), 4)  # same counts, any negative is padding
    assert topk.get_epoch_stats() == pytest.approx(flat.get_epoch_stats(), nan_ok=True)


def test_usage_single_active_set_std_undefined():
    d = ReferenceSetDiagnostics()
    d.update(torch.tensor([[1, 1, 1]]), 3)
    st = d.get_epoch_stats()
    assert math.isnan(st["ausa/active_set_size_std"])
    assert st["ausa/routing_gini"] == pytest.approx(12 / (2 * 3 * 3))  # 4 ordered pairs of 3
    assert st["ausa/routing_entropy"] == 0.0
    d.update(torch.tensor([[0, 1, 1]]), 3)  # std defined now: mean over the defined batch only
    assert d.get_epoch_stats()["ausa/active_set_size_std"] == pytest.approx(np.std([1, 2], ddof=1))


def test_all_padding_batch():
    d = ReferenceSetDiagnostics()
    d.update(torch.full((2, 3), -1), 4)
    st = d.get_epoch_stats()
    assert math.isnan(st["ausa/routing_entropy"]) and math.isnan(st["ausa/active_set_ratio"])
    assert st["ausa/tokens_per_set_variance"] == 0.0


def test_set_reuse_jaccard_and_reset():
    d = ReferenceSetDiagnostics()
    d.update(torch.tensor([[0, 2, 2]]), 4)  # {0, 2}
    d.update(torch.tensor([[2, 3, -1]]), 4)  # {2, 3}: 1/3
    d.update(torch.tensor([[3, 2, 3]]), 4)  # {2, 3}: 1
    assert d.get_epoch_stats()["ausa/set_reuse_jaccard"] == pytest.approx((1 / 3 + 1) / 2)
    d.reset()  # forgets the previous active set
    d.update(torch.tensor([[0]]), 4)
    assert math.isnan(d.get_epoch_stats()["ausa/set_reuse_jaccard"])


def test_invalid_inputs():
    with pytest.raises(ValueError, match="count_mode"):
        ReferenceSetDiagnostics(count_mode="mean")
    d = ReferenceSetDiagnostics()
    with pytest.raises(ValueError, match="num_sets"):
        d.update(torch.tensor([[0, 4]]), 4)
    with pytest.raises(TypeError, match="integer"):
        d.update(torch.tensor([[0.0]]), 4)
    with pytest.raises(ValueError, match="not both"):
        d.update_with_router_state(
            torch.tensor([[0]]), 2, torch.ones(1, 1, 2) / 2, router_logits=torch.zeros(1, 1, 2)
        )


# ----------------------------------------------------------------------------------------------
# ReferenceSetDiagnostics: router output, consistency, embeddings, attention, params
# ----------------------------------------------------------------------------------------------


def test_router_probs_and_logits():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, dtype=torch.float64)
    probs = torch.softmax(logits, -1)
    idx = torch.zeros(2, 3, dtype=torch.long)
    d = ReferenceSetDiagnostics()
    d.update_with_router_state(idx, 5, router_probs=probs)
    st = d.get_epoch_stats()
    p = probs.numpy()
    conf = p.max(-1).ravel()
    assert st["ausa/router_confidence_mean"] == pytest.approx(conf.mean())
    assert st["ausa/router_confidence_std"] == pytest.approx(np.std(conf, ddof=1))
    assert st["ausa/routing_confidence_std"] == st["ausa/router_confidence_std"]
    kl = [scipy.stats.entropy(r, np.full(5, 0.2)) for r in p.reshape(-1, 5)]
    assert st["ausa/top1_vs_random_kl"] == pytest.approx(np.mean(kl))

    from_logits = ReferenceSetDiagnostics()
    from_logits.update_with_router_state(idx, 5, router_logits=logits.float())
    assert from_logits.get_epoch_stats() == pytest.approx(st, rel=1e-5, nan_ok=True)


def test_routing_consistency_hand_sequence():
    steps = [
        ([[5, 6, 5]], [[0, 1, 2]]),  # nothing seen before; table 5 -> 2 (last occurrence), 6 -> 1
        ([[5, 6, 7]], [[2, 0, 1]]),  # 5 matches, 6 does not: 1/2
        ([[7, -1, 6]], [[1, 1, 0]]),  # 7 and 6 match, id -1 ignored: 1
    ]
    provided, seed = ReferenceSetDiagnostics(), ReferenceSetDiagnostics(count_mode="seed")
    for ids, top1 in steps:
        for d in (provided, seed):
            d.update_with_router_state(
                torch.tensor(top1), 3, one_hot_probs(top1, 3), token_ids=torch.tensor(ids)
            )
    assert provided.get_epoch_stats()["ausa/routing_consistency"] == pytest.approx(0.75)
    assert seed.get_epoch_stats()["ausa/routing_consistency"] == pytest.approx(1.5 / 3)

    first = ReferenceSetDiagnostics()
    ids, top1 = steps[0]
    first.update_with_router_state(
        torch.tensor(top1), 3, one_hot_probs(top1, 3), token_ids=torch.tensor(ids)
    )
    assert math.isnan(first.get_epoch_stats()["ausa/routing_consistency"])


def test_routing_consistency_fallbacks_and_ties():
    # without probs the top-1 set is bank_indices[..., 0]; the table survives reset()
    d = ReferenceSetDiagnostics()
    d.update_with_router_state(
        torch.tensor([[[1, 0], [2, 0]]]), 3, token_ids=torch.tensor([[4, 9]])
    )
    d.reset()
    d.update_with_router_state(
        torch.tensor([[[1, 2], [1, 0]]]), 3, token_ids=torch.tensor([[4, 9]])
    )
    assert d.get_epoch_stats()["ausa/routing_consistency"] == pytest.approx(0.5)
    # tied probabilities: the top-1 set is the lower index
    tie = ReferenceSetDiagnostics()
    even = torch.tensor([[[0.4, 0.4, 0.2]]])
    tie.update_with_router_state(torch.tensor([[0]]), 3, even, token_ids=torch.tensor([[1]]))
    tie.update_with_router_state(
        torch.tensor([[0]]), 3, one_hot_probs([[0]], 3), token_ids=torch.tensor([[1]])
    )
    assert tie.get_epoch_stats()["ausa/routing_consistency"] == 1.0


def test_set_embedding_metrics_all_rows():
    torch.manual_seed(1)
    emb = torch.randn(2, 3, 4, dtype=torch.float64)
    d = ReferenceSetDiagnostics()
    d.update_with_router_state(torch.tensor([[0, 1]]), 3, set_embeddings=emb)
    st = d.get_epoch_stats()
    flat = emb.reshape(-1, 4).numpy()
    assert st["ausa/set_embedding_variance"] == pytest.approx(np.var(flat, axis=0, ddof=1).mean())
    assert st["ausa/set_embedding_norm_mean"] == pytest.approx(np.linalg.norm(flat, axis=1).mean())
    cmean, cmax = np_offdiag_cos(flat)  # M = 6 <= 100: the sample is every row
    assert st["ausa/set_cosine_similarity_mean"] == pytest.approx(cmean)
    assert st["ausa/set_cosine_similarity_max"] == pytest.approx(cmax)
    erank = np.mean([np_erank(m) for m in emb.numpy()])
    assert st["ausa/set_rank_effective"] == pytest.approx(erank)


def test_set_cosine_sample_follows_generator():
    torch.manual_seed(2)
    emb = torch.randn(3, 50, 4)  # M = 150 > 100: a sample
    expected_idx = torch.randperm(150, generator=torch.Generator().manual_seed(7))[:100]
    rows = emb.reshape(-1, 4).double().numpy()[expected_idx.numpy()]
    cmean, cmax = np_offdiag_cos(rows)

    d = ReferenceSetDiagnostics()
    d.update_with_router_state(
        torch.tensor([[0]]), 2, set_embeddings=emb, generator=torch.Generator().manual_seed(7)
    )
    st = d.get_epoch_stats()
    assert st["ausa/set_cosine_similarity_mean"] == pytest.approx(cmean)
    assert st["ausa/set_cosine_similarity_max"] == pytest.approx(cmax)

    torch.manual_seed(7)  # generator=None draws from the global CPU RNG
    g = ReferenceSetDiagnostics()
    g.update_with_router_state(torch.tensor([[0]]), 2, set_embeddings=emb)
    assert g.get_epoch_stats()["ausa/set_cosine_similarity_mean"] == pytest.approx(cmean)


def test_effective_rank_edge_cases():
    assert reference.effective_rank(torch.eye(3)).item() == pytest.approx(3.0)
    assert reference.effective_rank(torch.zeros(2, 3, 4)).tolist() == [0.0, 0.0]
    rank1 = torch.outer(torch.arange(1.0, 4.0), torch.ones(5))
    assert reference.effective_rank(rank1).item() == pytest.approx(1.0)


def test_set_attention_weights():
    w = torch.tensor([[[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]], [[0.2, 0.3, 0.5], [0.6, 0.2, 0.2]]])
    d = ReferenceSetDiagnostics()
    d.update_with_router_state(torch.tensor([[0]]), 3, set_attention_weights=w)
    st = d.get_epoch_stats()
    assert st["ausa/set_attention_entropy_mean"] == pytest.approx(np_entropy_rows(w.numpy()).mean())
    assert st["ausa/set_attention_top1_mean"] == pytest.approx((0.5 + 1.0 + 0.5 + 0.6) / 4)


def _params() -> dict[str, torch.nn.Parameter]:
    w = torch.nn.Parameter(torch.tensor([[1.0, -2.0], [0.5, 0.0]]))
    b = torch.nn.Parameter(torch.tensor([3.0]))
    w.grad = torch.tensor([[0.1, 0.2], [0.0, -0.2]])  # b has no grad: skipped
    return {"w": w, "b": b}


@pytest.mark.parametrize("mode", ["provided", "seed"])
def test_router_params_norms_and_weight_change(mode):
    params = _params()
    d = ReferenceSetDiagnostics(count_mode=mode)
    d.update_with_router_state(torch.tensor([[0]]), 2, router_params=params)
    first = d.get_epoch_stats()
    assert first["ausa/router_gradient_norm"] == pytest.approx(math.sqrt(0.01 + 0.04 + 0.04))
    assert first["ausa/router_param_norm"] == pytest.approx(math.sqrt(1 + 4 + 0.25 + 9))
    if mode == "provided":  # first update: no previous params, not counted
        assert math.isnan(first["ausa/router_weight_change"])
    else:  # the original classes divide the (empty) sum by the update count
        assert first["ausa/router_weight_change"] == 0.0

    with torch.no_grad():
        params["w"] += torch.tensor([[0.3, 0.0], [0.0, 0.4]])
        params["b"] -= 1.2
    d.update_with_router_state(torch.tensor([[0]]), 2, router_params=params)
    change = math.sqrt(0.09 + 0.16 + 1.44)
    expected = change if mode == "provided" else change / 2
    assert d.get_epoch_stats()["ausa/router_weight_change"] == pytest.approx(expected)

    d.reset()  # previous params survive the epoch boundary
    with torch.no_grad():
        params["b"] += 2.0
    d.update_with_router_state(torch.tensor([[0]]), 2, router_params=params)
    assert d.get_epoch_stats()["ausa/router_weight_change"] == pytest.approx(2.0)


def test_count_modes_differ_when_inputs_are_missing():
    probs = one_hot_probs([[0, 1]], 2)  # confidence 0.85 per token
    runs = {}
    for mode in ("provided", "seed"):
        d = ReferenceSetDiagnostics(count_mode=mode)
        d.update(torch.tensor([[0, 1]]), 2)
        d.update_with_router_state(torch.tensor([[0, 1]]), 2, router_probs=probs)
        runs[mode] = d.get_epoch_stats()
    assert runs["provided"]["ausa/router_confidence_mean"] == pytest.approx(0.85)
    assert runs["seed"]["ausa/router_confidence_mean"] == pytest.approx(0.85 / 2)
    # usage metrics were provided by both updates: identical in both modes
    assert runs["seed"]["ausa/routing_entropy"] == pytest.approx(math.log(2))
    assert runs["provided"]["ausa/routing_entropy"] == pytest.approx(math.log(2))
    # jaccard uses its own count in both modes
    assert (
        runs["seed"]["ausa/set_reuse_jaccard"] == runs["provided"]["ausa/set_reuse_jaccard"] == 1.0
    )
    # never-provided metrics: absent vs 0.0; count_mode="seed" returns every key
    assert "ausa/set_embedding_variance" not in runs["provided"]
    assert runs["seed"]["ausa/set_embedding_variance"] == 0.0
    assert tuple(runs["seed"]) == schema.SET_DIAGNOSTICS


def test_empty_epoch():
    assert ReferenceSetDiagnostics().get_epoch_stats() == {}
    seed = ReferenceSetDiagnostics(count_mode="seed").get_epoch_stats()
    assert tuple(seed) == schema.SET_DIAGNOSTICS and all(math.isnan(v) for v in seed.values())


def test_epoch_deltas():
    d = ReferenceSetDiagnostics()
    emb1 = torch.tensor([[[0.0, 0.0], [2.0, 2.0]]])  # variance 2
    emb2 = torch.tensor([[[0.0, 0.0], [1.0, 1.0]]])  # variance 0.5
    d.update_with_router_state(torch.tensor([[0, 1]]), 2, one_hot_probs([[0, 1]], 2), emb1)
    e1 = d.get_epoch_stats()
    assert all(math.isnan(e1[k]) for k in reference._DELTAS)
    d.reset()
    probs2 = torch.tensor([[[0.6, 0.4], [0.6, 0.4]]])
    d.update_with_router_state(torch.tensor([[0, 0]]), 2, probs2, emb2)
    e2 = d.get_epoch_stats()
    assert e2["ausa/delta_routing_entropy"] == pytest.approx(0.0 - math.log(2))
    assert e2["ausa/delta_set_variance"] == pytest.approx(0.5 - 2.0)
    assert e2["ausa/delta_router_confidence"] == pytest.approx(0.6 - 0.85)
    d.reset()
    d.update(torch.tensor([[0, 1]]), 2)  # no probs / embeddings this epoch: those deltas absent
    e3 = d.get_epoch_stats()
    assert e3["ausa/delta_routing_entropy"] == pytest.approx(math.log(2))
    assert "ausa/delta_set_variance" not in e3 and "ausa/delta_router_confidence" not in e3


def test_full_update_emits_every_key():
    torch.manual_seed(3)
    d = ReferenceSetDiagnostics()
    params = _params()
    for _ in range(2):
        d.update_with_router_state(
            torch.randint(0, 4, (2, 3, 2)),
            4,
            torch.softmax(torch.randn(2, 3, 4), -1),
            torch.randn(2, 4, 5),
            params,
            torch.softmax(torch.randn(2, 3, 4), -1),
            token_ids=torch.randint(0, 3, (2, 3)),
        )
    st = d.get_epoch_stats()
    assert tuple(st) == schema.SET_DIAGNOSTICS
    assert all(math.isfinite(v) for k, v in st.items() if "delta" not in k)


# ----------------------------------------------------------------------------------------------
# ReferenceBaselineAttentionDiagnostics
# ----------------------------------------------------------------------------------------------


def test_baseline_head_mean_row_metrics():
    torch.manual_seed(4)
    attn = torch.softmax(torch.randn(2, 3, 4, 6, dtype=torch.float64), -1)
    d = ReferenceBaselineAttentionDiagnostics()
    d.update(attn)
    st = d.get_epoch_stats()
    a = attn.numpy().mean(1)
    h = np_entropy_rows(a)
    top1 = a.max(-1).ravel()
    assert st["baseline/attention_entropy_mean"] == pytest.approx(h.mean())
    assert st["baseline/attention_entropy_norm"] == pytest.approx(h.mean() / math.log(6))
    assert st["baseline/attention_top1_mean"] == pytest.approx(top1.mean())
    assert st["baseline/attention_top1_std"] == pytest.approx(np.std(top1, ddof=1))
    per_head = np_entropy_rows(attn.numpy())
    assert st["baseline/attention_head_entropy_mean"] == pytest.approx(per_head.mean())
    assert st["baseline/attention_sparsity"] == pytest.approx((attn.numpy() > 0.1).mean())
    assert math.isnan(st["baseline/attention_pattern_jaccard"])


def _rows(*rows: list[float]) -> torch.Tensor:
    return torch.tensor([list(rows)], dtype=torch.float64)  # [1, N, Nk]


def test_pattern_jaccards_tie_rule():
    uniform = [1 / 8] * 8  # all tied: top-5 = {0, 1, 2, 3, 4}
    high = [0.0, 0.0, 0.0, 0.2, 0.2, 0.2, 0.2, 0.2]  # top-5 = {3, ..., 7}
    assert py_topk(uniform, 5) == [0, 1, 2, 3, 4]
    d = ReferenceBaselineAttentionDiagnostics()
    d.update(_rows(uniform, high))
    d.update(_rows(high, uniform))  # same union of indices, every row changed
    st = d.get_epoch_stats()
    assert st["baseline/attention_pattern_jaccard"] == 1.0
    assert st["baseline/attention_topk_jaccard_per_query"] == pytest.approx(2 / 8)

    skew = [0.3] + [0.1] * 7  # ties among the seven 0.1: the lower indices win
    s = ReferenceBaselineAttentionDiagnostics()
    s.update(_rows(skew))
    s.update(_rows(high))
    assert s.get_epoch_stats()["baseline/attention_pattern_jaccard"] == pytest.approx(2 / 8)


def test_pattern_jaccard_small_nk_and_shape_change():
    d = ReferenceBaselineAttentionDiagnostics()
    d.update(_rows([0.7, 0.3]))  # k = min(5, 2) = 2: {0, 1}
    d.update(torch.tensor([[[0.0, 0.0, 1.0], [0.1, 0.2, 0.7], [0.5, 0.5, 0.0]]]))
    st = d.get_epoch_stats()
    # k = 3 now: {0, 1, 2} vs {0, 1}; the per-query Jaccard needs matching shapes
    assert st["baseline/attention_pattern_jaccard"] == pytest.approx(2 / 3)
    assert math.isnan(st["baseline/attention_topk_jaccard_per_query"])


def test_sparsity_and_effective_heads_use_heads():
    one_hot = torch.eye(8, dtype=torch.float64)[:2]  # entropy 0
    uniform = torch.full((2, 8), 1 / 8, dtype=torch.float64)  # normalised entropy 1
    attn = torch.stack([one_hot, uniform])[None]  # [1, 2 heads, 2, 8]
    d = ReferenceBaselineAttentionDiagnostics()
    d.update(attn)
    st = d.get_epoch_stats()
    assert st["baseline/attention_sparsity"] == pytest.approx((2 + 16) / 32)
    assert st["baseline/attention_effective_heads"] == 0.5
    assert st["baseline/attention_head_entropy_mean"] == pytest.approx(math.log(8) / 2)
    three = ReferenceBaselineAttentionDiagnostics()
    three.update(one_hot[None])  # 3-D input = one head
    assert three.get_epoch_stats()["baseline/attention_effective_heads"] == 1.0


def test_baseline_params_values_and_count_modes():
    torch.manual_seed(5)
    values = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    attn = torch.softmax(torch.randn(1, 4, 4, dtype=torch.float64), -1)
    runs = {}
    for mode in ("provided", "seed"):
        d = ReferenceBaselineAttentionDiagnostics(count_mode=mode)
        params = _params()
        d.update(None, params)  # params-only update
        with torch.no_grad():
            params["b"] += 0.5
        d.update(attn, params, values)
        runs[mode] = d.get_epoch_stats()
    flat = values.reshape(-1, 5).numpy()
    p, s = runs["provided"], runs["seed"]
    assert p["baseline/value_embedding_variance"] == pytest.approx(np.var(flat, 0, ddof=1).mean())
    assert p["baseline/value_cosine_similarity"] == pytest.approx(np_offdiag_cos(flat)[0])
    assert s["baseline/value_cosine_similarity"] == pytest.approx(np_offdiag_cos(flat)[0] / 2)
    assert p["baseline/attention_weight_change"] == pytest.approx(0.5)
    assert s["baseline/attention_weight_change"] == pytest.approx(0.25)
    assert p["baseline/attention_param_norm"] == pytest.approx(s["baseline/attention_param_norm"])
    top1 = attn.numpy().max(-1).mean()
    assert p["baseline/attention_top1_mean"] == pytest.approx(top1)
    assert s["baseline/attention_top1_mean"] == pytest.approx(top1 / 2)
    assert math.isnan(s["baseline/attention_pattern_jaccard"])  # own count: 0
    assert tuple(s) == schema.BASELINE_DIAGNOSTICS
    assert set(p) == set(schema.BASELINE_DIAGNOSTICS)


def test_baseline_attention_absent_when_never_given():
    d = ReferenceBaselineAttentionDiagnostics()
    d.update(None, _params())
    assert set(d.get_epoch_stats()) == {
        "baseline/attention_gradient_norm",
        "baseline/attention_param_norm",
        "baseline/attention_weight_change",
    }
    with pytest.raises(ValueError, match="attention_weights"):
        d.update(torch.ones(4, 4))


# ----------------------------------------------------------------------------------------------
# row_stats (oracle of the fused op)
# ----------------------------------------------------------------------------------------------


def _check_rows(out, p: np.ndarray, *, topk, tau, eps, window, offset):
    """Compare row_stats output with a python loop over the rows of p [..., q, n]."""
    n = p.shape[-1]
    q = p.shape[-2]
    for flat_i, row in enumerate(p.reshape(-1, n)):
        lead = np.unravel_index(flat_i, p.shape[:-1])
        i = lead[-1] + offset
        r = row.tolist()
        pos = row[row > 0]
        assert out["entropy"][lead].item() == pytest.approx(-(pos * np.log(pos)).sum(), abs=1e-12)
        assert out["max"][lead].item() == max(r)
        assert out["argmax"][lead].item() == py_topk(r, 1)[0]
        assert out["sumsq"][lead].item() == pytest.approx((row**2).sum())
        assert out["count_gt_tau"][lead].item() == sum(v > tau for v in r)
        assert out["count_gt_eps"][lead].item() == sum(v > eps for v in r)
        assert out["rowsum_err"][lead].item() == pytest.approx(abs(row.sum() - 1), abs=1e-12)
        future = sum(v for j, v in enumerate(r) if j > i)
        assert out["future_mass"][lead].item() == pytest.approx(future, abs=1e-12)
        assert out["abs_dev_uniform"][lead].item() == pytest.approx(np.abs(row - 1 / n).mean())
        if window is not None:
            local = sum(v for j, v in enumerate(r) if abs(j - i) <= window)
            assert out["local_mass"][lead].item() == pytest.approx(local, abs=1e-12)
        if topk:
            assert out["topk_indices"][lead].tolist() == py_topk(r, topk)
    assert q == out["entropy"].shape[-1]


def test_row_stats_probabilities_with_ties_and_zeros():
    g = torch.Generator().manual_seed(6)
    counts = torch.randint(0, 3, (2, 3, 5, 7), generator=g).double()  # many ties and zeros
    counts[..., 0] += 1
    p = counts / counts.sum(-1, keepdim=True)
    out = row_stats(p, topk=4, tau=0.2, eps=1e-6, window=1, query_offset=2)
    _check_rows(out, p.numpy(), topk=4, tau=0.2, eps=1e-6, window=1, offset=2)
    assert out["finite"].all()
    assert out["topk_indices"].shape == (2, 3, 5, 4)
    assert "local_mass" not in row_stats(p)
    assert "topk_indices" not in row_stats(p)


def test_row_stats_logits_reduce_dim():
    torch.manual_seed(7)
    logits = torch.randn(2, 3, 4, 6)
    out = row_stats(logits, from_logits=True, reduce_dim=1, topk=2, window=0)
    z = logits.double().numpy()
    e = np.exp(z - z.max(-1, keepdims=True))
    p = (e / e.sum(-1, keepdims=True)).mean(1)  # softmax per head, then the head mean
    _check_rows(out, p, topk=2, tau=0.1, eps=1e-6, window=0, offset=0)
    assert out["entropy"].dtype == torch.float64 and out["entropy"].shape == (2, 4)


def test_row_stats_finite_and_errors():
    logits = torch.tensor(
        [[0.0, -math.inf, 1.0], [-math.inf] * 3, [0.0, math.nan, 0.0], [math.inf, 0.0, 0.0]]
    )
    assert row_stats(logits, from_logits=True)["finite"].tolist() == [True, False, False, False]
    probs = torch.tensor([[0.5, 0.5, 0.0], [math.nan, 0.5, 0.5]])
    assert row_stats(probs)["finite"].tolist() == [True, False]
    vec = row_stats(torch.tensor([0.25, 0.75]))  # 1-D: one row, query index 0
    assert vec["future_mass"].item() == pytest.approx(0.75)
    with pytest.raises(ValueError, match="topk"):
        row_stats(probs, topk=4)
    with pytest.raises(ValueError, match="reduce_dim"):
        row_stats(probs, reduce_dim=-1)


# ----------------------------------------------------------------------------------------------
# weight_stats, bank_coherence
# ----------------------------------------------------------------------------------------------


def test_weight_stats():
    w = torch.tensor(
        [
            [0.7, 0.3, 0.0, 0.0],
            [0.25, 0.25, 0.25, 0.25],
            [1.0, 0.0, 0.0, 0.0],
            [0.5, 0.5 - 1e-7, 1e-7, 0.0],
        ]
    )
    idx = torch.tensor([[0, 0], [3, -1], [0, 2]])
    st = weight_stats(w, tau=0.2, eps=1e-6, indices=idx)
    a = w.double().numpy()
    h = np_entropy_rows(a)
    support = (a > 1e-6).sum(1)
    assert st["entropy_mean"] == pytest.approx(h.mean())
    assert st["entropy_norm"] == pytest.approx(h.mean() / math.log(4))
    assert st["top1_mean"] == pytest.approx(a.max(1).mean())
    assert st["top1_std"] == pytest.approx(np.std(a.max(1), ddof=1))
    assert st["kl_uniform"] == pytest.approx(
        np.mean([scipy.stats.entropy(r, np.full(4, 0.25)) for r in a])
    )
    assert st["sparsity"] == pytest.approx((a > 0.2).mean())
    assert st["support_mean"] == pytest.approx(support.mean())
    assert st["support_median"] == pytest.approx(np.median(support))  # [2, 4, 1, 2] -> 2.0
    assert st["prune_frac"] == pytest.approx((a <= 1e-6).mean())
    c = np.array([3.0, 0.0, 1.0, 1.0])
    assert st["usage_gini"] == pytest.approx(np.abs(c[:, None] - c[None]).sum() / (2 * 4 * c.sum()))
    assert st["active_ratio"] == pytest.approx(0.75)
    assert set(st) == set(schema.WEIGHT_DIAGNOSTICS_SUFFIXES) - {"coherence"}
    assert "usage_gini" not in weight_stats(w)


def test_bank_coherence():
    atoms = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [-3.0, 0.1, 0.0], [0.0, 0.0, 0.0]])
    a = atoms.double().numpy()[:3]
    unit = a / np.linalg.norm(a, axis=1, keepdims=True)
    cos = np.abs(unit @ unit.T)[~np.eye(3, dtype=bool)]
    assert bank_coherence(atoms) == pytest.approx(cos.max())  # anti-parallel counts: |cos|
    assert bank_coherence(torch.randn(4, 2, 3)) <= 1.0 + 1e-12  # atoms flattened
    assert math.isnan(bank_coherence(torch.ones(1, 3)))
