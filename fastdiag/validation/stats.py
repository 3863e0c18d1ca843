"""Per-capture statistics of a validation pass: float64 sums / counts / maxima (device tensors,
no host copy), added up over batches. The row statistics come from one fused ``dist_stats``
read (``window`` and ``rows=True``: row-sum error, future and local mass, per-row entropy and
sum of squares); the rest is vectorised torch over the [B, H, N, Nk] tensor (no loop over rows).

Attendable keys of a row: the SDPA call's mask (and ``is_causal``) for SDPA layers; for
layers that return their weights, keys ``j <= i + (Nk - N)`` when the model is causal, else
all Nk keys. ``n_i`` is their number; rows with ``n_i = 0``, padding rows and non-finite rows
are left out everywhere.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastdiag.ops import dist_stats
from fastdiag.ops._dist_stats_layout import RowSlot, Slot
from fastdiag.validation.capture import Capture

__all__ = ["capture_stats", "merge"]

_F64 = torch.float64


def merge(total: dict[str, Tensor], new: dict[str, Tensor]) -> None:
    """Add ``new`` into ``total`` (keys ending in ``_max`` by maximum)."""
    for k, v in new.items():
        if k not in total:
            total[k] = v
        elif k.endswith("_max"):
            total[k] = torch.maximum(total[k], v)
        else:
            total[k] = total[k] + v


def _masked_mean_sum(values: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    return torch.where(mask, values, 0).sum(dtype=_F64), mask.sum(dtype=_F64)


def capture_stats(
    cap: Capture,
    *,
    causal: bool | None,
    window: int,
    row_mask: Tensor | None = None,
    token_ids: Tensor | None = None,
    special_ids: Tensor | None = None,
    distant: int = 10,
) -> dict[str, Tensor]:
    p = cap.weights
    b, h, n, nk = p.shape
    dev = p.device
    off = cap.offset
    qi = torch.arange(n, device=dev)[:, None] + off
    kj = torch.arange(nk, device=dev)[None, :]
    if cap.allowed is not None:
        allowed = cap.allowed.expand(b, h, n, nk)
    elif causal:
        allowed = (kj <= qi).expand(b, h, n, nk)
    else:
        allowed = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=dev).expand(b, h, n, nk)
    count = allowed.sum(-1)  # [B, H, N]
    nf = count.to(p.dtype)
    rows = count > 0
    if row_mask is not None:
        rows = rows & row_mask.to(torch.bool)[:, None, :]
    ds = dist_stats(p, window=window, query_offset=off, rows=True, row_mask=rows, heads=False)
    valid = ~torch.isnan(ds.rows[..., RowSlot.ENTROPY])  # [B, H, N]
    out: dict[str, Tensor] = {
        "rows": ds.sums[Slot.COUNT],
        "rowsum_err_max": ds.sums[Slot.ROWSUM_ERR_MAX],
        "rowsum_err": ds.sums[Slot.ROWSUM_ERR],
        "future_max": ds.sums[Slot.FUTURE_MAX],
        "future": ds.sums[Slot.FUTURE],
        "local_mass": ds.sums[Slot.LOCAL],
        "nonfinite": ds.sums[Slot.NONFINITE],
    }
    pv = torch.where(valid[..., None], p, 0)  # invalid rows contribute nothing below

    # 2. positional: mean weight of a local key vs of a far key, per row
    band = (kj - qi).abs() <= window
    loc, far = allowed & band, allowed & ~band
    n_loc, n_far = loc.sum(-1), far.sum(-1)
    both = valid & (n_loc > 0) & (n_far > 0)
    loc_mean = (pv * loc).sum(-1) / n_loc.clamp_min(1)
    far_mean = (pv * far).sum(-1) / n_far.clamp_min(1)
    out["local_w"], out["pos_rows"] = _masked_mean_sum(loc_mean, both)
    out["far_w"], _ = _masked_mean_sum(far_mean, both)

    # 4. distance from uniform over the attendable keys
    inv = 1.0 / nf.clamp_min(1)
    dev_abs = ((p - inv[..., None]).abs() * allowed) * valid[..., None]
    row_dev = dev_abs.sum(-1)
    out["absdev"], _ = _masked_mean_sum(row_dev * inv, valid)
    out["absdev_max"] = dev_abs.amax().to(_F64) if dev_abs.numel() else torch.zeros((), dtype=_F64, device=dev)
    out["tv"], _ = _masked_mean_sum(row_dev / 2, valid)
    multi = valid & (count > 1)
    h_ratio = ds.rows[..., RowSlot.ENTROPY] / nf.clamp_min(2).log()
    out["h_ratio"], out["h_rows"] = _masked_mean_sum(h_ratio, multi)

    # 5. row_std over the attendable keys (population std), per head
    mu = (pv * allowed).sum(-1) * inv
    # centred (sumsq / n - mu^2 from dist_stats' per-row sumsq cancels in float32 near uniform)
    var = (((pv - mu[..., None]) ** 2) * allowed).sum(-1) * inv
    std = torch.where(multi, var.sqrt(), 0)
    out["head_std"] = std.sum((0, 2), dtype=_F64)  # [H]
    out["head_rows"] = multi.sum((0, 2), dtype=_F64)

    # 6. L2 distance between rows of the same (b, h): all pairs, adjacent, `distant` apart
    flat = pv.reshape(b * h, n, nk)
    vflat = valid.reshape(b * h, n)
    dist = torch.cdist(flat, flat)  # [BH, N, N]
    pair = vflat[:, :, None] & vflat[:, None, :] & torch.ones(n, n, dtype=torch.bool, device=dev).triu(1)
    out["l2_all"], out["l2_pairs"] = _masked_mean_sum(dist, pair)
    out["l2_all_max"] = torch.where(pair, dist, 0).amax().to(_F64) if pair.numel() else out["l2_pairs"] * 0
    for key, d in (("l2_adj", 1), ("l2_far", distant)):
        if n > d:
            dd = (flat[:, d:] - flat[:, :-d]).norm(dim=-1)
            out[key], out[key + "_pairs"] = _masked_mean_sum(dd, vflat[:, d:] & vflat[:, :-d])

    # 3. token-level: mean weight between repeated tokens vs different tokens; special keys
    if token_ids is not None and nk == n and off == 0 and tuple(token_ids.shape) == (b, n):
        t = token_ids.to(dev)
        same = (t[:, :, None] == t[:, None, :])[:, None]  # [B, 1, N, N]
        eye = torch.eye(n, dtype=torch.bool, device=dev)
        base = allowed & valid[..., None] & ~eye
        for key, m in (("same", base & same), ("diff", base & ~same)):
            out[key], out[key + "_pairs"] = _masked_mean_sum(p, m)
        if special_ids is not None and special_ids.numel():
            special = torch.isin(t, special_ids.to(dev))[:, None, None, :]
            base = allowed & valid[..., None]
            for key, m in (("special", base & special), ("regular", base & ~special)):
                out[key], out[key + "_pairs"] = _masked_mean_sum(p, m)

    # 7. diversity of the layer's input hidden states: mean pairwise distance of unit vectors / 2
    x = cap.hidden
    if x is not None and x.shape[0] == b and x.shape[1] == n and n > 1:
        u = torch.nn.functional.normalize(x.float(), dim=-1)
        d = torch.cdist(u, u) / 2  # [B, N, N], in [0, 1]
        ok = torch.ones(b, n, dtype=torch.bool, device=dev) if row_mask is None else row_mask.to(torch.bool).to(dev)
        pm = ok[:, :, None] & ok[:, None, :] & ~torch.eye(n, dtype=torch.bool, device=dev)
        out["hidden_div"], out["hidden_pairs"] = _masked_mean_sum(d, pm)
    return out
