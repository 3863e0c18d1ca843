"""A dictionary-learning AM loop whose softmax coding collapses, and the settings that fix it.

Synthetic "expert weights" W [E, D] are sparse mixtures (4 of K basis experts each) of an
orthogonal bank, plus a little noise. The loop learns a bank B [K, D] (unit-RMS atoms), codes
alpha [E, K] (a temperature softmax of per-expert logits) and a scale per expert:

* coding step: ``inner`` iterations of a fixed step on the logits z (alpha = softmax(z / T))
  along the reconstruction gradient plus a small entropy penalty (sparse codes), the temperature
  annealed by ``T <- max(T_min, T * (1 - anneal))`` at every iteration. Through softmax(z / T)
  a step moves log(alpha) by about step / T: at a low temperature the updates overshoot and the
  codes go one-hot. Then the
  codes are pruned (entries <= epsilon set to 0, rows renormalised) and the logits are rebuilt
  from the pruned codes, ``z = T * log(alpha)``. The "before" code takes that log of the raw
  codes: a pruned entry gives a -inf logit, and that basis can never come back for that expert.
  The "after" code clamps the codes at epsilon first (``log(max(alpha, epsilon))``).
* dictionary step: least squares for B given the codes and scales, atoms rescaled to RMS 1;
  scales refit by least squares; the bank is warm-started from a noisy copy of the generating
  bases (a cold start lands in other local minima of this small problem, for both settings).
* stats: ``fastdiag.stability.am_stats`` (on the device), logged with ``fastdiag.MetricsLogger``
  and judged by ``fastdiag.stability.EarlyStopping`` (``StabilityCriteria`` defaults).

"before": temperature 1.0, epsilon 1e-6, anneal 0.05, T_min 0.1, raw log (the collapse);
"after":  temperature 3.0, epsilon 1e-4, anneal 0.01, T_min 0.5, clamped log (the fix).

Run ``python examples/am_loop.py`` (``--quick``: a smaller problem for the tests).
"""

from __future__ import annotations

import argparse
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

import fastdiag
from fastdiag.stability import EarlyStopping, StabilityCriteria, am_stats


@dataclass(frozen=True)
class Settings:
    name: str
    temperature: float
    epsilon: float
    anneal: float
    min_temperature: float
    safe_log: bool


BEFORE = Settings(
    "before", temperature=1.0, epsilon=1e-6, anneal=0.05, min_temperature=0.1, safe_log=False
)
AFTER = Settings(
    "after", temperature=3.0, epsilon=1e-4, anneal=0.01, min_temperature=0.5, safe_log=True
)


def make_experts(
    n_experts: int, n_bases: int, dim: int, support: int, noise: float, generator: torch.Generator
) -> torch.Tensor:
    """W [E, D]: each row a random convex mix of ``support`` of the orthogonal bases, + noise."""
    bank = torch.linalg.qr(torch.randn(dim, n_bases, generator=generator)).Q.T * math.sqrt(dim)
    codes = torch.zeros(n_experts, n_bases)
    for i in range(n_experts):
        chosen = torch.randperm(n_bases, generator=generator)[:support]
        w = -torch.log(torch.rand(support, generator=generator))  # flat Dirichlet weights
        codes[i, chosen] = w / w.sum()
    return codes @ bank + noise * torch.randn(n_experts, dim, generator=generator), bank


