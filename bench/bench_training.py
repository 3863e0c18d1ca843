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

Hugging Face Trainer (``--hf``): a tiny ``LlamaForCausalLM`` (2 layers, hidden 128, 4 heads,
intermediate 256, vocab 512, SDPA attention), sequence 128, batch 8, AdamW, gradient clipping at
1.0, fp32 on the CPU, run by ``transformers.Trainer`` for ``--hf-steps`` optimizer steps with
``logging_steps=10``. Variants: ``hf_none`` (no callback), ``hf_callback``
(``fastdiag.integrations.hf.FastdiagCallback()``: every step) and ``hf_callback_every10``
(``every=10``). Step time: between consecutive ``on_step_begin`` events, so it includes the
callback's ``on_log`` (its one host copy per logging interval); the first two steps of each run
are warm-up. The variants' runs are interleaved over ``--rounds``; each round's value is the mean
step time of one run.

Rounds of ``--steps`` steps are interleaved across variants (so drifting machine load hits
every variant alike); the median and the minimum step time per variant are reported with their
overhead over ``none`` from the same run (on a shared machine the minimum is the better
estimate of the uncontended cost).

    pytest bench/bench_training.py --benchmark-only
    python bench/bench_training.py [--rounds 5 --steps 3 --device cpu --json out.json]
    python bench/bench_training.py --hf [--rounds 5 --hf-steps 22]
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
# Hugging Face Trainer with and without fastdiag.integrations.hf.FastdiagCallback
# ----------------------------------------------------------------------------------------------

HF_VARIANTS = ("hf_none", "hf_callback", "hf_callback_every10")
HF_SHAPE = {"layers": 2, "hidden": 128, "heads": 4, "intermediate": 256, "vocab": 512, "seq": 128, "batch": 8}
HF_WARMUP = 2


def _hf_trainer(variant: str, steps: int, output_dir: str, times: list):
    """A Trainer of the tiny Llama for ``steps`` steps; ``times`` gets the on_step_begin times."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        PrinterCallback,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from fastdiag.integrations.hf import FastdiagCallback

    if variant not in HF_VARIANTS:
        raise ValueError(f"variant must be one of {HF_VARIANTS}, got {variant!r}")
    sh = HF_SHAPE
    torch.manual_seed(0)
    config = LlamaConfig(
        num_hidden_layers=sh["layers"],
        hidden_size=sh["hidden"],
        num_attention_heads=sh["heads"],
        num_key_value_heads=sh["heads"],
        intermediate_size=sh["intermediate"],
        vocab_size=sh["vocab"],
        max_position_embeddings=sh["seq"],
    )
    model = LlamaForCausalLM(config)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, sh["vocab"], (sh["batch"] * (steps + 1), sh["seq"]), generator=g)
    data = [{"input_ids": r, "labels": r} for r in ids]

    class Clock(TrainerCallback):  # (wall, process CPU) time at each step begin and at the end
        def on_step_begin(self, args, state, control, **kwargs):
            times.append((time.perf_counter(), time.process_time()))

        def on_train_end(self, args, state, control, **kwargs):
            times.append((time.perf_counter(), time.process_time()))

    callbacks: list = [Clock()]
    if variant != "hf_none":
        callbacks.append(FastdiagCallback(every=10 if variant.endswith("every10") else 1))
    args = TrainingArguments(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=sh["batch"],
        logging_steps=10,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        max_grad_norm=1.0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)  # no printing in the timed steps
    return trainer


def measure_hf(rounds: int, steps: int, variants=HF_VARIANTS) -> dict[str, dict[str, list[float]]]:
    """Seconds per Trainer step of each variant, wall and process CPU time, one entry per round
    (runs interleaved, after one untimed warm-up run of each variant)."""
    import logging
    import tempfile

    logging.getLogger("transformers").setLevel(logging.ERROR)
    times = {clock: {v: [] for v in variants} for clock in ("wall", "cpu")}
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for v in variants:
            _hf_trainer(v, HF_WARMUP + 1, tmp, []).train()
        for _ in range(rounds):
            for v in variants:
                stamps: list = []
                _hf_trainer(v, steps, tmp, stamps).train()
                # stamps: each on_step_begin, then train end (after the last step's logs)
                for i, clock in enumerate(("wall", "cpu")):
                    steps_s = [b[i] - a[i] for a, b in zip(stamps[:-1], stamps[1:])]
                    times[clock][v].append(statistics.fmean(steps_s[HF_WARMUP:]))
    return times


def report_hf(times: dict[str, dict[str, list[float]]]) -> dict:
    rows = {}
    for clock, by_variant in times.items():
        base_med, base_min = statistics.median(by_variant["hf_none"]), min(by_variant["hf_none"])
        for v, ts in by_variant.items():
            med = statistics.median(ts)
            rows[f"{v} ({clock})"] = {
                "median_s": med,
                "min_s": min(ts),
                "max_s": max(ts),
                "overhead_median_pct": 100.0 * (med - base_med) / base_med,
                "overhead_min_pct": 100.0 * (min(ts) - base_min) / base_min,
            }
    import transformers

    return {
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "shape": HF_SHAPE,
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


@pytest.mark.parametrize("variant", HF_VARIANTS)
def test_hf_trainer_step(benchmark, variant, tmp_path):
    pytest.importorskip("transformers")
    stamps: list[float] = []

    def run():
        _hf_trainer(variant, 12, str(tmp_path), stamps).train()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)


def _print_table(result: dict) -> None:
    print(
        f"{'variant':<28}{'median ms':>10}{'min ms':>9}{'max ms':>9}"
        f"{'overhead (median)':>19}{'overhead (min)':>16}"
    )
    for v, r in result["variants"].items():
        print(
            f"{v:<28}{1e3 * r['median_s']:>10.1f}{1e3 * r['min_s']:>9.1f}{1e3 * r['max_s']:>9.1f}"
            f"{r['overhead_median_pct']:>18.1f}%{r['overhead_min_pct']:>15.1f}%"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--hf", action="store_true", help="the Hugging Face Trainer table instead")
    parser.add_argument("--hf-steps", type=int, default=22, help="Trainer steps per run (--hf)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.hf:
        result = report_hf(measure_hf(args.rounds, args.hf_steps))
        print(f"HF Trainer, tiny Llama {result['shape']}, threads={result['threads']} torch={result['torch']} transformers={result['transformers']}")
        _print_table(result)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
        return 0
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
