"""fastdiag.integrations.hf.FastdiagCallback in a real transformers.Trainer (CPU, tiny GPT-2),
and watch() with accelerate's wrapped optimizer."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
accelerate = pytest.importorskip("accelerate")

from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

import fastdiag  # noqa: E402
from fastdiag.diagnostics.training import TrainingDiagnostics  # noqa: E402
from fastdiag.integrations.hf import FastdiagCallback  # noqa: E402
from tests.conftest import forbid_host_sync  # noqa: E402

CONFIG = dict(n_layer=2, n_head=2, n_embd=32, vocab_size=64, n_positions=32)
SEQ, N_SEQ = 16, 16


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """The Trainer's Accelerator and accelerate's singletons: every test starts from none."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    yield
    GradientState._reset_state()
    AcceleratorState._reset_state(True)
    PartialState._reset_state()


class CountingDiagnostics(TrainingDiagnostics):
    """Counts the attention updates (one per layer and sampled training forward)."""

    def __init__(self) -> None:
        super().__init__()
        self.attention_updates = 0

    def update_attention(self, *args, **kwargs):
        self.attention_updates += 1
        return super().update_attention(*args, **kwargs)

    def update_attention_qk(self, *args, **kwargs):
        self.attention_updates += 1
        return super().update_attention_qk(*args, **kwargs)


class Recorder(TrainerCallback):
    """A callback given *before* FastdiagCallback, standing for a report_to integration: what
    its on_log sees, and the attention updates of each logging window."""

    def __init__(self, diagnostics: CountingDiagnostics | None = None) -> None:
        self.seen: list[dict] = []
        self.windows: list[int] = []
        self.diagnostics = diagnostics

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.seen.append(dict(logs))
        if self.diagnostics is not None and "loss" in logs:
            self.windows.append(self.diagnostics.attention_updates)
            self.diagnostics.attention_updates = 0


def _dataset() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, CONFIG["vocab_size"], (N_SEQ, SEQ), generator=g)
    return [{"input_ids": row, "labels": row.clone(), "attention_mask": torch.ones(SEQ, dtype=torch.long)} for row in ids]


def _trainer(tmp_path, callbacks, *, max_grad_norm=0.1, logging_steps=1, every=1):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**CONFIG))
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=2,
        per_device_eval_batch_size=4,
        gradient_accumulation_steps=2,
        logging_steps=logging_steps,
        eval_strategy="steps",
        eval_steps=2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        max_grad_norm=max_grad_norm,
        learning_rate=1e-3,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    data = _dataset()
    return Trainer(model=model, args=args, train_dataset=data, eval_dataset=data[:8], callbacks=callbacks)


def _train(trainer):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()


def test_trainer_logs_reach_log_history_and_earlier_callbacks_without_eval_leakage(tmp_path):
    diag = CountingDiagnostics()
    recorder = Recorder(diag)
    cb = FastdiagCallback(diagnostics=diag)
    trainer = _trainer(tmp_path, [recorder, cb])
    _train(trainer)

    train_logs = [e for e in trainer.state.log_history if "loss" in e]
    eval_logs = [e for e in trainer.state.log_history if "eval_loss" in e]
    assert [e["step"] for e in train_logs] == [1, 2, 3, 4]
    assert len(eval_logs) == 2
    for entry in train_logs:
        assert "fastdiag/grad_norm_total" in entry
        assert "fastdiag/attention_entropy/transformer.h.0.attn" in entry
        assert any(k.startswith("fastdiag/update_ratio/") for k in entry)
        assert all(math.isfinite(v) for k, v in entry.items() if k.startswith("fastdiag/grad_norm"))
    for entry in eval_logs:
        assert not any(k.startswith("fastdiag/") for k in entry)

    # the callback put itself before the recorder (a stand-in for report_to integrations)
    seen_train = [s for s in recorder.seen if "loss" in s]
    assert all("fastdiag/grad_norm_total" in s for s in seen_train)
    # per logging window (1 step, 2 micro-batches, 2 layers): training forwards only, although
    # evaluation (8 sequences, 2 forwards) ran after the logs of steps 2 and 4
    assert recorder.windows == [4, 4, 4, 4]
    # detached at train end: no hooks left
    assert cb.watch is not None and not cb.watch._handles
    assert "clip_grad_norm_" not in vars(trainer.accelerator)  # the accelerator's own method again


def test_grad_norm_total_is_the_trainers_pre_clipping_grad_norm(tmp_path):
    cb = FastdiagCallback()
    trainer = _trainer(tmp_path, [cb], max_grad_norm=0.1)
    _train(trainer)
    train_logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(train_logs) == 4
    for entry in train_logs:
        assert entry["grad_norm"] > 0.1  # clipping happened: the post-clip norm would be 0.1
        assert entry["fastdiag/grad_norm_total"] == pytest.approx(entry["grad_norm"], rel=1e-5)


