"""Shared models, hand computations and deterministic watch scenarios of the training tests
(tests/test_watch.py, tests/test_training_diagnostics.py)."""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

D, HEADS, SEQ, BATCH = 16, 4, 6, 3


@contextlib.contextmanager
def quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def encoder(layers: int = 2, seed: int = 0) -> nn.TransformerEncoder:
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(D, HEADS, 2 * D, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


def entr(p: torch.Tensor) -> torch.Tensor:
    return torch.special.entr(p.double()).sum(-1)


def hand_mha_weights(mha: nn.MultiheadAttention, x: torch.Tensor) -> torch.Tensor:
    """Per-head softmax(q k^T / sqrt(dh)) [B, H, N, N] in float64 from the module's projections."""
    with torch.no_grad():
        w = mha.in_proj_weight.double()
        b = mha.in_proj_bias.double()
        q, k, _ = F.linear(x.double(), w, b).chunk(3, dim=-1)
        bsz, n, _ = q.shape
        dh = D // HEADS
        q = q.view(bsz, n, HEADS, dh).transpose(1, 2)
        k = k.view(bsz, n, HEADS, dh).transpose(1, 2)
        return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dh), dim=-1)


def attention_expect(w: torch.Tensor, tau: float = 0.1) -> dict[str, float]:
    """Per-layer values (docs/metrics.md §5) of per-head weights w [B, H, N, Nk] (float64):
    normalised entropy per row = H / log(number of entries > 0), rows with >= 2 of them."""
    h = entr(w)  # [B, H, N]
    n = (w > 0).sum(-1).double()
    ok = n >= 2
    u = torch.where(ok, h / n.clamp_min(2).log(), 0.0)
    per_head = u.sum(dim=(0, 2)) / ok.sum(dim=(0, 2))
    return {
        "attention_entropy": float(h.mean()),
        "attention_sparsity": float((w > tau).double().mean()),
        "attention_top1": float(w.amax(-1).mean()),
        "attention_effective_heads": float((per_head < 0.9).double().mean()),
        "attention_entropy_norm": float(u.sum() / ok.sum()),
    }


