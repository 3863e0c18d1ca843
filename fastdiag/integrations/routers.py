"""Mixture-of-experts routers for :func:`fastdiag.watch`: discovery and :func:`register_router`.

``watch`` records, per router, the statistics of
:meth:`~fastdiag.diagnostics.training.TrainingDiagnostics.update_router` (docs/metrics.md §5)
from the router logits [tokens, E] its forward produces. Routers are found

* in Hugging Face models that record ``router_logits`` (``output_router_logits=True``): the
  model's ``_can_record_outputs["router_logits"]`` names the router class and the index of the
  logits in its output (transformers 5.x: ``MixtralTopKRouter``, ``Qwen2MoeTopKRouter``,
  ``OlmoeTopKRouter``, ... output 0), so ``watch`` reads exactly what the model reports;
* in sparse MoE blocks (class name ending in ``SparseMoeBlock`` / ``MoeBlock`` / ``MoE`` with
  a ``gate`` submodule, e.g. transformers 4.x where ``gate`` is an ``nn.Linear``): the gate's
  output, or its first element when it returns a tuple;
* in modules given to :func:`register_router` (any other router).

Top-k: the registration's ``top_k``, else the router's (or its block's) ``top_k`` attribute,
else the model config's ``num_experts_per_tok``, else 1. Fused expert parameters (a module
whose class name ends in ``Experts`` holding [E, ...] parameters, ``E = num_experts``) are
listed by :func:`fused_experts` for the per-expert gradient norms.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

from torch import Tensor, nn

__all__ = ["RouterFn", "RouterSpec", "find_routers", "fused_experts", "register_router", "router_spec"]

RouterFn = Callable[[nn.Module, tuple, Any], "Tensor | None"]


class RouterSpec(NamedTuple):
    """How to read one router: ``fn(module, args, output)`` -> logits [..., E] (or None), its
    top-k (None: found from the module / config) and capacity factor (None: no capacity key)."""

    fn: RouterFn
    top_k: int | None
    capacity_factor: float | None


_REGISTRY: weakref.WeakKeyDictionary[nn.Module, RouterSpec] = weakref.WeakKeyDictionary()
_MOE_SUFFIXES = ("SparseMoeBlock", "MoeBlock", "MoEBlock", "MoE", "Moe")


def _first(module: nn.Module, args: tuple, output: Any) -> Tensor | None:
    """The output itself, or its first element (a router returning (logits, scores, indices))."""
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    return output if isinstance(output, Tensor) and output.is_floating_point() else None


def _item(index: int) -> RouterFn:
    def fn(module: nn.Module, args: tuple, output: Any) -> Tensor | None:
        if isinstance(output, (tuple, list)):
            output = output[index] if -len(output) <= index < len(output) else None
        return output if isinstance(output, Tensor) and output.is_floating_point() else None

    return fn


def register_router(
    module: nn.Module,
    fn: RouterFn | None = None,
    *,
    top_k: int | None = None,
    capacity_factor: float | None = None,
) -> nn.Module:
    """Declare ``module`` a mixture-of-experts router for :func:`fastdiag.watch`; returns it.

    fn: ``fn(module, args, output)`` -> router logits [..., E] (leading axes: the tokens), or
        None to skip the call; default: the output, or its first element when it is a tuple.
    top_k: experts per token (default: the module's ``top_k``, else the model config's
        ``num_experts_per_tok``, else 1). capacity_factor: also report
        ``expert_over_capacity/{router}`` (capacity per expert ``ceil(cf * tokens * k / E)``).
    Register before calling ``watch`` (a watch picks up the registrations present when it
    starts); a registered module overrides the automatic discovery.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    if fn is not None and not callable(fn):
        raise TypeError(f"fn must be callable (module, args, output) -> logits or None, got {type(fn).__name__}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= 16):
        raise ValueError(f"top_k must be an int in [1, 16] or None, got {top_k!r}")
    if capacity_factor is not None:
        if isinstance(capacity_factor, bool) or not isinstance(capacity_factor, (int, float)):
            raise TypeError(f"capacity_factor must be a number or None, got {type(capacity_factor).__name__}")
        if not capacity_factor > 0:
            raise ValueError(f"capacity_factor must be > 0, got {capacity_factor!r}")
        capacity_factor = float(capacity_factor)
    _REGISTRY[module] = RouterSpec(fn if fn is not None else _first, top_k, capacity_factor)
    return module


def router_spec(module: nn.Module) -> RouterSpec | None:
    """The registration of ``module`` (None if it has none)."""
    return _REGISTRY.get(module)


def _recorded_router(model: nn.Module) -> tuple[type, int] | None:
    """(router class, output index) from a Hugging Face model's ``_can_record_outputs``."""
    for m in model.modules():
        spec = getattr(m, "_can_record_outputs", None)
        if not isinstance(spec, dict):
            continue
        rec = spec.get("router_logits")
        target = getattr(rec, "target_class", rec)
        if isinstance(target, type) and issubclass(target, nn.Module):
            index = getattr(rec, "index", 0)
            return target, index if isinstance(index, int) else 0
    return None


def _config_top_k(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for attr in ("num_experts_per_tok", "moe_topk", "top_k"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return value
    return None


def _attr_top_k(*modules: nn.Module | None) -> int | None:
    for m in modules:
        value = getattr(m, "top_k", None)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return value
    return None


def find_routers(model: nn.Module) -> list[tuple[nn.Module, RouterSpec]]:
    """Every router of ``model`` (registered, recorded by the HF model, gate of a sparse MoE
    block) in module order, each with its spec (top-k resolved)."""
    modules = list(model.modules())
    parent: dict[nn.Module, nn.Module] = {}
    for m in modules:
        for c in m.children():
            parent.setdefault(c, m)
    recorded = _recorded_router(model)
    config_k = _config_top_k(model)
    found: dict[nn.Module, RouterSpec] = {}
    for m in modules:
        spec = _REGISTRY.get(m)
        if spec is not None:
            found[m] = spec._replace(top_k=spec.top_k or _attr_top_k(m, parent.get(m)) or config_k or 1)
        elif recorded is not None and isinstance(m, recorded[0]):
            found[m] = RouterSpec(_item(recorded[1]), _attr_top_k(m, parent.get(m)) or config_k or 1, None)
    if recorded is None:  # blocks of models that do not say which module gives router_logits
        for m in modules:
            gate = getattr(m, "gate", None)
            if (
                type(m).__name__.endswith(_MOE_SUFFIXES)
                and isinstance(gate, nn.Module)
                and gate not in found
                and hasattr(m, "experts")
            ):
                found[gate] = RouterSpec(_first, _attr_top_k(gate, m) or config_k or 1, None)
    order = {m: i for i, m in enumerate(modules)}
    return sorted(found.items(), key=lambda item: order[item[0]])


def fused_experts(model: nn.Module) -> dict[str, tuple[str, int]]:
    """Fused expert parameters: qualified parameter name -> (owning module's name, E), for every
    module whose class name ends in ``Experts`` and its parameters of >= 3 dims with
    ``shape[0] == E`` (E = the module's ``num_experts`` / ``num_local_experts``)."""
    out: dict[str, tuple[str, int]] = {}
    for mname, m in model.named_modules():
        if not type(m).__name__.endswith("Experts"):
            continue
        e = getattr(m, "num_experts", None) or getattr(m, "num_local_experts", None)
        if not isinstance(e, int) or isinstance(e, bool) or e < 1:
            continue
        for pname, p in m.named_parameters(recurse=False):
            if p.dim() >= 3 and p.shape[0] == e:
                out[f"{mname}.{pname}" if mname else pname] = (mname, e)
    return out