def run(
    settings: Settings,
    weights: torch.Tensor,
    *,
    n_bases: int,
    target_support: int,
    epochs: int,
    inner: int,
    step: float,
    sparsity: float,
    patience: int,
    logger: fastdiag.MetricsLogger,
    seed: int,
    init_bank: torch.Tensor,
    warm_noise: float = 0.5,
    verbose: bool = True,
) -> dict:
    """One AM run; returns a summary (epochs run, stop reason, last stats, verdict)."""
    g = torch.Generator().manual_seed(seed)
    n_experts, dim = weights.shape
    # warm start: a noisy copy of the generating bases (what a previous run or a clustering of
    # the experts would give); a cold start lands in other local minima of this small problem
    bank = init_bank + warm_noise * torch.randn(init_bank.shape, generator=g)
    bank = bank / bank.square().mean(-1, keepdim=True).sqrt()
    scale = torch.ones(n_experts)
    z = torch.zeros(n_experts, n_bases)
    temp = settings.temperature
    eps = settings.epsilon
    half = dim // 2
    stopper = EarlyStopping(StabilityCriteria(), patience=patience)
    stats: dict[str, float] = {}
    first_flag = None
    for epoch in range(epochs):
        # coding step: mirror descent on the logits, temperature annealed per iteration
        lipschitz = 2 * torch.linalg.matrix_norm(bank, 2) ** 2 * scale.square().mean()
        for _ in range(inner):
            alpha = torch.softmax(z / temp, dim=-1)
            grad = 2 * scale[:, None] * (scale[:, None] * (alpha @ bank) - weights) @ bank.T
            # d(-H)/d alpha: a small entropy penalty that favours sparse codes
            neg_entropy_grad = alpha.clamp_min(1e-30).log() + 1
            # a fixed step on the logits: through softmax(z / T) it moves log(alpha) by ~step / T
            z = z - ((step / lipschitz) * grad - sparsity * neg_entropy_grad)
            temp = max(settings.min_temperature, temp * (1 - settings.anneal))
        logits = z
        alpha = torch.softmax(z / temp, dim=-1)
        alpha = torch.where(alpha > eps, alpha, torch.zeros_like(alpha))  # epsilon pruning
        alpha = alpha / alpha.sum(-1, keepdim=True)
        z = temp * (alpha.clamp_min(eps).log() if settings.safe_log else alpha.log())
        # dictionary step and refits
        bank = torch.linalg.lstsq(scale[:, None] * alpha, weights).solution
        bank = bank / bank.square().mean(-1, keepdim=True).sqrt().clamp_min(1e-12)
        mixed = alpha @ bank
        scale = (weights * mixed).sum(-1) / mixed.square().sum(-1)
        refit = torch.linalg.lstsq(
            bank.T, weights.T
        ).solution.T  # unconstrained least-squares codes
        recon = scale[:, None] * mixed
        device_stats = am_stats(
            recon={
                "up": (weights[:, :half], recon[:, :half]),
                "gate": (weights[:, half:], recon[:, half:]),
            },
            alpha=alpha,
            logits=logits,
            bank=bank,
            refit=(refit[:, None, :], bank[None], weights[:, None, :]),
            eps=eps,
            target_support=target_support,
            temperature=temp,
            check_finite=(scale,),
        )
        logger.log(device_stats, step=epoch)
        stop = stopper.step(device_stats)
        stats = stopper.history[-1]
        verdict = stopper.verdict
        if first_flag is None and any(
            v.severity == "critical" and v.failure in fastdiag.stability.COLLAPSE_FAILURES
            for v in verdict.failing
        ):
            first_flag = epoch
        if verbose and (epoch % 5 == 0 or stop):
            rmse = max(stats["recon/rMSE_up"], stats["recon/rMSE_gate"])
            print(
                f"  [{settings.name}] epoch {epoch:3d}  rMSE {rmse:.3g}"
                f"  support median {stats['alpha/median_support']:.3g}"
                f" mean {stats['alpha/mean_support']:.3g}  T {stats['alpha/temp_T']:.3g}"
                f"  -inf rows {stats['alpha/nonfinite_logit_rows']:.0f}"
                f"  coherence {stats['bank/coherence_offdiag_max']:.3g}"
                f"  {'stable' if verdict.stable else 'UNSTABLE'}"
            )
        if stop:
            break
    return {
        "settings": settings.name,
        "epochs": len(stopper.history),
        "stopped": bool(stopper.reason),
        "collapsed": stopper.collapsed,
        "reason": stopper.reason or "max epochs reached",
        "stable": stopper.verdict.stable if stopper.verdict else False,
        "first_collapse_epoch": first_flag,
        "messages": stopper.verdict.messages if stopper.verdict else [],
        "stats": stats,
        "best": stopper.best,
        "best_step": stopper.best_step,
    }


def main(argv: list[str] | None = None) -> dict[str, dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a smaller problem (for the tests)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument(
        "--db", default=None, help="SQLite file for MetricsLogger (default: a temporary one)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    n_experts, n_bases, dim = (32, 8, 128) if args.quick else (64, 8, 256)
    epochs = args.epochs or (60 if args.quick else 120)
    g = torch.Generator().manual_seed(args.seed)
    weights, true_bank = make_experts(n_experts, n_bases, dim, support=4, noise=2e-3, generator=g)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(args.db) if args.db else Path(tmp) / "am_loop.db"
        for settings in (BEFORE, AFTER):
            print(f"{settings}")
            with fastdiag.MetricsLogger(
                db, run=f"am-{settings.name}-{args.seed}", config=settings.__dict__
            ) as logger:
                res = run(
                    settings,
                    weights,
                    n_bases=n_bases,
                    target_support=4,
                    epochs=epochs,
                    inner=20,
                    step=2.0,
                    sparsity=0.005,
                    patience=3,
                    logger=logger,
                    seed=args.seed + 1,
                    init_bank=true_bank,
                    verbose=not args.quiet,
                )
            res["db"] = str(db)
            results[settings.name] = res
            print(
                f"  -> {res['reason']} after {res['epochs']} epochs; "
                f"{'stable' if res['stable'] else 'unstable'}"
            )
            for line in res["messages"]:
                print(f"     {line}")
    return results


if __name__ == "__main__":
    main()
