"""``BaselineAttentionDiagnostics``: token-attention diagnostics (docs/metrics.md §2).

A drop-in for the original class (``baseline/`` keys) that reads each attention tensor once:
one ``dist_stats`` pass averages the heads while reading and returns entropy, top-1, top-5
indices and the per-head entropy / sparsity sums; one ``dist_summary`` turns them (and the
previous top-k) into the whole value vector of the update, which the accumulator adds in one
op. ``update_from_qk`` gives the same values from the q and k of a
``scaled_dot_product_attention`` call (``attention_stats``: the weights are never materialised). No formula lives here (see :mod:`fastdiag.ops.summaries`); no host synchronisation in
``update``; ``get_epoch_stats`` copies to the host once.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from fastdiag import ops, schema
from fastdiag.diagnostics._base import (
    call_order_warning,
    check_cosine_samples,
    check_float,
    rowsum_warnings,
)
from fastdiag.diagnostics.base import Diagnostics
from fastdiag.diagnostics.params import ParamTracker
from fastdiag.ops import Slot, summaries
from fastdiag.ops.summaries import DIST
from fastdiag.schema import COSINE_SAMPLES, NONFINITE_ROWS, PATTERN_TOPK, SPARSITY_TAU

# attention key -> field of summaries.DIST_FIELDS
_ATTENTION_FIELDS = {
    "baseline/attention_entropy_mean": "entropy_mean",
    "baseline/attention_entropy_norm": "entropy_norm",
    "baseline/attention_top1_mean": "top1_mean",
    "baseline/attention_top1_std": "top1_std",
    "baseline/attention_pattern_jaccard": "pattern_jaccard",
    "baseline/attention_topk_jaccard_per_query": "topk_jaccard_per_query",
    "baseline/attention_sparsity": "head_sparsity",
    "baseline/attention_effective_heads": "effective_heads",
    "baseline/attention_head_entropy_mean": "head_entropy_mean",
}
_PARAM_KEYS = (
    "baseline/attention_gradient_norm",
    "baseline/attention_param_norm",
    "baseline/attention_weight_change",
)
_VALUE_KEYS = ("baseline/value_embedding_variance", "baseline/value_cosine_similarity")
_HAS_HEADS = "heads" in inspect.signature(ops.dist_stats).parameters  # dist_stats(heads=False)
# internal: sum of |row sum - 1| and number of rows of the attention weights (means per update)
_ROWSUM = {"attention_weights": ("_rowsum/attention_weights", "_rows/attention_weights", "")}
_ROWSUM_ADD = (tuple(_ROWSUM["attention_weights"][:2]), (Slot.ROWSUM_ERR, Slot.COUNT))
# internal: call-order flags of the parameter norms (summaries.PARAM_FIELDS positions 3, 4)
_CALL_ORDER = ("_params/gradient_missing", "_params/moved")
_CALL_ORDER_PAIRS = ((_CALL_ORDER[0], 3), (_CALL_ORDER[1], 4))
_JACCARD_KEYS = ("baseline/attention_pattern_jaccard", "baseline/attention_topk_jaccard_per_query")


def _select(pairs: Sequence[tuple[str, int]], keys: Sequence[str]) -> tuple[tuple[str, ...], tuple[int, ...]]:
    chosen = [(k, i) for k, i in pairs if k in keys or k.startswith(("health/", "_"))]
    return tuple(k for k, _ in chosen), tuple(i for _, i in chosen)


class BaselineAttentionDiagnostics(Diagnostics):
    """Token-attention diagnostics (``baseline/`` keys of ``fastdiag.schema.BASELINE_DIAGNOSTICS``).

    cosine_samples: rows of ``value_states`` drawn for ``value_cosine_similarity`` (the original
                class: 100); None = exact over all rows (blockwise op).
    keys:       the keys to compute (default: every catalogue key). Without the per-head keys
                (``schema.BASELINE_HEAD_KEYS``) ``dist_stats`` skips its per-head statistics,
                without the two Jaccards it skips the top-k.

    ``get_epoch_stats`` also returns ``health/nonfinite_rows``: the mean number per update of
    attention rows (B*N, any head) or value rows holding NaN or inf, excluded from every value.
    Attention weights whose (head-averaged) rows do not sum to 1 (mean |sum - 1| > 1e-3: logits,
    or many all-zero rows) give one RuntimeWarning per object.
    """

    def __init__(
        self, *, cosine_samples: int | None = COSINE_SAMPLES, keys: Sequence[str] | None = None
    ) -> None:
        super().__init__()
        self.cosine_samples = check_cosine_samples(cosine_samples)
        if keys is None:
            keys = schema.BASELINE_DIAGNOSTICS
        elif isinstance(keys, str) or not all(isinstance(k, str) for k in keys):
            raise ValueError(f"keys must be a sequence of key names, got {keys!r}")
        unknown = [k for k in keys if k not in schema.BASELINE_DIAGNOSTICS]
        if unknown:
            raise ValueError(f"unknown keys {unknown}; valid keys: {list(schema.BASELINE_DIAGNOSTICS)}")
        self.keys = tuple(k for k in schema.BASELINE_DIAGNOSTICS if k in keys)
        self._heads = any(k in self.keys for k in schema.BASELINE_HEAD_KEYS)
        self._jaccard = any(k in self.keys for k in _JACCARD_KEYS)
        attention = [(k, DIST[f]) for k, f in _ATTENTION_FIELDS.items()]
        self._attn = _select([*attention, (NONFINITE_ROWS, DIST["nonfinite_rows"])], self.keys)
        self._attn_no_nf = _select(attention, self.keys)  # with value_states: one summed count
        self._param = _select([*((k, i) for i, k in enumerate(_PARAM_KEYS)), *_CALL_ORDER_PAIRS], self.keys)
        self._value = _select([(k, i) for i, k in enumerate((*_VALUE_KEYS, NONFINITE_ROWS))], self.keys)
        self.add_state("_params", ParamTracker("attention_params"), reset=False)
        self.add_state("_prev_top", None)
        self.add_state("_prev_bitmap", None)
        self.add_state("_attn_ndim", None)
        self._rowsum_warned: set[str] = set()  # row-sum warning given (once per object)

    def metric_keys(self) -> tuple[str, ...]:
        return (*self.keys, NONFINITE_ROWS)

    @property
    def prev_params(self) -> dict[str, Tensor] | None:
        """Device copies of the attention parameters at the previous update (the original attribute)."""
        return self._params.prev

    @prev_params.setter
    def prev_params(self, value: Mapping[str, Tensor] | None) -> None:
        self._params.load_state_dict(value)

    @torch.no_grad()
    def update(
        self,
        attention_weights: Tensor | None,
        attention_params: Mapping[str, Tensor] | None = None,
        value_states: Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> None:
        """Record one batch; never synchronises with the device.

        attention_weights: [B, H, N, Nk] (heads averaged while reading) or [B, N, Nk], or None
        (params-only update). attention_params: name -> Parameter. value_states: [..., dh].
        generator: drives the sampled value cosine (the global CPU RNG when None, as the original).
        """
        if attention_weights is not None:
            self._check_attention(attention_weights)
        if attention_params is not None:
            self._params.check(attention_params)
        if value_states is not None:
            check_float(value_states, "value_states")
            if value_states.dim() < 2 or value_states.shape[-1] == 0:
                raise ValueError(
                    f"value_states must have shape [..., dh] with at least 2 dims and dh >= 1, "
                    f"got {tuple(value_states.shape)}"
                )
            if (
                attention_weights is not None
                and value_states.dim() >= 3
                and value_states.shape[0] != attention_weights.shape[0]
            ):
                raise ValueError(
                    f"value_states of shape {tuple(value_states.shape)} does not match "
                    f"attention_weights of shape {tuple(attention_weights.shape)}: the batch sizes "
                    f"(first dims) must be equal"
                )
        attn_values = None
        if attention_weights is not None:
            attn_values, st = self._attention(attention_weights)
            names, pos = self._attn if value_states is None else self._attn_no_nf
            self._add(names, attn_values, pos)
            self._add(_ROWSUM_ADD[0], st.sums, _ROWSUM_ADD[1])
        if attention_params is not None:
            names, pos = self._param
            self._add(names, self._params.update_values(attention_params), pos)
        if value_states is not None:
            emb = ops.embedding_stats(value_states, self.cosine_samples, generator)
            nonfinite = emb.nonfinite_rows
            if attn_values is not None:
                nonfinite = nonfinite + attn_values[DIST["nonfinite_rows"]]
            names, pos = self._value
            values = torch.stack([emb.variance, emb.cosine_mean, torch.as_tensor(nonfinite, dtype=torch.float64)])
            self._add(names, values, pos)

    @torch.no_grad()
    def update_from_qk(
        self,
        q: Tensor,
        k: Tensor,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
        scale: float | None = None,
        attention_params: Mapping[str, Tensor] | None = None,
        *,
        enable_gqa: bool = False,
    ) -> None:
        """Record one batch from the arguments of ``scaled_dot_product_attention``: the same keys
        and values as ``update(softmax(q @ k^T * scale + mask), attention_params)``, without
        materialising the [B, H, N, Nk] weights; never synchronises with the device.

        q [B, Hq, N, d], k [B, Hk, Nk, d]; attn_mask: bool (True = attend) or additive float,
        broadcastable to [B, Hq, N, Nk]; is_causal: top-left aligned (query i sees keys j <= i),
        not with attn_mask; scale: None = 1 / sqrt(d); enable_gqa: head h reads kv head
        h // (Hq / Hk). attention_params: as in :meth:`update`.
        """
        for name, t in (("q", q), ("k", k)):
            check_float(t, name)
            if t.dim() != 4:
                want = "[B, Hq, N, d]" if name == "q" else "[B, Hk, Nk, d]"
                raise ValueError(f"{name} must have shape {want} (4 dims), got {tuple(t.shape)}")
        if k.shape[2] == 0:
            raise ValueError(f"k must hold at least one key (Nk >= 1), got shape {tuple(k.shape)}")
        if attn_mask is not None:
            if not isinstance(attn_mask, Tensor):
                raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
            if attn_mask.dtype != torch.bool and not attn_mask.dtype.is_floating_point:
                raise ValueError(
                    f"attn_mask must be bool (True = attend) or floating (added to the scores), got {attn_mask.dtype}"
                )
        if not isinstance(is_causal, bool):
            raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
        if is_causal and attn_mask is not None:
            raise ValueError("attn_mask and is_causal=True cannot be given together (as in scaled_dot_product_attention)")
        if scale is not None and (
            isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale) or scale <= 0
        ):
            raise ValueError(f"scale must be None or a positive finite number, got {scale!r}")
        if not isinstance(enable_gqa, bool):
            raise TypeError(f"enable_gqa must be a bool, got {type(enable_gqa).__name__}")
        self._check_ndim(4, tuple(q.shape[:3]) + (k.shape[2],))
        if attention_params is not None:
            self._params.check(attention_params)
        nk = k.shape[2]
        st = ops.attention_stats(
            q.detach(),
            k.detach(),
            attn_mask=None if attn_mask is None else attn_mask.detach(),
            is_causal=is_causal,
            scale=None if scale is None else float(scale),
            enable_gqa=enable_gqa,
            reduce_dim=1,
            topk=min(PATTERN_TOPK, nk) if self._jaccard else 0,
            tau=SPARSITY_TAU,
            heads=self._heads,
        )
        self._attn_ndim = 4
        names, pos = self._attn
        self._add(names, self._summary(st, nk, True), pos)
        if attention_params is not None:
            names, pos = self._param
            self._add(names, self._params.update_values(attention_params), pos)

    def _check_ndim(self, nd: int, shape: tuple[int, ...]) -> None:
        if self._attn_ndim is not None and nd != self._attn_ndim:
            raise ValueError(
                f"attention_weights must keep its number of dims within an epoch: got {nd}-D "
                f"{shape} after {self._attn_ndim}-D attention in this epoch "
                "(call reset() between epochs)"
            )

    def _check_attention(self, attn: Tensor) -> None:
        check_float(attn, "attention_weights")
        nd = attn.dim()
        if nd not in (3, 4) or attn.shape[-1] == 0:
            raise ValueError(
                f"attention_weights must have shape [B, H, N, Nk] or [B, N, Nk] with Nk >= 1, "
                f"got {tuple(attn.shape)}"
            )
        self._check_ndim(nd, tuple(attn.shape))

    def _attention(self, attn: Tensor) -> tuple[Tensor, ops.DistStats]:
        """The float64 [len(DIST_FIELDS)] summary of one attention tensor (updates the previous
        top-k) and its ``dist_stats`` result."""
        nd = attn.dim()
        self._attn_ndim = nd
        nk = attn.shape[-1]
        k = min(PATTERN_TOPK, nk) if self._jaccard else 0
        four = nd == 4
        if _HAS_HEADS:
            st = ops.dist_stats(
                attn, reduce_dim=1 if four else None, topk=k, tau=SPARSITY_TAU, heads=self._heads and four
            )
        else:
            st = ops.dist_stats(attn, reduce_dim=1 if four else None, topk=k, tau=SPARSITY_TAU)
        return self._summary(st, nk, four), st

    def _summary(self, st: ops.DistStats, nk: int, from_heads: bool) -> Tensor:
        """``dist_summary`` of one ``dist_stats`` / ``attention_stats`` result (updates the previous top-k)."""
        values, bitmap = summaries.dist_summary(
            st, nk, from_heads=from_heads, prev_top=self._prev_top, prev_bitmap=self._prev_bitmap, jaccard=self._jaccard
        )
        if self._jaccard:
            self._prev_top, self._prev_bitmap = st.topk, bitmap
        return values

    def get_epoch_stats(self, sync_dist: bool = False, process_group: Any = None) -> dict[str, float]:
        """Epoch values (the selected ``baseline/`` keys in catalogue order, then ``health/nonfinite_rows``).

        One device->host copy; ``sync_dist`` / ``process_group`` sum over the ranks first (global
        means). The previous top-k (the two Jaccards) and the previous attention parameters
        (``attention_weight_change``) stay per rank: each rank's batch values use its own.
        """
        return super().get_epoch_stats(sync_dist, process_group)

    def _epoch_values(self, raw: dict[str, float]) -> dict[str, float]:
        rowsum_warnings(raw, _ROWSUM, self._rowsum_warned, stacklevel=5)  # the caller of get_epoch_stats
        call_order_warning(raw, "attention_params", _CALL_ORDER, self._rowsum_warned, stacklevel=5)
        return super()._epoch_values(raw)

    def state_dict(self) -> dict[str, Any]:
        """Sums, previous parameters and previous top-k (so a resumed run continues its Jaccards)."""
        return super().state_dict()
