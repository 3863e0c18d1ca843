"""``SetDiagnostics``: set-routing learning diagnostics (docs/metrics.md §1, ``ausa/`` keys).

A drop-in for the user's class: same constructor (no argument needed), same
``update_with_router_state`` / ``update`` / ``get_epoch_stats`` / ``reset``, same keys and
numbers, with no host synchronisation in ``update``. Every batch value stays on the device in
one accumulator; ``get_epoch_stats`` copies them to the host once.

The one deviation from the original classes (documented, tested): each key is divided by the number of
updates that provided its input, not by the total number of updates.
"""

from __future__ import annotations

import functools
import math
import numbers
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from fastdiag import ops, schema
from fastdiag.diagnostics._base import (
    call_order_warning,
    check_cosine_samples,
    check_float,
    check_tensor,
    report_flags,
    rowsum_warnings,
)
from fastdiag.diagnostics.base import Diagnostics
from fastdiag.diagnostics.params import ParamTracker
from fastdiag.ops import Slot, summaries
from fastdiag.ops.embedding import EMBEDDING_FIELDS, embedding_raw
from fastdiag.ops.spectral import NUM_STATS, spectral_raw
from fastdiag.ops.summaries import DIST, PARAM_FIELDS, USAGE
from fastdiag.ops.token_table import MAX_TOKEN_CAPACITY, TokenTable
from fastdiag.schema import COSINE_SAMPLES, DEFAULT_TOKEN_CAPACITY, NONFINITE_ROWS, SET_DELTAS

_OUT_OF_RANGE = "_error/bank_indices_out_of_range"
_TOKEN_OVERFLOW = "_token_table/overflow"
_TOKEN_MAX = "_token_table/max_id"
OUT_OF_RANGE_KEY = "health/indices_out_of_range"  # mean number per update of bank_indices >= num_sets
TOKEN_OVERFLOW_KEY = "health/token_table_overflow"  # mean number per update of token ids >= capacity
# internal row-sum checks (sum of |row sum - 1| and number of rows, both means per update)
_ROWSUM = {
    "router_probs": ("_rowsum/router_probs", "_rows/router_probs", ": pass router_logits= for logits"),
    "set_attention_weights": ("_rowsum/set_attention_weights", "_rows/set_attention_weights", ""),
}
_TokenTable = TokenTable  # the old private name

# (key, field) of each part's summary vector
_USAGE = tuple(
    (k, USAGE[f])
    for k, f in (
        ("ausa/active_set_ratio", "active_ratio"),
        ("ausa/active_set_size_mean", "size_mean"),
        ("ausa/active_set_size_std", "size_std"),
        ("ausa/routing_entropy", "entropy"),
        ("ausa/routing_entropy_norm", "entropy_norm"),
        ("ausa/routing_gini", "gini"),
        ("ausa/routing_top1_prob_mean", "top1_share"),
        ("ausa/set_reuse_jaccard", "reuse_jaccard"),
        ("ausa/tokens_per_set_variance", "variance"),
        (_OUT_OF_RANGE, "out_of_range"),
    )
)
_ROUTER = tuple(
    (k, DIST[f])
    for k, f in (
        ("ausa/router_confidence_mean", "top1_mean"),
        ("ausa/router_confidence_std", "top1_std"),
        ("ausa/routing_confidence_std", "top1_std"),
        ("ausa/top1_vs_random_kl", "kl_uniform"),
    )
)
_SET_ATTENTION = tuple(
    (k, DIST[f])
    for k, f in (
        ("ausa/set_attention_entropy_mean", "entropy_mean"),
        ("ausa/set_attention_top1_mean", "top1_mean"),
    )
)
_EMBEDDING_KEYS = (
    "ausa/set_embedding_variance",
    "ausa/set_embedding_norm_mean",
    "ausa/set_cosine_similarity_mean",
    "ausa/set_cosine_similarity_max",
    "ausa/set_rank_effective",
)
_PARAM_KEYS = ("ausa/router_gradient_norm", "ausa/router_param_norm", "ausa/router_weight_change")
# internal: call-order flags of the parameter norms (summaries.PARAM_FIELDS positions 3, 4)
_CALL_ORDER = ("_params/gradient_missing", "_params/moved")
_TOKEN_KEYS = ("ausa/routing_consistency", _TOKEN_OVERFLOW, _TOKEN_MAX)
_NF = DIST["nonfinite_rows"]


