"""fastdiag.integrations.lightning.FastdiagCallback in a real Lightning Trainer (CPU, tiny model,
CSVLogger), and watch() with Lightning's wrapped optimizer."""

from __future__ import annotations

import csv
import warnings

import pytest
import torch
from torch import nn

pl = pytest.importorskip("lightning.pytorch")

from lightning.pytorch.loggers import CSVLogger  # noqa: E402

import fastdiag  # noqa: E402
from fastdiag.diagnostics.training import TrainingDiagnostics  # noqa: E402
from fastdiag.integrations.lightning import FastdiagCallback  # noqa: E402

D, HEADS, SEQ, VOCAB = 16, 2, 8, 32


class CountingDiagnostics(TrainingDiagnostics):
    def __init__(self) -> None:
        super().__init__()
        self.attention_updates = 0

    def update_attention(self, *args, **kwargs):
        self.attention_updates += 1
        return super().update_attention(*args, **kwargs)


class TinyLM(pl.LightningModule):
    """Embedding, one nn.TransformerEncoderLayer (nn.MultiheadAttention), a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D)
        self.block = nn.TransformerEncoderLayer(D, HEADS, 32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(D, VOCAB)
        self.norms: list[float] = []  # the accumulated gradient's norm before clipping, per step

    def forward(self, ids):
        return self.head(self.block(self.emb(ids)))

    def _loss(self, ids):
        return nn.functional.cross_entropy(self(ids).flatten(0, 1), ids.flatten())

    def training_step(self, batch, batch_idx):
        return self._loss(batch[0])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._loss(batch[0]))

    def on_before_optimizer_step(self, optimizer):  # after the callbacks' hook, before clipping
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        self.norms.append(float(torch.nn.utils.get_total_norm(grads)))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def _loader(n: int, seed: int):
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(seed))
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=2)


def test_lightning_trainer_logs_reach_the_csv_logger_before_clipping_without_val_leakage(tmp_path):
    torch.manual_seed(0)
    module = TinyLM()
    diag = CountingDiagnostics()
    cb = FastdiagCallback(diagnostics=diag)
    counts: list[int] = []

    class Counter(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if (batch_idx + 1) % 2 == 0:  # an optimizer step ended
                counts.append(diag.attention_updates)
                diag.attention_updates = 0

    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=3,
        accumulate_grad_batches=2,
        gradient_clip_val=1e-3,
        log_every_n_steps=1,
        val_check_interval=2,  # validation inside the epoch, between training batches
        limit_val_batches=2,
        num_sanity_val_steps=1,
        logger=CSVLogger(str(tmp_path), name="run"),
        callbacks=[cb, Counter()],
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, _loader(16, 0), _loader(8, 1))
    assert trainer.global_step == 3

    with open(trainer.logger.log_dir + "/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    key = "fastdiag/grad_norm_total"
    logged = [float(r[key]) for r in rows if r.get(key)]
    assert len(logged) == 3
    assert any(r.get("fastdiag/attention_entropy/block.self_attn") for r in rows)
    assert any(r.get("val_loss") for r in rows)
    # the accumulated gradient before clipping (clipping to 1e-3 happened after it)
    assert logged == pytest.approx(module.norms, rel=1e-5)
    assert min(logged) > 1e-3
    # one layer, one attention update per training batch: validation and the sanity check add none
    assert counts == [2, 2, 2]
    assert not cb.watch._handles  # detached at train end


def test_invalid_arguments():
    with pytest.raises(ValueError, match="every"):
        FastdiagCallback(every=0)
    with pytest.raises(ValueError, match="optimizer_index"):
        FastdiagCallback(optimizer_index=-1)
    with pytest.raises(TypeError, match="prefix"):
        FastdiagCallback(prefix=None)


def test_watch_unwraps_lightning_optimizer_with_the_same_stats():
    from lightning.pytorch.core.optimizer import LightningOptimizer

    def run(wrap: bool) -> dict[str, float]:
        torch.manual_seed(0)
        model = TinyLM()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        handle = LightningOptimizer(opt) if wrap else opt
        ids = next(iter(_loader(4, 2)))[0]
        with fastdiag.watch(model, optimizer=handle) as w:
            assert w._optimizer is opt
            for _ in range(2):
                model._loss(ids).backward()
                opt.step()
                opt.zero_grad()
            return w.get_epoch_stats()

    bare, wrapped = run(False), run(True)
    assert bare.keys() == wrapped.keys() and bare == wrapped
