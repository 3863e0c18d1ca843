"""Per-update overhead of the diagnostics classes: µs and top-level aten ops per ``update``.

Next to each class, the original plain code for the same keys (pure torch, one ``.item()`` per
value, as the original classes do), so the table reads "what a drop-in costs on top of the
user's own code". Ops = top-level events of ``torch.profiler`` on the CPU (events without a
parent; a fused ``fastdiag::`` op counts once, whatever it does inside).

Also ``fastdiag.watch`` per attention layer: a tiny model of one or two
``nn.MultiheadAttention`` layers, one training-mode forward with and without ``watch(model,
gradients=False)``; the µs and ops it adds, divided by the number of layers.

    pytest bench/bench_overhead.py --benchmark-only
    python bench/bench_overhead.py            # prints the tables (tiny inputs, the large one, watch)
    python bench/bench_overhead.py --rounds 7 # more rounds: each row is the min over the rounds

Timing: each row interleaves the fastdiag and the plain code, ``rounds`` times, and keeps the
minimum of each (the figure least disturbed by other jobs on a shared machine); the load
average is printed first.
"""

from __future__ import annotations

import argparse
import math
import os
import timeit

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from fastdiag import BaselineAttentionDiagnostics, SetDiagnostics, WeightDiagnostics, schema

ORIGINAL_BASELINE_KEYS = tuple(k for k in schema.BASELINE_DIAGNOSTICS if k not in schema.BASELINE_HEAD_KEYS)


# ------------------------------------------------------------------------------------------------
# the original plain code (per update, .item() per value)
# ------------------------------------------------------------------------------------------------


class PlainBaseline:
    def __init__(self, heads: bool = True) -> None:
        self.sums: dict[str, float] = {}
        self.prev_top: torch.Tensor | None = None
        self.prev_params: dict[str, torch.Tensor] | None = None
        self.heads = heads

    def _put(self, k: str, v: float) -> None:
        self.sums[k] = self.sums.get(k, 0.0) + v

    @torch.no_grad()
    def update(self, a: torch.Tensor, params: dict | None = None) -> None:
        nk = a.shape[-1]
        attn = a.mean(1)
        ent = -(attn * torch.log(attn + 1e-10)).sum(-1)
        self._put("entropy_mean", ent.mean().item())
        self._put("entropy_norm", (ent / math.log(nk)).mean().item())
        top1 = attn.max(-1).values
        self._put("top1_mean", top1.mean().item())
        self._put("top1_std", top1.std().item())
        top = attn.topk(min(5, nk), -1).indices
        if self.prev_top is not None:
            now, old = set(top.flatten().tolist()), set(self.prev_top.flatten().tolist())
            self._put("pattern_jaccard", len(now & old) / max(len(now | old), 1))
            eq = (top.unsqueeze(-1) == self.prev_top.unsqueeze(-2)).sum((-2, -1)).float()
            self._put("per_query", (eq / (2 * top.shape[-1] - eq)).mean().item())
        self.prev_top = top
        if self.heads:
            self._put("sparsity", (a > 0.1).float().mean().item())
            h = -(a * torch.log(a + 1e-10)).sum(-1).mean((0, 2))
            self._put("head_entropy", h.mean().item())
            self._put("effective_heads", ((h / math.log(nk)) < 0.9).float().mean().item())
        if params is not None:
            grads = [p.grad for p in params.values() if p.grad is not None]
            self._put("grad_norm", math.sqrt(sum(g.norm().item() ** 2 for g in grads)))
            self._put("param_norm", math.sqrt(sum(p.norm().item() ** 2 for p in params.values())))
            if self.prev_params is not None:
                self._put("change", math.sqrt(sum(
                    (p - self.prev_params[n]).norm().item() ** 2 for n, p in params.items())))
            self.prev_params = {n: p.detach().clone() for n, p in params.items()}