class Means:
    """Running means of hand-computed values."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, key: str, value: float) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + value
        self.counts[key] = self.counts.get(key, 0) + 1

    def result(self) -> dict[str, float]:
        return {k: self.sums[k] / self.counts[k] for k in self.sums}


def assert_close(stats: dict[str, float], expect: dict[str, float], rel: float = 1e-5) -> None:
    for key, value in expect.items():
        assert key in stats, f"{key} missing from {sorted(stats)[:8]}..."
        assert stats[key] == pytest.approx(value, rel=rel, abs=1e-7), key


# ----------------------------------------------------------------------------------------------
# Hugging Face style model (built from a config in code, no download)
# ----------------------------------------------------------------------------------------------


@dataclass
class TinyConfig:
    hidden_size: int = D
    num_attention_heads: int = HEADS
    num_hidden_layers: int = 2
    intermediate_size: int = 2 * D
    vocab_size: int = 11
    output_attentions: bool = True


class TinySelfAttention(nn.Module):
    def __init__(self, config: TinyConfig) -> None:
        super().__init__()
        self.heads = config.num_attention_heads
        self.dh = config.hidden_size // self.heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.out = nn.Linear(config.hidden_size, config.hidden_size)

    def split(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.heads, self.dh).transpose(1, 2)

    def forward(self, hidden_states, attention_mask=None, output_attentions=False):
        q, k, v = (self.split(f(hidden_states)) for f in (self.query, self.key, self.value))
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.dh)
        if attention_mask is not None:
            scores = scores + attention_mask
        probs = scores.softmax(-1)
        ctx = (probs @ v).transpose(1, 2).reshape(hidden_states.shape)
        return (self.out(ctx), probs if output_attentions else None)


class TinyLayer(nn.Module):
    def __init__(self, config: TinyConfig) -> None:
        super().__init__()
        self.attention = TinySelfAttention(config)
        self.norm = nn.LayerNorm(config.hidden_size)
        self.mlp = nn.Sequential(
            nn.Linear(config.hidden_size, config.intermediate_size),
            nn.GELU(),
            nn.Linear(config.intermediate_size, config.hidden_size),
        )

    def forward(self, hidden_states, attention_mask=None, output_attentions=False):
        attn, probs = self.attention(hidden_states, attention_mask, output_attentions)
        hidden_states = self.norm(hidden_states + attn)
        return (hidden_states + self.mlp(hidden_states), probs)


class TinyModel(nn.Module):
    def __init__(self, config: TinyConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layer = nn.ModuleList(TinyLayer(config) for _ in range(config.num_hidden_layers))
        self.head = nn.Linear(config.hidden_size, config.vocab_size)
        self.unused = nn.Linear(2, 2)  # never in the graph: its parameters get no gradient

    def forward(self, input_ids, output_attentions=None):
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        h = self.embeddings(input_ids)
        attentions = []
        for layer in self.layer:
            h, probs = layer(h, output_attentions=output_attentions)
            attentions.append(probs)
        return {"logits": self.head(h), "attentions": tuple(attentions) if output_attentions else None}


class LogitAttention(nn.Module):
    """Returns only its output; keeps the pre-softmax scores [B, H, N, N] on itself."""

    def __init__(self) -> None:
        super().__init__()
        self.qk = nn.Linear(D, 2 * D)
        self.alpha_logit = nn.Parameter(torch.tensor(0.3))

    def forward(self, x):
        q, k = self.qk(x).chunk(2, -1)
        q = q.view(*x.shape[:2], HEADS, -1).transpose(1, 2)
        k = k.view(*x.shape[:2], HEADS, -1).transpose(1, 2)
        self.scores = q @ k.transpose(-1, -2)
        mixed = self.scores.softmax(-1).mean(1) @ x
        return torch.sigmoid(self.alpha_logit) * mixed


# ----------------------------------------------------------------------------------------------
# Deterministic scenarios: the epoch dict of watch() on the cases of the tests, recorded before
# fastdiag/training.py was split (tests/watch_before_split.json) and compared after it
# ----------------------------------------------------------------------------------------------


def _sgd_steps(model, handle_fn, opt, xs, loss_fn) -> None:
    for x in xs:
        loss = loss_fn(model(x))
        opt.zero_grad()
        loss.backward()
        opt.step()


def scenario_encoder_optimizer(watch: Callable, api: dict) -> dict[str, float]:
    model = encoder()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    torch.manual_seed(1)
    xs = [torch.randn(BATCH, SEQ, D) for _ in range(3)]
    handle = watch(model, optimizer=opt)
    _sgd_steps(model, handle, opt, xs, lambda out: out.square().mean())
    stats = handle.get_epoch_stats()
    handle.remove()
    return stats


def scenario_hf_module_groups(watch: Callable, api: dict) -> dict[str, float]:
    torch.manual_seed(0)
    config = TinyConfig()
    model = TinyModel(config)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = watch(model, group="module")
    for _ in range(3):
        ids = torch.randint(0, config.vocab_size, (BATCH, SEQ))
        out = model(ids)
        loss = F.cross_entropy(out["logits"].flatten(0, 1), ids.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    stats = handle.get_epoch_stats()
    handle.remove()
    return stats


def scenario_registered_and_probes(watch: Callable, api: dict) -> dict[str, float]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, D), LogitAttention())
    block = model[1]
    api["register_attention"](block, lambda m, inputs, out: m.scores, from_logits=True)
    api["probe"](block, "memory_read_norm", lambda m, inputs, out: out.norm())
    api["probe"](block, "m3_alpha", lambda m, inputs, out: torch.sigmoid(m.alpha_logit))
    api["probe"](block, "m3_alpha_grad", lambda m: m.alpha_logit.grad, at="grad")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with watch(model, optimizer=opt) as handle:
        for _ in range(3):
            out = model(torch.randn(BATCH, SEQ, D))
            opt.zero_grad()
            out.sum().backward()
            opt.step()
        return handle.get_epoch_stats()


def scenario_nan_gradients(watch: Callable, api: dict) -> dict[str, float]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 1))
    inject = [True]

    def poison(grad):
        if inject[0]:
            grad = grad.clone()
            grad[0, :3] = float("nan")
            grad[0, 3] = float("inf")
        return grad

    model[1].weight.register_hook(poison)
    with quiet():
        handle = watch(model)
    for _ in range(2):
        model(torch.randn(5, 4)).sum().backward()
        inject[0] = False
        model.zero_grad()
    stats = handle.get_epoch_stats()
    handle.remove()
    return stats


def scenario_every_3_depth_2(watch: Callable, api: dict) -> dict[str, float]:
    model = encoder(layers=2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    torch.manual_seed(3)
    x = torch.randn(BATCH, SEQ, D)
    handle = watch(model, every=3, group=2, optimizer=opt)
    for _ in range(7):
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    stats = handle.get_epoch_stats()
    handle.remove()
    return stats


def scenario_update_gradients_direct(watch: Callable, api: dict) -> dict[str, float]:
    torch.manual_seed(0)
    named = [
        ("a.x", nn.Parameter(torch.randn(5, 3))),
        ("a.y", nn.Parameter(torch.randn(7, dtype=torch.float64))),
        ("b.z", nn.Parameter(torch.randn(2, 2))),
        ("frozen", nn.Parameter(torch.randn(3))),
    ]
    for _, p in named[:3]:
        p.grad = torch.randn_like(p)
    named[2][1].grad[0, 0] = float("nan")
    diag = api["TrainingDiagnostics"]()
    diag.update_gradients(named)
    diag.update_gradients(dict(named), group="module")
    diag.update_attention("l", torch.softmax(torch.randn(2, 3, 4, 5), -1))
    diag.update_attention("one", torch.softmax(torch.randn(2, 4, 1), -1))
    diag.update_probe("p", torch.randn(3))
    diag.update_probe("p", 2.5)
    return diag.get_epoch_stats()


SCENARIOS = {
    "encoder_optimizer": scenario_encoder_optimizer,
    "hf_module_groups": scenario_hf_module_groups,
    "registered_and_probes": scenario_registered_and_probes,
    "nan_gradients": scenario_nan_gradients,
    "every_3_depth_2": scenario_every_3_depth_2,
    "update_gradients_direct": scenario_update_gradients_direct,
}