def test_clipping_off_every_k_and_metrics_logger(tmp_path):
    log = fastdiag.MetricsLogger(str(tmp_path / "runs.db"), run="hf")
    cb = FastdiagCallback(every=2, logger=log, prefix="fd.")
    trainer = _trainer(tmp_path, [cb], max_grad_norm=0.0, logging_steps=1)
    _train(trainer)
    log.close()
    train_logs = [e for e in trainer.state.log_history if "loss" in e]
    # steps 1 and 3 (optimizer steps 0 and 2) are sampled: their logs carry the values
    with_keys = [e["step"] for e in train_logs if "fd.grad_norm_total" in e]
    assert with_keys == [1, 3]
    for e in train_logs:
        if "fd.grad_norm_total" in e:
            assert e["fd.grad_norm_total"] == pytest.approx(e["grad_norm"], rel=1e-5)
    from fastdiag.store.database import load_metrics

    series = load_metrics(tmp_path / "runs.db", ["hf"], ["grad_norm_total"])["hf"]["grad_norm_total"]
    assert series.steps.tolist() == [1, 3]  # the MetricsLogger gets the keys without the prefix
    by_step = {e["step"]: e["fd.grad_norm_total"] for e in train_logs if "fd.grad_norm_total" in e}
    assert series.values.tolist() == pytest.approx([by_step[1], by_step[3]], rel=1e-12)


def test_outside_a_trainer_warns_reads_at_pre_optimizer_step_and_never_syncs_per_step():
    from transformers import TrainerControl, TrainerState

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**CONFIG))
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)  # (CPU Adam reads its step count with .item())
    cb = FastdiagCallback(every=1)
    state, control = TrainerState(), TrainerControl()
    with pytest.warns(UserWarning, match="not called by a transformers.Trainer"):
        cb.on_train_begin(None, state, control, model=model, optimizer=opt)
    ids = torch.randint(0, 64, (2, SEQ), generator=torch.Generator().manual_seed(1))
    with forbid_host_sync():  # the per-step path: hooks, the gradient read, the step hooks
        model(input_ids=ids, labels=ids).loss.backward()
        cb.on_pre_optimizer_step(None, state, control)
        opt.step()
        opt.zero_grad()
    expected = cb.watch.diagnostics.get_epoch_stats()["grad_norm_total"]
    state.global_step = 1
    logs = {"loss": 1.0}
    state.log_history.append({**logs, "step": 1})
    cb.on_log(None, state, control, logs=logs)
    assert logs["fastdiag/grad_norm_total"] == expected
    assert state.log_history[-1]["fastdiag/grad_norm_total"] == expected
    # an evaluation log is left alone
    eval_logs = {"eval_loss": 1.0}
    cb.on_log(None, state, control, logs=eval_logs)
    assert eval_logs == {"eval_loss": 1.0}
    cb.on_train_end(None, state, control)
    assert not cb.watch._handles


def test_invalid_arguments():
    with pytest.raises(ValueError, match="every"):
        FastdiagCallback(every=0)
    with pytest.raises(TypeError, match="prefix"):
        FastdiagCallback(prefix=1)
    with pytest.raises(TypeError, match="logger"):
        FastdiagCallback(logger=object())
    with pytest.raises(TypeError, match="diagnostics"):
        FastdiagCallback(diagnostics={})
    with pytest.raises(ValueError, match="attention_names"):
        FastdiagCallback(attention_names="x")


def test_watch_accepts_accelerates_wrapped_optimizer_with_the_same_stats():
    from accelerate import Accelerator

    def run(wrap: bool) -> dict[str, float]:
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(**CONFIG))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        if wrap:
            accelerator = Accelerator(cpu=True)
            model, opt = accelerator.prepare(model, opt)
            assert type(opt).__name__ == "AcceleratedOptimizer"
        ids = torch.randint(0, 64, (2, SEQ), generator=torch.Generator().manual_seed(1))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with fastdiag.watch(model, optimizer=opt) as w:
                for _ in range(2):
                    model(input_ids=ids, labels=ids).loss.backward()
                    opt.step()
                    opt.zero_grad()
                return w.get_epoch_stats()

    bare, wrapped = run(False), run(True)
    assert bare.keys() == wrapped.keys()
    assert any(k.startswith("update_ratio/") for k in bare)
    for k in bare:
        assert wrapped[k] == pytest.approx(bare[k], rel=1e-6, nan_ok=True), k


def test_watch_rejects_an_object_without_step_hooks():
    model = torch.nn.Linear(2, 2)

    class Wrapper:
        def __init__(self, inner):
            self.optimizer = inner

    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        fastdiag.watch(model, optimizer=Wrapper(object()), attention=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    w = fastdiag.watch(model, optimizer=Wrapper(Wrapper(opt)), attention=False)
    assert w._optimizer is opt
    w.remove()
