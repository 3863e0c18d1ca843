"""Capture of every attention layer's probabilities for :func:`fastdiag.validate_attention`,
and the substitution of their SDPA calls for the ablation.

The layers are the ones :func:`fastdiag.watch` finds (``nn.MultiheadAttention``, Hugging Face
style modules, modules given to :func:`fastdiag.register_attention`, innermost only), read the
same way: the weights a module returns (per head for ``nn.MultiheadAttention``), its registered
extract function, or the q / k / mask of its ``scaled_dot_product_attention`` calls seen by an
:class:`~fastdiag.integrations.sdpa.SDPACapture` entered in its forward pre-hook. Unlike
``watch`` (which never materialises them), a validation pass builds the probabilities of an
SDPA call, ``softmax(q k^T * scale + mask)``, because its row-pair statistics need them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fastdiag.integrations.hooks import _MHA_PARAMS, _find_weights, _is_hf_attention
from fastdiag.integrations.registry import registration
from fastdiag.integrations.sdpa import _PARAMS, _SDPA, SDPACall, SDPACapture, sdpa_call

__all__ = ["Capture", "Capturer", "Substitute", "attention_modules", "call_allowed", "infer_causal"]


@dataclass
class Capture:
    """One call of one attention layer: probabilities [B, H, N, Nk] (float32), the attendable
    keys (bool, broadcastable to it; None when unknown: eager weights), whether the call was
    causal (None: unknown), the key index of query 0 and the layer's input hidden states."""

    layer: str
    weights: Tensor
    allowed: Tensor | None
    causal: bool | None
    offset: int
    hidden: Tensor | None
    kind: str  # "sdpa" or "weights"


def attention_modules(model: nn.Module, layers: Iterable[str] | None = None) -> dict[str, nn.Module]:
    """Qualified name -> attention module, as ``watch`` finds them (innermost only)."""
    named = list(model.named_modules())
    registered = {m for _, m in named if (r := registration(m)) is not None and r.attention}
    candidates = {m for _, m in named if isinstance(m, nn.MultiheadAttention) or _is_hf_attention(m)}
    inner = candidates | registered
    found: dict[str, nn.Module] = {}
    for name, m in named:
        if m in registered or (m in candidates and not any(c in inner for c in m.modules() if c is not m)):
            found[name or type(m).__name__] = m
    if layers is not None:
        wanted = list(layers)
        missing = [w for w in wanted if w not in found]
        if missing:
            raise ValueError(f"layers {missing} are not attention layers of the model; found {list(found)}")
        found = {w: found[w] for w in wanted}
    return found


def infer_causal(model: nn.Module, modules: Iterable[nn.Module]) -> tuple[bool | None, str]:
    """The model's causal flag from what it declares (not from its weights), and the source."""
    cfg = getattr(model, "config", None)
    if type(model).__name__.endswith(("ForCausalLM", "LMHeadModel")):
        return True, f"model class {type(model).__name__}"
    if cfg is not None and getattr(cfg, "is_decoder", False) is True:
        return True, "config.is_decoder"
    flags = {f for m in modules if isinstance(f := getattr(m, "is_causal", None), bool)}
    if len(flags) == 1:
        return flags.pop(), "attention modules' is_causal"
    if cfg is not None and getattr(cfg, "is_decoder", None) is False:
        return False, "config.is_decoder is False"
    return None, "unknown"


def call_allowed(call: SDPACall, n: int, nk: int) -> Tensor:
    """Bool [.., N, Nk] (4-D, broadcastable to [B, H, N, Nk]): the keys each query of an SDPA
    call may attend (``is_causal``: top-left j <= i; float masks: entries above the dtype's
    half minimum, so both -inf and transformers' ``finfo.min`` count as masked)."""
    device = call.q.device
    allowed = torch.ones(n, nk, dtype=torch.bool, device=device)
    if call.is_causal:
        allowed = torch.ones(n, nk, dtype=torch.bool, device=device).tril()
    m = call.attn_mask
    if m is not None:
        ok = m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2
        allowed = allowed & ok
    while allowed.dim() < 4:
        allowed = allowed.unsqueeze(0)
    return allowed


def call_is_causal(call: SDPACall, allowed: Tensor) -> bool:
    if call.is_causal:
        return True
    n, nk = allowed.shape[-2:]
    future = torch.ones(n, nk, dtype=torch.bool, device=allowed.device).triu(1)
    return not bool((allowed & future).any())


def _repeat_kv(t: Tensor, heads: int) -> Tensor:
    return t if t.shape[1] == heads else t.repeat_interleave(heads // t.shape[1], dim=1)


def materialise(call: SDPACall) -> tuple[Tensor, Tensor]:
    """(probabilities float32 [B, Hq, N, Nk], allowed keys) of one SDPA call."""
    q, k = call.q.float(), _repeat_kv(call.k, call.q.shape[1]).float()
    scale = call.scale if call.scale is not None else q.shape[-1] ** -0.5
    scores = q @ k.transpose(-1, -2) * scale
    allowed = call_allowed(call, q.shape[-2], k.shape[-2])
    if call.attn_mask is not None and call.attn_mask.dtype != torch.bool:
        scores = scores + call.attn_mask.float()
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1), allowed


def _hidden(module: nn.Module, args: tuple, kwargs: dict) -> Tensor | None:
    if isinstance(module, nn.MultiheadAttention):
        x = args[0] if args else kwargs.get("query")
        if isinstance(x, Tensor) and x.dim() == 3 and not module.batch_first:
            x = x.transpose(0, 1)
        return x.detach() if isinstance(x, Tensor) and x.dim() == 3 else None
    x = kwargs.get("hidden_states")
    if x is None:
        x = next((a for a in args if isinstance(a, Tensor) and a.dim() == 3 and a.is_floating_point()), None)
    return x.detach() if isinstance(x, Tensor) and x.dim() == 3 and x.is_floating_point() else None


