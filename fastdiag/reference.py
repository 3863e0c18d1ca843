"""Reference semantics of every fastdiag metric, in plain (slow) PyTorch.

This module is the user's original diagnostics code, rewritten by us and completed with every
metric of docs/metrics.md §1-§3. It copies to the host freely (``.item()``, Python sets of
top-k indices): it is the oracle that every backend and diagnostics class is tested and
benchmarked against, so it favours being obviously right over being fast. All statistics are
computed in float64.

Conventions shared by every function here:

- Entropy is ``H(p) = -sum_{p_j > 0} p_j log p_j`` in nats (0 log 0 = 0; non-positive entries
  contribute nothing), never ``log(p + 1e-10)``.
- Top-k indices are sorted by descending value; ties go to the lower index (a stable descending
  sort, never ``torch.topk`` whose tie order is unspecified).
- ``std`` and ``var`` are unbiased (n - 1).
- An entropy normalised by ``log n`` is NaN when ``n == 1`` (0 / log 1: undefined, as the op documents).

Epoch semantics of the diagnostics classes (``count_mode``):

- ``"provided"`` (fastdiag's): a metric's epoch value is the mean of its batch values over the
  updates that provided its input *and* where the batch value is defined. A metric whose input
  was never provided in the epoch is absent from the dict; one whose input was provided but
  whose batch value was never defined is NaN. Undefined batch values: the Jaccards and
  ``*_weight_change`` on an update without a previous one, ``routing_consistency`` when no
  token had been seen before, any ``std`` / ``var`` / sampled cosine of fewer than 2 values.
- ``"seed"`` (the averaging of the user's original classes; fastdiag's one documented
  deviation from it is the mode above, docs/metrics.md §8): every key of the schema is returned
  and every sum is divided by the total number of updates of the epoch (undefined or missing
  batch values add 0), except the Jaccards, divided by their own count (NaN when 0). With no
  update at all every value is NaN.

"Epoch" = the updates since the last ``reset()``. ``reset()`` clears the epoch sums and the
previous top-k / active-set state of the Jaccards, but keeps the previous parameters (weight
change spans epochs), the token -> set table of ``routing_consistency`` and the previous
epoch's values used by the ``delta_*`` keys (one ``get_epoch_stats()`` call = one epoch).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from fastdiag import schema

__all__ = [
    "ReferenceSetDiagnostics",
    "ReferenceBaselineAttentionDiagnostics",
    "row_stats",
    "weight_stats",
    "bank_coherence",
    "entropy",
    "stable_topk_indices",
    "usage_counts",
    "gini",
    "sampled_cosine",
    "effective_rank",
]

COUNT_MODES = ("provided", "seed")
COSINE_SAMPLES = 100  # rows drawn by the original classes' sampled cosine estimate
PATTERN_TOPK = 5  # k of the attention top-k Jaccards
SPARSITY_TAU = 0.1  # attention_sparsity threshold
EFFECTIVE_HEAD_ENTROPY = 0.9  # a head counts as effective when its mean H/log Nk is below this


# ----------------------------------------------------------------------------------------------
# Elementary statistics
# ----------------------------------------------------------------------------------------------


def entropy(p: Tensor, dim: int = -1) -> Tensor:
    """Entropy in nats along ``dim`` (0 log 0 = 0, entries <= 0 contribute 0); float64."""
    return torch.special.entr(p.double().clamp_min(0)).sum(dim)


def _normalised(h: Tensor | float, n: int) -> Tensor | float:
    """``h / log n``; NaN when ``n == 1`` (0 / log 1 is undefined)."""
    return h / math.log(n) if n > 1 else h * math.nan


def stable_topk_indices(x: Tensor, k: int) -> Tensor:
    """Indices [..., k] of the k largest entries of the last axis, descending, ties to the lower index."""
    return torch.sort(x, dim=-1, descending=True, stable=True).indices[..., :k]


def usage_counts(indices: Tensor, num_sets: int) -> Tensor:
    """Counts int64 [num_sets] of each index value over all entries; entries < 0 are padding."""
    if indices.dtype.is_floating_point or indices.dtype == torch.bool:
        raise TypeError(f"bank_indices must be an integer tensor, got dtype {indices.dtype}")
    flat = indices.reshape(-1).long()
    flat = flat[flat >= 0]
    if flat.numel() and int(flat.max()) >= num_sets:
        raise ValueError(
            f"bank_indices must be < num_sets={num_sets} (or < 0 for padding), "
            f"got max {int(flat.max())}"
        )
    return torch.bincount(flat.cpu(), minlength=num_sets)


def gini(counts: Tensor) -> float:
    """Gini coefficient ``sum_ij |c_i - c_j| / (2 S sum c)`` of counts [S], zeros included."""
    c = counts.double()
    total = float(c.sum())
    if total == 0:
        return math.nan
    return float((c[:, None] - c[None, :]).abs().sum()) / (2 * c.numel() * total)


def _jaccard(a: set[int], b: set[int]) -> float:
    """|a & b| / |a | b|; 0 for two empty sets (the original classes' convention)."""
    union = len(a | b)
    return len(a & b) / union if union else 0.0


def sampled_cosine(
    rows: Tensor, generator: torch.Generator | None = None, samples: int = COSINE_SAMPLES
) -> tuple[float, float] | None:
    """Sampled pairwise cosine of the rows of ``rows`` [M, D], as the original classes take it.

    Returns (off-diagonal mean, max).

    ``idx = torch.randperm(M, generator=generator)[:n]`` with ``n = min(samples, M)``, drawn on
    the generator's device (the CPU, global RNG, when ``generator`` is None) and moved to the
    data's device; ``cos = S S^T / (outer(norms) + 1e-8)``. None when M < 2 (no RNG drawn).
    """
    m = rows.shape[0]
    if m < 2:
        return None
    device = generator.device if generator is not None else torch.device("cpu")
    idx = torch.randperm(m, generator=generator, device=device)[: min(samples, m)]
    s = rows[idx.to(rows.device)].double()
    norms = s.norm(dim=1, keepdim=True)
    cos = (s @ s.T) / (norms @ norms.T + 1e-8)
    off = cos[~torch.eye(s.shape[0], dtype=torch.bool, device=cos.device)]
    return float(off.mean()), float(off.max())


def effective_rank(x: Tensor) -> Tensor:
    """exp(H(sigma / sum sigma)) of each matrix of ``x`` [..., rows, cols], float64 [...].

    Singular values by ``torch.linalg.svdvals`` in float64; an all-zero matrix has rank 0.
    """
    sigma = torch.linalg.svdvals(x.double())
    total = sigma.sum(-1, keepdim=True)
    p = torch.where(total > 0, sigma / total.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    return torch.where(total.squeeze(-1) > 0, torch.exp(entropy(p)), 0.0)


def _flat_rows(x: Tensor, name: str) -> Tensor:
    if x.dim() < 2:
        raise ValueError(
            f"{name} must have shape [..., D] with at least 2 dims, got {tuple(x.shape)}"
        )
    return x.detach().reshape(-1, x.shape[-1]).double()


def _embedding_stats(
    rows: Tensor, generator: torch.Generator | None
) -> tuple[float | None, float, tuple[float, float] | None]:
    """(variance of each column averaged over columns, mean row L2 norm, sampled cosine)."""
    variance = float(rows.var(dim=0).mean()) if rows.shape[0] > 1 else None
    return variance, float(rows.norm(dim=1).mean()), sampled_cosine(rows, generator)


def _param_stats(
    params: Mapping[str, Tensor], prev: dict[str, Tensor] | None
) -> tuple[float, float, float | None, dict[str, Tensor]]:
    """(gradient norm, parameter norm, weight change or None, snapshot) of a name -> tensor dict.

    Gradient norm skips tensors without ``.grad``; weight change covers the names present now
    and at the previous snapshot (None without a previous snapshot).
    """
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a dict name -> Parameter, got {type(params).__name__}")
    grad_sq = 0.0
    param_sq = 0.0
    change_sq = 0.0
    for name, p in params.items():
        if p.grad is not None:
            grad_sq += float(p.grad.detach().double().square().sum())
        param_sq += float(p.detach().double().square().sum())
        if prev is not None and name in prev:
            if prev[name].shape != p.shape:
                raise ValueError(
                    f"parameter {name!r} changed shape from {tuple(prev[name].shape)} "
                    f"to {tuple(p.shape)} between updates"
                )
            change_sq += float((p.detach().double() - prev[name].double()).square().sum())
    snapshot = {k: v.detach().clone() for k, v in params.items()}
    change = math.sqrt(change_sq) if prev is not None else None
    return math.sqrt(grad_sq), math.sqrt(param_sq), change, snapshot


# ----------------------------------------------------------------------------------------------
# Epoch accumulation
# ----------------------------------------------------------------------------------------------


class _EpochMeans:
    """Per-key sums of batch values, counts of defined values, and which inputs were provided."""

    def __init__(self, keys: tuple[str, ...], own_count_keys: tuple[str, ...], mode: str) -> None:
        if mode not in COUNT_MODES:
            raise ValueError(f"count_mode must be one of {COUNT_MODES}, got {mode!r}")
        self.keys = keys
        self.own_count_keys = own_count_keys
        self.mode = mode
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.provided: set[str] = set()
        self.updates = 0

    def add(self, key: str, value: float | None) -> None:
        """Record ``key``'s batch value; None = input provided but value undefined this batch."""
        self.provided.add(key)
        if value is not None:
            self.sums[key] = self.sums.get(key, 0.0) + value
            self.counts[key] = self.counts.get(key, 0) + 1

    def result(self, skip: tuple[str, ...] = ()) -> dict[str, float]:
        out: dict[str, float] = {}
        for key in self.keys:
            if key in skip:
                continue
            total = self.sums.get(key, 0.0)
            count = self.counts.get(key, 0)
            if self.mode == "provided":
                if key in self.provided:
                    out[key] = total / count if count else math.nan
            elif key in self.own_count_keys:
                out[key] = total / count if count else math.nan
            else:
                out[key] = total / self.updates if self.updates else math.nan
        return out


# ----------------------------------------------------------------------------------------------
# Set-routing diagnostics (docs/metrics.md §1)
# ----------------------------------------------------------------------------------------------

_DELTAS = {
    "ausa/delta_routing_entropy": "ausa/routing_entropy",
    "ausa/delta_set_variance": "ausa/set_embedding_variance",
    "ausa/delta_router_confidence": "ausa/router_confidence_mean",
}


class ReferenceSetDiagnostics:
    """Set-routing diagnostics (``ausa/`` keys), the reference for ``fastdiag.SetDiagnostics``."""

    def __init__(self, count_mode: str = "provided") -> None:
        if count_mode not in COUNT_MODES:
            raise ValueError(f"count_mode must be one of {COUNT_MODES}, got {count_mode!r}")
        self.count_mode = count_mode
        self.prev_router_params: dict[str, Tensor] | None = None
        self.last_set: dict[int, int] = {}  # token id -> top-1 set at its last occurrence
        self._prev_epoch: dict[str, float] = {}
        self.reset()

    def reset(self) -> None:
        """Start a new epoch (keeps previous params, the token table and last epoch's values)."""
        self._means = _EpochMeans(
            schema.SET_DIAGNOSTICS, ("ausa/set_reuse_jaccard",), self.count_mode
        )
        self._prev_active: set[int] | None = None

    def update(self, bank_indices: Tensor, num_sets: int) -> None:
        """The original two-argument update: usage statistics only."""
        self.update_with_router_state(bank_indices, num_sets)

    @torch.no_grad()
    def update_with_router_state(
        self,
        bank_indices: Tensor,
        num_sets: int,
        router_probs: Tensor | None = None,
        set_embeddings: Tensor | None = None,
        router_params: Mapping[str, Tensor] | None = None,
        set_attention_weights: Tensor | None = None,
        *,
        router_logits: Tensor | None = None,
        token_ids: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        """Record one batch.

        bank_indices: int [B, N] or [B, N, k], entries < 0 are padding. num_sets: S >= 1.
        router_probs [B, N, S] or router_logits [B, N, S] (softmaxed here), not both.
        set_embeddings [B, S, D]. router_params: name -> Parameter.
        set_attention_weights [B, N, S]. token_ids int [B, N] (ids < 0 ignored).
        generator: drives the sampled set cosine (global CPU RNG when None).
        """
        if isinstance(num_sets, bool) or not isinstance(num_sets, int) or num_sets < 1:
            raise ValueError(f"num_sets must be a positive int, got {num_sets!r}")
        if bank_indices.dim() not in (2, 3):
            raise ValueError(
                f"bank_indices must have shape [B, N] or [B, N, k], got {tuple(bank_indices.shape)}"
            )
        if router_probs is not None and router_logits is not None:
            raise ValueError("pass router_probs or router_logits, not both")
        m = self._means
        m.updates += 1
        s_count = num_sets

        counts = usage_counts(bank_indices, s_count)
        self._add_usage(counts)

        probs = None
        if router_logits is not None:
            probs = torch.softmax(router_logits.detach().double(), dim=-1)
        elif router_probs is not None:
            probs = router_probs.detach().double()
        if probs is not None:
            if probs.shape[-1] != s_count:
                raise ValueError(
                    f"router probs/logits must have last dim num_sets={s_count}, got {tuple(probs.shape)}"
                )
            conf = probs.max(dim=-1).values.reshape(-1)
            m.add("ausa/router_confidence_mean", float(conf.mean()))
            conf_std = float(conf.std()) if conf.numel() > 1 else None
            m.add("ausa/router_confidence_std", conf_std)
            m.add("ausa/routing_confidence_std", conf_std)
            kl = math.log(s_count) - entropy(probs)
            m.add("ausa/top1_vs_random_kl", float(kl.mean()))

        if token_ids is not None:
            if probs is not None:
                top1 = stable_topk_indices(probs, 1)[..., 0]
            else:
                top1 = bank_indices[..., 0] if bank_indices.dim() == 3 else bank_indices
            if tuple(token_ids.shape) != tuple(top1.shape):
                raise ValueError(
                    f"token_ids must have shape {tuple(top1.shape)} (the [B, N] of the routing), "
                    f"got {tuple(token_ids.shape)}"
                )
            m.add("ausa/routing_consistency", self._consistency(token_ids, top1))

        if set_embeddings is not None:
            if set_embeddings.dim() != 3:
                raise ValueError(
                    f"set_embeddings must have shape [B, S, D], got {tuple(set_embeddings.shape)}"
                )
            rows = _flat_rows(set_embeddings, "set_embeddings")
            variance, norm_mean, cos = _embedding_stats(rows, generator)
            m.add("ausa/set_embedding_variance", variance)
            m.add("ausa/set_embedding_norm_mean", norm_mean)
            m.add("ausa/set_cosine_similarity_mean", None if cos is None else cos[0])
            m.add("ausa/set_cosine_similarity_max", None if cos is None else cos[1])
            m.add("ausa/set_rank_effective", float(effective_rank(set_embeddings).mean()))

        if set_attention_weights is not None:
            w = set_attention_weights.detach().double()
            m.add("ausa/set_attention_entropy_mean", float(entropy(w).mean()))
            m.add("ausa/set_attention_top1_mean", float(w.max(dim=-1).values.mean()))

        if router_params is not None:
            grad, norm, change, self.prev_router_params = _param_stats(
                router_params, self.prev_router_params
            )
            m.add("ausa/router_gradient_norm", grad)
            m.add("ausa/router_param_norm", norm)
            m.add("ausa/router_weight_change", change)

    def _add_usage(self, counts: Tensor) -> None:
        m = self._means
        active = set((counts > 0).nonzero().flatten().tolist())
        jac = _jaccard(active, self._prev_active) if self._prev_active is not None else None
        m.add("ausa/set_reuse_jaccard", jac)
        self._prev_active = active

        c = counts.double()
        total = float(c.sum())
        s_count = c.numel()
        m.add("ausa/tokens_per_set_variance", float(c.var()) if s_count > 1 else None)
        act = c[c > 0]
        if total == 0:  # all padding: the shares are undefined
            for key in (
                "ausa/active_set_ratio",
                "ausa/active_set_size_mean",
                "ausa/active_set_size_std",
                "ausa/routing_entropy",
                "ausa/routing_entropy_norm",
                "ausa/routing_gini",
                "ausa/routing_top1_prob_mean",
            ):
                m.add(key, None)
            return
        u = c / total
        h = float(entropy(u))
        m.add("ausa/active_set_ratio", act.numel() / s_count)
        m.add("ausa/active_set_size_mean", float(act.mean()))
        m.add("ausa/active_set_size_std", float(act.std()) if act.numel() > 1 else None)
        m.add("ausa/routing_entropy", h)
        m.add("ausa/routing_entropy_norm", _normalised(h, s_count))
        m.add("ausa/routing_gini", gini(counts))
        m.add("ausa/routing_top1_prob_mean", float(u.max()))

    def _consistency(self, token_ids: Tensor, top1: Tensor) -> float | None:
        """Share of this batch's seen-before tokens routed as at their last occurrence; updates the table."""
        pairs = [
            (t, s)
            for t, s in zip(token_ids.reshape(-1).tolist(), top1.reshape(-1).tolist(), strict=True)
            if t >= 0 and s >= 0
        ]
        seen = [s == self.last_set[t] for t, s in pairs if t in self.last_set]
        for t, s in pairs:  # in flat order: the last occurrence wins
            self.last_set[t] = s
        return sum(seen) / len(seen) if seen else None

    def get_epoch_stats(self) -> dict[str, float]:
        """Epoch values (``ausa/`` keys, catalogue order); also advances the ``delta_*`` epoch."""
        out = self._means.result(skip=tuple(_DELTAS))
        for delta_key, base_key in _DELTAS.items():
            if base_key in out or self.count_mode == "seed":
                cur = out.get(base_key, math.nan)
                out[delta_key] = cur - self._prev_epoch.get(base_key, math.nan)
        self._prev_epoch = {base: out[base] for base in _DELTAS.values() if base in out}
        return {k: out[k] for k in schema.SET_DIAGNOSTICS if k in out}


# ----------------------------------------------------------------------------------------------
# Baseline attention diagnostics (docs/metrics.md §2)
# ----------------------------------------------------------------------------------------------


class ReferenceBaselineAttentionDiagnostics:
    """Token-attention diagnostics (``baseline/`` keys), the reference for
    ``fastdiag.BaselineAttentionDiagnostics``."""

    def __init__(self, count_mode: str = "provided") -> None:
        if count_mode not in COUNT_MODES:
            raise ValueError(f"count_mode must be one of {COUNT_MODES}, got {count_mode!r}")
        self.count_mode = count_mode
        self.prev_params: dict[str, Tensor] | None = None
        self.reset()

    def reset(self) -> None:
        """Start a new epoch (keeps the previous parameters for the weight change)."""
        self._means = _EpochMeans(
            schema.BASELINE_DIAGNOSTICS,
            ("baseline/attention_pattern_jaccard", "baseline/attention_topk_jaccard_per_query"),
            self.count_mode,
        )
        self._prev_top: Tensor | None = None
        self._prev_top_set: set[int] | None = None

    @torch.no_grad()
    def update(
        self,
        attention_weights: Tensor | None,
        attention_params: Mapping[str, Tensor] | None = None,
        value_states: Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> None:
        """Record one batch.

        attention_weights: [B, H, N, Nk] or [B, N, Nk] (one head), or None (params-only update).
        attention_params: name -> Parameter. value_states: [..., dh].
        generator: drives the sampled value cosine (global CPU RNG when None).
        """
        m = self._means
        m.updates += 1
        if attention_weights is not None:
            self._add_attention(attention_weights)
        if attention_params is not None:
            grad, norm, change, self.prev_params = _param_stats(attention_params, self.prev_params)
            m.add("baseline/attention_gradient_norm", grad)
            m.add("baseline/attention_param_norm", norm)
            m.add("baseline/attention_weight_change", change)
        if value_states is not None:
            rows = _flat_rows(value_states, "value_states")
            variance, _, cos = _embedding_stats(rows, generator)
            m.add("baseline/value_embedding_variance", variance)
            m.add("baseline/value_cosine_similarity", None if cos is None else cos[0])

    def _add_attention(self, attention_weights: Tensor) -> None:
        m = self._means
        attn = attention_weights.detach().double()
        if attn.dim() == 4:
            heads = attn
        elif attn.dim() == 3:
            heads = attn.unsqueeze(1)
        else:
            raise ValueError(
                f"attention_weights must have shape [B, H, N, Nk] or [B, N, Nk], got {tuple(attn.shape)}"
            )
        a = heads.mean(dim=1)  # [B, N, Nk], the head mean of the original class
        nk = a.shape[-1]

        h = entropy(a)
        h_mean = float(h.mean())
        m.add("baseline/attention_entropy_mean", h_mean)
        m.add("baseline/attention_entropy_norm", _normalised(h_mean, nk))
        top1 = a.max(dim=-1).values.reshape(-1)
        m.add("baseline/attention_top1_mean", float(top1.mean()))
        m.add("baseline/attention_top1_std", float(top1.std()) if top1.numel() > 1 else None)

        top = stable_topk_indices(a, min(PATTERN_TOPK, nk))  # [B, N, k]
        top_set = set(top.reshape(-1).tolist())
        pattern = per_query = None
        if self._prev_top is not None:
            pattern = _jaccard(top_set, self._prev_top_set)
            if self._prev_top.shape == top.shape:
                rows_now = top.reshape(-1, top.shape[-1]).tolist()
                rows_prev = self._prev_top.reshape(-1, top.shape[-1]).tolist()
                scores = [
                    _jaccard(set(r), set(q)) for r, q in zip(rows_now, rows_prev, strict=True)
                ]
                per_query = sum(scores) / len(scores) if scores else None
        m.add("baseline/attention_pattern_jaccard", pattern)
        m.add("baseline/attention_topk_jaccard_per_query", per_query)
        self._prev_top, self._prev_top_set = top, top_set

        m.add("baseline/attention_sparsity", float((heads > SPARSITY_TAU).double().mean()))
        head_h = entropy(heads)  # [B, H, N]
        m.add("baseline/attention_head_entropy_mean", float(head_h.mean()))
        per_head = _normalised(head_h.mean(dim=(0, 2)), nk)  # [H]
        m.add(
            "baseline/attention_effective_heads",
            float((per_head < EFFECTIVE_HEAD_ENTROPY).double().mean()),
        )

    def get_epoch_stats(self) -> dict[str, float]:
        """Epoch values (``baseline/`` keys, catalogue order)."""
        return self._means.result()


# ----------------------------------------------------------------------------------------------
# Row statistics oracle (the fused dist_stats op) and weights (docs/metrics.md §3)
# ----------------------------------------------------------------------------------------------


def row_stats(
    x: Tensor,
    *,
    from_logits: bool = False,
    reduce_dim: int | None = None,
    topk: int = 0,
    tau: float = 0.1,
    eps: float = 1e-6,
    window: int | None = None,
    query_offset: int = 0,
) -> dict[str, Tensor]:
    """Per-row statistics of the distributions on the last axis of ``x`` [..., N], in float64.

    Rows are ``p = x`` (``softmax(x)`` with ``from_logits``), then averaged over ``reduce_dim``
    when given (softmax per original row first, so logits give the mean of probabilities).
    With L = the leading shape of ``p``, returns:

    - ``entropy``, ``max``, ``sumsq``, ``rowsum_err`` (|sum - 1|), ``abs_dev_uniform``
      (mean_j |p_j - 1/N|), ``future_mass`` (sum of p_j, j > i + query_offset), and
      ``local_mass`` (sum of p_j, |j - (i + query_offset)| <= window; only when ``window`` is
      given): float64 [L]. ``i`` is the row's index along ``p.shape[-2]`` (0 for 1-D ``p``).
    - ``argmax`` int64 [L] (lowest index on ties), ``count_gt_tau`` / ``count_gt_eps`` int64 [L].
    - ``topk_indices`` int64 [L, topk] (descending, ties to the lower index; only when topk > 0).
    - ``finite`` bool [L]: every entry of ``p`` is finite (so masked -inf logits are fine).
    """
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have shape [..., N] with N >= 1, got {tuple(x.shape)}")
    p = x.detach().double()
    if from_logits:
        p = torch.softmax(p, dim=-1)
    if reduce_dim is not None:
        if reduce_dim % x.dim() == x.dim() - 1:
            raise ValueError(
                f"reduce_dim must not be the last axis of x {tuple(x.shape)}, got {reduce_dim}"
            )
        p = p.mean(dim=reduce_dim)
    n = p.shape[-1]
    if not 0 <= topk <= n:
        raise ValueError(f"topk must be in [0, N={n}], got {topk}")

    j = torch.arange(n, device=p.device)
    q = p.shape[-2] if p.dim() >= 2 else 1
    i = torch.arange(q, device=p.device)[:, None] + query_offset  # [q, 1] key index of each query

    out = {
        "entropy": entropy(p),
        "max": p.max(dim=-1).values,
        "argmax": stable_topk_indices(p, 1)[..., 0],
        "sumsq": p.square().sum(-1),
        "count_gt_tau": (p > tau).sum(-1),
        "count_gt_eps": (p > eps).sum(-1),
        "rowsum_err": (p.sum(-1) - 1).abs(),
        "future_mass": (p * (j > i)).sum(-1).reshape(p.shape[:-1]),
        "abs_dev_uniform": (p - 1.0 / n).abs().mean(-1),
        "finite": torch.isfinite(p).all(-1),
    }
    if window is not None:
        out["local_mass"] = (p * ((j - i).abs() <= window)).sum(-1).reshape(p.shape[:-1])
    if topk > 0:
        out["topk_indices"] = stable_topk_indices(p, topk)
    return out


def weight_stats(
    weights: Tensor,
    *,
    tau: float = 0.1,
    eps: float = 1e-6,
    indices: Tensor | None = None,
    num_sets: int | None = None,
) -> dict[str, float]:
    """Row statistics of weights [..., N] (pooling, gates, sparse codes), keys without prefix.

    ``entropy_mean``, ``entropy_norm`` (/ log N), ``top1_mean``, ``top1_std``, ``kl_uniform``
    (mean of log N - H), ``sparsity`` (share of entries > tau), ``support_mean`` /
    ``support_median`` (#entries > eps per row; the median averages the two middle values),
    ``prune_frac`` (share of entries <= eps); with ``indices`` (entries < 0 padding) also
    ``usage_gini`` and ``active_ratio`` over ``num_sets`` (default N) choices.
    """
    w = weights.detach().double()
    if w.dim() < 1 or w.shape[-1] == 0:
        raise ValueError(
            f"weights must have shape [..., N] with N >= 1, got {tuple(weights.shape)}"
        )
    w = w.reshape(-1, w.shape[-1])
    n = w.shape[-1]
    h = entropy(w)
    top1 = w.max(dim=-1).values
    support = (w > eps).sum(-1).double()
    out = {
        "entropy_mean": float(h.mean()),
        "entropy_norm": float(_normalised(h.mean(), n)),
        "top1_mean": float(top1.mean()),
        "top1_std": float(top1.std()) if top1.numel() > 1 else math.nan,
        "kl_uniform": float((math.log(n) - h).mean()),
        "sparsity": float((w > tau).double().mean()),
        "support_mean": float(support.mean()),
        "support_median": float(torch.quantile(support, 0.5)),
        "prune_frac": float((w <= eps).double().mean()),
    }
    if indices is not None:
        s_count = n if num_sets is None else num_sets
        counts = usage_counts(indices, s_count)
        out["usage_gini"] = gini(counts)
        out["active_ratio"] = float((counts > 0).sum()) / s_count
    return out


def bank_coherence(atoms: Tensor) -> float:
    """Max off-diagonal |cosine| between the atoms (rows of ``atoms`` [K, ...], flattened), exact.

    A zero atom has cosine 0 with everything; NaN when K < 2.
    """
    a = atoms.detach().reshape(atoms.shape[0], -1).double()
    k = a.shape[0]
    if k < 2:
        return math.nan
    norms = a.norm(dim=1)
    unit = a / torch.where(norms > 0, norms, 1.0)[:, None]
    cos = (unit @ unit.T).abs()
    return float(cos[~torch.eye(k, dtype=torch.bool, device=cos.device)].max())
