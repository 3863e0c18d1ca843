"""The ``fastdiag::dist_stats_*`` custom ops (one per backend) and the dispatch between them.

All three share one schema over the canonical [A, G, C, N] view (see ``dist_stats``):
``(x4, row_mask, from_logits, topk, tau, eps, window, query_offset, query_len, want_rows)
-> (sums f64[16], head_sums f64[G, 4], rows f32[R or 0, 4], topk i64[R, k])``.
Each has a fake implementation, so ``torch.compile(fullgraph=True)`` traces through them.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from fastdiag import _extension, backends
from fastdiag.ops._dist_stats import HeadSlot, RowSlot, Slot
from fastdiag.ops._dist_stats_torch import dist_stats_torch

SCHEMA = (
    "(Tensor x4, Tensor? row_mask, bool from_logits, int topk, float tau, float eps, int window, "
    "int query_offset, int query_len, bool want_rows) -> (Tensor, Tensor, Tensor, Tensor)"
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
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return dist_stats_torch(
        x4, row_mask, from_logits, topk, tau, eps, window, query_offset, query_len, want_rows
    )


_torch_op.register_fake(_fake)


def _register_cpu_fake() -> None:
    torch.library.register_fake("fastdiag::dist_stats_cpu")(_fake)


_extension.on_load(_register_cpu_fake)


@functools.cache
def _triton_op():
    from fastdiag.kernels.dist_stats import dist_stats_triton

    return dist_stats_triton


def run(*args):
    """Run the op on the backend chosen by ``fastdiag.backends.resolve``."""
    x4 = args[0]
    backend = backends.resolve(x4.device)
    if backend == "triton":
        return _triton_op()(*args)
    if backend == "cpu":  # resolve() only says "cpu" once the extension is loaded
        return torch.ops.fastdiag.dist_stats_cpu.default(*args)
    return _torch_op(*args)
