"""``fastdiag demo``: train the two tiny LMs with the drop-in diagnostics on every step.

Each model is one run of ``<out>/demo.db``: per step the loss and the total gradient norm
(logged as 0-d tensors: no host sync in the loop), per epoch the diagnostics' epoch values
plus train / validation loss and the top-1 rules' chance companions
(``baseline/attention_top1_mean_chance`` = H_N / N for the causal rows of N tokens,
``ausa/router_confidence_mean_chance`` = 1 / S for S sets; see ``fastdiag.schema``). At the end: the health verdicts of each run, the
baseline-vs-set-routing comparison table, ``<out>/demo_report.html``, and each trained model
as a checkpoint directory, ``<out>/checkpoints/baseline/`` and ``<out>/checkpoints/set-routing/``
(``fastdiag_demo.json``: model class and constructor arguments; ``model.pt``: the state dict,
loadable with ``torch.load(weights_only=True)``; see ``fastdiag.demo.checkpoint``), which
``fastdiag validate <out>/checkpoints/baseline`` reads.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any, TextIO

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdiag import backends
from fastdiag.demo.checkpoint import save_checkpoint
from fastdiag.demo.models import BaselineLM, SetRoutingLM
from fastdiag.diagnostics import BaselineAttentionDiagnostics, SetDiagnostics
from fastdiag.report import format_comparison, format_verdicts, write_html
from fastdiag.schema import CHANCE_SUFFIX, Verdict, causal_top1_chance, verdicts
from fastdiag.store import MetricsLogger

BASELINE_RUN = "baseline"
SET_RUN = "set-routing"


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of one demo (``QUICK`` for CI, ``FULL`` for the README's main job)."""

    epochs: int = 8
    steps_per_epoch: int = 40
    batch: int = 16
    context: int = 64
    dim: int = 64
    heads: int = 4
    layers: int = 2
    num_sets: int = 16
    top_k: int = 2
    lr: float = 3e-3
    val_batches: int = 4
    seed: int = 0


FULL = DemoConfig()
QUICK = replace(FULL, epochs=3, steps_per_epoch=12, batch=8, context=48, val_batches=2)


@dataclass
class DemoResult:
    """Where the demo wrote (database, report, one checkpoint directory per run), each run's
    last epoch stats, verdicts and history."""

    db: Path
    report: Path
    checkpoints: dict[str, Path] = field(default_factory=dict)
    stats: dict[str, dict[str, float]] = field(default_factory=dict)
    history: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    verdicts: dict[str, list[Verdict]] = field(default_factory=dict)
    seconds: float = 0.0


def load_corpus() -> str:
    """The demo corpus shipped with the package (plain English prose)."""
    return resources.files("fastdiag.demo").joinpath("corpus.txt").read_text(encoding="utf-8")


