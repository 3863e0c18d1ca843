"""Layout of the per-update summary ops (``fastdiag.ops.summaries``), shared by the wrapper,
the torch implementation and the C++ kernels (``csrc/summaries.cpp`` writes the same fields in
the same order). Leaf module."""

from __future__ import annotations

import torch
from torch import Tensor

DIST_FIELDS: tuple[str, ...] = (
    "entropy_mean",  # mean row entropy h (nats)
    "entropy_norm",  # h / log n (NaN for n = 1)
    "top1_mean",
    "top1_std",  # unbiased std of the row max
    "kl_uniform",  # log n - h
    "sparsity",  # share of entries > tau
    "support_mean",  # mean number of entries > eps
    "prune_frac",  # share of entries <= eps
    "nonfinite_rows",
    "head_sparsity",  # share of per-head entries > tau (the row itself without heads)
    "head_entropy_mean",  # mean per-head row entropy
    "effective_heads",  # share of heads whose mean H / log n < EFFECTIVE_HEAD_ENTROPY
    "pattern_jaccard",  # Jaccard of the flattened top-k sets, now vs previous update
    "topk_jaccard_per_query",  # mean per-row top-k Jaccard, now vs previous update
)
DIST = {name: i for i, name in enumerate(DIST_FIELDS)}

USAGE_FIELDS: tuple[str, ...] = (
    "active_ratio",  # #active / S, NaN when nothing was routed
    "size_mean",
    "size_std",
    "entropy",
    "entropy_norm",
    "gini",
    "top1_share",
    "reuse_jaccard",  # active set now vs previous update (NaN without one)
    "variance",
    "out_of_range",
    "active_ratio_raw",  # #active / S (0 when nothing was routed)
)
USAGE = {name: i for i, name in enumerate(USAGE_FIELDS)}

PARAM_FIELDS: tuple[str, ...] = (
    "gradient_norm",
    "param_norm",
    "weight_change",
    "gradient_missing",  # 1 when no parameter had a gradient (None or all zero), else 0
    "moved",  # 1 when the parameters changed since the previous update, 0 when not, NaN first
)

ROUTER_FIELDS: tuple[str, ...] = (
    "entropy_norm",  # mean over the valid tokens of H(softmax(logits)) / log E
    "top1",  # mean over the valid tokens of max softmax(logits)
    "load_gini",  # Gini of the tokens per expert (top-k choices of the valid tokens)
    "active_ratio",  # share of experts chosen by at least one token
    "load_max_over_mean",  # max / mean of the tokens per expert
    "topk_jaccard",  # mean per-token Jaccard of the top-k sets, now vs previous update
    "over_capacity",  # share of the top-k assignments beyond ceil(cf * T * k / E) per expert
)

ATTENTION_FIELDS: tuple[str, ...] = (
    "entropy",  # mean per-head row entropy (nats)
    "sparsity",  # share of per-head entries > tau
    "top1",  # mean per-head row max
    "effective_heads",  # share of heads whose mean H / log(n attendable) < threshold
    "entropy_norm",  # mean over per-head rows with n >= 2 attendable keys of H / log n
)


def accumulate_fake(state: Tensor, slots: Tensor, src: Tensor, values: Tensor) -> None:
    return None


def dist_summary_fake(sums, head_sums, topk, prev_top, prev_bitmap, n, from_heads, jaccard):
    return sums.new_empty(len(DIST_FIELDS), dtype=torch.float64), sums.new_empty(
        n if jaccard else 0, dtype=torch.bool
    )


def usage_summary_fake(indices, num_sets, prev_active):
    return (
        indices.new_empty(len(USAGE_FIELDS), dtype=torch.float64),
        indices.new_empty(num_sets, dtype=torch.bool),
    )


def param_norms_fake(params, grads, prev, has_prev):
    return params[0].new_empty(len(PARAM_FIELDS), dtype=torch.float64)


def attention_values_fake(sums, rows, nk, threshold):
    return sums.new_empty(len(ATTENTION_FIELDS), dtype=torch.float64)
