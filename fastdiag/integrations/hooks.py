"""``watch(model)``: hooks that feed a :class:`~fastdiag.diagnostics.training.TrainingDiagnostics`
while the user's own training loop runs.

``watch`` finds the attention modules (``torch.nn.MultiheadAttention``, Hugging Face style
modules: class name ending in ``Attention``, modules given to
:func:`~fastdiag.integrations.registry.register_attention`) and the probes of
:func:`~fastdiag.integrations.registry.probe`, hooks them, and reads gradient health at the
optimizer's step pre-hook (or when the backward of a sampled forward ends, or when an
integration calls ``Watch.record_gradients``: ``gradients_at``) and update ratios at its
post-hook. A Hugging Face style module that returns its weights (eager attention) is read
from them; one that does not is read from its ``scaled_dot_product_attention`` calls: an
:class:`~fastdiag.integrations.sdpa.SDPACapture` mode entered in its forward pre-hook and left
in its forward hook (``always_call``) sees them, runs them unchanged and keeps q and k for
``update_attention_qk`` (pre-dropout, never materialised). Every hook calls public methods of
``TrainingDiagnostics`` (``update_attention``, ``update_attention_qk``, ``update_gradients``,
``update_ratio``, ``update_probe``) and copies nothing to the host; the keys are those of
docs/metrics.md, §5 "Gradient and training health".

Which passes count: a forward of the watched model counts when the model is in training mode
and autograd is enabled as it starts (``include_eval=True``: every pass); an attention module
called outside the model's forward counts by its own ``training`` flag and autograd. Passes that
do not count record no attention and, without an optimizer, are not steps.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from fastdiag.diagnostics.params import GroupSpec, ParamTracker, group_fn
from fastdiag.diagnostics.training import TrainingDiagnostics
from fastdiag.integrations.registry import ExtractFn, ProbeFn, registration, subscribe, unsubscribe
from fastdiag.integrations.routers import RouterSpec, find_routers, fused_experts, router_spec
from fastdiag.integrations.sdpa import SDPACapture

__all__ = ["Watch", "watch"]

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


_OPTIMIZER_WRAPPER_ATTRS = ("optimizer", "_optimizer")


def _has_step_hooks(obj: Any) -> bool:
    """Whether ``obj`` can take step hooks: a ``torch.optim.Optimizer`` whose ``__init__`` ran
    (accelerate's ``AcceleratedOptimizer`` subclasses it without: no hook registry), or any object
    with both ``register_step_*_hook`` methods."""
    if not (callable(getattr(obj, "register_step_pre_hook", None)) and callable(getattr(obj, "register_step_post_hook", None))):
        return False
    if isinstance(obj, torch.optim.Optimizer):
        return isinstance(getattr(obj, "_optimizer_step_pre_hooks", None), dict)
    return True


def _unwrap_optimizer(optimizer: Any) -> Any:
    """The innermost optimizer with step hooks inside wrappers that expose it as ``.optimizer`` or
    ``._optimizer`` (accelerate's ``AcceleratedOptimizer``, Lightning's ``LightningOptimizer``):
    its ``step`` is the one that updates the parameters (accelerate skips it while accumulating)."""
    chain, seen, obj = [], set(), optimizer
    while obj is not None and id(obj) not in seen:
        seen.add(id(obj))
        chain.append(obj)
        obj = next(
            (v for a in _OPTIMIZER_WRAPPER_ATTRS if (v := getattr(obj, a, None)) is not None and v is not obj),
            None,
        )
    for obj in reversed(chain):
        if _has_step_hooks(obj):
            return obj
    raise TypeError(
        "optimizer must be a torch.optim.Optimizer (with step hooks) or a wrapper that exposes one as "
        f".optimizer / ._optimizer, got {type(optimizer).__name__} (searched: "
        f"{' -> '.join(type(o).__name__ for o in chain)})"
    )


def _is_hf_attention(module: nn.Module) -> bool:
    return type(module).__name__.endswith("Attention") and not isinstance(module, nn.MultiheadAttention)


def _mask_position(model: nn.Module) -> int | None:
    """Position of ``attention_mask`` among the positional parameters of ``model.forward``."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    for i, p in enumerate(params):
        if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            return None
        if p.name == "attention_mask":
            return i
    return None


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

    _SAMPLED = "sampled"  # a pending entry of a module hooked without SDPA capture

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
        include_eval: bool = False,
        gradients_at: str | None = None,
        routers: bool = True,
        expert_grad_norms: bool | None = None,
    ) -> None:
        self.diagnostics = diagnostics
        self.every = every
        self.model = model
        self._inner = _unwrap(model)
        self._attention = attention
        self._attention_names = attention_names
        self._optimizer = optimizer
        self._update_ratio = update_ratio and optimizer is not None
        # where gradient health is read: the optimizer's step pre-hook, the end of the backward of
        # a sampled forward, or record_gradients() (an integration's pre-clipping point)
        self._gradients_at = gradients_at or ("step" if optimizer is not None else "backward")
        self._grads_read_at = -1  # the step whose gradients record_gradients() last read
        self._handles: list[Any] = []
        self._live = True
        self.step = 0  # completed steps (optimizer steps, else forward calls of the model)
        self.active = True  # whether the current step is sampled
        self._forwards = 0
        self._include_eval = include_eval
        self._depth = 0  # nesting of the model's forward (a model called inside itself)
        self._root_counts = True  # whether the model's current forward counts (training pass)
        self._row_mask: Tensor | None = None  # bool [B, N] of the 2-D attention_mask, if any
        self._mask_pos = _mask_position(self._inner)
        self._captured = 0  # attention hook calls since the model's forward began
        self._requests: dict[int, list[tuple[bool, bool] | None]] = {}
        self._warned: set[tuple[str, str]] = set()
        self._qualname = {m: n for n, m in self._inner.named_modules()}
        self.attention_layers: dict[str, str] = {}
        self._grad_probes: list[tuple[str, nn.Module, ProbeFn]] = []
        self._attached: set[tuple[int, str]] = set()

        # the parameters watched (those with requires_grad at watch time) and this watch's own
        # tracker: its snapshot before an optimizer step is this model's, whoever else feeds
        # the same diagnostics
        self._params: list[tuple[str, nn.Parameter]] | None = None
        self._tracker: ParamTracker | None = None
        if gradients:
            self._params = [(n, p) for n, p in self._inner.named_parameters() if p.requires_grad]
            experts = fused_experts(self._inner) if expert_grad_norms is not False else {}
            self._tracker = ParamTracker("parameters", group=group, experts=experts)

        if attention:
            self._attach_attention()
        self.router_layers: dict[str, str] = {}  # metric name -> "hf" / "registered"
        if routers:
            self._attach_routers()
        for module in self._qualname:
            reg = registration(module)
            if reg is not None:
                for pr in reg.probes:
                    self.attach_registered(module, probe=pr)

        if optimizer is not None:
            self._handles.append(optimizer.register_step_pre_hook(_disable(self._on_pre_step)))
            self._handles.append(optimizer.register_step_post_hook(_disable(self._on_post_step)))
        # hooks on the object the user calls run eagerly even when it is a compiled wrapper
        self._handles.append(model.register_forward_pre_hook(_disable(self._on_root_pre), with_kwargs=True))
        self._handles.append(model.register_forward_hook(_disable(self._on_root_post), always_call=True))
        subscribe(self)

    # -- routers (fastdiag.integrations.routers) ---------------------------------------------

    def _attach_routers(self) -> None:
        for i, (module, spec) in enumerate(find_routers(self._inner)):
            name = f"router_{i}" if self._attention_names == "index" else (
                self._qualname[module] or type(module).__name__
            )
            self.router_layers[name] = "registered" if router_spec(module) is not None else "hf"
            hook = _disable(lambda m, args, out, name=name, spec=spec: self._router_post(m, name, spec, args, out))
            self._handles.append(module.register_forward_hook(hook))

    def _router_post(self, module: nn.Module, name: str, spec: RouterSpec, args: tuple, output: Any) -> None:
        if not self._sampled(module):
            return
        logits = spec.fn(module, args, output)
        if logits is None:
            return
        rows = self._row_mask
        # the padding mask of the model's forward when the router saw one row per token
        mask = rows if rows is not None and rows.numel() == logits.numel() // logits.shape[-1] else None
        self.diagnostics.update_router(
            name, logits, top_k=min(spec.top_k or 1, logits.shape[-1]), capacity_factor=spec.capacity_factor,
            row_mask=mask,
        )

    # -- attention discovery ---------------------------------------------------------------

    def _layer_name(self, module: nn.Module) -> str:
        if self._attention_names == "index":
            return f"layer_{len(self.attention_layers)}"
        return self._qualname[module] or type(module).__name__

    def _attach_attention(self) -> None:
        modules = list(self._qualname)
        registered = {m for m in modules if (r := registration(m)) is not None and r.attention}
        candidates = [
            m for m in modules if isinstance(m, nn.MultiheadAttention) or _is_hf_attention(m)
        ]
        # innermost only: an attention module wrapping another one reports nothing itself
        inner = set(candidates) | registered
        for m in modules:
            if m in registered:
                self.attach_registered(m)
            elif m in candidates and not any(c in inner for c in m.modules() if c is not m):
                if isinstance(m, nn.MultiheadAttention):
                    self._attach_mha(m)
                else:
                    self._attach_hf(m)
        if not self.attention_layers:
            warnings.warn(
                f"fastdiag.watch: no attention module found in {type(self._inner).__name__}: searched "
                f"{len(modules)} modules for torch.nn.MultiheadAttention, Hugging Face style modules "
                "(class name ending in 'Attention': read from their weights or their "
                "scaled_dot_product_attention calls) and modules given to "
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
        self._hook_attention(module, name, None, False)

    def _hook_attention(self, module: nn.Module, name: str, extract: ExtractFn | None, from_logits: bool) -> None:
        """Pre-hook: decide whether this call is sampled (and, without ``extract``, enter an
        SDPA capture); post-hook (also when the forward raises): leave it and record."""
        pending: list[Any] = []  # one entry per call in flight (None: not sampled)
        pre = _disable(lambda m, args: self._attention_pre(m, pending, extract is None))
        post = _disable(lambda m, args, out: self._attention_post(m, name, pending, extract, from_logits, args, out))
        self._handles.append(module.register_forward_pre_hook(pre))
        self._handles.append(module.register_forward_hook(post, always_call=True))

    def attach_registered(self, module: nn.Module, probe: tuple[str, ProbeFn, str] | None = None) -> None:
        """Hook ``module``'s registered attention, or its ``probe`` (name, fn, at), if this watch
        is live and ``module`` is in the watched model (called by the registry)."""
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
        reg = registration(module)
        if reg is None or reg.attention is None or (id(module), "attention") in self._attached:
            return
        self._attached.add((id(module), "attention"))
        extract, from_logits = reg.attention
        name = self._layer_name(module)
        self.attention_layers[name] = "registered"
        self._hook_attention(module, name, extract, from_logits)

    # -- hooks (all device-side: no host copy of tensor data) ------------------------------

    def _mha_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        requests = self._requests.get(id(module))
        if not (self._live and self.active and self._counts(module)) or requests is None:
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

    def _counts(self, module: nn.Module) -> bool:
        """Whether a call of ``module`` now belongs to a counted (training) pass."""
        if self._include_eval:
            return True
        if self._depth:
            return self._root_counts
        return module.training and torch.is_grad_enabled()

    def _sampled(self, module: nn.Module) -> bool:
        return self._live and self.active and not _in_backward() and self._counts(module)

    def _attention_pre(self, module: nn.Module, pending: list, sdpa: bool) -> None:
        if not self._sampled(module):
            pending.append(None)
        else:
            pending.append(SDPACapture().open() if sdpa else self._SAMPLED)

    def _attention_post(
        self,
        module: nn.Module,
        name: str,
        pending: list,
        extract: ExtractFn | None,
        from_logits: bool,
        args: tuple,
        output: Any,
    ) -> None:
        entry = pending.pop() if pending else None
        if entry is None:
            return
        calls = []
        if isinstance(entry, SDPACapture):
            if not entry.close():
                self._warn_once(name, "mode_stack", (
                    f"fastdiag.watch: {name} ({type(module).__name__}) left a torch function mode "
                    "entered in its forward; its scaled_dot_product_attention capture stays active "
                    "until that mode exits"
                ))
            calls = entry.calls
        if output is None:  # the forward raised (always_call hook), or returned nothing
            return
        self._captured += 1
        if extract is not None:
            weights = extract(module, args, output)
            if weights is not None:
                self.diagnostics.update_attention(
                    name, weights, from_logits=from_logits, row_mask=self._rows(weights.shape[0], weights.shape[-2])
                )
            return
        weights = _find_weights(output)
        if weights is not None:
            self.diagnostics.update_attention(name, weights, row_mask=self._rows(weights.shape[0], weights.shape[-2]))
            return
        for c in calls:
            self.diagnostics.update_attention_qk(
                name,
                c.q,
                c.k,
                attn_mask=c.attn_mask,
                is_causal=c.is_causal,
                scale=c.scale,
                enable_gqa=c.enable_gqa,
                row_mask=self._rows(c.q.shape[0], c.q.shape[-2]),
            )
        if not calls:
            self._warn_once(name, "no_weights", (
                f"fastdiag.watch: {name} ({type(module).__name__}) returned no attention weights and "
                "called no torch.nn.functional.scaled_dot_product_attention; build the model with "
                "attn_implementation='sdpa' or 'eager', or give an extract function with "
                "fastdiag.register_attention"
            ))

    def _rows(self, batch: int, queries: int) -> Tensor | None:
        """The padding row mask of the model's forward when it fits [batch, queries]."""
        rows = self._row_mask
        if rows is None or tuple(rows.shape) != (batch, queries):
            return None
        return rows

    def _probe_post(self, key: str, fn: ProbeFn, module: nn.Module, args: tuple, output: Any) -> None:
        if self._sampled(module):
            with torch.no_grad():
                value = fn(module, args, output)
                if value is not None:
                    self.diagnostics.update_probe(key, value)

    def _on_root_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not self._live:
            return
        self._depth += 1
        if self._depth > 1:  # the model called inside its own forward: part of the same pass
            return
        self._root_counts = self._include_eval or (self._inner.training and torch.is_grad_enabled())
        self._captured = 0
        self._row_mask = self._padding_rows(args, kwargs)
        if self._optimizer is None and self._root_counts:  # one counted forward call is one step
            self.active = self._forwards % self.every == 0
            self.step = self._forwards
            self._forwards += 1

    def _padding_rows(self, args: tuple, kwargs: dict) -> Tensor | None:
        """bool [B, N] (True = real token) of a 2-D ``attention_mask`` given to the model."""
        mask = kwargs.get("attention_mask")
        if mask is None and self._mask_pos is not None and len(args) > self._mask_pos:
            mask = args[self._mask_pos]
        if not isinstance(mask, Tensor) or mask.dim() != 2 or mask.is_nested:
            return None
        return mask.detach() != 0

    def _on_root_post(self, module: nn.Module, args: tuple, output: Any) -> None:
        if not self._live or self._depth == 0:
            return
        self._depth -= 1
        if self._depth:
            return
        self._row_mask = None
        if output is None or not (self.active and self._root_counts):
            return
        if self.attention_layers and not self._captured:
            self._warn_once("", "not_run", (
                "fastdiag.watch: a sampled forward of the model ran none of the attention hooks "
                f"({', '.join(self.attention_layers)}). A model compiled with torch.compile keeps the "
                "hooks it had at its first call: call watch() before the first call of the compiled "
                "model (or torch._dynamo.reset() after watch())"
            ))
        # gradients_at="backward" (the default without an optimizer): read when the backward of a
        # sampled forward ends
        if self._gradients_at != "backward" or (self._params is None and not self._grad_probes):
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
                self.diagnostics.update_gradients(self._params, snapshot=snapshot, tracker=self._tracker)
            for key, module, fn in self._grad_probes:
                value = fn(module)
                if value is not None:  # e.g. a parameter that got no gradient this step
                    self.diagnostics.update_probe(key, value)

    def _on_pre_step(self, optimizer: Any, args: tuple, kwargs: dict) -> None:
        if self._gradients_at == "step":
            self.record_gradients()

    def record_gradients(self) -> None:
        """Read gradient health now, if the current step is sampled (with an optimizer, also the
        parameters' snapshot behind ``update_ratio``); at most once per step. For
        ``gradients_at="manual"``: an integration calls it where its host measures gradients
        (after the last backward of the step, before clipping)."""
        if self._live and self.active and self._grads_read_at != self.step:
            self._grads_read_at = self.step
            self._record_gradients(snapshot=self._update_ratio)

    def _on_post_step(self, optimizer: Any, args: tuple, kwargs: dict) -> None:
        if not self._live:
            return
        if self.active and self._params is not None:
            with torch.no_grad():
                self.diagnostics.update_ratio(self._params, tracker=self._tracker)
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
        unsubscribe(self)

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
    group: GroupSpec = "auto",
    optimizer: torch.optim.Optimizer | None = None,
    update_ratio: bool = True,
    attention_names: str = "qualified",
    diagnostics: TrainingDiagnostics | None = None,
    include_eval: bool = False,
    gradients_at: str | None = None,
    routers: bool = True,
    expert_grad_norms: bool | None = None,
) -> Watch:
    """Hook ``model`` so its training loop feeds a :class:`TrainingDiagnostics`; returns a :class:`Watch`.

    attention: capture per-head weights of ``nn.MultiheadAttention`` (forcing
        ``need_weights=True, average_attn_weights=False`` on sampled steps and giving the caller
        back exactly what it asked for), of Hugging Face style modules (class name ending in
        ``Attention``, innermost) and of modules given to :func:`register_attention`. A module
        that returns its weights (eager attention) is read from them; one that does not is read
        from the q and k of its ``torch.nn.functional.scaled_dot_product_attention`` calls
        (transformers' default ``attn_implementation="sdpa"``, nanoGPT-style blocks): the call
        runs unchanged, the statistics are those of the pre-dropout probabilities and the
        N x Nk weights are never built. When the model's forward gets a 2-D ``attention_mask``
        [B, N] (0 = padding), the padded query rows are left out of every layer that is not an
        ``nn.MultiheadAttention``. Warns, naming what was searched, when none.
    gradients: gradient health of every parameter with ``requires_grad`` (those without a
        gradient at that step are skipped). Read where ``gradients_at`` says.
    gradients_at: ``"step"`` (the default with an optimizer): at the optimizer's step pre-hook
        (after any clipping; right for gradient accumulation and DDP); ``"backward"`` (the
        default without): when the backward of a sampled forward ends (each micro-batch under
        gradient accumulation); ``"manual"``: when :meth:`Watch.record_gradients` is called, at
        most once per step (the Hugging Face and Lightning callbacks call it after the last
        backward of the step and before clipping, where their hosts measure ``grad_norm``).
    every: sample one step in ``every``; a step is one ``optimizer.step()`` when an optimizer is
        given, else one forward call of ``model``. Hooks return at once on the other steps.
    optimizer: a ``torch.optim.Optimizer``, or a wrapper that exposes one as ``.optimizer`` /
        ``._optimizer`` (accelerate's ``AcceleratedOptimizer``, Lightning's
        ``LightningOptimizer``): the innermost optimizer with step hooks is hooked.
    group: ``"parameter"``, ``"module"`` (owning module's name), an int depth (first k name
        components) or a callable name -> group; ``"auto"`` = per parameter up to
        512 tensors, else per module (bounds the number of keys).
    update_ratio: with an optimizer, ``||param after - before|| / ||before||`` per group (keeps
        one copy of the parameters that have gradients).
    attention_names: ``"qualified"`` (module names, the default) or ``"index"`` (``layer_{i}``).
    diagnostics: feed an existing object instead of a new one.
    include_eval: also record the passes that are not training passes. By default a forward of
        ``model`` counts only when ``model.training`` and autograd is enabled as it starts (an
        attention module called on its own: its own ``training`` flag); the other passes
        (``model.eval()``, ``torch.no_grad()``, ``torch.inference_mode()``: validation,
        generation) record no attention or forward probe and, without an optimizer, are not
        steps.

    routers: record every mixture-of-experts router (:mod:`fastdiag.integrations.routers`:
        Hugging Face routers that give ``router_logits``, gates of sparse MoE blocks, modules
        given to :func:`register_router`) on the sampled passes: ``router_entropy_norm``,
        ``router_top1``, ``expert_load_gini``, ``expert_active_ratio``,
        ``expert_load_max_over_mean``, ``router_topk_jaccard`` (+ ``expert_over_capacity`` with
        a capacity factor) per router (``/{qualified name}``, ``/router_{i}`` with
        ``attention_names="index"``); padded tokens of a 2-D ``attention_mask`` are left out.
    expert_grad_norms: with ``gradients``, also ``grad_norm/{experts module}.expert_{e}``: the
        gradient norm of expert e's slices of the fused [E, ...] parameters of each module
        whose class name ends in ``Experts`` (transformers 5.x). None (default): on when the
        model has such parameters.

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
    if optimizer is not None:
        optimizer = _unwrap_optimizer(optimizer)
    if gradients_at not in (None, "step", "backward", "manual"):
        raise ValueError(f"gradients_at must be 'step', 'backward', 'manual' or None, got {gradients_at!r}")
    if gradients_at == "step" and optimizer is None:
        raise ValueError("gradients_at='step' needs an optimizer (the step pre-hook reads the gradients)")
    if diagnostics is not None and not isinstance(diagnostics, TrainingDiagnostics):
        raise TypeError(f"diagnostics must be a TrainingDiagnostics, got {type(diagnostics).__name__}")
    group_fn(group, 0)  # validate early
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
        include_eval=bool(include_eval),
        gradients_at=gradients_at,
        routers=bool(routers),
        expert_grad_norms=None if expert_grad_norms is None else bool(expert_grad_norms),
    )
