"""The demo's two tiny character language models.

``BaselineLM``: a pre-norm transformer whose attention layers are ``nn.MultiheadAttention``
called with ``need_weights=True, average_attn_weights=False``, so every step hands the
per-head weights [B, H, N, N] to ``BaselineAttentionDiagnostics``.

``SetRoutingLM``: the set-routing design of the user's AUSA model, small. A router scores
each token against S learned sets; each token joins its top-k sets with its router
probability as weight. Each set's state at position n is the weighted mean of the values of
the tokens routed to it up to n (causal), started from the set's learned embedding; each
token then attends over the S set states (set attention, [B, N, S] weights) instead of over
the N tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _MLP(nn.Sequential):
    def __init__(self, dim: int) -> None:
        super().__init__(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))


@dataclass
class BaselineOutput:
    """logits [B, N, V]; attention [B, H, N, N] and values [B, H, N, dh] of the first layer."""

    logits: Tensor
    attention: Tensor
    values: Tensor


class AttentionBlock(nn.Module):
    """Pre-norm block: causal multi-head self-attention, then an MLP."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = _MLP(dim)

    def forward(self, x: Tensor, causal: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(x [B, N, D], per-head weights [B, H, N, N], the normalised input [B, N, D])."""
        h = self.norm1(x)
        out, weights = self.attn(
            h, h, h, attn_mask=causal, need_weights=True, average_attn_weights=False
        )
        x = x + out
        return x + self.mlp(self.norm2(x)), weights, h

    def value_states(self, h: Tensor) -> Tensor:
        """The attention's value vectors [B, H, N, dh] for the normalised input ``h``."""
        dim = h.shape[-1]
        w = self.attn.in_proj_weight[2 * dim :]
        b = None if self.attn.in_proj_bias is None else self.attn.in_proj_bias[2 * dim :]
        v = F.linear(h, w, b)
        return v.unflatten(-1, (self.heads, dim // self.heads)).transpose(1, 2)


class BaselineLM(nn.Module):
    """Token-token attention LM: embeddings, ``layers`` attention blocks, a linear head."""

    def __init__(
        self, vocab: int, dim: int = 64, heads: int = 4, layers: int = 2, context: int = 64
    ):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(context, dim) * 0.02)
        self.blocks = nn.ModuleList(AttentionBlock(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def attention_params(self) -> dict[str, nn.Parameter]:
        """The first layer's attention parameters (what the diagnostics watch)."""
        return dict(self.blocks[0].attn.named_parameters())

    def forward(self, ids: Tensor) -> BaselineOutput:
        n = ids.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool, device=ids.device).triu(1)
        x = self.embed(ids) + self.pos[:n]
        first_attention = first_values = None
        for index, block in enumerate(self.blocks):
            x, weights, h = block(x, causal)
            if index == 0:
                first_attention = weights
                with torch.no_grad():
                    first_values = block.value_states(h)
        logits = self.head(self.norm(x))
        return BaselineOutput(logits, first_attention, first_values)


@dataclass
class SetRoutingOutput:
    """logits [B, N, V]; router logits / probs [B, N, S]; bank_indices int64 [B, N, k];
    set_attention [B, N, S] and set_embeddings [B, S, D] of the last block."""

    logits: Tensor
    router_logits: Tensor
    router_probs: Tensor
    bank_indices: Tensor
    set_attention: Tensor
    set_embeddings: Tensor


class Router(nn.Module):
    """Scores each token against the S sets: logits [B, N, S]."""

    def __init__(self, dim: int, num_sets: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, num_sets)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.norm(x))


class SetAttentionBlock(nn.Module):
    """Tokens attend over S causal set states instead of over the N tokens."""

    def __init__(self, dim: int, num_sets: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.set_init = nn.Parameter(torch.randn(num_sets, dim))  # learned set embeddings
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = _MLP(dim)

    def forward(self, x: Tensor, membership: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``membership`` [B, N, S] (router weight of each token in each set, 0 outside its
        top-k). Returns (x, set attention [B, N, S], final set states [B, S, D]).

        The state of set s at position n is
        ``state[n, s] = (set_init[s] + sum_{m <= n} w[m, s] v[m]) / (1 + sum_{m <= n} w[m, s])``
        and token n attends over ``key(state[n, s])`` with its query. The key is affine, so
        the scores and the mix are computed with [N, N] and [N, S] matrix products instead
        of materialising the [B, N, S, D] states (see ``explicit_set_attention`` in the tests).
        """
        h = self.norm1(x)
        n, dim = h.shape[1], h.shape[2]
        v = self.value(h)  # [B, N, D]
        q = self.query(h) / math.sqrt(dim)  # [B, N, D]
        future = torch.ones(n, n, dtype=torch.bool, device=h.device).triu(1)
        mass = 1.0 + membership.cumsum(1)  # [B, N, S]
        wk = self.key.weight  # key(s) = s @ wk.T + b
        qk = (q @ (v @ wk.T).transpose(1, 2)).masked_fill(future, 0.0)  # q_n . W_k v_m, m <= n
        scores = (qk @ membership + q @ (self.set_init @ wk.T).T) / mass
        scores = scores + (q @ self.key.bias).unsqueeze(-1)
        weights = torch.softmax(scores, dim=-1)  # [B, N, S]
        scaled = weights / mass
        mix = (scaled @ membership.transpose(1, 2)).masked_fill(future, 0.0)  # [B, N, N]
        mixed = mix @ v + scaled @ self.set_init
        x = x + self.out(mixed)
        final = (membership.transpose(1, 2) @ v + self.set_init) / mass[:, -1].unsqueeze(-1)
        return x + self.mlp(self.norm2(x)), weights, final


class SetRoutingLM(nn.Module):
    """Set-routing LM: one router, ``layers`` set-attention blocks, a linear head."""

    def __init__(
        self,
        vocab: int,
        dim: int = 64,
        num_sets: int = 16,
        top_k: int = 2,
        layers: int = 2,
        context: int = 64,
    ) -> None:
        super().__init__()
        if not 1 <= top_k <= num_sets:
            raise ValueError(f"top_k must be in [1, num_sets={num_sets}], got {top_k}")
        self.num_sets = num_sets
        self.top_k = top_k
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(context, dim) * 0.02)
        self.router = Router(dim, num_sets)
        self.blocks = nn.ModuleList(SetAttentionBlock(dim, num_sets) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids: Tensor) -> SetRoutingOutput:
        n = ids.shape[1]
        x = self.embed(ids) + self.pos[:n]
        logits = self.router(x)
        probs = torch.softmax(logits, dim=-1)
        top = probs.topk(self.top_k, dim=-1).indices  # [B, N, k]
        membership = torch.zeros_like(probs).scatter(-1, top, 1.0) * probs
        weights = states = None
        for block in self.blocks:
            x, weights, states = block(x, membership)
        out = self.head(self.norm(x))
        return SetRoutingOutput(out, logits, probs, top, weights, states)
