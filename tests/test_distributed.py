"""Multi-process reduction: two gloo ranks with different shards equal one process fed everything."""

from __future__ import annotations

import datetime
import math
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from fastdiag.accumulator import Accumulator
from fastdiag.distributed import all_reduce_named
from fastdiag.training import TrainingDiagnostics, watch

WORLD = 2
SHARDS = {0: [0, 1, 2], 1: [3, 4]}  # different shards, different numbers of updates
ALL = [0, 1, 2, 3, 4]
NON_SUM_KEYS = ("jaccard", "weight_change")  # per-rank state (documented), not sums


# ----------------------------------------------------------------------------------------------
# Deterministic batches, the same in every process
# ----------------------------------------------------------------------------------------------


def attention_batch(i: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + i)
    return torch.softmax(3 * torch.randn(2, 3, 5, 7, generator=g), dim=-1)


def gradient_batch(i: int) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(200 + i)
    named = []
    for name, shape in (("enc.weight", (4, 3)), ("enc.bias", (4,)), ("head.weight", (2, 4))):
        p = nn.Parameter(torch.randn(shape, generator=g))
        if not (name == "head.weight" and i % 2):  # sometimes no gradient: skipped
            p.grad = torch.randn(shape, generator=g)
        named.append((name, p))
    return named


def feed_training(diag: TrainingDiagnostics, batches: list[int]) -> None:
    for i in batches:
        a = attention_batch(i)
        diag.update_attention("layers.0.attn", a)
        diag.update_attention("layers.1.attn", a[:, 0])  # one head [B, N, Nk]
        diag.update_gradients(gradient_batch(i), group="parameter")
        diag.update_probe("memory_read_norm/layers.0", a.square().sum().sqrt())


def baseline_class():
    try:
        import fastdiag

        return fastdiag.BaselineAttentionDiagnostics
    except (ImportError, AttributeError):
        return None


def feed_baseline(diag, batches: list[int]) -> None:
    for i in batches:
        diag.update(attention_batch(i))


# ----------------------------------------------------------------------------------------------
# The worker (one per rank)
# ----------------------------------------------------------------------------------------------


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        out: dict = {}
        diag = TrainingDiagnostics()
        feed_training(diag, SHARDS[rank])
        out["local"] = diag.get_epoch_stats()
        out["training"] = diag.get_epoch_stats(sync_dist=True)
        group = dist.new_group(list(range(WORLD)))
        out["training_group"] = diag.compute(process_group=group)

        # names registered in a different order, names one rank lacks, a rank with no state
        acc = Accumulator()
        if rank == 0:
            acc.add({"a": torch.tensor(1.0), "b": torch.tensor(2.0)})
        else:
            acc.add({"c": torch.tensor(5.0), "a": torch.tensor(3.0)})
        out["union"] = acc.compute(sync_dist=True)
        lonely = Accumulator()
        if rank == 0:
            lonely.add({"z": torch.tensor(4.0)})
            lonely.add({"z": torch.tensor(6.0)})
        out["lonely"] = lonely.compute(sync_dist=True)
        out["empty"] = Accumulator().compute(sync_dist=True)

        cls = baseline_class()
        if cls is not None:
            base = cls()
            feed_baseline(base, SHARDS[rank])
            out["baseline"] = base.get_epoch_stats(sync_dist=True)

        # watch() on a DDP model: same steps on every rank, different data
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        model = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
        handle = watch(ddp, optimizer=opt)
        g = torch.Generator().manual_seed(300 + rank)
        for _ in range(2):
            loss = ddp(torch.randn(2, 5, 8, generator=g)).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        local = handle.get_epoch_stats()
        gathered: list = [None] * WORLD
        dist.all_gather_object(gathered, local)
        out["ddp_locals"] = gathered
        out["ddp_synced"] = handle.get_epoch_stats(sync_dist=True)
        handle.remove()
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks():
    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as mp_env:
        mp_env.setenv("FASTDIAG_BACKEND", "torch")  # no C++ build in the children
        mp_env.setenv("OMP_NUM_THREADS", "1")
        mp.spawn(_worker, args=(os.path.join(tmp, "init"), tmp), nprocs=WORLD, join=True)
        yield [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(WORLD)]