class PlainSet:
    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.prev_active: set | None = None
        self.tokens: dict[int, int] = {}

    def _put(self, k: str, v: float) -> None:
        self.sums[k] = self.sums.get(k, 0.0) + v

    @torch.no_grad()
    def update(self, idx, s, probs, emb, params, att, tokens) -> None:
        counts = torch.bincount(idx.flatten(), minlength=s).float()
        u = counts / counts.sum()
        active = counts > 0
        self._put("active_ratio", active.float().mean().item())
        self._put("size_mean", counts[active].mean().item())
        self._put("size_std", counts[active].std().item())
        ent = -(u[u > 0] * u[u > 0].log()).sum().item()
        self._put("entropy", ent)
        self._put("entropy_norm", ent / math.log(s))
        sc = counts.sort().values
        self._put("gini", ((2 * torch.arange(s) - s + 1) * sc).sum().item() / (s * counts.sum().item()))
        self._put("top1", u.max().item())
        now = set(idx.flatten().tolist())
        if self.prev_active is not None:
            self._put("reuse", len(now & self.prev_active) / max(len(now | self.prev_active), 1))
        self.prev_active = now
        self._put("variance", counts.var().item())
        conf = probs.max(-1).values
        self._put("conf_mean", conf.mean().item())
        self._put("conf_std", conf.std().item())
        self._put("kl", math.log(s) + (probs * torch.log(probs + 1e-10)).sum(-1).mean().item())
        top1 = probs.argmax(-1).flatten().tolist()
        same = seen = 0
        for t, c in zip(tokens.flatten().tolist(), top1):
            if t in self.tokens:
                seen += 1
                same += self.tokens[t] == c
            self.tokens[t] = c
        if seen:
            self._put("consistency", same / seen)
        flat = emb.reshape(-1, emb.shape[-1])
        self._put("emb_var", flat.var(0).mean().item())
        self._put("emb_norm", flat.norm(dim=-1).mean().item())
        sample = flat[torch.randperm(flat.shape[0])[:100]]
        nrm = torch.nn.functional.normalize(sample, dim=-1)
        cos = nrm @ nrm.T
        off = cos[~torch.eye(cos.shape[0], dtype=torch.bool)]
        self._put("cos_mean", off.mean().item())
        self._put("cos_max", off.max().item())
        sv = torch.linalg.svdvals(emb.float())
        p = sv / sv.sum(-1, keepdim=True)
        self._put("erank", torch.exp(-(p * torch.log(p + 1e-10)).sum(-1)).mean().item())
        self._put("att_entropy", -(att * torch.log(att + 1e-10)).sum(-1).mean().item())
        self._put("att_top1", att.max(-1).values.mean().item())
        grads = [q.grad for q in params.values() if q.grad is not None]
        self._put("grad_norm", math.sqrt(sum(g.norm().item() ** 2 for g in grads)))
        self._put("param_norm", math.sqrt(sum(q.norm().item() ** 2 for q in params.values())))


class PlainWeight:
    def __init__(self) -> None:
        self.sums: dict[str, float] = {}

    @torch.no_grad()
    def update(self, w: torch.Tensor) -> None:
        n = w.shape[-1]
        ent = -(w * torch.log(w + 1e-10)).sum(-1)
        top1 = w.max(-1).values
        for k, v in (
            ("entropy_mean", ent.mean().item()), ("entropy_norm", (ent / math.log(n)).mean().item()),
            ("top1_mean", top1.mean().item()), ("top1_std", top1.std().item()),
            ("kl", math.log(n) - ent.mean().item()), ("sparsity", (w > 0.1).float().mean().item()),
            ("support_mean", (w > 1e-6).sum(-1).float().mean().item()),
            ("support_median", (w > 1e-6).sum(-1).float().median().item()),
            ("prune", (w <= 1e-6).float().mean().item()),
        ):
            self.sums[k] = self.sums.get(k, 0.0) + v


# ------------------------------------------------------------------------------------------------
# cases
# ------------------------------------------------------------------------------------------------


def _params(d_in: int, d_out: int) -> dict[str, torch.Tensor]:
    lin = torch.nn.Linear(d_in, d_out)
    lin(torch.randn(2, d_in)).sum().backward()
    return dict(lin.named_parameters())


def cases(large: bool = False):
    """name -> (fastdiag update, plain update) closures."""
    torch.manual_seed(0)
    out = {}
    if large:
        a = torch.softmax(torch.randn(8, 12, 512, 512), -1)
        full, orig = BaselineAttentionDiagnostics(), BaselineAttentionDiagnostics(keys=ORIGINAL_BASELINE_KEYS)
        pf, po = PlainBaseline(heads=True), PlainBaseline(heads=False)
        out["baseline [8,12,512,512] all keys"] = (lambda: full.update(a), lambda: pf.update(a))
        out["baseline [8,12,512,512] original keys"] = (lambda: orig.update(a), lambda: po.update(a))
        return out
    a = torch.softmax(torch.randn(1, 2, 16, 16), -1)
    params = _params(16, 16)
    b1, b2, p1, p2 = BaselineAttentionDiagnostics(), BaselineAttentionDiagnostics(), PlainBaseline(), PlainBaseline()
    out["baseline weights"] = (lambda: b1.update(a), lambda: p1.update(a))
    out["baseline weights+params"] = (lambda: b2.update(a, params), lambda: p2.update(a, params))
    s, d = 8, 16
    idx = torch.randint(0, s, (2, 16))
    probs = torch.softmax(torch.randn(2, 16, s), -1)
    emb, tok, rp = torch.randn(2, s, d), torch.randint(0, 50, (2, 16)), _params(d, s)
    sd, ps = SetDiagnostics(), PlainSet()
    out["set all inputs"] = (
        lambda: sd.update_with_router_state(idx, s, probs, emb, rp, probs, token_ids=tok),
        lambda: ps.update(idx, s, probs, emb, rp, probs, tok),
    )
    w = torch.softmax(torch.randn(16, 8), -1)
    wd, pw = WeightDiagnostics("pool"), PlainWeight()
    out["weight"] = (lambda: wd.update(w), lambda: pw.update(w))
    return out


