"""``SetDiagnostics``: set-routing learning diagnostics (METRICS.md section 1, ``ausa/`` keys).

A drop-in for the user's class: same constructor (no argument needed), same
``update_with_router_state`` / ``update`` / ``get_epoch_stats`` / ``reset``, same keys and
numbers, with no host synchronisation in ``update``. Every batch value stays on the device in
one accumulator; ``get_epoch_stats`` copies them to the host once.

The one deviation from the seed (documented, tested): each key is divided by the number of
updates that provided its input, not by the total number of updates.
"""

from __future__ import annotations

import math
import numbers
import warnings
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
    check_tensor,
    effective_rank_mean,
    nan,
    raise_flags,
)
from fastdiag.ops import Slot
from fastdiag.ops import jaccard as _jaccard
from fastdiag.ops import usage as _usage

_DELTAS = {
    "ausa/delta_routing_entropy": "ausa/routing_entropy",
    "ausa/delta_set_variance": "ausa/set_embedding_variance",
    "ausa/delta_router_confidence": "ausa/router_confidence_mean",
}
_OUT_OF_RANGE = "_error/bank_indices_out_of_range"
_TOKEN_OVERFLOW = "_token_table/overflow"
_TOKEN_MAX = "_token_table/max_id"
DEFAULT_TOKEN_CAPACITY = 1 << 16