class Substitute(SDPACapture):
    """An :class:`SDPACapture` that also replaces every SDPA call's attention: ``"uniform"``
    (the mean of V over the attendable keys) or ``"local"`` (the call's mask combined with the
    band ``|j - i| <= window``). ``count`` is the number of calls replaced."""

    def __init__(self, mode: str, window: int) -> None:
        super().__init__()
        self.mode, self.window, self.count = mode, window, 0

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is not _SDPA:
            return func(*args, **kwargs)
        call = sdpa_call(args, kwargs)
        if call is None:
            return func(*args, **kwargs)
        self.count += 1
        bound = dict(zip(_PARAMS, args))
        bound.update(kwargs)
        v = bound["value"]
        n, nk = call.q.shape[-2], call.k.shape[-2]
        allowed = call_allowed(call, n, nk)
        if self.mode == "uniform":
            w = allowed.to(v.dtype)
            w = w / w.sum(-1, keepdim=True).clamp_min(1)
            return w @ _repeat_kv(v, call.q.shape[1])
        i = torch.arange(n, device=v.device)[:, None]
        j = torch.arange(nk, device=v.device)[None, :]
        band = (j - i).abs() <= self.window
        mask = call.attn_mask
        if mask is None:
            new_mask = band & allowed[0, 0] if call.is_causal else band
        elif mask.dtype == torch.bool:
            new_mask = mask & band
        else:
            new_mask = mask.masked_fill(~band, float("-inf"))
        rest = {key: val for key, val in bound.items() if key not in ("query", "key", "value")}
        rest.update(attn_mask=new_mask, is_causal=False)
        return func(bound["query"], bound["key"], v, **rest)


class Capturer:
    """Forward hooks on the attention modules: capture (``mode=None``) or substitute
    (``mode="uniform" | "local"``) while active; ``remove()`` takes every hook off."""

    def __init__(self, modules: dict[str, nn.Module], registrations: dict[str, Any],
                 mode: str | None = None, window: int = 5) -> None:  # fmt: skip
        self.captures: list[Capture] = []
        self.kinds: dict[str, str] = {}
        self.substituted: dict[str, int] = dict.fromkeys(modules, 0)
        self._handles: list[Any] = []
        self._mode, self._window = mode, window
        for name, m in modules.items():
            reg = registrations.get(name)
            pending: list[Any] = []
            pre = self._pre_fn(name, m, pending, reg)
            post = self._post_fn(name, m, pending, reg)
            self._handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
            self._handles.append(m.register_forward_hook(post, with_kwargs=True, always_call=True))

    def _pre_fn(self, name: str, module: nn.Module, pending: list, reg: Any):
        def pre(m: nn.Module, args: tuple, kwargs: dict):
            hidden = _hidden(m, args, kwargs) if self._mode is None else None
            new = None
            if isinstance(m, nn.MultiheadAttention) and self._mode is None:
                kwargs = dict(kwargs)
                for pname, value in zip(_MHA_PARAMS[3:], args[3:], strict=False):
                    kwargs[pname] = value
                request = (bool(kwargs.get("need_weights", True)), bool(kwargs.get("average_attn_weights", True)))
                kwargs["need_weights"], kwargs["average_attn_weights"] = True, False
                new = (args[:3], kwargs)
                pending.append((None, hidden, request))
                return new
            sdpa = not isinstance(m, nn.MultiheadAttention) and (reg is None or reg[0] is None)
            mode = None
            if sdpa:
                mode = (SDPACapture() if self._mode is None else Substitute(self._mode, self._window)).open()
            pending.append((mode, hidden, None))
            return None

        return pre

    def _post_fn(self, name: str, module: nn.Module, pending: list, reg: Any):
        def post(m: nn.Module, args: tuple, kwargs: dict, output: Any):
            mode, hidden, request = pending.pop() if pending else (None, None, None)
            calls = []
            if mode is not None:
                mode.close()
                calls = mode.calls
                if isinstance(mode, Substitute):
                    self.substituted[name] += mode.count
            if output is None or self._mode is not None:
                return None
            if request is not None:  # nn.MultiheadAttention: per-head weights were requested
                out, weights = output
                if weights is not None:
                    self._add(name, weights if weights.dim() == 4 else weights.unsqueeze(0), hidden)
                need, average = request
                if not need:
                    return out, None
                return (out, weights.mean(dim=-3)) if average and weights is not None else (out, weights)
            if reg is not None and reg[0] is not None:
                weights = reg[0](m, args, output)
                if weights is not None:
                    w = torch.softmax(weights.float(), -1) if reg[1] else weights
                    self._add(name, w, hidden)
                return None
            weights = _find_weights(output)
            if weights is not None:
                self._add(name, weights, hidden)
                return None
            for c in calls:
                probs, allowed = materialise(c)
                causal = call_is_causal(c, allowed)
                self.captures.append(Capture(name, probs, allowed, causal, 0, hidden, "sdpa"))
                self.kinds[name] = "sdpa"
            return None

        return post

    def _add(self, name: str, weights: Tensor, hidden: Tensor | None) -> None:
        w = weights.detach().float()
        if w.dim() == 3:
            w = w.unsqueeze(1)
        self.captures.append(Capture(name, w, None, None, w.shape[-1] - w.shape[-2], hidden, "weights"))
        self.kinds[name] = "weights"

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

