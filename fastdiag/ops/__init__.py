"""The public functional API: fused, sync-free statistics ops.

Every op keeps its results on the input's device and picks its backend through
``fastdiag.backends``.

* ``dist_stats``      every row statistic of a distribution tensor in one read
* ``attention_stats`` dist_stats of softmax(q k^T * scale + mask) without materialising it
* ``spectral_stats``  effective rank, stable rank, condition number ... of [..., rows, cols]
* ``cosine_stats``    mean / max / max-abs off-diagonal cosine of the rows of [..., M, D]
  (``bank_coherence``: the max-abs one of an atom bank, scale-free)
* ``embedding_stats`` variance, mean norm, cosine and non-finite rows of embeddings [..., D]
* ``usage_stats``     set / expert usage balance from index tensors (integer counts on device)
* ``jaccard``         top-k and active-set stability on device bitmaps
* ``norms``           fused multi-tensor gradient / parameter norms
* ``summaries``       every per-update formula of the diagnostics classes, fused per update
* ``token_table``     the device token-id -> set table of routing consistency
"""

from fastdiag.ops import (
    jaccard,
    norms,
    summaries,
    token_table,
)
from fastdiag.ops._dist_stats import (
    DistStats,
    HeadSlot,
    RowSlot,
    Slot,
    dist_stats,
    mean,
    median,
    std,
)
from fastdiag.ops.attention import attention_stats
from fastdiag.ops.cosine import CosineStats, bank_coherence, cosine_stats
from fastdiag.ops.embedding import EmbeddingStats, embedding_stats
from fastdiag.ops.spectral import SpectralStats, effective_rank, spectral_stats
from fastdiag.ops.usage import UsageStats, usage_stats

__all__ = [
    "CosineStats",
    "DistStats",
    "EmbeddingStats",
    "HeadSlot",
    "RowSlot",
    "Slot",
    "SpectralStats",
    "UsageStats",
    "attention_stats",
    "bank_coherence",
    "cosine_stats",
    "dist_stats",
    "effective_rank",
    "embedding_stats",
    "jaccard",
    "mean",
    "median",
    "norms",
    "spectral_stats",
    "std",
    "summaries",
    "token_table",
    "usage_stats",
]