def assert_same(got: dict, expect: dict, rel: float = 1e-9) -> None:
    assert sorted(got) == sorted(expect)
    for k, v in expect.items():
        assert got[k] == pytest.approx(v, rel=rel, abs=1e-12, nan_ok=True), k


# ----------------------------------------------------------------------------------------------
# Multi-process tests
# ----------------------------------------------------------------------------------------------


@pytest.mark.distributed
def test_synced_training_stats_equal_one_process_fed_everything(ranks, backend):
    backend("torch")
    single = TrainingDiagnostics()
    feed_training(single, ALL)
    expect = single.get_epoch_stats()
    assert "grad_norm/head.weight" in expect and "update_ratio/enc.weight" not in expect
    for r in ranks:
        assert_same(r["training"], expect)
        assert_same(r["training_group"], expect)
    # the shards really differ: a rank's own means are not the global ones
    assert ranks[0]["local"]["attention_entropy/layers.0.attn"] != pytest.approx(
        expect["attention_entropy/layers.0.attn"], rel=1e-6
    )


@pytest.mark.distributed
def test_ranks_with_different_or_no_names(ranks):
    for r in ranks:
        assert r["union"] == {"a": 2.0, "b": 2.0, "c": 5.0}
        assert r["lonely"] == {"z": 5.0}
        assert r["empty"] == {}


@pytest.mark.distributed
def test_baseline_attention_diagnostics_sync(ranks, backend):
    cls = baseline_class()
    if cls is None or "baseline" not in ranks[0]:
        pytest.skip("fastdiag.BaselineAttentionDiagnostics is not available yet")
    backend("torch")
    single = cls()
    feed_baseline(single, ALL)
    expect = {k: v for k, v in single.get_epoch_stats().items() if not any(s in k for s in NON_SUM_KEYS)}
    assert "baseline/attention_entropy_mean" in expect and "baseline/attention_sparsity" in expect
    for r in ranks:
        got = {k: v for k, v in r["baseline"].items() if k in expect}
        assert_same(got, expect)


@pytest.mark.distributed
def test_watch_on_ddp_model(ranks):
    local0, local1 = ranks[0]["ddp_locals"]
    synced = ranks[0]["ddp_synced"]
    assert synced == ranks[1]["ddp_synced"]
    assert "attention_entropy/layers.0.self_attn" in synced  # DDP's "module." prefix dropped
    assert not any("module." in k for k in synced)
    for k, v in synced.items():
        if k.startswith("attention_"):  # different data per rank, same number of updates
            assert v == pytest.approx((local0[k] + local1[k]) / 2, rel=1e-9), k
        elif k.startswith("grad_norm"):  # DDP averaged the gradients: every rank saw the same
            assert local0[k] == pytest.approx(local1[k], rel=1e-6) and v == pytest.approx(local0[k], rel=1e-6)
    assert local0["attention_entropy/layers.0.self_attn"] != pytest.approx(
        local1["attention_entropy/layers.0.self_attn"], rel=1e-6
    )


# ----------------------------------------------------------------------------------------------
# Single process
# ----------------------------------------------------------------------------------------------


def test_all_reduce_named_is_a_noop_without_a_process_group():
    assert not dist.is_initialized()
    state = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    names, out = all_reduce_named(["x"], state)
    assert names == ["x"] and out is state
    assert all_reduce_named([], None) == ([], None)
    acc = Accumulator()
    acc.add({"x": torch.tensor(3.0)})
    assert acc.compute(sync_dist=True) == {"x": 3.0}


def test_all_reduce_named_checks_the_state_shape():
    with pytest.raises(ValueError, match=r"state must have shape \(2, C\)"):
        all_reduce_named(["a", "b"], torch.zeros(3, 2, dtype=torch.float64))


def test_nan_values_do_not_poison_the_sum():
    diag = TrainingDiagnostics()
    diag.update_probe("p", torch.tensor(float("nan")))
    diag.update_probe("p", torch.tensor(2.0))
    assert diag.get_epoch_stats() == {"p": 2.0}
    assert math.isnan(TrainingDiagnostics().get_epoch_stats().get("p", math.nan))
