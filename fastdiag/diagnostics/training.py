"""``TrainingDiagnostics``: per-layer attention, gradient health and probe statistics.

Fed by the hooks of :func:`fastdiag.watch` (``fastdiag.integrations.hooks``) or directly
through the ``update_*`` methods; ``get_epoch_stats()`` returns one dict (docs/metrics.md, §5
"Gradient and training health"):

* ``attention_entropy/{layer}``, ``attention_sparsity/{layer}``, ``attention_top1/{layer}``,
  ``attention_effective_heads/{layer}``, ``attention_entropy_norm/{layer}``
  (:meth:`TrainingDiagnostics.update_attention` with the weights,
  :meth:`TrainingDiagnostics.update_attention_qk` straight from SDPA's q and k). Per-head
  values: entropy (the mean of the per-head entropies) and top-1 are means over the B*H*N
  per-head rows, sparsity the share of per-head entries > ``tau``; causal-aware normalisation:
  ``attention_entropy_norm`` is the mean of H(row) / log n(row), n = the row's attendable keys
  (entries > 0; rows with n >= 2), effective heads the share of heads whose mean of it is below
  ``effective_head_entropy``.
* ``grad_norm/{group}``, ``grad_norm_total``, ``param_norm/{group}``, ``health/nan_infs`` and
  ``health/nan_infs/{group}`` (:meth:`TrainingDiagnostics.update_gradients`), and
  ``update_ratio/{group}`` (:meth:`TrainingDiagnostics.update_ratio`, after an optimizer step).
  ``health/nan_infs/{group}`` is returned only for the groups that had a non-finite entry.
* ``{probe key}`` (:meth:`TrainingDiagnostics.update_probe`).

The keys are dynamic (per layer, per group, per probe): :meth:`TrainingDiagnostics.metric_keys`
lists them in the order they were first recorded. Values are computed on the device by
``fastdiag.ops`` and :class:`~fastdiag.diagnostics.params.ParamTracker`, and accumulated by the
:class:`~fastdiag.diagnostics.base.Diagnostics` base class: nothing is copied to the host before
``get_epoch_stats()``. Epoch value = mean of the batch values of the updates since ``reset()``
(non-finite batch values are not counted); with ``sync_dist=True`` the mean over all ranks'
batch values.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from fastdiag import ops
from fastdiag.accumulator import Accumulator
from fastdiag.diagnostics.base import Diagnostics
from fastdiag.diagnostics.params import GroupSpec, ParamTracker
from fastdiag.ops import summaries
from fastdiag.schema import EFFECTIVE_HEAD_ENTROPY, SPARSITY_TAU

__all__ = [
    "ATTENTION_METRICS",
    "EFFECTIVE_HEAD_ENTROPY",
    "ROUTER_METRICS",
    "SPARSITY_TAU",
    "TrainingDiagnostics",
]

ATTENTION_METRICS = (
    "attention_entropy",
    "attention_sparsity",
    "attention_top1",
    "attention_effective_heads",
    "attention_entropy_norm",
)
ROUTER_METRICS = (
    "router_entropy_norm",
    "router_top1",
    "expert_load_gini",
    "expert_active_ratio",
    "expert_load_max_over_mean",
    "router_topk_jaccard",
    "expert_over_capacity",  # only with a capacity factor
)
_NAN_INFS_GROUP = "health/nan_infs/"


# ----------------------------------------------------------------------------------------------
# The class
# ----------------------------------------------------------------------------------------------


class TrainingDiagnostics(Diagnostics):
    """Per-layer attention, gradient-health and probe statistics, accumulated on the device.

    tau: attention sparsity threshold; effective_head_entropy: a head counts as effective when
    its mean normalised entropy is below it; device: where the accumulated state lives (default:
    the device of the values recorded).
    """

    def __init__(
        self,
        *,
        tau: float = SPARSITY_TAU,
        effective_head_entropy: float = EFFECTIVE_HEAD_ENTROPY,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.tau = _number(tau, "tau")
        self.effective_head_entropy = _number(effective_head_entropy, "effective_head_entropy")
        self.device = None if device is None else torch.device(device)
        self._attention_keys: dict[str, tuple[str, ...]] = {}
        self._probe_keys: dict[str, tuple[str]] = {}
        self._router_keys: dict[tuple[str, bool], tuple[str, ...]] = {}
        self._router_prev: dict[str, tuple[Tensor, Tensor]] = {}  # top-k, expert bitmap
        self._trackers: dict[Any, ParamTracker] = {}

    @property
    def accumulator(self) -> Accumulator:
        """The packed (sum, count) state behind every metric (read it, do not write it)."""
        return self._acc

    def metric_keys(self) -> tuple[str, ...]:
        """Every key recorded so far (since construction or the loaded state), first-recorded first."""
        return tuple(n for n in self._acc.names if not n.startswith("_"))

    def _epoch_values(self, raw: dict[str, float]) -> dict[str, float]:
        values = super()._epoch_values(raw)
        return {k: v for k, v in values.items() if not (k.startswith(_NAN_INFS_GROUP) and not v > 0)}

    def _record(self, names: tuple[str, ...], values: Tensor) -> None:
        if self.device is not None:
            values = values.to(self.device)
        self._add(names, values.to(torch.float64))

    # -- updates ------------------------------------------------------------------------------

    @torch.no_grad()
    def update_attention(
        self,
        name: str,
        weights: Tensor,
        *,
        from_logits: bool = False,
        row_mask: Tensor | None = None,
    ) -> None:
        """Record one batch of attention for layer ``name``.

        weights: [B, H, N, Nk] per-head probabilities (logits with ``from_logits``) or
        [B, N, Nk] (one head). row_mask: bool [B, N], False rows (padding queries) ignored.
        Batch values: see :func:`fastdiag.ops.summaries.attention_values`; NaN (not counted) when no row is valid.
        """
        if not isinstance(name, str):
            raise TypeError(f"name must be a str, got {type(name).__name__}")
        if not isinstance(weights, Tensor):
            raise TypeError(f"weights must be a torch.Tensor, got {type(weights).__name__}")
        if weights.dim() not in (3, 4):
            raise ValueError(
                f"weights must have shape [B, H, N, Nk] or [B, N, Nk], got {tuple(weights.shape)}"
            )
        w = weights.detach()
        if w.dim() == 3:
            w = w.unsqueeze(1)
        rows = _head_rows(row_mask, w.shape[0], w.shape[1], w.shape[2])
        # every (b, h, i) its own row; per-row entropy and support (entries > 0: the attendable
        # keys) for the causal-aware normalisation
        ds = ops.dist_stats(
            w, from_logits=from_logits, tau=self.tau, eps=0.0, row_mask=rows, rows=True, heads=False
        )
        values = summaries.attention_values(ds.sums, ds.rows, w.shape[-1], self.effective_head_entropy)
        self._record(self._attention_key_names(name), values)

    @torch.no_grad()
    def update_attention_qk(
        self,
        name: str,
        q: Tensor,
        k: Tensor,
        *,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
        row_mask: Tensor | None = None,
    ) -> None:
        """Record one batch of attention for layer ``name`` from the arguments of
        ``torch.nn.functional.scaled_dot_product_attention``, without materialising the weights.

        q [B, Hq, N, d], k [B, Hk, Nk, d]; attn_mask (bool, True = attend, or additive),
        is_causal (top-left aligned), scale (None = 1/sqrt(d)) and enable_gqa as in SDPA.
        row_mask: bool [B, N], False rows (padding queries) ignored. The same keys and values
        as :meth:`update_attention` with ``softmax(q @ k^T * scale + mask)`` (pre-dropout).
        """
        if not isinstance(name, str):
            raise TypeError(f"name must be a str, got {type(name).__name__}")
        for arg, t in (("q", q), ("k", k)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{arg} must be a torch.Tensor, got {type(t).__name__}")
        if attn_mask is not None and not isinstance(attn_mask, Tensor):
            raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
        if row_mask is not None and not isinstance(row_mask, Tensor):
            raise TypeError(f"row_mask must be a torch.Tensor or None, got {type(row_mask).__name__}")
        rows = _head_rows(row_mask, q.shape[0], q.shape[1], q.shape[-2]) if q.dim() == 4 else row_mask
        ds = ops.attention_stats(
            q.detach(),
            k.detach(),
            attn_mask=None if attn_mask is None else attn_mask.detach(),
            is_causal=bool(is_causal),
            scale=scale,
            enable_gqa=bool(enable_gqa),
            reduce_dim=None,
            tau=self.tau,
            eps=0.0,
            row_mask=rows,
            rows=True,
            heads=False,
        )
        values = summaries.attention_values(ds.sums, ds.rows, k.shape[-2], self.effective_head_entropy)
        self._record(self._attention_key_names(name), values)

    @torch.no_grad()
    def update_router(
        self,
        name: str,
        logits: Tensor,
        *,
        top_k: int = 1,
        capacity_factor: float | None = None,
        row_mask: Tensor | None = None,
    ) -> None:
        """Record one call of the mixture-of-experts router ``name``.

        logits: [..., E] router logits (the leading axes are the tokens, e.g. [B*N, E]);
        top_k: experts per token (1..16, <= E); capacity_factor: adds
        ``expert_over_capacity/{name}``; row_mask: bool with the leading shape of ``logits`` (or
        its number of tokens), False tokens (padding) ignored. Batch values: see
        :func:`fastdiag.ops.summaries.router_summary`; ``router_topk_jaccard`` compares with the
        previous call recorded for ``name`` (reset by :meth:`reset`).
        """
        if not isinstance(name, str):
            raise TypeError(f"name must be a str, got {type(name).__name__}")
        if not isinstance(logits, Tensor):
            raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
        if logits.dim() < 1 or not logits.is_floating_point() or logits.shape[-1] < 1:
            raise ValueError(
                f"logits must be floating [..., E] with E >= 1, got {logits.dtype} {tuple(logits.shape)}"
            )
        experts = logits.shape[-1]
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= min(16, experts):
            raise ValueError(f"top_k must be an int in [1, min(16, E={experts})], got {top_k!r}")
        if capacity_factor is not None:
            capacity_factor = _number(capacity_factor, "capacity_factor")
            if not capacity_factor > 0:
                raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
        x = logits.detach().reshape(-1, experts)
        mask = None
        if row_mask is not None:
            if not isinstance(row_mask, Tensor):
                raise TypeError(f"row_mask must be a torch.Tensor or None, got {type(row_mask).__name__}")
            if row_mask.numel() != x.shape[0]:
                raise ValueError(
                    f"row_mask must hold one entry per token ({x.shape[0]} for logits of shape "
                    f"{tuple(logits.shape)}), got shape {tuple(row_mask.shape)}"
                )
            mask = row_mask.detach().reshape(-1).to(device=x.device, dtype=torch.bool)
        ds = ops.dist_stats(x, from_logits=True, topk=top_k, row_mask=mask, heads=False)
        prev = self._router_prev.get(name)
        values, bitmap = summaries.router_summary(
            ds,
            experts,
            capacity_factor=capacity_factor,
            prev_top=None if prev is None else prev[0],
            prev_bitmap=None if prev is None else prev[1],
        )
        self._router_prev[name] = (ds.topk, bitmap)
        with_capacity = capacity_factor is not None
        keys = self._router_keys.get((name, with_capacity))
        if keys is None:
            metrics = ROUTER_METRICS if with_capacity else ROUTER_METRICS[:-1]
            keys = self._router_keys[(name, with_capacity)] = tuple(f"{m}/{name}" for m in metrics)
        self._record(keys, values if with_capacity else values[:-1])

    def reset(self) -> None:
        """Clear every accumulated value and the routers' previous top-k (for the Jaccard)."""
        super().reset()
        self._router_prev.clear()

    def _attention_key_names(self, name: str) -> tuple[str, ...]:
        keys = self._attention_keys.get(name)
        if keys is None:
            keys = self._attention_keys[name] = tuple(f"{m}/{name}" for m in ATTENTION_METRICS)
        return keys

    @torch.no_grad()
    def update_gradients(
        self,
        parameters: Mapping[str, Tensor] | Iterable[tuple[str, Tensor]],
        *,
        group: GroupSpec = "parameter",
        snapshot: bool = False,
        tracker: ParamTracker | None = None,
    ) -> None:
        """Record gradient health of named parameters (those without ``.grad`` are skipped).

        Batch values: ``grad_norm/{g}`` and ``param_norm/{g}`` (L2 over the group's tensors),
        ``grad_norm_total`` (L2 over all gradients), ``health/nan_infs`` (non-finite gradient
        entries) and ``health/nan_infs/{g}``. ``group``: ``"parameter"``, ``"module"``, an int
        depth, a callable name -> group or ``"auto"`` (see :func:`fastdiag.watch`).
        ``snapshot``: also keep a copy of those parameters for :meth:`update_ratio` (call it
        after the optimizer step). ``tracker``: a :class:`ParamTracker` of the caller's (its own
        group and snapshot, e.g. one per watched model) instead of this object's one for
        ``group``.
        """
        out = self._tracker(group, tracker).gradient_stats(parameters, snapshot=snapshot)
        if out is not None:
            self._record(*out)

    @torch.no_grad()
    def update_ratio(
        self,
        parameters: Mapping[str, Tensor] | Iterable[tuple[str, Tensor]],
        *,
        group: GroupSpec = "parameter",
        tracker: ParamTracker | None = None,
    ) -> None:
        """Record ``update_ratio/{g}`` = ||param now - snapshot|| / ||snapshot|| per group, for the
        parameters of the last ``update_gradients(..., snapshot=True)`` with the same ``group``
        (or ``tracker``); nothing without one. A group whose snapshot norm is 0 adds nothing
        (no finite ratio)."""
        out = self._tracker(group, tracker).update_ratios(parameters)
        if out is not None:
            self._record(*out)

    def _tracker(self, group: GroupSpec, tracker: ParamTracker | None) -> ParamTracker:
        """``tracker``, else this object's tracker of ``group`` (one per group spec)."""
        if tracker is not None:
            if not isinstance(tracker, ParamTracker):
                raise TypeError(f"tracker must be a ParamTracker or None, got {type(tracker).__name__}")
            return tracker
        tracker = self._trackers.get(group)
        if tracker is None:
            tracker = self._trackers[group] = ParamTracker("parameters", group=group)
        return tracker

    @torch.no_grad()
    def update_probe(self, key: str, value: Tensor | float) -> None:
        """Record one value of probe ``key`` (a tensor is averaged over its entries, on device)."""
        if not isinstance(key, str):
            raise TypeError(f"key must be a str, got {type(key).__name__}")
        if isinstance(value, Tensor):
            v = value.detach()
            v = v.reshape(1) if v.numel() == 1 else v.double().mean().reshape(1)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            v = torch.tensor([float(value)], dtype=torch.float64)
        else:
            raise TypeError(f"probe {key!r} must return a tensor or a number, got {type(value).__name__}")
        keys = self._probe_keys.get(key)
        if keys is None:
            keys = self._probe_keys[key] = (key,)
        self._record(keys, v)

    # -- epoch --------------------------------------------------------------------------------

    def get_epoch_stats(self, sync_dist: bool = False, process_group: Any = None) -> dict[str, float]:
        """Every recorded metric's epoch value (one device->host copy; one all_reduce when synced).

        Keys recorded before the last ``reset()`` and not since are absent;
        ``health/nan_infs/{group}`` appears only for groups that had a non-finite gradient.
        """
        return super().get_epoch_stats(sync_dist=sync_dist, process_group=process_group)


def _head_rows(row_mask: Tensor | None, batch: int, heads: int, queries: int) -> Tensor | None:
    """A [B, N] query row mask as the [B, H, N] mask of the per-head rows (a view)."""
    if row_mask is None:
        return None
    if not isinstance(row_mask, Tensor):
        raise TypeError(f"row_mask must be a torch.Tensor or None, got {type(row_mask).__name__}")
    if tuple(row_mask.shape) != (batch, queries):
        raise ValueError(f"row_mask must have shape [B, N] = {(batch, queries)}, got {tuple(row_mask.shape)}")
    return row_mask.unsqueeze(1).expand(batch, heads, queries)


def _number(x: Any, name: str) -> float:
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(x).__name__}")
    return float(x)

