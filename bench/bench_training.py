"""Step time of a small transformer training step with and without diagnostics.

Model: ``nn.TransformerEncoder``, 4 layers, d=256, 8 heads, FFN 1024, dropout 0, sequence 256,
batch 8, AdamW, MSE loss on the output (fp32, CPU by default). Variants, all in one process:

* ``none``          - the plain step.
* ``reference``     - what users run today: every layer's per-head weights (forced with
  ``need_weights=True``) fed to ``fastdiag.reference.ReferenceBaselineAttentionDiagnostics`` in
  a forward hook, and the user's original per-parameter gradient loop (``grad.norm().item()``
  per parameter) after backward.
* ``weights_only``  - only the forced ``need_weights=True`` (what any attention capture costs).
* ``watch``         - ``fastdiag.watch(model, optimizer=opt)``: per-layer attention, gradient
  health, update ratios, every step.
* ``watch_attention`` / ``watch_gradients`` - ``watch`` with only one of its two parts.
* ``watch_every10`` - ``watch`` sampling one step in 10 (the cost averaged over the 10 steps).
* ``sdpa_none`` / ``sdpa_watch`` - the same shape as nanoGPT-style blocks whose attention calls
  ``F.scaled_dot_product_attention`` (causal): plain, and under ``watch`` (q / k captured in the
  attention module, statistics by ``ops.attention_stats``, no N x Nk weights). Their overhead is
  over ``sdpa_none``.

Rounds of ``--steps`` steps are interleaved across variants (so drifting machine load hits
every variant alike); the median and the minimum step time per variant are reported with their
overhead over ``none`` from the same run (on a shared machine the minimum is the better
estimate of the uncontended cost).

    pytest bench/bench_training.py --benchmark-only
    python bench/bench_training.py [--rounds 5 --steps 3 --device cpu --json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn

import fastdiag
from fastdiag import backends

LAYERS, D, HEADS, FFN, SEQ, BATCH = 4, 256, 8, 1024, 256, 8
VARIANTS = (
    "none",
    "reference",
    "weights_only",
    "watch",
    "watch_attention",
    "watch_gradients",
    "watch_every10",
    "sdpa_none",
    "sdpa_watch",
)


class SDPAAttention(nn.Module):
    """nanoGPT-style attention: one qkv projection, causal ``F.scaled_dot_product_attention``."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(D, 3 * D)
        self.proj = nn.Linear(D, D)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (t.view(b, n, HEADS, D // HEADS).transpose(1, 2) for t in self.qkv(x).split(D, -1))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, n, D))


class SDPABlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.attn = SDPAAttention()
        self.mlp = nn.Sequential(nn.Linear(D, FFN), nn.GELU(), nn.Linear(FFN, D))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Setup:
    """A model, optimizer and batch plus the variant's hooks; ``step()`` runs one training step."""

    def __init__(self, variant: str, device: str = "cpu", seed: int = 0) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        torch.manual_seed(seed)
        if variant.startswith("sdpa_"):
            self.model = nn.Sequential(*(SDPABlock() for _ in range(LAYERS))).to(device)
        else:
            layer = nn.TransformerEncoderLayer(D, HEADS, FFN, dropout=0.0, batch_first=True)
            self.model = nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False).to(device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.x = torch.randn(BATCH, SEQ, D, device=device)
        self.device = device
        self.variant = variant
        self.handles: list = []
        self.after_backward: Callable[[], None] = lambda: None
        self.watch = None
        mhas = [(n, m) for n, m in self.model.named_modules() if isinstance(m, nn.MultiheadAttention)]
        if variant in ("reference", "weights_only"):
            for name, mha in mhas:
                self.handles.append(mha.register_forward_pre_hook(_force_weights, with_kwargs=True))
                self.handles.append(mha.register_forward_hook(self._reference_hook(name, variant)))
            if variant == "reference":
                self.after_backward = self._original_gradient_loop
        elif variant == "sdpa_watch":
            self.watch = fastdiag.watch(self.model, optimizer=self.opt)
        elif variant.startswith("watch"):
            self.watch = fastdiag.watch(
                self.model,
                optimizer=self.opt,
                every=10 if variant == "watch_every10" else 1,
                attention=variant != "watch_gradients",
                gradients=variant != "watch_attention",
            )

    def _reference_hook(self, name: str, variant: str):
        from fastdiag.reference import ReferenceBaselineAttentionDiagnostics

        diag = ReferenceBaselineAttentionDiagnostics()

        def hook(module, args, output):
            out, weights = output
            if variant == "reference":
                diag.update(weights.detach())
            return out, None  # the caller (TransformerEncoderLayer) asked for no weights

        return hook

    def _original_gradient_loop(self) -> None:
        logged = {}
        for name, param in self.model.named_parameters():
            if param.grad is not None:
                logged[f"grad_norm/{name}"] = param.grad.norm().item()
        total = torch.nn.utils.get_total_norm([p.grad for p in self.model.parameters()])
        logged["grad_norm_total"] = total.item()

    def step(self) -> None:
        loss = self.model(self.x).square().mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.after_backward()
        self.opt.step()
        if self.device != "cpu":
            torch.cuda.synchronize()

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        if self.watch is not None:
            self.watch.remove()


def _force_weights(module, args, kwargs):
    kwargs = dict(kwargs)
    kwargs["need_weights"] = True
    kwargs["average_attn_weights"] = False
    return args, kwargs


def measure(rounds: int, steps: int, device: str, variants=VARIANTS) -> dict[str, list[float]]:
    """Seconds per step of each variant, one entry per round (rounds interleaved)."""
    setups = {v: Setup(v, device) for v in variants}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for s in setups.values():  # warm-up: allocator, extension load, plan caches
            s.step()
            s.step()
        times: dict[str, list[float]] = {v: [] for v in variants}
        for _ in range(rounds):
            for v, s in setups.items():
                start = time.perf_counter()
                for _ in range(steps):
                    s.step()
                times[v].append((time.perf_counter() - start) / steps)
    for s in setups.values():
        s.close()
    return times


def report(times: dict[str, list[float]], device: str) -> dict:
    rows = {}
    for v, ts in times.items():
        base = "sdpa_none" if v.startswith("sdpa_") and "sdpa_none" in times else "none"
        base_med = statistics.median(times[base])
        base_min = min(times[base])
        med = statistics.median(ts)
        rows[v] = {
            "median_s": med,
            "min_s": min(ts),
            "max_s": max(ts),
            "overhead_median_pct": 100.0 * (med - base_med) / base_med,
            "overhead_min_pct": 100.0 * (min(ts) - base_min) / base_min,
        }
    return {
        "device": device if device == "cpu" else torch.cuda.get_device_name(),
        "threads": torch.get_num_threads(),
        "dist_stats_backend": backends.resolve("dist_stats", device, torch.float32),
        "torch": torch.__version__,
        "shape": {"layers": LAYERS, "d": D, "heads": HEADS, "ffn": FFN, "seq": SEQ, "batch": BATCH},
        "variants": rows,
    }


# ----------------------------------------------------------------------------------------------
# pytest-benchmark entry points
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_training_step(benchmark, variant):
    setup = Setup(variant)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        setup.step()
        benchmark.extra_info["dist_stats_backend"] = backends.resolve("dist_stats", "cpu", torch.float32)
        benchmark.pedantic(setup.step, rounds=5, iterations=1, warmup_rounds=1)
    setup.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = tuple(v for v in args.variants.split(",") if v)
    if "none" not in variants:
        variants = ("none", *variants)
    result = report(measure(args.rounds, args.steps, args.device, variants), args.device)
    print(
        f"device={result['device']} threads={result['threads']} "
        f"dist_stats backend={result['dist_stats_backend']} torch={result['torch']}"
    )
    print(
        f"{'variant':<16}{'median ms':>10}{'min ms':>9}{'max ms':>9}"
        f"{'overhead (median)':>19}{'overhead (min)':>16}"
    )
    for v, r in result["variants"].items():
        print(
            f"{v:<16}{1e3 * r['median_s']:>10.1f}{1e3 * r['min_s']:>9.1f}{1e3 * r['max_s']:>9.1f}"
            f"{r['overhead_median_pct']:>18.1f}%{r['overhead_min_pct']:>15.1f}%"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
