"""``validate_attention``: nine checks of a model's attention on a few batches (see
docs/metrics.md, section 10)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fastdiag.integrations.registry import registration
from fastdiag.validation.capture import Capturer, attention_modules, infer_causal
from fastdiag.validation.report import ValidationReport
from fastdiag.validation.sections import (
    _ablation,
    _diversity,
    _gradients,
    _heads,
    _positional,
    _queries,
    _sanity,
    _statistics,
    _tokens,
)
from fastdiag.validation.stats import capture_stats, merge

__all__ = ["Thresholds", "validate_attention"]

LossFn = Callable[[nn.Module, Any], Tensor]


@dataclass(frozen=True)
class Thresholds:
    """Every threshold of the report (override with ``thresholds=Thresholds(...)``)."""

    rowsum_tol: float = 1e-3  # max |sum_j p_j - 1|
    causal_tol: float = 1e-5  # max future mass of a causal layer
    local_ratio: float = 1.5  # local / far mean weight: local bias at or above
    repeat_ratio: float = 1.05  # repeated / different tokens mean weight: attraction at or above
    tv_fail: float = 0.1  # total variation to uniform below: nearly uniform (fail)
    tv_warn: float = 0.2
    entropy_fail: float = 0.95  # H / H_max above: nearly uniform (fail)
    entropy_warn: float = 0.9
    head_uniform: float = 0.05  # row_std below: uniform head
    head_medium: float = 0.1  # row_std below: medium, else sharp
    query_pass: float = 0.05  # mean L2 between rows at or above: queries attend differently
    query_fail: float = 0.02  # below: every query attends alike
    distant: int = 10  # the query distance of the "distant" pairs
    diverse_inputs: float = 0.3  # hidden-state diversity above: diverse
    ablation_margin: float = 0.01  # relative loss gain over a baseline needed to "beat" it


def _batches(inputs: Any) -> list[Any]:
    if isinstance(inputs, (Tensor, Mapping)):
        return [inputs]
    batches = list(inputs)
    if not batches:
        raise ValueError("inputs holds no batch")
    return batches


def _call(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _batch_ids(batch: Any) -> Tensor | None:
    if isinstance(batch, Tensor) and not batch.is_floating_point():
        return batch
    if isinstance(batch, Mapping) and isinstance(batch.get("input_ids"), Tensor):
        return batch["input_ids"]
    return None


def _batch_rows(batch: Any) -> Tensor | None:
    if isinstance(batch, Mapping):
        m = batch.get("attention_mask")
        if isinstance(m, Tensor) and m.dim() == 2:
            return m.to(torch.bool)
    return None


def validate_attention(
    model: nn.Module,
    inputs: Any,
    *,
    loss_fn: LossFn | None = None,
    token_ids: Tensor | Sequence[Tensor] | None = None,
    special_token_ids: Iterable[int] | Tensor | None = None,
    causal: bool | None = None,
    local_window: int = 5,
    layers: Iterable[str] | None = None,
    thresholds: Thresholds | None = None,
) -> ValidationReport:
    """Run ``model`` on ``inputs`` capturing every attention layer and check its attention.

    inputs:    a batch (a tensor, called as ``model(x)``; a dict of keyword arguments; a tuple
               of positional arguments) or an iterable of batches.
    loss_fn:   ``loss_fn(model, batch) -> loss`` (0-d tensor) for the gradient-flow and
               ablation sections; without it they are "n/a".
    token_ids: [B, N] per batch (one tensor, or one per batch); default: the batch itself when
               it is an integer tensor, or its ``input_ids``.
    special_token_ids: ids whose keys are compared with the others (section 3).
    causal:    the model's causal flag; None infers it (SDPA calls, config, class name).
    local_window: the half width w of "local" (|i - j| <= w) in sections 2 and 9.
    layers:    qualified names of the attention layers to check (default: all found).

    The model is run in eval mode under ``torch.no_grad()`` (one backward of ``loss_fn`` for
    section 8); its parameters, gradients, training flags and modules are as before afterwards.
    """
    th = thresholds or Thresholds()
    if isinstance(local_window, bool) or not isinstance(local_window, int) or local_window < 0:
        raise ValueError(f"local_window must be a non-negative int, got {local_window!r}")
    batches = _batches(inputs)
    if token_ids is None:
        ids = [_batch_ids(b) for b in batches]
    elif isinstance(token_ids, Tensor):
        ids = [token_ids] + [None] * (len(batches) - 1)
    else:
        ids = list(token_ids)
    special = None
    if special_token_ids is not None:
        special = torch.as_tensor(list(special_token_ids) if not isinstance(special_token_ids, Tensor)
                                  else special_token_ids, dtype=torch.long).reshape(-1)  # fmt: skip
    modules = attention_modules(model, layers)
    if not modules:
        raise ValueError(
            f"no attention layer found in {type(model).__name__}: validate_attention reads "
            "nn.MultiheadAttention, Hugging Face style modules (class name ending in 'Attention') "
            "and modules given to fastdiag.register_attention"
        )
    regs = {n: (r.attention if (r := registration(m)) is not None else None) for n, m in modules.items()}
    static_causal, source = (causal, "given") if causal is not None else infer_causal(model, modules.values())

    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        totals: dict[str, dict[str, Tensor]] = {n: {} for n in modules}
        call_causal: dict[str, set[bool]] = {n: set() for n in modules}
        kinds: dict[str, str] = {}
        with torch.no_grad():
            for bi, batch in enumerate(batches):
                cap = Capturer(modules, regs)
                try:
                    _call(model, batch)
                finally:
                    cap.remove()
                kinds.update(cap.kinds)
                tok = ids[bi] if bi < len(ids) else None
                for c in cap.captures:
                    if c.causal is not None:
                        call_causal[c.layer].add(c.causal)
                    s = capture_stats(
                        c, causal=static_causal, window=local_window, row_mask=_batch_rows(batch),
                        token_ids=tok, special_ids=special, distant=th.distant,
                    )  # fmt: skip
                    merge(totals[c.layer], s)
        seen = [n for n in modules if totals[n]]
        if causal is None and any(call_causal.values()):
            flags_seen = set().union(*call_causal.values())
            static_causal = flags_seen == {True}
            source = "scaled_dot_product_attention calls (is_causal / mask)"
        sums = {n: {k: v.detach().to("cpu") for k, v in t.items()} for n, t in totals.items() if t}
        overall: dict[str, Tensor] = {}
        for n in seen:
            merge(overall, {k: v for k, v in sums[n].items() if not k.startswith("head_")})
        sections = [
            _sanity(overall, static_causal, th),
            _positional(overall, local_window, th),
            _tokens(overall, th, ids, special),
            _statistics(overall, th),
            _heads(sums, seen, th),
            _queries(overall, th),
            _diversity(sums, seen, th),
            _gradients(model, modules, loss_fn, batches, th),
            _ablation(model, modules, regs, kinds, loss_fn, batches, local_window, th),
        ]
    finally:
        for m, flag in flags.items():
            m.training = flag
    meta = {
        "causal": static_causal,
        "causal_source": source,
        "batches": len(batches),
        "local_window": local_window,
        "layer_kinds": {n: kinds.get(n, "none") for n in modules},
        "thresholds": asdict(th),
    }
    missing = [n for n in modules if n not in seen]
    if missing:
        meta["layers_without_attention"] = missing
    return ValidationReport(sections, list(modules), meta)
