"""``FastdiagCallback`` for Lightning (``lightning.pytorch.Trainer``).

    trainer = L.Trainer(callbacks=[FastdiagCallback(every=10)], logger=CSVLogger("logs"))
    trainer.fit(module)   # fastdiag/... columns in every logger, at Lightning's logging steps

Hook points:

* ``on_train_start`` (after the sanity-check validation, once the optimizers exist):
  :func:`fastdiag.watch` on the LightningModule with ``trainer.optimizers[optimizer_index]``
  (a ``LightningOptimizer`` would be unwrapped too) and ``gradients_at="manual"``.
* ``on_before_optimizer_step``: gradient health. Lightning calls it once per optimizer step,
  after the last backward of the accumulation window and after AMP unscaling, and before
  gradient clipping (``gradient_clip_val``).
* ``on_train_batch_end`` of a batch that ended an optimizer step at one of Lightning's logging
  steps (``trainer.global_step % trainer.log_every_n_steps == 0``, or ``trainer.should_stop``):
  one ``get_epoch_stats()`` (one host copy; summed over the ranks under torch.distributed) and
  ``reset()``, then ``pl_module.log_dict(..., on_step=True, on_epoch=False)`` with ``prefix``:
  Lightning writes them to every logger and ``trainer.callback_metrics``; on rank 0, also
  ``logger`` (a :class:`fastdiag.MetricsLogger`, without the prefix) at ``trainer.global_step``.
* ``on_train_end``: the hooks are removed; steps after the last logging step stay in
  ``callback.watch``.

Validation and test loops run in eval mode without autograd: ``watch`` records nothing there.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback

from fastdiag.diagnostics.params import GroupSpec
from fastdiag.diagnostics.training import TrainingDiagnostics
from fastdiag.integrations.callbacks import check_arguments, distributed, sampled_between
from fastdiag.integrations.hooks import Watch, watch

__all__ = ["FastdiagCallback"]


class FastdiagCallback(Callback):
    """Feeds a :func:`fastdiag.watch` during ``Trainer.fit`` and logs its statistics through
    ``pl_module.log_dict`` at Lightning's logging steps.

    every: sample one optimizer step in ``every``; group, attention, gradients, update_ratio,
    attention_names, diagnostics: as in :func:`fastdiag.watch`; optimizer_index: which of
    ``trainer.optimizers`` is watched; logger: a :class:`fastdiag.MetricsLogger` that also gets
    each interval's values (rank 0 only); prefix: put before every logged key; sync_dist: sum
    over the ranks when torch.distributed is initialised.

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
        optimizer_index: int = 0,
        logger: Any = None,
        prefix: str = "fastdiag/",
        sync_dist: bool = True,
    ) -> None:
        check_arguments(every, prefix, logger, diagnostics, group)
        if attention_names not in ("qualified", "index"):
            raise ValueError(f"attention_names must be 'qualified' or 'index', got {attention_names!r}")
        if isinstance(optimizer_index, bool) or not isinstance(optimizer_index, int) or optimizer_index < 0:
            raise ValueError(f"optimizer_index must be a non-negative int, got {optimizer_index!r}")
        self.every = every
        self.prefix = prefix
        self.logger = logger
        self.sync_dist = bool(sync_dist)
        self.optimizer_index = optimizer_index
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
        self._global_step = -1  # trainer.global_step at the last batch end

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._detach()
        optimizers = list(trainer.optimizers)
        if optimizers and self.optimizer_index >= len(optimizers):
            raise ValueError(
                f"optimizer_index {self.optimizer_index} is out of range: the trainer has {len(optimizers)} optimizer(s)"
            )
        optimizer = optimizers[self.optimizer_index] if optimizers else None
        self.watch = watch(
            pl_module,
            optimizer=optimizer,
            diagnostics=self._diagnostics if self._diagnostics is not None else TrainingDiagnostics(),
            gradients_at="manual",
            **self._watch_kwargs,
        )
        self._logged_step = 0
        self._global_step = trainer.global_step

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if self.watch is not None:
            self.watch.record_gradients()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        w = self.watch
        if w is None or trainer.global_step == self._global_step:  # accumulating: no step yet
            return
        self._global_step = trainer.global_step
        w._grads_read_at = -1  # a step the AMP scaler skipped must not keep the next one unread
        every_n = trainer.log_every_n_steps
        if not every_n or not (trainer.global_step % every_n == 0 or trainer.should_stop):
            return
        if not sampled_between(self._logged_step, w.step, self.every):
            return
        stats = w.get_epoch_stats(sync_dist=self.sync_dist and distributed())
        w.reset()
        self._logged_step = w.step
        self.last_stats = stats
        if stats:
            pl_module.log_dict(
                {f"{self.prefix}{k}": v for k, v in stats.items()},
                on_step=True,
                on_epoch=False,
                prog_bar=False,
                logger=True,
            )
        if self.logger is not None and trainer.is_global_zero:
            self.logger.log(stats, trainer.global_step)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._detach()

    def _detach(self) -> None:
        if self.watch is not None:
            self.watch.remove()