class AttentionStack(torch.nn.Module):
    """``layers`` self-attention layers (d=16, 2 heads) in sequence, the weights not asked for
    (the plain user's call: ``need_weights=False``)."""

    def __init__(self, layers: int, d: int = 16) -> None:
        super().__init__()
        self.attn = torch.nn.ModuleList(torch.nn.MultiheadAttention(d, 2, batch_first=True) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.attn:
            x = x + layer(x, x, x, need_weights=False)[0]
        return x


def watch_cases():
    """name -> (forward with watch, forward without, number of attention layers)."""
    from fastdiag.integrations import watch

    torch.manual_seed(0)
    x = torch.randn(1, 16, 16)
    out = {}
    for layers in (1, 2):
        plain, watched = AttentionStack(layers).train(), AttentionStack(layers).train()
        watched.load_state_dict(plain.state_dict())
        handle = watch(watched, gradients=False)
        handle.layers = layers  # keep the handle (and its hooks) alive with the closure
        out[f"watch, {layers} x MultiheadAttention [1,16,16]"] = (
            lambda m=watched, h=handle: m(x), lambda m=plain: m(x), layers,
        )
    return out


def top_level_ops(fn) -> int:
    fn()
    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(
        1 for e in prof.events() if e.cpu_parent is None and not e.name.startswith("[") and "Profiler" not in e.name
    )


def micros(fn, number: int) -> float:
    fn()
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6


def interleaved(fast, plain, number: int, rounds: int) -> tuple[float, float]:
    """(fastdiag µs, plain µs) per call: the min over ``rounds`` interleaved measurements."""
    tf, tp = math.inf, math.inf
    for _ in range(rounds):
        tf = min(tf, micros(fast, number))
        tp = min(tp, micros(plain, number))
    return tf, tp


TINY = list(cases())


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("impl", ["fastdiag", "plain"])
def test_overhead(benchmark, name, impl):
    fn = cases()[name][0 if impl == "fastdiag" else 1]
    benchmark.extra_info["top_level_ops"] = top_level_ops(fn)
    benchmark(fn)


@pytest.mark.parametrize("name", ["watch, 1 x MultiheadAttention [1,16,16]", "watch, 2 x MultiheadAttention [1,16,16]"])
@pytest.mark.parametrize("impl", ["watch", "plain"])
def test_watch_overhead(benchmark, name, impl):
    fast, plain, layers = watch_cases()[name]
    fn = fast if impl == "watch" else plain
    benchmark.extra_info["top_level_ops"] = top_level_ops(fn)
    benchmark.extra_info["layers"] = layers
    benchmark(fn)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per row (min kept)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one thread: the 2-core runner is shared
    print(f"load average: {' '.join(f'{v:.2f}' for v in os.getloadavg())}; rounds: {args.rounds}\n")
    print("| update | fastdiag µs | plain µs | ratio | fastdiag ops | plain ops |")
    print("|---|---|---|---|---|---|")
    for large in (False, True):
        for name, (fast, plain) in cases(large).items():
            tf, tp = interleaved(fast, plain, 3 if large else 300, args.rounds)
            print(f"| {name} | {tf:.0f} | {tp:.0f} | {tf / tp:.2f}x | {top_level_ops(fast)} | {top_level_ops(plain)} |")
    print("\n| forward | with watch µs | without µs | added µs per layer | added ops per layer |")
    print("|---|---|---|---|---|")
    for name, (fast, plain, layers) in watch_cases().items():
        tf, tp = interleaved(fast, plain, 200, args.rounds)
        ops = (top_level_ops(fast) - top_level_ops(plain)) / layers
        print(f"| {name} | {tf:.0f} | {tp:.0f} | {(tf - tp) / layers:.0f} | {ops:.0f} |")


if __name__ == "__main__":
    main()
