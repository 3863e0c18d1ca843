"""Training integration: ``watch(model)`` hooks, gradient health and generic probes.

``watch(model)`` attaches hooks that feed a :class:`TrainingDiagnostics` while the user's own
training loop runs; ``get_epoch_stats()`` returns one dict (METRICS.md section 5):

* ``attention_entropy/{layer}``, ``attention_sparsity/{layer}``, ``attention_top1/{layer}``,
  ``attention_effective_heads/{layer}``: from the per-head attention weights of every
  ``torch.nn.MultiheadAttention``, every Hugging Face style attention module that returns its
  weights, and every module given to :func:`register_attention`. ``{layer}`` is the module's
  qualified name (``layers.0.self_attn``), or ``layer_{i}`` with ``attention_names="index"``.
* ``grad_norm/{group}``, ``grad_norm_total``, ``param_norm/{group}``, ``update_ratio/{group}``
  (``||param after step - before|| / ||before||``; not counted where ``before`` is 0),
  ``health/nan_infs`` (non-finite gradient entries per sampled step; a step whose norm is
  non-finite adds nothing to that norm's mean) and ``health/nan_infs/{group}`` for the groups
  that had any.
* ``{probe name}/{module}`` for every :func:`probe`.

Attention values are per-head (seed 004): entropy and top-1 are means over the B*H*N per-head
rows, sparsity the share of per-head entries > 0.1, effective heads the share of heads whose
mean entropy / log Nk is below 0.9.

Every value is computed on the device by ``fastdiag.ops`` and kept in one packed
:class:`~fastdiag.accumulator.Accumulator`; nothing is copied to the host before
``get_epoch_stats()``. Epoch value = mean of the batch values of the sampled steps since
``reset()``; with ``sync_dist=True`` the mean over all ranks' batch values.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fastdiag import ops
from fastdiag.accumulator import Accumulator
from fastdiag.ops import HeadSlot, Slot
from fastdiag.ops.norms import nonfinite_counts, norms

__all__ = ["TrainingDiagnostics", "Watch", "watch", "register_attention", "probe"]

SPARSITY_TAU = 0.1  # seed 004: an attention entry > 0.1 counts as concentrated
EFFECTIVE_HEAD_ENTROPY = 0.9  # a head is "effective" when its mean H / log Nk is below this
AUTO_GROUP_MAX_PARAMS = 512  # group="auto": per parameter up to this many tensors, else per module
ATTENTION_METRICS = (
    "attention_entropy",
    "attention_sparsity",
    "attention_top1",
    "attention_effective_heads",
)
GROUPS = ("auto", "parameter", "module")

# names of nn.MultiheadAttention.forward's parameters, in positional order
_MHA_PARAMS = (
    "query",
    "key",
    "value",
    "key_padding_mask",
    "need_weights",
    "attn_mask",
    "average_attn_weights",
    "is_causal",
)

ExtractFn = Callable[[nn.Module, tuple, Any], "Tensor | None"]
ProbeFn = Callable[..., Tensor]


# ----------------------------------------------------------------------------------------------
# Diagnostics object
# ----------------------------------------------------------------------------------------------


class TrainingDiagnostics:
    """Per-layer attention, gradient-health and probe statistics, accumulated on the device.

    Fed by :func:`watch` hooks, or directly through the ``update_*`` methods.
    ``tau``: attention sparsity threshold; ``effective_head_entropy``: a head counts as
    effective when its mean normalised entropy is below it.
    """

    def __init__(
        self,
        *,
        tau: float = SPARSITY_TAU,
        effective_head_entropy: float = EFFECTIVE_HEAD_ENTROPY,
        device: torch.device | str | None = None,
    ) -> None:
        self.tau = float(tau)
        self.effective_head_entropy = float(effective_head_entropy)
        self._acc = Accumulator(device)
        self._attention_keys: dict[str, list[str]] = {}
        self._param_sets: dict[tuple[tuple[str, ...], Any], _ParamSet] = {}

    @property
    def accumulator(self) -> Accumulator:
        """The packed (sum, count) state behind every metric."""
        return self._acc

    @torch.no_grad()
    def update_attention(
        self,
        name: str,
        weights: Tensor,
        *,
        from_logits: bool = False,
        row_mask: Tensor | None = None,
    ) -> None:
        """Record one batch of attention for layer ``name``.

        weights: [B, H, N, Nk] per-head probabilities (logits with ``from_logits``) or
        [B, N, Nk] (one head). row_mask: bool [B, N], False rows (padding queries) ignored.
        Batch values: mean per-head entropy (nats) and top-1 over the valid B*H*N rows, the
        share of per-head entries > ``tau``, and the share of heads whose mean entropy / log Nk
        is below ``effective_head_entropy``. NaN (not counted) when no row is valid.
        """
        if not isinstance(name, str):
            raise TypeError(f"name must be a str, got {type(name).__name__}")
        if not isinstance(weights, Tensor):
            raise TypeError(f"weights must be a torch.Tensor, got {type(weights).__name__}")
        if weights.dim() not in (3, 4):
            raise ValueError(
                f"weights must have shape [B, H, N, Nk] or [B, N, Nk], got {tuple(weights.shape)}"
            )
        w = weights.detach()
        if w.dim() == 3:
            w = w.unsqueeze(1)
        ds = ops.dist_stats(w, from_logits=from_logits, reduce_dim=1, tau=self.tau, row_mask=row_mask)
        values = _attention_values(ds.sums, ds.head_sums, w.shape[-1], self.effective_head_entropy)
        self._acc.add(names=self._attention_names(name), stacked=values)

    def _attention_names(self, name: str) -> list[str]:
        keys = self._attention_keys.get(name)
        if keys is None:
            keys = self._attention_keys[name] = [f"{m}/{name}" for m in ATTENTION_METRICS]
        return keys

    @torch.no_grad()
    def update_gradients(
        self,
        parameters: Mapping[str, Tensor] | Iterable[tuple[str, Tensor]],
        *,
        group: str | int | Callable[[str], str] = "parameter",
    ) -> None:
        """Record gradient health of named parameters (those without ``.grad`` are skipped).

        Batch values: ``grad_norm/{g}`` and ``param_norm/{g}`` (L2 over the group's tensors),
        ``grad_norm_total`` (L2 over all gradients), ``health/nan_infs`` (non-finite gradient
        entries) and ``health/nan_infs/{g}``. ``group``: see :func:`watch`.
        """
        self._param_set(parameters, group).record_gradients(self)

    def _param_set(self, parameters: Any, group: Any) -> _ParamSet:
        named = list(parameters.items()) if isinstance(parameters, Mapping) else list(parameters)
        key = (tuple(n for n, _ in named), group)
        ps = self._param_sets.get(key)
        if ps is None or any(a is not b for a, b in zip(ps.params, (p for _, p in named), strict=False)):
            ps = self._param_sets[key] = _ParamSet(named, group)
        return ps

    @torch.no_grad()
    def update_probe(self, key: str, value: Tensor | float) -> None:
        """Record one value of probe ``key`` (a tensor is averaged over its entries, on device)."""
        if not isinstance(key, str):
            raise TypeError(f"key must be a str, got {type(key).__name__}")
        if isinstance(value, Tensor):
            v = value.detach()
            v = v.reshape(1) if v.numel() == 1 else v.double().mean().reshape(1)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            v = torch.tensor([float(value)], dtype=torch.float64)
        else:
            raise TypeError(f"probe {key!r} must return a tensor or a number, got {type(value).__name__}")
        self._acc.add(names=[key], stacked=v)

    def get_epoch_stats(self, sync_dist: bool = False, process_group: Any = None) -> dict[str, float]:
        """Every metric's epoch value (one device->host copy; one all_reduce when synced).

        ``health/nan_infs/{group}`` appears only for groups that had a non-finite gradient.
        """
        stats = self._acc.compute(sync_dist=sync_dist, process_group=process_group)
        return {
            k: v
            for k, v in stats.items()
            if not (k.startswith("health/nan_infs/") and not v > 0)
        }

    def compute(self, sync_dist: bool = False, process_group: Any = None) -> dict[str, float]:
        """Alias of :meth:`get_epoch_stats`."""
        return self.get_epoch_stats(sync_dist=sync_dist, process_group=process_group)

    def reset(self) -> None:
        """Start a new epoch (metric names stay registered)."""
        self._acc.reset()

    def state_dict(self) -> dict[str, Any]:
        return {"accumulator": self._acc.state_dict()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self._acc.load_state_dict(state_dict["accumulator"])


def _attention_values(sums: Tensor, head_sums: Tensor, nk: int, threshold: float) -> Tensor:
    """[entropy, sparsity, top1, effective heads] float64 from one dist_stats result."""
    count = sums[Slot.COUNT]
    heads = head_sums.shape[0]
    rows = count * heads
    entropy = head_sums[:, HeadSlot.ENTROPY].sum() / rows
    sparsity = head_sums[:, HeadSlot.GT_TAU].sum() / (rows * nk)
    top1 = head_sums[:, HeadSlot.MAX].sum() / rows
    head_entropy = head_sums[:, HeadSlot.ENTROPY] / count
    # N = 1: H / log 1 is NaN (as dist_stats documents), so no head counts as effective,
    # the same value BaselineAttentionDiagnostics gives
    normalised = head_entropy / math.log(nk) if nk > 1 else head_entropy * math.nan
    effective = (normalised < threshold).double().mean()
    effective = torch.where(count > 0, effective, torch.full_like(effective, math.nan))
    return torch.stack([entropy, sparsity, top1, effective])


# ----------------------------------------------------------------------------------------------
# Parameter groups and gradient health
# ----------------------------------------------------------------------------------------------


def _group_fn(group: Any, count: int) -> Callable[[str], str]:
    if callable(group):
        return group
    if isinstance(group, bool) or not isinstance(group, (str, int)):
        raise TypeError(
            f"group must be one of {GROUPS}, a positive int depth or a callable name -> group, got {group!r}"
        )
    if isinstance(group, int):
        if group < 1:
            raise ValueError(f"group depth must be >= 1, got {group}")
        return lambda name: ".".join(name.split(".")[:group])
    if group not in GROUPS:
        raise ValueError(
            f"group must be one of {GROUPS}, a positive int depth or a callable name -> group, got {group!r}"
        )
    if group == "auto":
        group = "parameter" if count <= AUTO_GROUP_MAX_PARAMS else "module"
    if group == "parameter":
        return lambda name: name
    return lambda name: name.rpartition(".")[0] or name


class _Plan:
    """Keys and device index tensors for one set of parameters that have gradients."""

    def __init__(self, pset: _ParamSet, idx: tuple[int, ...], device: torch.device) -> None:
        groups: dict[str, int] = {}
        member = [groups.setdefault(pset.group_of[i], len(groups)) for i in idx]
        self.idx = idx
        self.groups = list(groups)
        self.identity = len(self.groups) == len(idx)  # one tensor per group, in order
        # host ints -> device without a blocking copy
        self.member = torch.tensor(member, dtype=torch.long).to(device, non_blocking=True)
        self.grad_keys = (
            [f"grad_norm/{g}" for g in self.groups]
            + [f"param_norm/{g}" for g in self.groups]
            + ["grad_norm_total", "health/nan_infs"]
            + [f"health/nan_infs/{g}" for g in self.groups]
        )
        self.ratio_keys = [f"update_ratio/{g}" for g in self.groups]

    def group_sum(self, values: Tensor) -> Tensor:
        """Sum of float64 per-tensor values [len(idx)] within each group -> [len(groups)]."""
        if self.identity:
            return values
        out = torch.zeros(len(self.groups), dtype=values.dtype, device=values.device)
        return out.index_add_(0, self.member, values)


class _ParamSet:
    """Named parameters with their groups; builds gradient and update-ratio statistics."""

    def __init__(self, named: Sequence[tuple[str, Tensor]], group: Any) -> None:
        for name, p in named:
            if not isinstance(name, str) or not isinstance(p, Tensor):
                raise TypeError(
                    f"parameters must be (name, tensor) pairs, got ({type(name).__name__}, {type(p).__name__})"
                )
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        fn = _group_fn(group, len(named))
        self.group_of = [str(fn(n)) for n in self.names]
        self._plans: dict[tuple[int, ...], _Plan] = {}
        self._snapshot: dict[int, Tensor] = {}
        self._pending: tuple[_Plan, list[Tensor], Tensor] | None = None

    def with_grad(self) -> tuple[int, ...]:
        return tuple(i for i, p in enumerate(self.params) if p.grad is not None)

    def plan(self, idx: tuple[int, ...]) -> _Plan:
        plan = self._plans.get(idx)
        if plan is None:
            plan = self._plans[idx] = _Plan(self, idx, self.params[idx[0]].device)
        return plan

    def record_gradients(self, diag: TrainingDiagnostics, snapshot: bool = False) -> None:
        """Add this step's gradient health to ``diag``; with ``snapshot`` also keep a copy of
        the parameters for :meth:`record_update`."""
        idx = self.with_grad()
        if not idx:
            return
        plan = self.plan(idx)
        params = [self.params[i] for i in idx]
        grads = [p.grad for p in params]
        gn = norms(grads)
        pn = norms(params)
        nf = nonfinite_counts(grads)
        param_sq = plan.group_sum(pn.square())
        stacked = torch.cat(
            [
                plan.group_sum(gn.square()).sqrt(),
                param_sq.sqrt(),
                gn.square().sum().sqrt().reshape(1),
                nf.sum().reshape(1),
                plan.group_sum(nf),
            ]
        )
        diag._acc.add(names=plan.grad_keys, stacked=stacked)
        if snapshot:
            copies = [self._buffer(i) for i in idx]
            torch._foreach_copy_(copies, [p.detach() for p in params])
            self._pending = (plan, copies, param_sq)

    def _buffer(self, i: int) -> Tensor:
        buf = self._snapshot.get(i)
        p = self.params[i]
        if buf is None or buf.shape != p.shape or buf.dtype != p.dtype or buf.device != p.device:
            buf = self._snapshot[i] = torch.empty_like(p, memory_format=torch.preserve_format).detach()
        return buf

    def record_update(self, diag: TrainingDiagnostics) -> None:
        """``update_ratio/{g}`` = ||param now - snapshot|| / ||snapshot|| per group."""
        if self._pending is None:
            return
        plan, copies, param_sq = self._pending
        self._pending = None
        # in place (the copies are rewritten at the next snapshot): no temporary per parameter
        torch._foreach_sub_(copies, [self.params[i].detach() for i in plan.idx])
        delta_sq = plan.group_sum(norms(copies).square())
        diag._acc.add(names=plan.ratio_keys, stacked=delta_sq.sqrt() / param_sq.sqrt())


# ----------------------------------------------------------------------------------------------
# Registration of custom attention modules and probes
# ----------------------------------------------------------------------------------------------


class _Registration:
    def __init__(self) -> None:
        self.attention: tuple[ExtractFn, bool] | None = None
        self.probes: list[tuple[str, ProbeFn, str]] = []


_REGISTRY: weakref.WeakKeyDictionary[nn.Module, _Registration] = weakref.WeakKeyDictionary()
_LIVE: weakref.WeakSet[Watch] = weakref.WeakSet()
PROBE_AT = ("forward", "grad")


def register_attention(module: nn.Module, extract_fn: ExtractFn, *, from_logits: bool = False) -> nn.Module:
    """Declare ``module`` an attention layer for :func:`watch`; returns ``module``.

    ``extract_fn(module, inputs, output)`` runs after the module's forward on sampled steps and
    returns its attention, [B, H, N, Nk] per-head (or [B, N, Nk]) probabilities (logits with
    ``from_logits=True``), or None to skip this call. Works for watches made before or after.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    if not callable(extract_fn):
        raise TypeError(f"extract_fn must be callable (module, inputs, output) -> Tensor, got {extract_fn!r}")
    reg = _REGISTRY.setdefault(module, _Registration())
    reg.attention = (extract_fn, bool(from_logits))
    for w in list(_LIVE):
        w._attach_registered(module)
    return module


def probe(module: nn.Module, name: str, fn: ProbeFn, *, at: str = "forward") -> nn.Module:
    """Record ``fn``'s value as ``{name}/{module's qualified name}`` on sampled steps; returns ``module``.

    ``at="forward"``: ``fn(module, inputs, output)`` after each forward of ``module`` (e.g. a
    memory read norm). ``at="grad"``: ``fn(module)`` once per sampled step when gradients are
    ready (e.g. a mixer parameter's gradient). ``fn`` returns a tensor, averaged over its
    entries on the device (it must not copy to the host), or None to skip this call.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty str, got {name!r}")
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {fn!r}")
    if at not in PROBE_AT:
        raise ValueError(f"at must be one of {PROBE_AT}, got {at!r}")
    reg = _REGISTRY.setdefault(module, _Registration())
    reg.probes.append((name, fn, at))
    for w in list(_LIVE):
        w._attach_registered(module, probe=(name, fn, at))
    return module


# ----------------------------------------------------------------------------------------------
# watch()
# ----------------------------------------------------------------------------------------------

_WRAPPERS = ("DistributedDataParallel", "DataParallel", "FullyShardedDataParallel")


def _unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside DDP / DataParallel / FSDP / torch.compile wrappers."""
    while True:
        if type(model).__name__ in _WRAPPERS and isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _is_hf_attention(module: nn.Module) -> bool:
    return type(module).__name__.endswith("Attention") and not isinstance(module, nn.MultiheadAttention)


def _find_weights(output: Any) -> Tensor | None:
    """The attention weights in a Hugging Face style output: the first floating 3-D / 4-D
    tensor after the hidden states of a tuple, or ``attentions`` / ``attn_weights`` of a dict."""
    if isinstance(output, Mapping):
        for key in ("attn_weights", "attentions", "attention_weights"):
            value = output.get(key)
            if isinstance(value, Tensor):
                return value
        return None
    if isinstance(output, (tuple, list)):
        for item in output[1:]:
            if isinstance(item, Tensor) and item.is_floating_point() and item.dim() in (3, 4):
                return item
    return None


def _tensors(tree: Any) -> list[Tensor]:
    if isinstance(tree, Tensor):
        return [tree]
    if isinstance(tree, Mapping):
        tree = list(tree.values())
    if isinstance(tree, (tuple, list)):
        return [t for item in tree for t in _tensors(item)]
    return []


def _in_backward() -> bool:
    """True while autograd runs a backward pass (e.g. a checkpointed forward being recomputed)."""
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


def _disable(fn: Callable) -> Callable:
    """Run ``fn`` eagerly under torch.compile (a graph break at each hooked module)."""
    disable = getattr(getattr(torch, "compiler", None), "disable", None)
    return disable(fn) if disable is not None else fn


class Watch:
    """Handle returned by :func:`watch`: a context manager; ``remove()`` detaches every hook.

    ``diagnostics`` is the :class:`TrainingDiagnostics` being fed; ``get_epoch_stats``,
    ``compute`` and ``reset`` forward to it. ``attention_layers`` maps each captured module's
    metric name to its kind (``"mha"``, ``"hf"``, ``"registered"``).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        attention: bool,
        gradients: bool,
        every: int,
        group: Any,
        optimizer: torch.optim.Optimizer | None,
        update_ratio: bool,
        attention_names: str,
        diagnostics: TrainingDiagnostics,
    ) -> None:
        self.diagnostics = diagnostics
        self.every = every
        self.model = model
        self._inner = _unwrap(model)
        self._attention = attention
        self._attention_names = attention_names
        self._optimizer = optimizer
        self._update_ratio = update_ratio and optimizer is not None
        self._handles: list[Any] = []
        self._live = True
        self.step = 0  # completed steps (optimizer steps, else forward calls of the model)
        self.active = True  # whether the current step is sampled
        self._forwards = 0
        self._captured = 0  # attention hook calls since the model's forward began
        self._requests: dict[int, list[tuple[bool, bool] | None]] = {}
        self._warned: set[tuple[str, str]] = set()
        self._qualname = {m: n for n, m in self._inner.named_modules()}
        self.attention_layers: dict[str, str] = {}
        self._grad_probes: list[tuple[str, nn.Module, ProbeFn]] = []
        self._attached: set[tuple[int, str]] = set()

        self._params: _ParamSet | None = None
        if gradients:
            named = [(n, p) for n, p in self._inner.named_parameters() if p.requires_grad]
            self._params = _ParamSet(named, group)

        if attention:
            self._attach_attention()
        for module in self._qualname:
            reg = _REGISTRY.get(module)
            if reg is not None:
                for pr in reg.probes:
                    self._attach_registered(module, probe=pr)

        if optimizer is not None:
            self._handles.append(optimizer.register_step_pre_hook(_disable(self._on_pre_step)))
            self._handles.append(optimizer.register_step_post_hook(_disable(self._on_post_step)))
        # hooks on the object the user calls run eagerly even when it is a compiled wrapper
        self._handles.append(model.register_forward_pre_hook(_disable(self._on_root_pre)))
        self._handles.append(model.register_forward_hook(_disable(self._on_root_post)))
        _LIVE.add(self)

    # -- attention discovery ---------------------------------------------------------------

    def _layer_name(self, module: nn.Module) -> str:
        if self._attention_names == "index":
            return f"layer_{len(self.attention_layers)}"
        return self._qualname[module] or type(module).__name__

    def _attach_attention(self) -> None:
        modules = list(self._qualname)
        registered = {m for m in modules if (r := _REGISTRY.get(m)) is not None and r.attention}
        candidates = [
            m for m in modules if isinstance(m, nn.MultiheadAttention) or _is_hf_attention(m)
        ]
        # innermost only: an attention module wrapping another one reports nothing itself
        inner = set(candidates) | registered
        for m in modules:
            if m in registered:
                self._attach_registered(m)
            elif m in candidates and not any(c in inner for c in m.modules() if c is not m):
                if isinstance(m, nn.MultiheadAttention):
                    self._attach_mha(m)
                else:
                    self._attach_hf(m)
        if not self.attention_layers:
            warnings.warn(
                f"fastdiag.watch: no attention module found in {type(self._inner).__name__}: searched "
                f"{len(modules)} modules for torch.nn.MultiheadAttention, Hugging Face style modules "
                "(class name ending in 'Attention' that return their weights) and modules given to "
                "fastdiag.register_attention; gradients are still watched",
                UserWarning,
                stacklevel=3,
            )

    def _attach_mha(self, module: nn.MultiheadAttention) -> None:
        name = self._layer_name(module)
        self.attention_layers[name] = "mha"
        self._requests[id(module)] = []
        pre = _disable(lambda m, args, kwargs: self._mha_pre(m, args, kwargs))
        post = _disable(lambda m, args, kwargs, out: self._mha_post(m, name, args, out))
        self._handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        # prepend: hooks registered before ours see the output the caller asked for
        self._handles.append(module.register_forward_hook(post, with_kwargs=True, prepend=True))

    def _attach_hf(self, module: nn.Module) -> None:
        name = self._layer_name(module)
        self.attention_layers[name] = "hf"
        hook = _disable(lambda m, args, out: self._hf_post(m, name, out))
        self._handles.append(module.register_forward_hook(hook))

    def _attach_registered(self, module: nn.Module, probe: tuple[str, ProbeFn, str] | None = None) -> None:
        if not self._live or module not in self._qualname:
            return
        if probe is not None:
            pname, fn, at = probe
            key = f"{pname}/{self._qualname[module] or type(module).__name__}"
            if (id(fn), key) in self._attached:
                return
            self._attached.add((id(fn), key))
            if at == "grad":
                self._grad_probes.append((key, module, fn))
            else:
                hook = _disable(lambda m, args, out: self._probe_post(key, fn, m, args, out))
                self._handles.append(module.register_forward_hook(hook))
            return
        if not self._attention:
            return
        reg = _REGISTRY.get(module)
        if reg is None or reg.attention is None or (id(module), "attention") in self._attached:
            return
        self._attached.add((id(module), "attention"))
        extract, from_logits = reg.attention
        name = self._layer_name(module)
        self.attention_layers[name] = "registered"
        hook = _disable(lambda m, args, out: self._registered_post(m, name, extract, from_logits, args, out))
        self._handles.append(module.register_forward_hook(hook))

    # -- hooks (all device-side: no host copy of tensor data) ------------------------------

    def _mha_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        requests = self._requests.get(id(module))
        if not (self._live and self.active) or requests is None:
            if requests is not None:
                requests.append(None)
            return None
        kwargs = dict(kwargs)
        for pname, value in zip(_MHA_PARAMS[3:], args[3:], strict=False):
            kwargs[pname] = value
        requests.append((bool(kwargs.get("need_weights", True)), bool(kwargs.get("average_attn_weights", True))))
        kwargs["need_weights"] = True
        kwargs["average_attn_weights"] = False
        return args[:3], kwargs

    def _mha_post(self, module: nn.Module, name: str, args: tuple, output: Any) -> Any:
        requests = self._requests.get(id(module))
        request = requests.pop() if requests else None
        if request is None:
            return None
        need, average = request
        out, weights = output
        # a recomputation under activation checkpointing was already recorded by the forward
        if weights is not None and not _in_backward():
            if module.training and module.dropout > 0:
                self._warn_once(name, "dropout", (
                    f"fastdiag.watch: {name} applies attention dropout ({module.dropout}) in training; "
                    "nn.MultiheadAttention returns the post-dropout weights, so its attention "
                    "statistics include dropout"
                ))
            query = args[0] if args else None
            w = weights if weights.dim() == 4 else weights.unsqueeze(0)
            mask = None
            if isinstance(query, Tensor) and query.is_nested:
                # the nested fast path pads dropped queries with all-zero rows: leave them out
                mask = w[:, 0].sum(-1) > 0
            self.diagnostics.update_attention(name, w, row_mask=mask)
            self._captured += 1
        if not need:
            return out, None
        if average and weights is not None:
            return out, weights.mean(dim=-3)
        return out, weights

    def _hf_post(self, module: nn.Module, name: str, output: Any) -> None:
        if not (self._live and self.active) or _in_backward():
            return
        self._captured += 1
        weights = _find_weights(output)
        if weights is None:
            self._warn_once(name, "no_weights", (
                f"fastdiag.watch: {name} ({type(module).__name__}) returned no attention weights; "
                "build the model with output_attentions=True and attn_implementation='eager', or "
                "give an extract function with fastdiag.register_attention"
            ))
            return
        self.diagnostics.update_attention(name, weights)

    def _registered_post(
        self, module: nn.Module, name: str, extract: ExtractFn, from_logits: bool, args: tuple, output: Any
    ) -> None:
        if not (self._live and self.active) or _in_backward():
            return
        self._captured += 1
        weights = extract(module, args, output)
        if weights is not None:
            self.diagnostics.update_attention(name, weights, from_logits=from_logits)

    def _probe_post(self, key: str, fn: ProbeFn, module: nn.Module, args: tuple, output: Any) -> None:
        if self._live and self.active and not _in_backward():
            with torch.no_grad():
                value = fn(module, args, output)
                if value is not None:
                    self.diagnostics.update_probe(key, value)

    def _on_root_pre(self, module: nn.Module, args: tuple) -> None:
        if not self._live:
            return
        self._captured = 0
        if self._optimizer is None:  # without an optimizer, one forward call is one step
            self.active = self._forwards % self.every == 0
            self.step = self._forwards
            self._forwards += 1

    def _on_root_post(self, module: nn.Module, args: tuple, output: Any) -> None:
        if not (self._live and self.active):
            return
        if self.attention_layers and not self._captured:
            self._warn_once("", "not_run", (
                "fastdiag.watch: a sampled forward of the model ran none of the attention hooks "
                f"({', '.join(self.attention_layers)}). A model compiled with torch.compile keeps the "
                "hooks it had at its first call: call watch() before the first call of the compiled "
                "model (or torch._dynamo.reset() after watch())"
            ))
        # without an optimizer, gradients are read when the backward of a sampled forward ends
        if self._optimizer is not None or (self._params is None and not self._grad_probes):
            return
        if not torch.is_grad_enabled():
            return
        queued = [False]

        def on_grad(_grad: Tensor) -> None:
            if not queued[0]:
                queued[0] = True
                torch.autograd.Variable._execution_engine.queue_callback(self._record_gradients)

        for t in _tensors(output):
            if t.requires_grad:
                t.register_hook(on_grad)

    def _record_gradients(self, snapshot: bool = False) -> None:
        if not self._live:
            return
        with torch.no_grad():
            if self._params is not None:
                self._params.record_gradients(self.diagnostics, snapshot=snapshot)
            for key, module, fn in self._grad_probes:
                value = fn(module)
                if value is not None:  # e.g. a parameter that got no gradient this step
                    self.diagnostics.update_probe(key, value)

    def _on_pre_step(self, optimizer: Any, args: tuple, kwargs: dict) -> None:
        if self._live and self.active:
            self._record_gradients(snapshot=self._update_ratio)

    def _on_post_step(self, optimizer: Any, args: tuple, kwargs: dict) -> None:
        if not self._live:
            return
        if self.active and self._params is not None:
            with torch.no_grad():
                self._params.record_update(self.diagnostics)
        self.step += 1
        self.active = self.step % self.every == 0

    def _warn_once(self, name: str, what: str, message: str) -> None:
        if (name, what) not in self._warned:
            self._warned.add((name, what))
            warnings.warn(message, UserWarning, stacklevel=2)

    # -- handle API ------------------------------------------------------------------------

    def remove(self) -> None:
        """Detach every hook (idempotent); the statistics gathered so far stay available."""
        self._live = False
        for h in self._handles:
            h.remove()
        self._handles.clear()
        _LIVE.discard(self)

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def get_epoch_stats(self, sync_dist: bool = False, process_group: Any = None) -> dict[str, float]:
        return self.diagnostics.get_epoch_stats(sync_dist=sync_dist, process_group=process_group)

    def compute(self, sync_dist: bool = False, process_group: Any = None) -> dict[str, float]:
        return self.diagnostics.get_epoch_stats(sync_dist=sync_dist, process_group=process_group)

    def reset(self) -> None:
        self.diagnostics.reset()


def watch(
    model: nn.Module,
    *,
    attention: bool = True,
    gradients: bool = True,
    every: int = 1,
    group: str | int | Callable[[str], str] = "auto",
    optimizer: torch.optim.Optimizer | None = None,
    update_ratio: bool = True,
    attention_names: str = "qualified",
    diagnostics: TrainingDiagnostics | None = None,
) -> Watch:
    """Hook ``model`` so its training loop feeds a :class:`TrainingDiagnostics`; returns a :class:`Watch`.

    attention: capture per-head weights of ``nn.MultiheadAttention`` (forcing
        ``need_weights=True, average_attn_weights=False`` on sampled steps and giving the caller
        back exactly what it asked for), of Hugging Face style modules that return them, and of
        modules given to :func:`register_attention`. Warns, naming what was searched, when none.
    gradients: gradient health of every parameter with ``requires_grad`` (those without a
        gradient at that step are skipped). Read at the optimizer's step pre-hook when
        ``optimizer`` is given (after clipping, right for gradient accumulation and DDP), else
        when the backward of a sampled forward ends.
    every: sample one step in ``every``; a step is one ``optimizer.step()`` when an optimizer is
        given, else one forward call of ``model``. Hooks return at once on the other steps.
    group: ``"parameter"``, ``"module"`` (owning module's name), an int depth (first k name
        components) or a callable name -> group; ``"auto"`` = per parameter up to
        512 tensors, else per module (bounds the number of keys).
    update_ratio: with an optimizer, ``||param after - before|| / ||before||`` per group (keeps
        one copy of the parameters that have gradients).
    attention_names: ``"qualified"`` (module names, the default) or ``"index"`` (``layer_{i}``).
    diagnostics: feed an existing object instead of a new one.

    Under ``torch.compile`` call ``watch`` before the first call of the compiled model (dynamo
    keeps the hooks a module had when it was compiled; a sampled forward that ran none of the
    attention hooks warns); the hooks run eagerly, one graph break at each hooked module, so
    ``fullgraph=True`` is not possible while watching. While attached, the hooks also keep
    ``nn.TransformerEncoderLayer`` off its fused inference fast path (PyTorch disables it for
    hooked layers); ``remove()`` restores it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"every must be a positive int, got {every!r}")
    if attention_names not in ("qualified", "index"):
        raise ValueError(f"attention_names must be 'qualified' or 'index', got {attention_names!r}")
    if optimizer is not None and not hasattr(optimizer, "register_step_pre_hook"):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer (with step hooks), got {type(optimizer).__name__}"
        )
    if diagnostics is not None and not isinstance(diagnostics, TrainingDiagnostics):
        raise TypeError(f"diagnostics must be a TrainingDiagnostics, got {type(diagnostics).__name__}")
    _group_fn(group, 0)  # validate early
    return Watch(
        model,
        attention=bool(attention),
        gradients=bool(gradients),
        every=every,
        group=group,
        optimizer=optimizer,
        update_ratio=update_ratio,
        attention_names=attention_names,
        diagnostics=diagnostics if diagnostics is not None else TrainingDiagnostics(),
    )
