"""The ``fastdiag::dist_stats_*`` custom ops (one per backend) and the dispatch between them.

All three share one schema over the canonical [A, G, C, N] view (see ``dist_stats``):
``(x4, row_mask, from_logits, topk, tau, eps, window, query_offset, query_len, want_rows,
want_heads=True) -> (sums f64[16], head_sums f64[G, 4], rows f32[R or 0, 4], topk i64[R, k])``
(``want_heads=False``: no per-head statistics are computed, ``head_sums`` is all NaN).
Each has a fake implementation, so ``torch.compile(fullgraph=True)`` traces through them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastdiag import _extension, backends
from fastdiag.ops._dist_stats import HeadSlot, RowSlot, Slot
from fastdiag.ops._dist_stats_torch import dist_stats_torch

SCHEMA = (
    "(Tensor x4, Tensor? row_mask, bool from_logits, int topk, float tau, float eps, int window, "
    "int query_offset, int query_len, bool want_rows, bool want_heads=True) "
    "-> (Tensor, Tensor, Tensor, Tensor)"
)


def _fake(
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
    a, g, c, _ = x4.shape
    r = a * c
    return (
        x4.new_empty(Slot.NUM, dtype=torch.float64),
        x4.new_empty(g, HeadSlot.NUM, dtype=torch.float64),
        x4.new_empty(r if want_rows else 0, RowSlot.NUM, dtype=torch.float32),
        x4.new_empty(r, topk, dtype=torch.int64),
    )


@torch.library.custom_op("fastdiag::dist_stats_torch", mutates_args=())
def _torch_op(
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


_torch_op.register_fake(_fake)


_extension.register_fake("dist_stats_cpu", _fake)


def _triton_impl():
    from fastdiag.kernels.dist_stats import dist_stats_triton

    return dist_stats_triton


backends.register(
    "dist_stats",
    {
        "triton": backends.Impl(_triton_impl, devices=("cuda",)),
        "cpu": backends.Impl(
            lambda: _extension.op("dist_stats_cpu"), devices=("cpu",), kernel="dist_stats_cpu"
        ),
        "torch": backends.Impl(lambda: _torch_op),
    },
)


def run(*args):
    """Run the op on the backend chosen by ``fastdiag.backends.resolve``."""
    x4 = args[0]
    return backends.implementation("dist_stats", x4.device, x4.dtype)(*args)
