"""``attention_stats``: dist_stats of SDPA's attention probabilities without materialising them.

``attention_stats(q, k, ...)`` returns the :class:`~fastdiag.ops.DistStats` that
``dist_stats(softmax(q @ k^T * scale + mask, -1), reduce_dim=reduce_dim, ...)`` returns, with
``torch.nn.functional.scaled_dot_product_attention``'s semantics for q [B, Hq, N, d],
k [B, Hk, Nk, d], ``attn_mask`` (bool, True = attend, or additive float; broadcastable to
[B, Hq, N, Nk]), ``is_causal`` (TOP-LEFT aligned as in SDPA: query i attends keys j <= i, also
when Nk != N), ``scale`` (None = 1 / sqrt(d)) and ``enable_gqa`` (head h reads kv head
h // (Hq / Hk)). Future mass counts keys j > i, local mass |j - i| <= window. A query row with
no attendable key (all masked) softmaxes to NaN: counted in ``Slot.NONFINITE`` and excluded,
like any non-finite row. ``row_mask`` (bool [B, N] with ``reduce_dim=1``, [B, Hq, N] with
``reduce_dim=None``): False rows (padding queries) count in ``Slot.MASKED``.

Nothing of size N x Nk is allocated for the whole tensor. Backends (``fastdiag.backends``):

* ``triton`` (``fastdiag.kernels.attention_stats``): flash-style, pass 1 per (b, h, query
  block) streams key blocks for each head's log-sum-exp, pass 2 per (b, query block)
  recomputes the scores of every head and accumulates the statistics; per-program float64
  partials, a fixed-order reduction.
* ``cpu`` / ``torch`` (``_attention_stats_torch``): query-chunked float32 slabs of at most
  ``SLAB_BYTES`` each, reduced by ``dist_stats`` on its own backend (the C++ kernel for the
  ``cpu`` entry, which needs the extension; the portable torch one for ``torch``).

Every implementation is a ``fastdiag::attention_stats_*`` custom op with a fake, so
``torch.compile(fullgraph=True, dynamic=True)`` traces one graph across sequence lengths.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastdiag import backends
from fastdiag.ops._attention_stats_layout import MAX_TOPK, SCHEMA, fake
from fastdiag.ops._attention_stats_torch import attention_stats_torch
from fastdiag.ops._dist_stats import DistStats

__all__ = ["SCHEMA", "attention_stats", "attention_stats_torch"]


@torch.library.custom_op("fastdiag::attention_stats_torch", mutates_args=())
def _torch_op(
    q: Tensor,
    k: Tensor,
    attn_mask: Tensor | None,
    row_mask: Tensor | None,
    is_causal: bool,
    scale: float | None,
    topk: int,
    tau: float,
    eps: float,
    window: int,
    reduce_heads: bool,
    want_rows: bool,
    want_heads: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return attention_stats_torch(
        q, k, attn_mask, row_mask, is_causal, scale, topk, tau, eps, window, reduce_heads,
        want_rows, want_heads,
    )


_torch_op.register_fake(fake)


def _triton_impl():
    from fastdiag.kernels.attention_stats import attention_stats_triton

    return attention_stats_triton


backends.register(
    "attention_stats",
    {
        "triton": backends.Impl(
            _triton_impl, devices=("cuda",), dtypes=(torch.float32, torch.float16, torch.bfloat16)
        ),
        # the same chunked path; its dist_stats calls run on the C++ kernel (needs the extension)
        "cpu": backends.Impl(lambda: _torch_op, devices=("cpu",), kernel="dist_stats_cpu"),
        "torch": backends.Impl(lambda: _torch_op),
    },
)

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _validate(q, k, attn_mask, is_causal, scale, enable_gqa, reduce_dim, topk, window, row_mask):
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dim() != 4:
        raise ValueError(f"q must have shape [B, Hq, N, d] (4 dims), got shape {_shape(q)}")
    if k.dim() != 4:
        raise ValueError(f"k must have shape [B, Hk, Nk, d] (4 dims), got shape {_shape(k)}")
    for name, t in (("q", q), ("k", k)):
        if t.dtype not in _FLOATS:
            raise ValueError(
                f"{name} must be float32, bfloat16, float16 or float64, got {t.dtype} "
                f"(shape {_shape(t)})"
            )
    b, hq, n, d = q.shape
    if k.device != q.device:
        raise ValueError(f"k must be on q's device {q.device}, got {k.device}")
    if k.shape[0] != b:
        raise ValueError(f"k must have q's batch size B={b}: shape [{b}, Hk, Nk, {d}], got {_shape(k)}")
    if k.shape[3] != d:
        raise ValueError(f"k must have q's head dim d={d}: shape [{b}, Hk, Nk, {d}], got {_shape(k)}")
    hk = k.shape[1]
    if hk != hq:
        if not enable_gqa:
            raise ValueError(
                f"k must have q's {hq} heads (shape [{b}, {hq}, Nk, {d}]) unless enable_gqa=True, "
                f"got shape {_shape(k)}"
            )
        if hk == 0 or hq % hk != 0:
            raise ValueError(
                f"k's head count must divide q's {hq} heads with enable_gqa=True, got k of shape "
                f"{_shape(k)}"
            )
    nk = k.shape[2]
    if nk == 0:
        raise ValueError(f"k needs at least one key, shape [{b}, {hk}, Nk >= 1, {d}], got {_shape(k)}")
    if d == 0:
        raise ValueError(f"q and k need a non-empty head dim d, got q {_shape(q)} and k {_shape(k)}")
    if attn_mask is not None:
        if not isinstance(attn_mask, Tensor):
            raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
        if is_causal:
            raise ValueError(
                "attn_mask and is_causal=True cannot be given together (as in "
                "scaled_dot_product_attention): pass one of them"
            )
        want = (b, hq, n, nk)
        if attn_mask.dtype != torch.bool and not attn_mask.dtype.is_floating_point:
            raise ValueError(
                f"attn_mask must be bool (True = attend) or floating (added to the scores), got "
                f"{attn_mask.dtype} with shape {_shape(attn_mask)}"
            )
        ok = attn_mask.dim() <= 4
        if ok:
            try:
                ok = tuple(torch.broadcast_shapes(attn_mask.shape, want)) == want
            except RuntimeError:
                ok = False
        if not ok:
            raise ValueError(
                f"attn_mask must be broadcastable to [B, Hq, N, Nk] = {list(want)}, got shape "
                f"{_shape(attn_mask)}"
            )
        if attn_mask.device != q.device:
            raise ValueError(f"attn_mask must be on q's device {q.device}, got {attn_mask.device}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if reduce_dim is not None and reduce_dim not in (1, -3):
        raise ValueError(
            f"reduce_dim must be 1 (average the heads of [B, Hq, N, Nk]) or None, got {reduce_dim!r}"
        )
    if isinstance(topk, bool) or not isinstance(topk, int):
        raise TypeError(f"topk must be an int, got {type(topk).__name__}")
    if not 0 <= topk <= min(MAX_TOPK, nk):
        raise ValueError(f"topk must be in [0, min({MAX_TOPK}, Nk={nk})] for k of shape {_shape(k)}, got {topk}")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 0):
        raise ValueError(f"window must be a non-negative int or None, got {window!r}")
    if row_mask is not None:
        if not isinstance(row_mask, Tensor):
            raise TypeError(f"row_mask must be a torch.Tensor or None, got {type(row_mask).__name__}")
        want = [b, n] if reduce_dim is not None else [b, hq, n]
        if list(row_mask.shape) != want:
            raise ValueError(
                f"row_mask must have shape {want} ({'[B, N]' if reduce_dim is not None else '[B, Hq, N]'} "
                f"with reduce_dim={reduce_dim}), got {_shape(row_mask)}"
            )
        if row_mask.device != q.device:
            raise ValueError(f"row_mask must be on q's device {q.device}, got {row_mask.device}")


def attention_stats(
    q: Tensor,
    k: Tensor,
    *,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    reduce_dim: int | None = 1,
    topk: int = 0,
    tau: float = 0.1,
    eps: float = 1e-6,
    window: int | None = None,
    row_mask: Tensor | None = None,
    rows: bool = False,
    heads: bool = True,
) -> DistStats:
    """Every ``dist_stats`` row statistic of ``softmax(q @ k^T * scale + mask)``, never stored.

    q:          [B, Hq, N, d] queries; k: [B, Hk, Nk, d] keys (Hk = Hq, or dividing Hq with
                ``enable_gqa``); float32 / bfloat16 / float16 / float64 (scores in float32).
    attn_mask:  bool (True = attend) or floating (added), broadcastable to [B, Hq, N, Nk].
    is_causal:  query i attends keys j <= i (top-left, as SDPA); not with ``attn_mask``.
    scale:      score scale, None = 1 / sqrt(d).
    reduce_dim: 1 averages the heads while reading (rows [B, N]); None keeps every
                (b, h, i) as its own row ([B, Hq, N]).
    topk, tau, eps, window, rows, heads: as in ``dist_stats`` (query_offset 0).
    row_mask:   bool [B, N] (reduce_dim=1) or [B, Hq, N] (None); False rows are padding.

    Returns :class:`DistStats`; nothing is copied to the host.
    """
    _validate(q, k, attn_mask, is_causal, scale, enable_gqa, reduce_dim, topk, window, row_mask)
    q = q.detach()
    k = k.detach()
    mask = None
    if attn_mask is not None:
        mask = attn_mask.detach()
        while mask.dim() < 4:
            mask = mask.unsqueeze(0)  # a view: [N, Nk] -> [1, 1, N, Nk]
    rmask = None if row_mask is None else row_mask.detach().to(torch.bool)
    impl = backends.implementation("attention_stats", q.device, q.dtype)
    sums, head_sums, row_out, topk_out = impl(
        q,
        k,
        mask,
        rmask,
        bool(is_causal),
        None if scale is None else float(scale),
        int(topk),
        float(tau),
        float(eps),
        -1 if window is None else int(window),
        reduce_dim is not None,
        bool(rows),
        bool(heads),
    )
    return DistStats(sums, head_sums, row_out, topk_out)
