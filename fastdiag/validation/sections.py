"""The nine sections of :func:`fastdiag.validate_attention`, from the summed statistics."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from fastdiag.validation.capture import Capturer
from fastdiag.validation.report import Check, Section, worst


def _f(sums: dict[str, Tensor], key: str) -> float:
    v = sums.get(key)
    return float(v) if v is not None else math.nan


def _mean(sums: dict[str, Tensor], key: str, count: str) -> float:
    c = _f(sums, count)
    return _f(sums, key) / c if c > 0 else math.nan


def _ratio(a: float, b: float) -> float:
    if not (math.isfinite(a) and math.isfinite(b)):
        return math.nan
    return a / b if b > 0 else (math.inf if a > 0 else math.nan)


def _sanity(s: dict[str, Tensor], causal: bool | None, th: Any) -> Section:
    sec = Section(1, "sanity", "Sanity (correctness)")
    rows = _f(s, "rows")
    err = _f(s, "rowsum_err_max")
    if not rows > 0:
        sec.checks.append(Check("rowsum", "n/a", "no valid attention row captured"))
    else:
        ok = err <= th.rowsum_tol
        sec.checks.append(Check(
            "rowsum", "pass" if ok else "fail",
            f"rows sum to 1 (max error {err:.3g})" if ok else f"rows do not sum to 1 (max error {err:.3g} > {th.rowsum_tol:g})",
            {"rowsum_err_max": err, "rowsum_err_mean": _mean(s, "rowsum_err", "rows"), "rows": rows,
             "nonfinite_rows": _f(s, "nonfinite")},
        ))  # fmt: skip
    fut = _f(s, "future_max")
    vals = {"future_max": fut, "future_mean": _mean(s, "future", "rows")}
    if not rows > 0:
        sec.checks.append(Check("causality", "n/a", "no valid attention row captured", vals))
    elif causal is None:
        sec.checks.append(Check("causality", "n/a", f"causal flag unknown: not checked (max future mass {fut:.3g})", vals))
    elif not causal:
        sec.checks.append(Check("causality", "n/a", f"non-causal model: future mass allowed (max {fut:.3g})", vals))
    elif fut <= th.causal_tol:
        sec.checks.append(Check("causality", "pass", f"causal: no mass on future keys (max {fut:.3g})", vals))
    else:
        sec.checks.append(Check("causality", "fail", f"causal model attends future keys (max mass {fut:.3g})", vals))
    return sec


def _positional(s: dict[str, Tensor], window: int, th: Any) -> Section:
    sec = Section(2, "positional", "Positional patterns")
    local, far = _mean(s, "local_w", "pos_rows"), _mean(s, "far_w", "pos_rows")
    ratio = _ratio(local, far)
    vals = {"local_weight": local, "far_weight": far, "local_far_ratio": ratio,
            "local_mass": _mean(s, "local_mass", "rows"), "window": window}  # fmt: skip
    if not _f(s, "pos_rows") > 0:
        sec.checks.append(Check("local_bias", "n/a", f"no row has both local (|i-j| <= {window}) and far keys", vals))
    elif ratio >= th.local_ratio:
        sec.checks.append(Check("local_bias", "pass", f"local bias (local {local:.4g}, far {far:.4g}, ratio {ratio:.3g}x)", vals))
    else:
        sec.checks.append(Check("local_bias", "warn", f"no local bias (local {local:.4g}, far {far:.4g}, ratio {ratio:.3g}x)", vals))
    return sec


def _tokens(s: dict[str, Tensor], th: Any, ids: list, special: Tensor | None) -> Section:
    sec = Section(3, "tokens", "Token-level patterns")
    same, diff = _mean(s, "same", "same_pairs"), _mean(s, "diff", "diff_pairs")
    ratio = _ratio(same, diff)
    vals = {"same_weight": same, "diff_weight": diff, "repeat_ratio": ratio, "same_pairs": _f(s, "same_pairs")}
    if all(t is None for t in ids):
        sec.checks.append(Check("repeated", "n/a", "no token ids: repeated-token attention not checked"))
    elif "same" not in s:
        sec.checks.append(Check("repeated", "n/a", "token ids do not match the attention shape (self-attention [B, N] ids needed)"))
    elif not _f(s, "same_pairs") > 0:
        sec.checks.append(Check("repeated", "n/a", "no repeated token in the inputs", vals))
    elif ratio >= th.repeat_ratio:
        sec.checks.append(Check("repeated", "pass", f"repeated tokens attract (same {same:.4g}, diff {diff:.4g}, ratio {ratio:.3g}x)", vals))
    else:
        sec.checks.append(Check("repeated", "warn", f"repeated tokens do not attract (same {same:.4g}, diff {diff:.4g}, ratio {ratio:.3g}x)", vals))
    sp, reg = _mean(s, "special", "special_pairs"), _mean(s, "regular", "regular_pairs")
    svals = {"special_weight": sp, "regular_weight": reg, "special_ratio": _ratio(sp, reg)}
    if special is None or not special.numel():
        sec.checks.append(Check("special", "n/a", "no special token ids given"))
    elif not _f(s, "special_pairs") > 0:
        sec.checks.append(Check("special", "n/a", "no special token in the inputs (or no token ids)", svals))
    else:
        sec.checks.append(Check("special", "info", f"special tokens get {sp:.4g} vs regular {reg:.4g} (ratio {_ratio(sp, reg):.3g}x)", svals))
    return sec


def _statistics(s: dict[str, Tensor], th: Any) -> Section:
    sec = Section(4, "statistics", "Statistical tests (vs uniform)")
    absdev, mx, tv = _mean(s, "absdev", "rows"), _f(s, "absdev_max"), _mean(s, "tv", "rows")
    vals = {"abs_dev_mean": absdev, "abs_dev_max": mx, "tv_uniform": tv}
    if not _f(s, "rows") > 0:
        sec.checks.append(Check("uniform", "n/a", "no valid attention row", vals))
    else:
        st = "fail" if tv < th.tv_fail else "warn" if tv < th.tv_warn else "pass"
        word = {"fail": "nearly uniform", "warn": "close to uniform", "pass": "far from uniform"}[st]
        sec.checks.append(Check("uniform", st, f"{word} (mean |p - 1/n| {absdev:.3g}, max {mx:.3g}, TV {tv:.3g})", vals))
    h = _mean(s, "h_ratio", "h_rows")
    if not _f(s, "h_rows") > 0:
        sec.checks.append(Check("entropy", "n/a", "no row with more than one attendable key", {"h_ratio": h}))
    else:
        st = "fail" if h > th.entropy_fail else "warn" if h > th.entropy_warn else "pass"
        word = {"fail": "nearly uniform", "warn": "close to uniform", "pass": "concentrated"}[st]
        sec.checks.append(Check("entropy", st, f"{word} (H/H_max {h:.3f})", {"h_ratio": h}))
    return sec


def head_class(std: float, th: Any) -> str:
    return "uniform" if std < th.head_uniform else "medium" if std < th.head_medium else "sharp"


def _heads(sums: dict[str, dict[str, Tensor]], layers: list[str], th: Any) -> Section:
    sec = Section(5, "heads", "Per-head analysis")
    heads = []
    for name in layers:
        t = sums[name]
        std = (t["head_std"] / t["head_rows"]).tolist()  # host ok: the report, not an update
        for h, v in enumerate(std):
            if math.isfinite(v):
                cls = head_class(v, th)
                heads.append({"layer": name, "head": h, "row_std": v, "class": cls})
                sec.lines.append(f"{name} head {h}: row_std={v:.4f} [{cls.upper()}]")
    n = len(heads)
    counts = {c: sum(x["class"] == c for x in heads) for c in ("sharp", "medium", "uniform")}
    sec.values = {"heads": heads}
    vals = {**counts, "total": n}
    if not n:
        sec.checks.append(Check("heads", "n/a", "no head with rows of more than one attendable key", vals))
    else:
        msg = ", ".join(f"{counts[c]}/{n} {c} ({100 * counts[c] / n:.0f}%)" for c in ("sharp", "medium", "uniform"))
        st = "fail" if counts["uniform"] == n else "warn" if counts["sharp"] == 0 else "pass"
        sec.checks.append(Check("heads", st, msg, vals))
    return sec


def _queries(s: dict[str, Tensor], th: Any) -> Section:
    sec = Section(6, "queries", "Query-side variation (do different queries attend differently?)")
    mean, mx = _mean(s, "l2_all", "l2_pairs"), _f(s, "l2_all_max")
    adj, far = _mean(s, "l2_adj", "l2_adj_pairs"), _mean(s, "l2_far", "l2_far_pairs")
    vals = {"l2_mean": mean, "l2_max": mx, "l2_adjacent": adj, "l2_distant": far}
    sec.lines += [f"mean L2 between rows: {mean:.4g} (max {mx:.4g})",
                  f"adjacent (dpos=1): {adj:.4g}, distant (dpos={th.distant}): {far:.4g}"]  # fmt: skip
    if not _f(s, "l2_pairs") > 0:
        sec.checks.append(Check("variation", "n/a", "fewer than two valid rows per head", vals))
    else:
        st = "pass" if mean >= th.query_pass else "fail" if mean < th.query_fail else "warn"
        word = {"pass": "different queries attend differently", "warn": "queries attend similarly",
                "fail": "every query attends alike"}[st]  # fmt: skip
        sec.checks.append(Check("variation", st, f"{word} (L2 {mean:.4g})", vals))
    if not (math.isfinite(adj) and math.isfinite(far)):
        sec.checks.append(Check("positional_structure", "n/a", f"sequences shorter than {th.distant + 1}", vals))
    elif far > adj:
        sec.checks.append(Check("positional_structure", "pass", f"positional structure (distant {far:.4g} > adjacent {adj:.4g})", vals))
    else:
        sec.checks.append(Check("positional_structure", "warn", f"no positional structure (distant {far:.4g} <= adjacent {adj:.4g})", vals))
    return sec


def _diversity(sums: dict[str, dict[str, Tensor]], layers: list[str], th: Any) -> Section:
    sec = Section(7, "diversity", "Diversity correlation (inputs vs attention)")
    per = {}
    checks = []
    for name in layers:
        t = sums[name]
        rows = float(t["head_rows"].sum())
        att = float(t["head_std"].sum()) / rows if rows > 0 else math.nan
        div = float(t["hidden_div"] / t["hidden_pairs"]) if "hidden_div" in t and float(t["hidden_pairs"]) > 0 else math.nan
        per[name] = {"input_diversity": div, "attention_row_std": att}
        sec.lines.append(f"{name}: input diversity {div:.4g}, attention row_std {att:.4g}")
        if not (math.isfinite(div) and math.isfinite(att)):
            checks.append(("n/a", f"{name}: input hidden states or rows not available"))
        elif div > th.diverse_inputs and att < th.head_uniform:
            checks.append(("fail", f"{name}: diverse inputs ({div:.3g}) but uniform attention ({att:.3g}): architectural issue"))
        elif div > th.diverse_inputs:
            checks.append(("pass", f"{name}: diverse inputs ({div:.3g}), attention follows (row_std {att:.3g})"))
        else:
            checks.append(("pass", f"{name}: similar inputs ({div:.3g}): uniform attention expected"))
    sec.values = {"layers": per}
    st = worst([c[0] for c in checks])
    msg = next((m for c, m in checks if c == st), "no layer")
    sec.checks.append(Check("correlation", st, msg, {
        "input_diversity": _nanmean([v["input_diversity"] for v in per.values()]),
        "attention_row_std": _nanmean([v["attention_row_std"] for v in per.values()])}))  # fmt: skip
    return sec


def _nanmean(v: list[float]) -> float:
    v = [x for x in v if math.isfinite(x)]
    return sum(v) / len(v) if v else math.nan


def _gradients(model: nn.Module, modules: dict[str, nn.Module], loss_fn: Any, batches: list, th: Any) -> Section:
    sec = Section(8, "gradients", "Gradient flow")
    params: dict[str, nn.Parameter] = {}
    for name, m in modules.items():
        for pn, p in m.named_parameters():
            params.setdefault(f"{name}.{pn}", p)
    total = sum(p.numel() for p in params.values())
    trainable = {k: p for k, p in params.items() if p.requires_grad}
    vals = {"tensors": len(params), "parameters": total, "trainable_tensors": len(trainable)}
    if not params:
        sec.checks.append(Check("found", "n/a", "the attention layers have no parameters", vals))
        return sec
    sec.checks.append(Check("found", "pass", f"{len(params)} attention parameter tensors ({total:,} parameters, {len(trainable)} trainable)", vals))
    if loss_fn is None:
        sec.checks.append(Check("flow", "n/a", "no loss_fn: gradients not checked"))
        return sec
    if not trainable:
        sec.checks.append(Check("flow", "fail", "every attention parameter is frozen (requires_grad=False)"))
        return sec
    all_params = list(model.parameters())
    saved = [p.grad for p in all_params]
    try:
        for p in all_params:
            p.grad = None
        with torch.enable_grad():
            loss = loss_fn(model, batches[0])
            loss.backward()
        norms = {k: (float(p.grad.norm()) if p.grad is not None else None) for k, p in trainable.items()}
    finally:
        for p, g in zip(all_params, saved, strict=True):
            p.grad = g
    missing = [k for k, v in norms.items() if v is None]
    zero = [k for k, v in norms.items() if v == 0.0]
    live = [v for v in norms.values() if v]
    gvals = {"with_grad": len(norms) - len(missing), "nonzero": len(live), "missing": missing, "zero": zero,
             "grad_norm_total": math.sqrt(sum(v * v for v in live)), "grad_norms": norms}  # fmt: skip
    if not live:
        sec.checks.append(Check("flow", "fail", "no attention parameter received a non-zero gradient", gvals))
    elif missing or zero:
        sec.checks.append(Check("flow", "warn", f"{len(live)}/{len(norms)} attention tensors get gradients; none or zero: {(missing + zero)[:4]}", gvals))
    else:
        sec.checks.append(Check("flow", "pass", f"all {len(norms)} trainable attention tensors get non-zero gradients (norm {gvals['grad_norm_total']:.3g})", gvals))
    return sec


def _loss(model: nn.Module, loss_fn: Any, batches: list) -> float:
    with torch.no_grad():
        return sum(float(loss_fn(model, b)) for b in batches) / len(batches)


def _ablation(model: nn.Module, modules: dict, regs: dict, kinds: dict, loss_fn: Any, batches: list,
              window: int, th: Any) -> Section:  # fmt: skip
    sec = Section(9, "ablation", "Ablation (does attention help?)")
    if loss_fn is None:
        sec.checks.append(Check("ablation", "n/a", "skipped: no loss_fn"))
        return sec
    learned = _loss(model, loss_fn, batches)
    vals: dict[str, Any] = {"loss_learned": learned, "ppl_learned": _exp(learned)}
    sec.lines.append(f"learned attention: loss={learned:.4f}, PPL={_exp(learned):.4g}")
    eager = [n for n in modules if kinds.get(n) != "sdpa"]
    if eager:
        sec.checks.append(Check("ablation", "n/a", f"skipped: {eager[0]} does not compute its attention through "
                                "scaled_dot_product_attention (no override)", vals))  # fmt: skip
        return sec
    for mode in ("uniform", "local"):
        sub = Capturer(modules, regs, mode=mode, window=window)
        try:
            loss = _loss(model, loss_fn, batches)
        finally:
            sub.remove()
        unused = [n for n, c in sub.substituted.items() if c == 0]
        if unused:
            sec.checks.append(Check("ablation", "n/a", f"skipped: no SDPA call of {unused[0]} was replaced", vals))
            return sec
        vals[f"loss_{mode}"], vals[f"ppl_{mode}"] = loss, _exp(loss)
        sec.lines.append(f"{mode} attention: loss={loss:.4f}, PPL={_exp(loss):.4g}")
    beats = {m: learned < vals[f"loss_{m}"] * (1 - th.ablation_margin) for m in ("uniform", "local")}
    vals.update({f"beats_{m}": b for m, b in beats.items()})
    if all(beats.values()):
        sec.checks.append(Check("ablation", "pass", "learned attention beats uniform and local attention", vals))
    elif beats["uniform"]:
        sec.checks.append(Check("ablation", "warn", "learned attention beats uniform but not local attention", vals))
    else:
        sec.checks.append(Check("ablation", "warn", "learned attention does not beat uniform attention: the rest of the model does the work", vals))
    return sec


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf
