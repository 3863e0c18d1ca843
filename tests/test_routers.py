"""watch() on mixture-of-experts routers (fastdiag/integrations/routers.py): tiny random-init
Mixtral, Qwen2-MoE and OLMoE from configs, every value against a by-hand computation from the
model's own ``output_router_logits=True`` outputs; register_router; per-expert gradient norms
of the fused expert parameters."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import fastdiag
from fastdiag.diagnostics.training import ROUTER_METRICS, TrainingDiagnostics
from tests.conftest import forbid_host_sync

transformers = pytest.importorskip("transformers")

COMMON = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    num_experts_per_tok=2,
)
E = 4


def _model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "mixtral":
        cfg = transformers.MixtralConfig(**COMMON, num_local_experts=E)
        return transformers.MixtralForCausalLM(cfg)
    if kind == "qwen2_moe":
        cfg = transformers.Qwen2MoeConfig(
            **COMMON, num_experts=E, moe_intermediate_size=16, shared_expert_intermediate_size=16
        )
        model = transformers.Qwen2MoeForCausalLM(cfg)
        with torch.no_grad():  # the router's weights are zero-initialised: give them a spread
            for layer in model.model.layers:
                layer.mlp.gate.weight.normal_(0, 0.5)
        return model
    olmoe = getattr(transformers, "OlmoeForCausalLM", None)
    if olmoe is None:
        pytest.skip("OLMoE is not in the installed transformers")
    cfg = transformers.OlmoeConfig(**COMMON, num_experts=E, eos_token_id=None, pad_token_id=None)
    return olmoe(cfg)


def _hand(logits: torch.Tensor, valid: torch.Tensor, k: int, prev_top: torch.Tensor | None) -> dict[str, float]:
    """The router values (docs/metrics.md §5) of logits [T, E] over the valid tokens."""
    p = torch.softmax(logits.double(), -1)[valid]
    e = p.shape[-1]
    h = torch.special.entr(p).sum(-1)
    top = torch.topk(p, k, dim=-1).indices
    counts = torch.bincount(top.reshape(-1), minlength=e).double()
    gini = (counts[:, None] - counts[None, :]).abs().sum() / (2 * e * counts.sum())
    out = {
        "router_entropy_norm": float(h.mean() / math.log(e)),
        "router_top1": float(p.amax(-1).mean()),
        "expert_load_gini": float(gini),
        "expert_active_ratio": float((counts > 0).double().mean()),
        "expert_load_max_over_mean": float(counts.max() / counts.mean()),
    }
    if prev_top is not None:
        jac = [len(set(a.tolist()) & set(b.tolist())) / len(set(a.tolist()) | set(b.tolist()))
               for a, b in zip(top, prev_top, strict=True)]
        out["router_topk_jaccard"] = sum(jac) / len(jac)
    return out, top


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "olmoe"])
def test_router_values_equal_the_models_router_logits(kind):
    model = _model(kind)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0  # padded tokens: left out of every router value
    valid = mask.reshape(-1).bool()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        handle = fastdiag.watch(model, optimizer=opt)
    layers = [f"model.layers.{i}.mlp.gate" for i in range(2)]
    assert handle.router_layers == {n: "hf" for n in layers}
    sums: dict[str, list[float]] = {}
    prev = [None, None]
    grads = []
    for _ in range(2):  # two steps: the Jaccard compares the second with the first
        out = model(ids, attention_mask=mask, labels=ids, output_router_logits=True)
        assert len(out.router_logits) == 2
        for i, logits in enumerate(out.router_logits):
            values, prev[i] = _hand(logits.detach(), valid, 2, prev[i])
            for m, v in values.items():
                sums.setdefault(f"{m}/{layers[i]}", []).append(v)
        opt.zero_grad()
        out.loss.backward()
        grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if "experts" in n})
        opt.step()
    stats = handle.get_epoch_stats()
    handle.remove()
    for key, values in sums.items():
        assert stats[key] == pytest.approx(sum(values) / len(values), rel=1e-5, abs=1e-9), key
    assert {k for k in stats if k.split("/")[0] in ROUTER_METRICS} == {
        f"{m}/{n}" for m in ROUTER_METRICS[:-1] for n in layers
    }  # no capacity factor: no expert_over_capacity
    # one gradient norm per expert of the fused [E, ...] parameters of each experts module
    for i in range(2):
        module = f"model.layers.{i}.mlp.experts"
        for e in range(E):
            want = [
                math.sqrt(sum(float(g[n][e].double().square().sum()) for n in g if n.startswith(module + ".")))
                for g in grads
            ]
            assert stats[f"grad_norm/{module}.expert_{e}"] == pytest.approx(sum(want) / 2, rel=1e-5)


def test_expert_grad_norms_off_and_routers_off():
    model = _model("mixtral")
    ids = torch.randint(0, 64, (1, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with fastdiag.watch(model, expert_grad_norms=False, routers=False) as handle:
            model(ids, labels=ids).loss.backward()
    stats = handle.get_epoch_stats()
    assert not any(".expert_" in k for k in stats)
    assert not any(k.split("/")[0] in ROUTER_METRICS for k in stats)
    assert handle.router_layers == {}


class TopOneRouter(nn.Module):
    """A custom router: returns a dict holding its logits."""

    def __init__(self, d: int, e: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d, e)

    def forward(self, x: torch.Tensor) -> dict:
        return {"scores": self.proj(x).softmax(-1), "logits": self.proj(x)}


def test_register_router_with_capacity_factor_and_no_host_sync():
    torch.manual_seed(0)
    router = TopOneRouter(8, 5)
    model = nn.Sequential(nn.Linear(8, 8), router)
    fastdiag.register_router(router, lambda m, a, out: out["logits"], top_k=1, capacity_factor=1.25)
    x = torch.randn(3, 6, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        handle = fastdiag.watch(model, gradients=False)
    assert handle.router_layers == {"1": "registered"}
    out = model(x)
    with forbid_host_sync():
        model(x)
    handle.remove()
    logits = out["logits"].detach().reshape(-1, 5)
    values, top = _hand(logits, torch.ones(18, dtype=torch.bool), 1, None)
    counts = torch.bincount(top.reshape(-1), minlength=5).double()
    cap = math.ceil(1.25 * 18 * 1 / 5)
    values["expert_over_capacity"] = float((counts - cap).clamp_min(0).sum() / counts.sum())
    values["router_topk_jaccard"] = 1.0  # the same batch twice
    stats = handle.get_epoch_stats()
    for m, v in values.items():
        assert stats[f"{m}/1"] == pytest.approx(v, rel=1e-6), m


def test_update_router_bad_arguments_and_reset():
    diag = TrainingDiagnostics()
    x = torch.randn(6, 4)
    with pytest.raises(TypeError, match="name must be a str"):
        diag.update_router(1, x)
    with pytest.raises(TypeError, match="logits must be a torch.Tensor"):
        diag.update_router("r", [1.0])
    with pytest.raises(ValueError, match="top_k must be"):
        diag.update_router("r", x, top_k=5)
    with pytest.raises(ValueError, match="capacity_factor must be > 0"):
        diag.update_router("r", x, capacity_factor=0.0)
    with pytest.raises(ValueError, match="row_mask must hold one entry per token"):
        diag.update_router("r", x, row_mask=torch.ones(5, dtype=torch.bool))
    with pytest.raises(TypeError, match="module must be a torch.nn.Module"):
        fastdiag.register_router("gate")
    with pytest.raises(ValueError, match="top_k must be"):
        fastdiag.register_router(nn.Linear(2, 2), top_k=0)
    diag.update_router("r", x, top_k=2)
    diag.update_router("r", x, top_k=2)
    assert diag.get_epoch_stats()["router_topk_jaccard/r"] == 1.0
    diag.reset()
    diag.update_router("r", x, top_k=2)  # first call after reset: no previous top-k
    assert math.isnan(diag.get_epoch_stats()["router_topk_jaccard/r"])
    diag.update_router("empty", x, row_mask=torch.zeros(6, dtype=torch.bool))
    assert all(math.isnan(v) for k, v in diag.get_epoch_stats().items() if k.endswith("/empty"))