class CharData:
    """Character-level token ids of the corpus, split 90 / 10 into train / validation."""

    def __init__(self, text: str, device: torch.device) -> None:
        self.chars = sorted(set(text))
        lookup = {c: i for i, c in enumerate(self.chars)}
        ids = torch.tensor([lookup[c] for c in text], dtype=torch.long)
        cut = int(0.9 * len(ids))
        self.splits = {"train": ids[:cut], "val": ids[cut:]}
        self.device = device

    @property
    def vocab(self) -> int:
        return len(self.chars)

    def batch(
        self, split: str, size: int, context: int, generator: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        """Random windows: inputs and next-character targets, int64 [size, context]."""
        data = self.splits[split]
        starts = torch.randint(0, len(data) - context - 1, (size,), generator=generator)
        window = data[starts[:, None] + torch.arange(context + 1)]
        window = window.to(self.device, non_blocking=True)
        return window[:, :-1], window[:, 1:]


class ProgressBar:
    """One line per epoch: redrawn in place on a terminal, printed once when piped."""

    def __init__(self, label: str, total: int, stream: TextIO, width: int = 24) -> None:
        self.label, self.total, self.stream, self.width = label, total, stream, width
        self.live = hasattr(stream, "isatty") and stream.isatty()
        self.start = time.perf_counter()

    def _line(self, done: int, note: str) -> str:
        filled = self.width * done // self.total
        bar = "#" * filled + "." * (self.width - filled)
        elapsed = time.perf_counter() - self.start
        return f"{self.label} [{bar}] {done}/{self.total} {elapsed:5.1f}s {note}".rstrip()

    def update(self, done: int) -> None:
        if self.live:
            self.stream.write("\r" + self._line(done, ""))
            self.stream.flush()

    def finish(self, note: str) -> None:
        self.stream.write(("\r" if self.live else "") + self._line(self.total, note) + "\n")
        self.stream.flush()


@torch.no_grad()
def evaluate(
    model: nn.Module, data: CharData, cfg: DemoConfig, generator: torch.Generator
) -> float:
    """Mean validation cross-entropy (nats per character) over ``cfg.val_batches`` batches."""
    model.eval()
    total = torch.zeros((), device=data.device)
    for _ in range(cfg.val_batches):
        x, y = data.batch("val", cfg.batch, cfg.context, generator)
        total += F.cross_entropy(model(x).logits.flatten(0, 1), y.flatten())
    model.train()
    return float(total / cfg.val_batches)  # host ok: once per epoch


def train_run(
    run: str,
    model: nn.Module,
    diagnostics: Any,
    observe: Callable[[Any, Tensor], None],
    data: CharData,
    cfg: DemoConfig,
    logger: MetricsLogger,
    stream: TextIO,
    companions: Mapping[str, float] | None = None,
) -> list[dict[str, float]]:
    """Train ``model`` for ``cfg.epochs``; ``observe(output, ids)`` feeds the diagnostics after
    each backward (gradients of this step present). ``companions``: constant keys logged with
    each epoch's stats (the top-1 rules' ``_chance`` keys). Returns the epoch stats, oldest
    first."""
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    val_generator = torch.Generator().manual_seed(cfg.seed + 2)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    total = cfg.epochs * cfg.steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(  # cosine decay to a tenth of the peak
        optimizer, lambda i: 0.1 + 0.45 * (1.0 + math.cos(math.pi * min(i, total) / total))
    )
    epochs: list[dict[str, float]] = []
    step = 0
    for epoch in range(cfg.epochs):
        bar = ProgressBar(f"{run:<12} epoch {epoch + 1}/{cfg.epochs}", cfg.steps_per_epoch, stream)
        loss_sum = torch.zeros((), device=data.device)
        for index in range(cfg.steps_per_epoch):
            x, y = data.batch("train", cfg.batch, cfg.context, generator)
            output = model(x)
            loss = F.cross_entropy(output.logits.flatten(0, 1), y.flatten())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            observe(output, x)  # before clipping: the raw learning signal
            grad_norm = nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            lr = schedule.get_last_lr()[0]
            schedule.step()
            step += 1
            loss_sum += loss.detach()
            logger.log(
                {"train/loss": loss.detach(), "train/grad_norm_total": grad_norm, "train/lr": lr},
                step,
            )
            bar.update(index + 1)
        stats = diagnostics.get_epoch_stats()
        diagnostics.reset()
        train_loss = float(loss_sum / cfg.steps_per_epoch)  # host ok: once per epoch
        val_loss = evaluate(model, data, cfg, val_generator)
        record = dict(stats)
        record.update(companions or {})
        record.update(
            {
                "epoch": float(epoch + 1),
                "train/loss_epoch": train_loss,
                "val/loss": val_loss,
                "val/ppl": math.exp(val_loss),
            }
        )
        logger.log(record, step)
        epochs.append(record)
        bar.finish(f"loss {train_loss:.3f}  val {val_loss:.3f}")
    return epochs


def _remove_db(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def run_demo(
    out: str | Path = "runs",
    *,
    quick: bool = False,
    device: str = "cpu",
    break_router: bool = False,
    stream: TextIO | None = None,
    config: DemoConfig | None = None,
    threads: int | None = 1,
) -> DemoResult:
    """Train both models, log to ``<out>/demo.db``, print the verdicts and the comparison
    table to ``stream`` (stdout), write ``<out>/demo_report.html`` and the checkpoints
    ``<out>/checkpoints/<run>/`` (run: ``baseline``, ``set-routing``); returns what it wrote.

    ``config`` overrides the sizes chosen by ``quick`` (``QUICK`` or ``FULL``). ``threads``:
    torch intra-op threads while the demo runs on CPU (restored after; None keeps the
    setting). One is the default: these models are too small to gain from more, and several
    threads on a busy machine are many times slower.
    """
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but torch.cuda.is_available() is False")
    previous = torch.get_num_threads()
    if dev.type == "cpu" and threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run_demo(Path(out), quick, dev, break_router, stream or sys.stdout, config)
    finally:
        torch.set_num_threads(previous)


def _run_demo(
    out: Path,
    quick: bool,
    dev: torch.device,
    break_router: bool,
    stream: TextIO,
    config: DemoConfig | None,
) -> DemoResult:
    started = time.perf_counter()
    cfg = config or (QUICK if quick else FULL)
    size = {QUICK: "quick", FULL: "full"}.get(cfg, "custom")
    out.mkdir(parents=True, exist_ok=True)
    db = out / "demo.db"
    _remove_db(db)  # each demo starts a fresh database
    data = CharData(load_corpus(), dev)
    set_cls, baseline_cls = SetDiagnostics, BaselineAttentionDiagnostics
    stream.write(
        f"fastdiag demo ({size} size): {len(data.splits['train'])} training "
        f"characters, vocab {data.vocab}, {cfg.epochs} epochs x {cfg.steps_per_epoch} steps, "
        f"device {dev}, backend {backends.get_backend()}"
        + (", router frozen" if break_router else "")
        + "\n"
    )
    result = DemoResult(db=db, report=out / "demo_report.html")
    base_config = {**asdict(cfg), "device": str(dev), "quick": quick, "vocab": data.vocab}

    torch.manual_seed(cfg.seed)
    baseline = BaselineLM(data.vocab, cfg.dim, cfg.heads, cfg.layers, cfg.context).to(dev)
    baseline_diag = baseline_cls()
    attention_params = baseline.attention_params()
    value_generator = torch.Generator(device=dev).manual_seed(cfg.seed)

    def observe_baseline(output: Any, ids: Tensor) -> None:
        baseline_diag.update(
            output.attention, attention_params, output.values, generator=value_generator
        )

    with MetricsLogger(db, run=BASELINE_RUN, config={**base_config, "model": "BaselineLM"}) as log:
        # top-1 of uniform causal attention over the same rows: what "uncertain" is measured against
        chance = {f"baseline/attention_top1_mean{CHANCE_SUFFIX}": causal_top1_chance(cfg.context)}
        result.history[BASELINE_RUN] = train_run(
            BASELINE_RUN, baseline, baseline_diag, observe_baseline, data, cfg, log, stream, chance
        )
    result.checkpoints[BASELINE_RUN] = save_checkpoint(
        baseline,
        out / "checkpoints" / BASELINE_RUN,
        {
            "vocab": data.vocab,
            "dim": cfg.dim,
            "heads": cfg.heads,
            "layers": cfg.layers,
            "context": cfg.context,
        },  # fmt: skip
        data.chars,
    )

    torch.manual_seed(cfg.seed)
    model = SetRoutingLM(data.vocab, cfg.dim, cfg.num_sets, cfg.top_k, cfg.layers, cfg.context)
    model = model.to(dev)
    if break_router:
        model.router.requires_grad_(False)
    set_diag = set_cls()
    router_params = dict(model.router.named_parameters())
    cosine_generator = torch.Generator(device=dev).manual_seed(cfg.seed)

    def observe_set(output: Any, ids: Tensor) -> None:
        set_diag.update_with_router_state(
            output.bank_indices,
            cfg.num_sets,
            router_probs=output.router_probs.detach(),
            set_embeddings=output.set_embeddings.detach(),
            router_params=router_params,
            set_attention_weights=output.set_attention.detach(),
            token_ids=ids,
            generator=cosine_generator,
        )

    set_config = {**base_config, "model": "SetRoutingLM", "break_router": break_router}
    with MetricsLogger(db, run=SET_RUN, config=set_config) as log:
        chance = {f"ausa/router_confidence_mean{CHANCE_SUFFIX}": 1.0 / cfg.num_sets}
        result.history[SET_RUN] = train_run(
            SET_RUN, model, set_diag, observe_set, data, cfg, log, stream, chance
        )
    result.checkpoints[SET_RUN] = save_checkpoint(
        model,
        out / "checkpoints" / SET_RUN,
        {
            "vocab": data.vocab,
            "dim": cfg.dim,
            "num_sets": cfg.num_sets,
            "top_k": cfg.top_k,
            "layers": cfg.layers,
            "context": cfg.context,
        },  # fmt: skip
        data.chars,
    )

    for run, epochs in result.history.items():
        result.stats[run] = epochs[-1]
        result.verdicts[run] = verdicts(epochs[-1], epochs[:-1])
    stream.write("\nHealth verdicts (last epoch):\n")
    stream.write(format_verdicts(result.verdicts) + "\n")
    stream.write("\nBaseline vs set routing (last epoch):\n")
    stream.write(format_comparison(result.stats[BASELINE_RUN], result.stats[SET_RUN]) + "\n")
    write_html(db, result.report, title="fastdiag demo: baseline vs set routing")
    result.seconds = time.perf_counter() - started
    stream.write(f"\nmetrics: {db}\nreport:  {result.report}\n")
    stream.write(f"checkpoints: {out / 'checkpoints'} (fastdiag validate "
                 f"{result.checkpoints[BASELINE_RUN]})\n({result.seconds:.1f}s)\n")  # fmt: skip
    stream.flush()
    return result