class _TokenTable:
    """Device table token id -> top-1 set of its last occurrence (routing consistency).

    Sizing without reading device data: the table is direct-mapped, slot = id % capacity, and
    stores the id with its set, so an id is "seen" only if its own id sits in its slot. With
    every id < capacity (``vocab_size`` given, or ids below the default 2^16) this is exactly
    the unbounded dict of the reference. An id >= capacity can evict another id sharing its
    slot (then counted as unseen: the value is approximate for that epoch); such ids are
    counted on device, and at ``get_epoch_stats`` (which reads them in its one host copy) the
    table grows to the next power of two above the largest id seen, rehashed on device, with a
    warning. Ties in one batch: the last occurrence in flat order wins, as in the reference
    (a scatter-max of positions picks one writer per slot, so writes never race).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.keys: Tensor | None = None  # int64 [capacity + 1]; -1 = empty; last slot = sink
        self.vals: Tensor | None = None  # int64 [capacity + 1]
        self.last: Tensor | None = None  # int64 [capacity + 1] scratch, all -1 between calls
        self.max_id: Tensor | None = None  # int64 0-d, largest valid id ever seen (-1: none)

    def _ensure(self, device: torch.device) -> None:
        if self.keys is None:
            size = self.capacity + 1
            self.keys = torch.full((size,), -1, dtype=torch.int64, device=device)
            self.vals = torch.full((size,), -1, dtype=torch.int64, device=device)
            self.max_id = torch.full((), -1, dtype=torch.int64, device=device)
        elif self.keys.device != device:
            self.keys, self.vals = self.keys.to(device), self.vals.to(device)
            self.max_id = self.max_id.to(device)
        if self.last is None or self.last.device != device or self.last.numel() != self.capacity + 1:
            self.last = torch.full((self.capacity + 1,), -1, dtype=torch.int64, device=device)

    def update(self, token_ids: Tensor, top1: Tensor) -> tuple[Tensor, Tensor]:
        """(consistency float64 0-d, NaN if no token was seen before; ids >= capacity count)."""
        ids = token_ids.reshape(-1).long()
        sets = top1.reshape(-1).long()
        device = ids.device
        self._ensure(device)
        cap = self.capacity
        valid = (ids >= 0) & (sets >= 0)
        slot = torch.where(valid, torch.remainder(ids, cap), cap)
        seen = valid & (self.keys[slot] == ids)
        same = seen & (self.vals[slot] == sets)
        value = same.sum().to(torch.float64) / seen.sum().to(torch.float64)
        pos = torch.arange(ids.numel(), device=device)
        self.last.scatter_reduce_(0, slot, pos, reduce="amax")
        writer = valid & (self.last[slot] == pos)
        self.last.index_fill_(0, slot, -1)  # back to all -1 for the next call
        wslot = torch.where(writer, slot, cap)  # non-writers go to the sink slot
        self.keys.scatter_(0, wslot, ids)
        self.vals.scatter_(0, wslot, sets)
        masked_ids = torch.where(valid, ids, -1)
        if ids.numel():
            self.max_id = torch.maximum(self.max_id, masked_ids.amax())
        overflow = (masked_ids >= cap).sum().to(torch.float64)
        return value, overflow

    def grow(self, max_id: int) -> None:
        """Rehash into a capacity above ``max_id`` (a power of two, at least double)."""
        if self.keys is None:
            return
        new_cap = max(2 * self.capacity, 1 << max(0, int(max_id)).bit_length())
        keys, vals = self.keys[:-1], self.vals[:-1]
        dev = keys.device
        nk = torch.full((new_cap + 1,), -1, dtype=torch.int64, device=dev)
        nv = torch.full((new_cap + 1,), -1, dtype=torch.int64, device=dev)
        slot = torch.where(keys >= 0, torch.remainder(keys, new_cap), new_cap)
        nk.scatter_(0, slot, keys)
        nv.scatter_(0, slot, vals)
        self.capacity, self.keys, self.vals, self.last = new_cap, nk, nv, None

    def state_dict(self) -> dict[str, Any]:
        return {
            "capacity": self.capacity,
            "keys": None if self.keys is None else self.keys.clone(),
            "vals": None if self.vals is None else self.vals.clone(),
            "max_id": None if self.max_id is None else self.max_id.clone(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.capacity = int(state["capacity"])
        self.keys = None if state["keys"] is None else state["keys"].clone()
        self.vals = None if state["vals"] is None else state["vals"].clone()
        self.max_id = None if state["max_id"] is None else state["max_id"].clone()
        self.last = None


class SetDiagnostics:
    """Set-routing diagnostics (``ausa/`` keys of ``fastdiag.schema.SET_DIAGNOSTICS``).

    vocab_size: size of the routing-consistency token table (ids must be < vocab_size for an
                exact value from the first epoch; default 2^16, grown at epoch end if exceeded).
    cosine_samples: rows drawn for ``set_cosine_similarity_mean`` / ``_max`` (the seed: 100);
                None = exact over all B*S rows (METRICS.md's ``exact=True``; blockwise op).

    ``get_epoch_stats`` also returns ``health/nonfinite_rows``: the mean number per update of
    rows of ``router_probs`` / ``router_logits`` / ``set_attention_weights`` / ``set_embeddings``
    holding NaN or inf (those rows are excluded from every other value).
    """

    def __init__(self, *, vocab_size: int | None = None, cosine_samples: int | None = COSINE_SAMPLES) -> None:
        if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1):
            raise ValueError(f"vocab_size must be a positive int or None, got {vocab_size!r}")
        self.cosine_samples = check_cosine_samples(cosine_samples)
        self._epoch = _Epoch()
        self._params = _ParamTracker("router_params")
        self._tokens = _TokenTable(vocab_size or DEFAULT_TOKEN_CAPACITY)
        self._prev_epoch: dict[str, float] = {}
        self._prev_active: Tensor | None = None
        self._token_updates = 0  # updates with token_ids since reset()
        self._token_grown = False  # the token table grew for this epoch's overflow

    @property
    def prev_router_params(self) -> dict[str, Tensor] | None:
        """Device copies of the router parameters at the previous update (the seed's attribute)."""
        return self._params.prev

    @prev_router_params.setter
    def prev_router_params(self, value: Mapping[str, Tensor] | None) -> None:
        self._params.load_state_dict(value)

    def reset(self) -> None:
        """Start a new epoch: clears the sums and the previous active set.

        Keeps the previous parameters (weight change spans epochs), the token table and the
        previous epoch's values of the ``delta_*`` keys.
        """
        self._epoch.reset()
        self._prev_active = None
        self._token_updates = 0
        self._token_grown = False

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
        """Record one batch; never synchronises with the device.

        bank_indices: int [B, N] or [B, N, k] set index per token (< 0 = padding, >= num_sets
        is an error reported by ``get_epoch_stats``). num_sets: S.
        router_probs [B, N, S] softmax over sets, or router_logits [B, N, S] (softmax fused).
        set_embeddings [B, S, D]. router_params: name -> Parameter.
        set_attention_weights [B, N, S]. token_ids int [B, N] (ids < 0 ignored).
        generator: drives the sampled set cosine (the global CPU RNG when None, as the seed).
        """
        probs = self._validate(
            bank_indices, num_sets, router_probs, router_logits, set_embeddings,
            set_attention_weights, token_ids,
        )
        if router_params is not None:
            self._params.check(router_params)
        s_count = num_sets = int(num_sets)
        device = bank_indices.device
        v: dict[str, Tensor] = {}

        usage = _usage.usage_stats(bank_indices, s_count)
        ok = usage.total > 0
        nan0 = nan(device)
        v["ausa/active_set_ratio"] = torch.where(ok, usage.active_ratio, nan0)
        v["ausa/active_set_size_mean"] = usage.size_mean
        v["ausa/active_set_size_std"] = usage.size_std
        v["ausa/routing_entropy"] = usage.entropy
        v["ausa/routing_entropy_norm"] = usage.entropy_norm
        v["ausa/routing_gini"] = usage.gini
        v["ausa/routing_top1_prob_mean"] = usage.top1_share
        if self._prev_active is None:
            v["ausa/set_reuse_jaccard"] = nan0
        else:
            v["ausa/set_reuse_jaccard"] = _jaccard.bitmap_jaccard(usage.active, self._prev_active)
        self._prev_active = usage.active
        v["ausa/tokens_per_set_variance"] = usage.variance
        v[_OUT_OF_RANGE] = usage.out_of_range

        nonfinite: list[Tensor] = []
        top1 = None
        if probs is not None:
            st = ops.dist_stats(
                probs, from_logits=router_logits is not None, topk=1 if token_ids is not None else 0
            )
            v["ausa/router_confidence_mean"] = ops.mean(st.sums, Slot.MAX)
            conf_std = ops.std(st.sums, Slot.MAX, Slot.MAX_SQ)
            v["ausa/router_confidence_std"] = conf_std
            v["ausa/routing_confidence_std"] = conf_std
            v["ausa/top1_vs_random_kl"] = math.log(s_count) - ops.mean(st.sums, Slot.ENTROPY)
            nonfinite.append(st.sums[Slot.NONFINITE])
            if token_ids is not None:
                top1 = st.topk[..., 0]
        if token_ids is not None:
            if top1 is None:
                top1 = bank_indices[..., 0] if bank_indices.dim() == 3 else bank_indices
            before = self._tokens.max_id
            value, overflow = self._tokens.update(token_ids, top1)
            v["ausa/routing_consistency"] = value
            v[_TOKEN_OVERFLOW] = overflow
            # telescoping t*M_t - (t-1)*M_{t-1}: the epoch mean of these is M_n, the running
            # max id, which get_epoch_stats then reads in its one host copy (to grow the table)
            t = self._token_updates = self._token_updates + 1
            after = self._tokens.max_id.to(torch.float64)
            v[_TOKEN_MAX] = t * after - (t - 1) * (after if before is None else before.to(torch.float64))

        if set_embeddings is not None:
            emb = ops.embedding_stats(set_embeddings, self.cosine_samples, generator)
            v["ausa/set_embedding_variance"] = emb.variance
            v["ausa/set_embedding_norm_mean"] = emb.norm_mean
            v["ausa/set_cosine_similarity_mean"] = emb.cosine_mean
            v["ausa/set_cosine_similarity_max"] = emb.cosine_max
            v["ausa/set_rank_effective"] = effective_rank_mean(emb.finite_rows.view(set_embeddings.shape))
            nonfinite.append(emb.nonfinite_rows)

        if set_attention_weights is not None:
            st = ops.dist_stats(set_attention_weights)
            v["ausa/set_attention_entropy_mean"] = ops.mean(st.sums, Slot.ENTROPY)
            v["ausa/set_attention_top1_mean"] = ops.mean(st.sums, Slot.MAX)
            nonfinite.append(st.sums[Slot.NONFINITE])

        if router_params is not None:
            grad, norm, change = self._params.update(router_params)
            v["ausa/router_gradient_norm"] = grad
            v["ausa/router_param_norm"] = norm
            v["ausa/router_weight_change"] = change

        if nonfinite:
            v[NONFINITE_ROWS] = torch.stack([t.to(device, torch.float64) for t in nonfinite]).sum()
        self._epoch.add(v)

    def _validate(
        self,
        bank_indices: Tensor,
        num_sets: int,
        router_probs: Tensor | None,
        router_logits: Tensor | None,
        set_embeddings: Tensor | None,
        set_attention_weights: Tensor | None,
        token_ids: Tensor | None,
    ) -> Tensor | None:
        """Host-side shape and type checks (metadata only); returns the router probs/logits."""
        if isinstance(num_sets, (bool, Tensor)) or not isinstance(num_sets, numbers.Integral) or num_sets < 1:
            raise ValueError(f"num_sets must be a positive int (not a tensor), got {num_sets!r}")
        check_tensor(bank_indices, "bank_indices")
        if bank_indices.dtype.is_floating_point or bank_indices.dtype.is_complex or bank_indices.dtype == torch.bool:
            raise TypeError(f"bank_indices must be an integer tensor, got dtype {bank_indices.dtype}")
        if bank_indices.dim() not in (2, 3):
            raise ValueError(
                f"bank_indices must have shape [B, N] or [B, N, k], got {tuple(bank_indices.shape)}"
            )
        if router_probs is not None and router_logits is not None:
            raise ValueError("pass router_probs or router_logits, not both")
        probs = router_probs if router_probs is not None else router_logits
        name = "router_probs" if router_probs is not None else "router_logits"
        if probs is not None:
            check_float(probs, name)
            if probs.dim() < 1 or probs.shape[-1] != num_sets:
                raise ValueError(
                    f"{name} must have shape [B, N, num_sets={num_sets}] (last axis = num_sets), "
                    f"got {tuple(probs.shape)}"
                )
        if set_embeddings is not None:
            check_float(set_embeddings, "set_embeddings")
            if set_embeddings.dim() != 3:
                raise ValueError(
                    f"set_embeddings must have shape [B, S, D] (3-D), got {tuple(set_embeddings.shape)}"
                )
        if set_attention_weights is not None:
            check_float(set_attention_weights, "set_attention_weights")
            if set_attention_weights.dim() < 1 or set_attention_weights.shape[-1] == 0:
                raise ValueError(
                    f"set_attention_weights must have shape [B, N, S] with S >= 1, "
                    f"got {tuple(set_attention_weights.shape)}"
                )
        if token_ids is not None:
            check_tensor(token_ids, "token_ids")
            if token_ids.dtype.is_floating_point or token_ids.dtype.is_complex or token_ids.dtype == torch.bool:
                raise TypeError(f"token_ids must be an integer tensor, got dtype {token_ids.dtype}")
            routing = tuple(probs.shape[:-1]) if probs is not None else tuple(bank_indices.shape[:2])
            if tuple(token_ids.shape) != routing:
                raise ValueError(
                    f"token_ids must have shape {routing} (the [B, N] of the routing), "
                    f"got {tuple(token_ids.shape)}"
                )
        return probs

    def get_epoch_stats(self, sync_dist: bool = False, process_group: Any = None) -> dict[str, float]:
        """Epoch values (``ausa/`` keys in catalogue order, then ``health/nonfinite_rows``).

        One device->host copy. ``sync_dist`` / ``process_group``: sum the accumulator over the
        ranks first (global means over every rank's batch values). State that is not a sum stays
        per rank: the previous active set (``set_reuse_jaccard``), the token table
        (``routing_consistency``) and the previous router parameters (``router_weight_change``):
        each rank's batch values use its own.
        Also advances the ``delta_*`` epoch (one call = one epoch, as the seed).
        Raises ValueError if ``bank_indices`` held an entry >= num_sets since ``reset()``.
        """
        tokens = self._tokens
        raw = self._epoch.compute(sync_dist, process_group)
        raise_flags(
            raw,
            {_OUT_OF_RANGE: "bank_indices must be < num_sets (or < 0 for padding); an update of "
             "this epoch held an entry >= num_sets (those entries were not counted)"},
        )
        max_id = raw.get(_TOKEN_MAX, 0.0)
        # the overflow count stays in the sums until reset(): grow once for it, then again only
        # for an id beyond the grown table (not at every call of an epoch that is not reset)
        if raw.get(_TOKEN_OVERFLOW, 0.0) > 0 and (not self._token_grown or max_id >= tokens.capacity):
            self._token_grown = True
            old = tokens.capacity
            tokens.grow(int(max_id) if math.isfinite(max_id) else 0)
            warnings.warn(
                f"token_ids reached {int(max_id)} >= the routing-consistency table capacity {old}: "
                f"routing_consistency was approximate this epoch; the table now holds "
                f"{tokens.capacity} ids (pass SetDiagnostics(vocab_size=...) to size it up front)",
                RuntimeWarning,
                stacklevel=2,
            )
        keys = (*schema.SET_DIAGNOSTICS, NONFINITE_ROWS)
        out = self._epoch.provided_values(raw, keys)
        for delta_key, base_key in _DELTAS.items():
            if base_key in out:
                out[delta_key] = out[base_key] - self._prev_epoch.get(base_key, math.nan)
        self._prev_epoch = {base: out[base] for base in _DELTAS.values() if base in out}
        return {k: out[k] for k in keys if k in out}  # the deltas in catalogue order

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue its sums, deltas, Jaccards and table."""
        return {
            "version": 1,
            "epoch": self._epoch.state_dict(),
            "prev_router_params": self._params.state_dict(),
            "prev_active": None if self._prev_active is None else self._prev_active.clone(),
            "prev_epoch": dict(self._prev_epoch),
            "token_table": self._tokens.state_dict(),
            "token_updates": self._token_updates,
            "token_grown": self._token_grown,
            "cosine_samples": self.cosine_samples,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self._epoch.load_state_dict(state_dict["epoch"])
        self._params.load_state_dict(state_dict["prev_router_params"])
        prev = state_dict["prev_active"]
        self._prev_active = None if prev is None else prev.clone()
        self._prev_epoch = dict(state_dict["prev_epoch"])
        self._tokens.load_state_dict(state_dict["token_table"])
        self._token_updates = int(state_dict["token_updates"])
        self._token_grown = bool(state_dict.get("token_grown", False))
        self.cosine_samples = check_cosine_samples(state_dict["cosine_samples"])
