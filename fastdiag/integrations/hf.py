"""``FastdiagCallback`` for the Hugging Face ``transformers.Trainer``.

    trainer = Trainer(model, args, train_dataset=ds, callbacks=[FastdiagCallback(every=10)])
    trainer.train()   # fastdiag/... keys in trainer.state.log_history and the report_to loggers

What the callback does, and where:

* ``on_train_begin``: :func:`fastdiag.watch` on the model the Trainer calls (DDP / FSDP /
  ``torch.compile`` wrappers are unwrapped by ``watch``), with the Trainer's optimizer
  (accelerate's ``AcceleratedOptimizer``: ``watch`` hooks the optimizer inside it) and
  ``gradients_at="manual"``. It moves itself in the Trainer's callback list to just after
  ``DefaultFlowCallback``, before the reporting integrations (``report_to``: TensorBoard, W&B,
  ...), which the Trainer puts before the user's callbacks: they see the ``logs`` dict after
  this callback has added its keys.
* Gradient health is read where the Trainer measures its ``grad_norm``: after the last backward
  of the step (the accumulated gradient under gradient accumulation) and before clipping. The
  callback wraps the Trainer's ``accelerator.clip_grad_norm_`` (an attribute of that accelerator
  instance, restored at train end), which the Trainer calls once per optimizer step, with
  ``max_grad_norm`` or with ``inf`` when clipping is off, and reads the gradients just before it
  (after unscaling them under fp16 mixed precision, as accelerate does first). When no such
  call happens (gradients on mixed device meshes, DeepSpeed), ``on_pre_optimizer_step`` reads
  them instead, after clipping.
* ``on_log``: for the Trainer's training logs (those with ``loss``; evaluation and the final
  summary are left alone) with at least one sampled step since the last one, one
  ``get_epoch_stats()`` (one host copy; summed over the ranks under torch.distributed) and
  ``reset()``: the values of the logging interval go into the ``logs`` dict under ``prefix``,
  into the matching ``state.log_history`` entry (the Trainer appends a copy of ``logs`` before
  calling the callbacks) and, on the main process, into ``logger`` (a
  :class:`fastdiag.MetricsLogger`, without the prefix) at ``state.global_step``.
* ``on_train_end``: the hooks are removed and ``clip_grad_norm_`` restored. Steps after the
  last logging step stay in ``callback.watch`` (``get_epoch_stats()``).

Evaluation passes (``model.eval()`` under ``torch.no_grad()``) record nothing: ``watch`` counts
training-mode forwards only.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import CallbackHandler, DefaultFlowCallback

from fastdiag.diagnostics.params import GroupSpec
from fastdiag.diagnostics.training import TrainingDiagnostics
from fastdiag.integrations.callbacks import check_arguments, distributed, sampled_between
from fastdiag.integrations.hooks import Watch, watch

__all__ = ["FastdiagCallback"]


def _callers(*types: type) -> dict[type, Any]:
    """The ``self`` of the nearest calling frames that are methods of each of ``types``
    (the Trainer and its CallbackHandler while they run a callback event)."""
    found: dict[type, Any] = {}
    frame = sys._getframe(1)
    while frame is not None and len(found) < len(types):
        obj = frame.f_locals.get("self")
        for t in types:
            if t not in found and isinstance(obj, t):
                found[t] = obj
        frame = frame.f_back
    return found


class FastdiagCallback(TrainerCallback):
    """Feeds a :func:`fastdiag.watch` during ``Trainer.train()`` and logs its statistics with
    the Trainer's logs (see the module docstring for the hook points).

    every: sample one optimizer step in ``every``; group, attention, gradients, update_ratio,
    attention_names, diagnostics: as in :func:`fastdiag.watch`; logger: a
    :class:`fastdiag.MetricsLogger` that also gets each interval's values (main process only);
    prefix: put before every key in the Trainer's logs; sync_dist: sum over the ranks when
    torch.distributed is initialised (every rank logs at the same steps).

    ``watch`` is the live :class:`~fastdiag.integrations.hooks.Watch` (None before training);
    ``last_stats`` the values of the last logging interval (without the prefix).
    """

    def __init__(
        self,
        *,
        every: int = 1,
        group: GroupSpec = "auto",
        attention: bool = True,
        gradients: bool = True,
        update_ratio: bool = True,
        attention_names: str = "qualified",
        diagnostics: TrainingDiagnostics | None = None,
        logger: Any = None,
        prefix: str = "fastdiag/",
        sync_dist: bool = True,
    ) -> None:
        check_arguments(every, prefix, logger, diagnostics, group)
        if attention_names not in ("qualified", "index"):
            raise ValueError(f"attention_names must be 'qualified' or 'index', got {attention_names!r}")
        self.every = every
        self.prefix = prefix
        self.logger = logger
        self.sync_dist = bool(sync_dist)
        self._watch_kwargs = dict(
            every=every,
            group=group,
            attention=bool(attention),
            gradients=bool(gradients),
            update_ratio=bool(update_ratio),
            attention_names=attention_names,
        )
        self._diagnostics = diagnostics
        self.watch: Watch | None = None
        self.last_stats: dict[str, float] = {}
        self._logged_step = 0  # watch.step at the last report
        self._restore: list[tuple[Any, str, Any]] = []  # (object, attribute, previous value or _ABSENT)

    # -- events --------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._detach()
        callers = _callers(Trainer, CallbackHandler)
        trainer, handler = callers.get(Trainer), callers.get(CallbackHandler)
        if handler is not None:
            self._move_before_reporters(handler)
        if trainer is None or handler is None:
            warnings.warn(
                "fastdiag FastdiagCallback: on_train_begin was not called by a transformers.Trainer "
                "through its CallbackHandler: the callback keeps its place in the callback list "
                "(callbacks before it see no fastdiag keys) and gradients are read at "
                "on_pre_optimizer_step, after clipping",
                UserWarning,
                stacklevel=2,
            )
        target = getattr(trainer, "model_wrapped", None)
        if target is None:
            target = model
        if target is None:
            raise ValueError("FastdiagCallback: the Trainer passed no model to on_train_begin")
        self.watch = watch(
            target,
            optimizer=optimizer,
            diagnostics=self._diagnostics if self._diagnostics is not None else TrainingDiagnostics(),
            gradients_at="manual",
            **self._watch_kwargs,
        )
        self._logged_step = 0
        accelerator = getattr(trainer, "accelerator", None)
        if accelerator is not None and callable(getattr(accelerator, "clip_grad_norm_", None)):
            self._wrap_clip(accelerator)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        # fallback when the Trainer measured its norm without accelerator.clip_grad_norm_
        # (no-op when the wrapper already read this step's gradients)
        if self.watch is not None:
            self.watch.record_gradients()

    def on_step_end(self, args, state, control, **kwargs):
        # a step the optimizer skipped (fp16 overflow: no step hooks, watch.step unchanged)
        # must not keep the next step from being read
        if self.watch is not None:
            self.watch._grads_read_at = -1

    def on_log(self, args, state, control, logs=None, **kwargs):
        w = self.watch
        if w is None or not isinstance(logs, dict) or "loss" not in logs:
            return
        if not sampled_between(self._logged_step, w.step, self.every):
            return
        entry = self._history_entry(state, logs)
        stats = w.get_epoch_stats(sync_dist=self.sync_dist and distributed())
        w.reset()
        self._logged_step = w.step
        self.last_stats = stats
        prefixed = {f"{self.prefix}{k}": v for k, v in stats.items()}
        logs.update(prefixed)
        if entry is not None:
            entry.update(prefixed)
        if self.logger is not None and state.is_world_process_zero:
            self.logger.log(stats, state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        self._detach()

    # -- helpers -------------------------------------------------------------------------------

    @staticmethod
    def _history_entry(state: Any, logs: dict) -> dict | None:
        """The ``state.log_history`` entry the Trainer made of ``logs`` just before on_log."""
        history = getattr(state, "log_history", None)
        if not history:
            return None
        entry = history[-1]
        if entry is logs or entry.get("step") != state.global_step:
            return None
        # the entry is {**logs, "step": ...}: the same value objects
        return entry if all(entry.get(k, _ABSENT) is v for k, v in logs.items()) else None

    def _move_before_reporters(self, handler: Any) -> None:
        """Put this callback just after DefaultFlowCallback (which decides when to log): the
        reporting integrations and the other user callbacks see the logs with its keys."""
        cbs = handler.callbacks
        if self not in cbs:
            return
        cbs.remove(self)
        flow = [i for i, cb in enumerate(cbs) if isinstance(cb, DefaultFlowCallback)]
        cbs.insert(flow[-1] + 1 if flow else 0, self)

    def _wrap_clip(self, accelerator: Any) -> None:
        original = accelerator.clip_grad_norm_
        previous = accelerator.__dict__.get("clip_grad_norm_", _ABSENT)

        def clip_grad_norm_(parameters, max_norm, *args, **kwargs):
            w = self.watch
            if w is None or not w.active:
                return original(parameters, max_norm, *args, **kwargs)
            if getattr(accelerator, "scaler", None) is not None:
                # fp16: read the unscaled gradients, as the Trainer's norm is; accelerate then
                # must not unscale them a second time
                accelerator.unscale_gradients()
                w.record_gradients()
                saved = accelerator.__dict__.get("unscale_gradients", _ABSENT)
                accelerator.unscale_gradients = _no_unscale
                try:
                    return original(parameters, max_norm, *args, **kwargs)
                finally:
                    _set(accelerator, "unscale_gradients", saved)
            w.record_gradients()
            return original(parameters, max_norm, *args, **kwargs)

        accelerator.clip_grad_norm_ = clip_grad_norm_
        self._restore.append((accelerator, "clip_grad_norm_", previous))

    def _detach(self) -> None:
        if self.watch is not None:
            self.watch.remove()
        for obj, name, previous in reversed(self._restore):
            _set(obj, name, previous)
        self._restore.clear()


_ABSENT = object()


def _no_unscale(*args: Any, **kwargs: Any) -> None:
    return None


def _set(obj: Any, name: str, value: Any) -> None:
    """Restore an instance attribute (``_ABSENT``: delete it, the class attribute shows again)."""
    if value is _ABSENT:
        obj.__dict__.pop(name, None)
    else:
        setattr(obj, name, value)
