"""Portable PyTorch implementation of ``fastdiag::dist_stats`` (the torch backend).

Vectorised, sync-free, and chunked over rows so the temporaries stay a bounded multiple of
one chunk, whatever the size of ``x4``: at most ``CHUNK_ELEMS`` input elements when every head
is used elementwise (per-head statistics, logits), and at most ``ROW_CHUNK_ELEMS`` elements of
the head-mean rows, which every statistic then reads a few times (kept cache-sized).

Cost notes (2-core CPU, [8, 12, 512, 512] float32): the head mean is one read of ``x4``; per
element of the mean row the passes are the logarithm of the entropy (the dearest), a few fused
reductions (sum, max, min, norm), two sign-based counts (a bool comparison is ~4x slower than
arithmetic) and two masked dot products for the future / local mass (a cached [C, N] mask per
chunk layout instead of a cumulative sum); top-k runs on exact int64 (value, index) keys.
Every elementwise temporary lives in scratch reused across chunks.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastdiag.ops._dist_stats_layout import HeadSlot, RowSlot, Slot, fake

CHUNK_ELEMS = 1 << 22  # input elements per chunk when every head is used elementwise
ROW_CHUNK_ELEMS = 1 << 19  # head-mean elements per chunk (2 MB of float32: cache-sized)
_TINY = torch.finfo(torch.float32).tiny

# per-row float32 columns reduced into the float64 sums (max-reduced ones handled apart)
_SUM_SLOTS = (
    Slot.ENTROPY,
    Slot.ENTROPY_SQ,
    Slot.MAX,
    Slot.MAX_SQ,
    Slot.SUMSQ,
    Slot.GT_TAU,
    Slot.GT_EPS,
    Slot.ROWSUM_ERR,
    Slot.FUTURE,
    Slot.LOCAL,
    Slot.ABS_DEV,
)


class _Work:
    """Reusable float32 scratch for the elementwise temporaries of one call: fresh multi-MB
    tensors per op cost a page fault per 4 KB page (glibc maps them anew), more than the op."""

    def __init__(self, device) -> None:
        self.device = device
        self.bufs: dict[str, Tensor] = {}

    def get(self, name: str, like: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        buf = self.bufs.get(name)
        if buf is None or buf.numel() < like.numel():
            buf = torch.empty(like.numel(), dtype=dtype, device=self.device)
            self.bufs[name] = buf
        return buf[: like.numel()].view(like.shape)


def _entr_sum(p: Tensor, work: _Work) -> Tensor:
    """sum_j -p_j log p_j over the last axis (0 log 0 = 0; negative entries contribute 0).

    As q log(q + tiny), q = max(p, 0): the same as q log q for every normal q (adding the
    smallest normal changes nothing), 0 for q = 0; vectorised log, unlike ``special.entr``."""
    q = torch.clamp_min(p, 0, out=work.get("a", p))
    return torch.add(q, _TINY, out=work.get("b", p)).log_().mul_(q).sum(-1).neg_()


def _sumsq(p: Tensor) -> Tensor:
    return torch.linalg.vector_norm(p, dim=-1).square()


def _count_gt(p: Tensor, t: float, work: _Work) -> Tensor:
    """#entries > t along the last axis, float32 (exact below 2^24 entries).

    As sum(sign(max(p - t, 0))): p - t > 0 exactly when p > t (IEEE subtraction of two floats
    is 0 only for equal ones), t rounded to float32 as in a comparison; arithmetic passes are
    several times faster than a bool comparison and its sum. NaN entries give NaN."""
    return torch.sub(p, t, out=work.get("a", p)).clamp_min_(0).sign_().sum(-1)


def _probs(chunk: Tensor, from_logits: bool) -> tuple[Tensor, Tensor | None]:
    """Per-head probabilities [a, G, c, N] (float32) and, for logits, per-row finiteness [a, c].

    Non-finite rows are not zeroed (that would cost a pass): their statistics come out NaN and
    are dropped by ``torch.where`` on the per-row values. A logits head is non-finite when its
    softmax normaliser is (NaN and +inf propagate into it, all -inf gives 0 / 0)."""
    xf = chunk.float()
    if from_logits:
        e = torch.exp(xf - xf.amax(dim=-1, keepdim=True))
        z = e.sum(dim=-1, keepdim=True)
        return e / z, torch.isfinite(z[..., 0]).all(1)
    return xf, None


def _topk_indices(p: Tensor, k: int, work: _Work) -> Tensor:
    """Top-k indices along the last axis of [R, N] rows, descending, ties to the lower index.

    Unique int64 keys make torch.topk's order exact: the float32 bits made order-preserving
    (negative floats flip their magnitude bits, as b ^ ((b >> 31) & 0x7fffffff): arithmetic,
    no bool mask) in the high half, the reversed index in the low half, so equal values rank
    the lower index first. ``+ 0.0`` folds -0.0 into +0.0. In place in reused scratch: the keys
    cost ~0.4x the int64 top-k, which itself is faster than a float32 one."""
    if k == 1:  # argmax returns the first maximal index
        return p.argmax(dim=-1, keepdim=True)
    bits = torch.add(p, 0.0, out=work.get("a", p)).view(torch.int32)
    flip = torch.bitwise_right_shift(bits, 31, out=work.get("b", p).view(torch.int32))
    bits ^= flip.bitwise_and_(0x7FFFFFFF)
    keys = work.get("keys", p, torch.int64).copy_(bits)
    keys <<= 32
    keys |= (1 << 32) - 1 - torch.arange(p.shape[-1], device=p.device, dtype=torch.int64)
    return torch.topk(keys, k, dim=-1, sorted=True).indices


class _Masks:
    """Float32 [c, N] masks of the future keys (j > q) and the local window (|j - q| <= w) of
    chunk rows, q = the row's query index + offset, cached per chunk layout (rows whose query
    indices repeat, e.g. every batch of [B, H, N, Nk], share one)."""

    def __init__(self, n: int, offset: int, window: int, query_len: int, device) -> None:
        self.cache: dict[tuple[int, int, int], tuple[Tensor, Tensor | None]] = {}
        self.cols = torch.arange(n, device=device, dtype=torch.int64)
        # bounds past either end of the row change nothing, so the Python-int bounds are
        # clamped there before they meet the int64 tensor (no overflow for any offset or window)
        far = query_len + n + 2

        def clamp(v: int) -> int:
            return max(-far, min(far, v))

        self.future_lo = clamp(offset + 1)
        self.local = (clamp(offset - window), clamp(offset + window)) if window >= 0 else None
        self.query_len = query_len

    def get(self, r0: int, r1: int) -> tuple[Tensor, Tensor | None]:
        q0 = r0 % self.query_len
        key = (q0, r1 - r0, 0)
        if key not in self.cache:
            qi = (torch.arange(r0, r1, device=self.cols.device) % self.query_len)[:, None]
            future = (self.cols >= qi + self.future_lo).float()
            local = None
            if self.local is not None:
                lo, hi = self.local
                local = ((self.cols >= qi + lo) & (self.cols <= qi + hi)).float()
            if len(self.cache) > 4:  # layouts that do not repeat: keep the memory bounded
                self.cache.clear()
            self.cache[key] = (future, local)
        return self.cache[key]


def dist_stats_torch(
    x4: Tensor,
    row_mask: Tensor | None,
    from_logits: bool,
    topk: int,
    tau: float,
    eps: float,
    window: int,
    query_offset: int,
    query_len: int,
    want_rows: bool,
    want_heads: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Torch backend of the canonical op; see ``fastdiag.ops._dist_stats`` for the contract.

    Without heads (``want_heads=False``) a probability row's finiteness is read off its head
    mean (its max and min): NaN / inf in any head reach the mean; finite heads whose float32
    sum overflows (entries beyond ~1e37) count as non-finite too, their statistics being inf."""
    a_dim, g_dim, c_dim, n = x4.shape
    dev = x4.device
    r_total = a_dim * c_dim
    head_sums = torch.full(
        (g_dim, HeadSlot.NUM), 0.0 if want_heads else float("nan"), dtype=torch.float64, device=dev
    )
    rows_out = torch.full(
        (r_total if want_rows else 0, RowSlot.NUM), float("nan"), dtype=torch.float32, device=dev
    )
    topk_out = torch.full((r_total, topk), -1, dtype=torch.int64, device=dev)
    if r_total == 0:
        return torch.zeros(Slot.NUM, dtype=torch.float64, device=dev), head_sums, rows_out, topk_out

    # rows per chunk: the head-mean chunk cache-sized; the input chunk bounded when every head
    # is used elementwise. Chunks are whole batches (a) or a row range inside one batch, so
    # each is one contiguous range of rows r = a * C + c.
    per_r = max(1, ROW_CHUNK_ELEMS // n)
    if want_heads or from_logits:
        per_r = max(1, min(per_r, CHUNK_ELEMS // max(1, g_dim * n)))
    per_a = max(1, per_r // c_dim) if per_r >= c_dim else 1
    c_step = c_dim if per_r >= c_dim else per_r
    masks = _Masks(n, query_offset, window, query_len, dev)
    work = _Work(dev)
    inv_n = 1.0 / n
    # per-row float32 statistics (columns: _SUM_SLOTS) and flags, reduced once after the loop:
    # O(rows) like the outputs, and a handful of ops instead of ~20 small ones per chunk
    stats = torch.zeros((r_total, len(_SUM_SLOTS)), dtype=torch.float32, device=dev)
    finite_all = torch.empty(r_total, dtype=torch.bool, device=dev)
    col = {slot: i for i, slot in enumerate(_SUM_SLOTS)}
    for a0 in range(0, a_dim, per_a):
        a1 = min(a_dim, a0 + per_a)
        for c0 in range(0, c_dim, c_step):
            c1 = min(c_dim, c0 + c_step)
            r0 = a0 * c_dim + c0
            r1 = r0 + (a1 - a0) * (c1 - c0)
            ph, finite = _probs(x4[a0:a1, :, c0:c1, :], from_logits)  # [a, G, c, N]
            if g_dim > 1:  # the mean into reused scratch (no fresh pages per chunk)
                p = torch.mean(ph, dim=1, out=work.get("p", ph[:, 0])).view(r1 - r0, n)
            else:
                p = ph[:, 0].reshape(r1 - r0, n)
            pmax = p.amax(-1)
            head_max = ph.amax(-1) if want_heads and g_dim > 1 else None  # [a, G, c]
            if finite is None:  # probabilities
                if head_max is not None:
                    finite = (torch.isfinite(head_max) & torch.isfinite(ph.amin(-1))).all(1)
                else:  # NaN propagates into max and min
                    finite = torch.isfinite(pmax) & torch.isfinite(p.amin(-1))
            finite_all[r0:r1] = finite.reshape(-1)

            st = stats[r0:r1]
            ent = _entr_sum(p, work)
            st[:, col[Slot.ENTROPY]] = ent
            torch.mul(ent, ent, out=st[:, col[Slot.ENTROPY_SQ]])
            st[:, col[Slot.MAX]] = pmax
            torch.mul(pmax, pmax, out=st[:, col[Slot.MAX_SQ]])
            st[:, col[Slot.SUMSQ]] = _sumsq(p)
            st[:, col[Slot.GT_TAU]] = _count_gt(p, tau, work)
            st[:, col[Slot.GT_EPS]] = _count_gt(p, eps, work)
            st[:, col[Slot.ROWSUM_ERR]] = p.sum(-1).sub_(1.0).abs_()
            future_mask, local_mask = masks.get(r0, r1)
            st[:, col[Slot.FUTURE]] = torch.mul(p, future_mask, out=work.get("a", p)).sum(-1)
            if local_mask is not None:
                st[:, col[Slot.LOCAL]] = torch.mul(p, local_mask, out=work.get("a", p)).sum(-1)
            # (vector_norm of order 1 is 5x slower)
            abs_dev = torch.sub(p, inv_n, out=work.get("a", p)).abs_().sum(-1).div_(n)
            st[:, col[Slot.ABS_DEV]] = abs_dev

            if want_heads and g_dim > 1:
                per_head = torch.stack(
                    [_entr_sum(ph, work), head_max, _count_gt(ph, tau, work), _sumsq(ph)], dim=-1
                )  # [a, G, c, 4]
                hv = finite.view(a1 - a0, 1, c1 - c0, 1)
                if row_mask is not None:
                    hv = hv & row_mask[r0:r1].view(a1 - a0, 1, c1 - c0, 1)
                part = torch.where(hv, per_head, 0.0).double().sum((0, 2))
                head_sums = head_sums + part
            if topk > 0:
                topk_out[r0:r1] = _topk_indices(p, topk, work)

    allowed = row_mask if row_mask is not None else torch.ones_like(finite_all)
    valid = finite_all & allowed
    kept = torch.where(valid[:, None], stats, 0.0).double()  # drops NaN rows
    sums = torch.zeros(Slot.NUM, dtype=torch.float64, device=dev)
    sums[list(_SUM_SLOTS)] = kept.sum(0)
    sums[[Slot.ROWSUM_ERR_MAX, Slot.FUTURE_MAX]] = kept[
        :, [col[Slot.ROWSUM_ERR], col[Slot.FUTURE]]
    ].amax(0)
    sums[[Slot.COUNT, Slot.NONFINITE, Slot.MASKED]] = torch.stack(
        [valid, allowed & ~finite_all, ~allowed]
    ).double().sum(1)
    if want_heads and g_dim == 1:  # the one head is the row itself
        cols = [col[Slot.ENTROPY], col[Slot.MAX], col[Slot.GT_TAU], col[Slot.SUMSQ]]
        head_sums = kept[:, cols].sum(0, keepdim=True)
    if want_rows:
        cols = [col[Slot.ENTROPY], col[Slot.MAX], col[Slot.GT_EPS], col[Slot.SUMSQ]]
        rows_out = torch.where(valid[:, None], stats[:, cols], float("nan"))
    if topk > 0:
        topk_out.masked_fill_(~valid[:, None], -1)
    return sums, head_sums, rows_out, topk_out


# the torch backend as a custom op: torch.compile traces through its fake, not its Python
@torch.library.custom_op("fastdiag::dist_stats_torch", mutates_args=())
def dist_stats_torch_op(
    x4: Tensor,
    row_mask: Tensor | None,
    from_logits: bool,
    topk: int,
    tau: float,
    eps: float,
    window: int,
    query_offset: int,
    query_len: int,
    want_rows: bool,
    want_heads: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return dist_stats_torch(
        x4,
        row_mask,
        from_logits,
        topk,
        tau,
        eps,
        window,
        query_offset,
        query_len,
        want_rows,
        want_heads,
    )


dist_stats_torch_op.register_fake(fake)