# each part of an update: (its value vector's length, (key, position) pairs, position of its
# non-finite row count or None); "embeddings" is the embedding_raw vector then the spectral one
_PARTS: dict[str, tuple[int, tuple[tuple[str, int], ...], int | None]] = {
    "usage": (len(USAGE), _USAGE, None),
    "router": (len(DIST), _ROUTER, _NF),
    "tokens": (len(_TOKEN_KEYS), tuple((k, i) for i, k in enumerate(_TOKEN_KEYS)), None),
    "embeddings": (
        len(EMBEDDING_FIELDS) + NUM_STATS,
        (
            *((k, EMBEDDING_FIELDS.index(f)) for k, f in zip(
                _EMBEDDING_KEYS[:4], ("variance", "norm_mean", "cosine_mean", "cosine_max"), strict=True
            )),
            (_EMBEDDING_KEYS[4], len(EMBEDDING_FIELDS)),  # the spectral vector's effective rank
        ),
        EMBEDDING_FIELDS.index("nonfinite_rows"),
    ),
    "set_attention": (len(DIST), _SET_ATTENTION, _NF),
    "params": (
        len(PARAM_FIELDS),
        (*((k, i) for i, k in enumerate(_PARAM_KEYS)), (_CALL_ORDER[0], 3), (_CALL_ORDER[1], 4)),
        None,
    ),
    # the dist_stats sums of router_probs / set_attention_weights: row-sum error and row count
    **{
        f"rowsum:{name}": (Slot.NUM, ((err, Slot.ROWSUM_ERR), (rows, Slot.COUNT)), None)
        for name, (err, rows, _) in _ROWSUM.items()
    },
}


def _mean_weights(_: str, b: int, device: torch.device) -> Tensor:
    return torch.full((b,), 1.0 / b, dtype=torch.float64, device=device)


def _index(positions: tuple[int, ...], device: torch.device) -> Tensor:
    return torch.tensor(positions, dtype=torch.long, device=device)


@functools.cache
def _layout(kinds: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[int, ...], tuple[int, ...]]:
    """(names, their positions in the concatenated part vectors, the positions of the non-finite
    row counts) for the parts ``kinds``, in that order. With one non-finite count, it is one of
    the names; with several, the caller sums them."""
    names: list[str] = []
    positions: list[int] = []
    nonfinite: list[int] = []
    offset = 0
    for kind in kinds:
        length, pairs, nf = _PARTS[kind]
        names.extend(k for k, _ in pairs)
        positions.extend(offset + i for _, i in pairs)
        if nf is not None:
            nonfinite.append(offset + nf)
        offset += length
    if len(nonfinite) == 1:
        names.append(NONFINITE_ROWS)
        positions.append(nonfinite[0])
    return tuple(names), tuple(positions), tuple(nonfinite)


