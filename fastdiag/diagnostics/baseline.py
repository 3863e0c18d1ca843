"""``BaselineAttentionDiagnostics``: token-attention diagnostics (METRICS.md section 2).

A drop-in for the user's class (``baseline/`` keys) that reads each attention tensor once:
one ``dist_stats`` pass averages the heads while reading and returns entropy, top-1, top-5
indices and the per-head entropy / sparsity sums; the top-5 Jaccards use device bitmaps.
No host synchronisation in ``update``; ``get_epoch_stats`` copies to the host once.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from fastdiag import ops, schema
from fastdiag.diagnostics._base import (
    COSINE_SAMPLES,
    NONFINITE_ROWS,
    _Epoch,
    _ParamTracker,
    check_cosine_samples,
    check_float,
    nan,
    normalised,
)
from fastdiag.ops import HeadSlot, Slot
from fastdiag.ops import jaccard as _jaccard

PATTERN_TOPK = 5  # k of the attention top-k Jaccards (the seed's top-5)
SPARSITY_TAU = 0.1  # attention_sparsity: share of per-head entries above this
EFFECTIVE_HEAD_ENTROPY = 0.9  # a head is effective when its mean H / log Nk is below this


class BaselineAttentionDiagnostics:
    """Token-attention diagnostics (``baseline/`` keys of ``fastdiag.schema.BASELINE_DIAGNOSTICS``).

    cosine_samples: rows of ``value_states`` drawn for ``value_cosine_similarity`` (seed: 100);
                None = exact over all rows (blockwise op).

    ``get_epoch_stats`` also returns ``health/nonfinite_rows``: the mean number per update of
    attention rows (B*N, any head) or value rows holding NaN or inf, excluded from every value.
    """

    def __init__(self, *, cosine_samples: int | None = COSINE_SAMPLES) -> None:
        self.cosine_samples = check_cosine_samples(cosine_samples)
        self._epoch = _Epoch()
        self._params = _ParamTracker("attention_params")
        self._prev_top: Tensor | None = None
        self._prev_bitmap: Tensor | None = None
        self._attn_ndim: int | None = None

    @property
    def prev_params(self) -> dict[str, Tensor] | None:
        """Device copies of the attention parameters at the previous update (the seed's attribute)."""
        return self._params.prev

    @prev_params.setter
    def prev_params(self, value: Mapping[str, Tensor] | None) -> None:
        self._params.load_state_dict(value)

    def reset(self) -> None:
        """Start a new epoch (keeps the previous parameters for the weight change)."""
        self._epoch.reset()
        self._prev_top = None
        self._prev_bitmap = None
        self._attn_ndim = None

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
        generator: drives the sampled value cosine (the global CPU RNG when None, as the seed).
        """
        if attention_weights is not None:
            self._check_attention(attention_weights)
        if attention_params is not None:
            self._params.check(attention_params)
        if value_states is not None:
            check_float(value_states, "value_states")
            if value_states.dim() < 2:
                raise ValueError(
                    f"value_states must have shape [..., dh] with at least 2 dims, got {tuple(value_states.shape)}"
                )
        v: dict[str, Tensor] = {}
        nonfinite: list[Tensor] = []
        if attention_weights is not None:
            nonfinite.append(self._attention(attention_weights, v))
        if attention_params is not None:
            grad, norm, change = self._params.update(attention_params)
            v["baseline/attention_gradient_norm"] = grad
            v["baseline/attention_param_norm"] = norm
            v["baseline/attention_weight_change"] = change
        if value_states is not None:
            emb = ops.embedding_stats(value_states, self.cosine_samples, generator)
            v["baseline/value_embedding_variance"] = emb.variance
            v["baseline/value_cosine_similarity"] = emb.cosine_mean
            nonfinite.append(emb.nonfinite_rows)
        if nonfinite:
            device = nonfinite[0].device
            v[NONFINITE_ROWS] = torch.stack([t.to(device, torch.float64) for t in nonfinite]).sum()
        self._epoch.add(v)

    def _check_attention(self, attn: Tensor) -> None:
        check_float(attn, "attention_weights")
        nd = attn.dim()
        if nd not in (3, 4) or attn.shape[-1] == 0:
            raise ValueError(
                f"attention_weights must have shape [B, H, N, Nk] or [B, N, Nk] with Nk >= 1, "
                f"got {tuple(attn.shape)}"
            )
        if self._attn_ndim is not None and nd != self._attn_ndim:
            raise ValueError(
                f"attention_weights must keep its number of dims within an epoch: got {nd}-D "
                f"{tuple(attn.shape)} after {self._attn_ndim}-D attention in this epoch "
                "(call reset() between epochs)"
            )

    def _attention(self, attention_weights: Tensor, v: dict[str, Tensor]) -> Tensor:
        """Add the attention keys of one update to ``v``; returns the non-finite row count."""
        attn = attention_weights
        nd = attn.dim()
        self._attn_ndim = nd
        nk = attn.shape[-1]
        heads = attn.shape[1] if nd == 4 else 1
        k = min(PATTERN_TOPK, nk)
        st = ops.dist_stats(attn, reduce_dim=1 if nd == 4 else None, topk=k, tau=SPARSITY_TAU)
        sums = st.sums
        count = sums[Slot.COUNT]
        device = sums.device

        h_mean = ops.mean(sums, Slot.ENTROPY)
        v["baseline/attention_entropy_mean"] = h_mean
        v["baseline/attention_entropy_norm"] = normalised(h_mean, nk)
        v["baseline/attention_top1_mean"] = ops.mean(sums, Slot.MAX)
        v["baseline/attention_top1_std"] = ops.std(sums, Slot.MAX, Slot.MAX_SQ)

        bitmap = _jaccard.index_bitmap(st.topk, nk)
        top = st.topk
        pattern = per_query = nan(device)
        if self._prev_bitmap is not None:
            pattern = _jaccard.bitmap_jaccard(bitmap, self._prev_bitmap)
            if self._prev_top.shape == top.shape:
                per_query = _jaccard.topk_jaccard_per_query(top, self._prev_top)
        v["baseline/attention_pattern_jaccard"] = pattern
        v["baseline/attention_topk_jaccard_per_query"] = per_query
        self._prev_top, self._prev_bitmap = top, bitmap

        if nd == 4:
            head_entropy = st.head_sums[:, HeadSlot.ENTROPY]  # [H] sums over valid rows
            gt_tau = st.head_sums[:, HeadSlot.GT_TAU].sum()
        else:  # one head: the head row is the row itself
            head_entropy = sums[Slot.ENTROPY].reshape(1)
            gt_tau = sums[Slot.GT_TAU]
        v["baseline/attention_sparsity"] = gt_tau / (count * heads * nk)
        v["baseline/attention_head_entropy_mean"] = head_entropy.sum() / (count * heads)
        per_head = normalised(head_entropy / count, nk)
        effective = (per_head < EFFECTIVE_HEAD_ENTROPY).to(torch.float64).mean()
        v["baseline/attention_effective_heads"] = torch.where(count > 0, effective, nan(device))
        return sums[Slot.NONFINITE]

    def get_epoch_stats(self, sync_dist: bool = False, process_group: Any = None) -> dict[str, float]:
        """Epoch values (``baseline/`` keys in catalogue order, then ``health/nonfinite_rows``).

        One device->host copy; ``sync_dist`` / ``process_group`` sum over the ranks first (global
        means). The previous top-k (the two Jaccards) and the previous attention parameters
        (``attention_weight_change``) stay per rank: each rank's batch values use its own.
        """
        raw = self._epoch.compute(sync_dist, process_group)
        return self._epoch.provided_values(raw, (*schema.BASELINE_DIAGNOSTICS, NONFINITE_ROWS))

    def state_dict(self) -> dict[str, Any]:
        """Sums, previous parameters and previous top-k (so a resumed run continues its Jaccards)."""
        return {
            "version": 1,
            "epoch": self._epoch.state_dict(),
            "prev_params": self._params.state_dict(),
            "prev_top": None if self._prev_top is None else self._prev_top.clone(),
            "prev_bitmap": None if self._prev_bitmap is None else self._prev_bitmap.clone(),
            "attn_ndim": self._attn_ndim,
            "cosine_samples": self.cosine_samples,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self._epoch.load_state_dict(state_dict["epoch"])
        self._params.load_state_dict(state_dict["prev_params"])
        top, bitmap = state_dict["prev_top"], state_dict["prev_bitmap"]
        self._prev_top = None if top is None else top.clone()
        self._prev_bitmap = None if bitmap is None else bitmap.clone()
        self._attn_ndim = state_dict["attn_ndim"]
        self.cosine_samples = check_cosine_samples(state_dict["cosine_samples"])