class SetDiagnostics(Diagnostics):
    """Set-routing diagnostics (``ausa/`` keys of ``fastdiag.schema.SET_DIAGNOSTICS``).

    vocab_size: size of the routing-consistency token table, and its maximum: ids < vocab_size
                give the exact value; ids >= vocab_size are hashed into the table (approximate
                value, one warning per object) and counted in ``health/token_table_overflow``.
                Default None: 2^16 slots, grown at an epoch end that saw a larger id up to
                ``fastdiag.ops.token_table.MAX_TOKEN_CAPACITY`` (2^22) slots, never beyond (a
                token id never sizes an allocation); larger ids are hashed and counted the same way.
    cosine_samples: rows drawn for ``set_cosine_similarity_mean`` / ``_max`` (the original class: 100);
                None = exact over all B*S rows (exact; blockwise op).

    ``get_epoch_stats`` also returns ``health/nonfinite_rows``: the mean number per update of
    rows of ``router_probs`` / ``router_logits`` / ``set_attention_weights`` / ``set_embeddings``
    holding NaN or inf (those rows are excluded from every other value); and, only when > 0,
    ``health/indices_out_of_range`` (mean number per update of ``bank_indices`` entries >=
    num_sets, excluded, with a warning at every call) and ``health/token_table_overflow`` (mean
    number per update of token ids beyond the table's capacity).
    """

    def __init__(self, *, vocab_size: int | None = None, cosine_samples: int | None = COSINE_SAMPLES) -> None:
        if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1):
            raise ValueError(f"vocab_size must be a positive int or None, got {vocab_size!r}")
        super().__init__()
        self.cosine_samples = check_cosine_samples(cosine_samples)
        self.add_state("_params", ParamTracker("router_params"), reset=False)
        self.add_state("_tokens", TokenTable(vocab_size or DEFAULT_TOKEN_CAPACITY), reset=False)
        self.add_state("_prev_epoch", {}, reset=False)  # previous epoch values of the delta_* bases
        self.add_state("_prev_active", None)
        self.add_state("_token_updates", 0)  # updates with token_ids since reset()
        self.add_state("_token_grown", False)  # the token table grew for this epoch's overflow
        self._vocab_size = vocab_size
        self._token_limit = vocab_size or MAX_TOKEN_CAPACITY  # the table's maximum capacity
        self._token_capped = False  # the table-at-its-maximum warning was given (once per object)
        self._rowsum_warned: set[str] = set()  # the row-sum warnings given (once per object)
        self._constants: dict[tuple[Any, ...], Tensor] = {}  # small device constants, cached

    def metric_keys(self) -> tuple[str, ...]:
        return (*schema.SET_DIAGNOSTICS, NONFINITE_ROWS)

    @property
    def prev_router_params(self) -> dict[str, Tensor] | None:
        """Device copies of the router parameters at the previous update (the original attribute)."""
        return self._params.prev

    @prev_router_params.setter
    def prev_router_params(self, value: Mapping[str, Tensor] | None) -> None:
        self._params.load_state_dict(value)

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
        generator: drives the sampled set cosine (the global CPU RNG when None, as the original class).
        """
        probs = self._validate(
            bank_indices, num_sets, router_probs, router_logits, set_embeddings,
            set_attention_weights, token_ids,
        )
        if router_params is not None:
            self._params.check(router_params)
        s_count = int(num_sets)
        # every part's value vector, concatenated once and accumulated with one op (the layout
        # of the concatenation, cached per combination of inputs, says which key takes which entry)
        parts: list[Tensor] = []
        kinds: list[str] = []
        values, self._prev_active = summaries.usage_summary(bank_indices, s_count, self._prev_active)
        parts.append(values)
        kinds.append("usage")

        top1 = None
        if probs is not None:
            st = ops.dist_stats(
                probs, from_logits=router_logits is not None, topk=1 if token_ids is not None else 0
            )
            parts.append(summaries.dist_summary(st, s_count)[0])
            kinds.append("router")
            if router_logits is None:  # probabilities: their row-sum error is checked at the epoch end
                parts.append(st.sums)
                kinds.append("rowsum:router_probs")
            top1 = st.topk  # [B, N, 1]: the token table reads the first choice
        if token_ids is not None:
            if top1 is None:
                top1 = bank_indices  # [B, N] or [B, N, k]: the first choice
            # t-th update with token_ids: the table's running-max term telescopes so that the
            # epoch mean of the terms is the running max id, which get_epoch_stats then reads in
            # its one host copy (to grow the table)
            self._token_updates += 1
            parts.append(self._tokens.update_values(token_ids, top1, self._token_updates))
            kinds.append("tokens")

        if set_embeddings is not None:
            values, clean = embedding_raw(set_embeddings, self.cosine_samples, generator)
            parts.append(values)
            # mean over the B matrices of every spectral statistic (entry 0: the effective rank),
            # as a product with cached weights 1/B (one small GEMM; cheaper than mean(0))
            stats = spectral_raw(clean)[0]
            parts.append(self._cached(("mean", stats.shape[0], stats.device), _mean_weights) @ stats)
            kinds.append("embeddings")

        if set_attention_weights is not None:
            st = ops.dist_stats(set_attention_weights)
            parts.append(summaries.dist_summary(st, set_attention_weights.shape[-1])[0])
            parts.append(st.sums)
            kinds.extend(("set_attention", "rowsum:set_attention_weights"))

        if router_params is not None:
            parts.append(self._params.update_values(router_params))
            kinds.append("params")

        names, positions, nonfinite = _layout(tuple(kinds))
        values = torch.cat(parts) if len(parts) > 1 else parts[0]
        if len(nonfinite) > 1:  # the non-finite rows of several inputs: their sum
            index = self._cached((nonfinite, values.device), _index)
            self._add((NONFINITE_ROWS,), values.index_select(0, index).sum(0, keepdim=True))
        self._add(names, values, positions)

    def _capped_message(self) -> str:
        limit = self._token_limit
        bound = f"vocab_size={limit}" if self._vocab_size is not None else f"the maximum capacity {limit}"
        return (
            f"ids >= {bound} of the routing-consistency table are hashed into it (routing_consistency "
            f"is approximate), counted in {TOKEN_OVERFLOW_KEY}"
        )

    def _cached(self, key: tuple[Any, ...], make: Any) -> Tensor:
        """The device constant ``make(*key)``, made once per key."""
        value = self._constants.get(key)
        if value is None:
            value = self._constants[key] = make(*key)
        return value

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
        b, n = bank_indices.shape[:2]
        against = f"to match bank_indices of shape {tuple(bank_indices.shape)} and num_sets={num_sets}"

        def check_routing(x: Tensor, name: str) -> None:
            if tuple(x.shape) != (b, n, num_sets):
                raise ValueError(
                    f"{name} must have shape [B, N, num_sets] = {(b, n, int(num_sets))} {against}, "
                    f"got {tuple(x.shape)}"
                )

        if router_probs is not None and router_logits is not None:
            raise ValueError("pass router_probs or router_logits, not both")
        probs = router_probs if router_probs is not None else router_logits
        name = "router_probs" if router_probs is not None else "router_logits"
        if probs is not None:
            check_float(probs, name)
            check_routing(probs, name)
        if set_embeddings is not None:
            check_float(set_embeddings, "set_embeddings")
            shape = tuple(set_embeddings.shape)
            if len(shape) != 3 or shape[:2] != (b, num_sets) or shape[2] == 0:
                raise ValueError(
                    f"set_embeddings must have shape [B, num_sets, D] = {(b, int(num_sets))} + (D,) "
                    f"with D >= 1 {against}, got {shape}"
                )
        if set_attention_weights is not None:
            check_float(set_attention_weights, "set_attention_weights")
            check_routing(set_attention_weights, "set_attention_weights")
        if token_ids is not None:
            check_tensor(token_ids, "token_ids")
            if token_ids.dtype.is_floating_point or token_ids.dtype.is_complex or token_ids.dtype == torch.bool:
                raise TypeError(f"token_ids must be an integer tensor, got dtype {token_ids.dtype}")
            if tuple(token_ids.shape) != (b, n):
                raise ValueError(
                    f"token_ids must have shape [B, N] = {(b, n)} (the [B, N] of the routing) {against}, "
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
        Also advances the ``delta_*`` epoch (one call = one epoch, as the original class).
        Entries of ``bank_indices`` >= num_sets since ``reset()`` were excluded: they are
        reported in ``health/indices_out_of_range`` (mean number per update) and a RuntimeWarning
        at every call, the other statistics are returned. Rows of ``router_probs`` /
        ``set_attention_weights`` not summing to 1 (mean |sum - 1| > 1e-3: logits passed as
        probabilities) give one RuntimeWarning per object.
        """
        return super().get_epoch_stats(sync_dist, process_group)

    def _epoch_values(self, raw: dict[str, float]) -> dict[str, float]:
        """Error flags, token-table growth and the ``delta_*`` keys from the epoch means."""
        tokens = self._tokens
        health = report_flags(
            raw,
            {_OUT_OF_RANGE: (
                OUT_OF_RANGE_KEY,
                "bank_indices must be < num_sets (or < 0 for padding): this epoch's updates held "
                "{value:.4g} entries >= num_sets per update (mean); they were excluded from every "
                f"statistic and are reported in {OUT_OF_RANGE_KEY}",
            )},
            stacklevel=5,  # the caller of SetDiagnostics.get_epoch_stats
        )
        rowsum_warnings(raw, _ROWSUM, self._rowsum_warned, stacklevel=5)
        call_order_warning(raw, "router_params", _CALL_ORDER, self._rowsum_warned, stacklevel=5)
        max_id = raw.get(_TOKEN_MAX, 0.0)
        overflow = raw.get(_TOKEN_OVERFLOW, 0.0)
        if overflow > 0:
            health[TOKEN_OVERFLOW_KEY] = overflow
        # the overflow count stays in the sums until reset(): grow once for it, then again only
        # for an id beyond the grown table (not at every call of an epoch that is not reset);
        # never beyond the maximum capacity (vocab_size, or MAX_TOKEN_CAPACITY)
        limit = self._token_limit
        if overflow > 0 and tokens.capacity < limit and (not self._token_grown or max_id >= tokens.capacity):
            self._token_grown = True
            old = tokens.capacity
            tokens.grow(int(max_id) if math.isfinite(max_id) else 0, limit)
            message = (
                f"token_ids reached {int(max_id)} >= the routing-consistency table capacity {old}: "
                f"routing_consistency was approximate this epoch; the table now holds "
                f"{tokens.capacity} ids (pass SetDiagnostics(vocab_size=...) to size it up front)"
            )
            if max_id >= tokens.capacity:  # beyond the maximum as well: one warning says both
                self._token_capped = True
                message += f"; {self._capped_message()}"
            warnings.warn(message, RuntimeWarning, stacklevel=4)
        elif overflow > 0 and tokens.capacity >= limit and max_id >= tokens.capacity and not self._token_capped:
            self._token_capped = True
            warnings.warn(f"token_ids reached {int(max_id)}: {self._capped_message()}", RuntimeWarning, stacklevel=4)
        keys = self.metric_keys()
        out = {k: raw[k] for k in keys if k in self._provided and k in raw}
        for delta_key, base_key in SET_DELTAS.items():
            if base_key in out:
                out[delta_key] = out[base_key] - self._prev_epoch.get(base_key, math.nan)
        self._prev_epoch = {base: out[base] for base in SET_DELTAS.values() if base in out}
        return {**{k: out[k] for k in keys if k in out}, **health}  # the deltas in catalogue order
